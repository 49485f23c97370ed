"""Grow an exported graph of a few identical decoder layers to the model's full depth, node for node as torch.export
would have built it.

torch.export traces every decoder layer again: a 70B model's 80 layers take most of a capture's seconds, though
each layer after the first is the same code on the same shapes. `grow_layers` takes the export of a model with
`have` layers (the first, which HF's tracing makes different, and at least two that must repeat) and copies its
last layer up to `want`, with what export gives each copy: fx names and torch_fn counters advanced by the per-layer
stride seen between the last two exported layers, `layers.N` in placeholder names, HF names and module stacks, the
graph's name table (so the passes that add nodes later name them as they would on the full export). It checks
first that the last two exported layers are the same up to that renaming (ops, arguments, shapes, metadata, the
single tensor passed from layer to layer) and returns None otherwise, leaving the graph untouched: the caller then
exports the whole model.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import torch
from torch.fx import Graph, GraphModule, Node
from torch.utils._pytree import tree_map

_NAME = re.compile(r"^([a-zA-Z_][0-9a-zA-Z_]*?)(?:_(\d+))?$")  # torch.fx's: a base and an optional counter
_ARG = re.compile(r"^arg(\d+)_1$")  # export's names of the placeholders before it renames them


class _Mismatch(Exception):
    """The last two exported layers differ beyond the renaming: the model's layers do not repeat."""


def _split(name: str) -> tuple[str, int]:
    m = _NAME.match(name)
    if m is None or (m.group(2) is not None and (int(m.group(2)) == 0 or m.group(2).startswith("0"))):
        raise _Mismatch(name)
    return m.group(1), int(m.group(2) or 0)


def _join(base: str, n: int) -> str:
    return f"{base}_{n}" if n else base


_FN = re.compile(r"^(.+)_(\d+)$")  # torch_fn's names: the function's and its call count, from 0


def _split_fn(name: str) -> tuple[str, int]:
    m = _FN.match(name)
    if m is None:
        raise _Mismatch(name)
    return m.group(1), int(m.group(2))


def _join_fn(base: str, n: int) -> str:
    return f"{base}_{n}"


def _relayer(text: str, old: int, new: int) -> str:
    """`text` with its one `layers.<old>` (or `layers_<old>`) index replaced by `new`."""
    out, count = re.subn(rf"(?<=layers[._]){old}(?=[._]|$)", str(new), text)
    if count != 1:
        raise _Mismatch(text)
    return out


def _stack(stack: dict, old: int, new: int) -> dict:
    """An nn_module_stack with the decoder layer `old` renamed `new` (keys and paths that name it)."""
    pattern = re.compile(rf"(?<=layers\.){old}(?=\.|$)")
    return {pattern.sub(str(new), k): (pattern.sub(str(new), v[0]), *v[1:]) for k, v in stack.items()}


def _shape(value: Any) -> Any:
    """Metadata with every tensor as its shape, dtype and strides (fake tensors compare by identity)."""

    def sig(v):
        return ("tensor", str(v.shape), v.dtype, str(v.stride())) if isinstance(v, torch.Tensor) else v

    return str(tree_map(sig, value))


class _Strides:
    """Per-base counter strides (of fx names, or of torch_fn names): what one more layer adds to each counter."""

    def __init__(self, split=_split, join=_join, least: int = 1) -> None:
        self.of: dict[str, int] = {}
        self.split, self.join, self.least = split, join, least  # least: fx names are unique, torch_fn's may repeat

    def learn(self, before: str, after: str) -> None:
        (b0, n0), (b1, n1) = self.split(before), self.split(after)
        if b0 != b1 or n1 - n0 < self.least or self.of.setdefault(b0, n1 - n0) != n1 - n0:
            raise _Mismatch(f"{before} -> {after}")

    def shift(self, name: str, layers: int) -> str:
        base, n = self.split(name)
        return self.join(base, n + layers * self.of[base]) if base in self.of else name


def grow_layers(
    gm: GraphModule,
    param_names: dict[str, str],
    buffer_names: dict[str, str],
    have: int,
    want: int,
    layer_of: Callable[[Node], int | None],
) -> tuple[dict[str, str], dict[str, str]] | None:
    """Grow `gm` (an export of `have` decoder layers) in place to `want` layers; the placeholders' HF names of the
    grown graph, or None (graph untouched) where its last two layers do not repeat exactly."""
    try:
        plan = _Plan(gm.graph, param_names, buffer_names, have, layer_of)
    except _Mismatch:
        return None
    return plan.grow(want)


class _Plan:
    """The exported graph cut into prelude, per-layer placeholders, per-layer nodes and postlude, checked to repeat."""

    def __init__(self, graph: Graph, params: dict, buffers: dict, have: int, layer_of) -> None:
        if have < 3:
            raise _Mismatch("need the first layer and two more")
        self.graph, self.params, self.buffers, self.have = graph, params, buffers, have
        self.ph: list[list[Node]] = [[] for _ in range(have)]
        self.body: list[list[Node]] = [[] for _ in range(have)]
        runs: dict[bool, list[int | None]] = {True: [], False: []}  # the layer of each node in turn, repeats dropped
        for node in graph.nodes:
            k = layer_of(node)
            if k is not None and not 0 <= k < have:
                raise _Mismatch(node.name)
            if k is not None:
                (self.ph if node.op == "placeholder" else self.body)[k].append(node)
            run = runs[node.op == "placeholder"]
            if not run or run[-1] != k:
                run.append(k)
        for run in runs.values():  # placeholders and nodes: the layers' come in blocks 0, 1, ..., have - 1
            core = run[1:] if run and run[0] is None else run
            if (core[:-1] if core and core[-1] is None else core) != list(range(have)):
                raise _Mismatch("the layers are not contiguous")
        last = have - 1
        self.prev, self.tmpl = last - 1, last
        nodes = list(graph.nodes)
        self.post = nodes[nodes.index(self.body[last][-1]) + 1 :]
        self.layered = {n for group in (*self.ph, *self.body) for n in group}
        self.out = [self._output_of(k) for k in range(have)]
        self.names, self.fns = _Strides(), _Strides(_split_fn, _join_fn, least=0)
        self._check()

    def _output_of(self, k: int) -> Node:
        """The one node of layer k read outside it (the hidden state passed on)."""
        inside = set(self.body[k])
        outs = [n for n in self.body[k] if any(u not in inside for u in n.users)]
        if len(outs) != 1:
            raise _Mismatch(f"layer {k} passes on {len(outs)} tensors")
        return outs[0]

    def _check(self) -> None:
        p, t = self.prev, self.tmpl
        if len(self.ph[p]) != len(self.ph[t]) or len(self.body[p]) != len(self.body[t]):
            raise _Mismatch("layer sizes differ")
        if not all(u in set(self.body[t]) for u in self.out[p].users):
            raise _Mismatch("a layer's output is read beyond the next layer")
        post = set(self.post)
        if not all(u in post for u in self.out[t].users):
            raise _Mismatch("the last layer's output is read before the postlude")
        to_t: dict[Node, Node] = {self.out[p - 1]: self.out[p]}
        for a, b in zip(self.ph[p], self.ph[t]):
            if _relayer(a.name, p, t) != b.name or _relayer(self._hf(a), p, t) != self._hf(b) or a.args or b.args:
                raise _Mismatch(b.name)
            if _shape(a.meta.get("val")) != _shape(b.meta.get("val")):
                raise _Mismatch(b.name)
            to_t[a] = b
        to_t.update(zip(self.body[p], self.body[t]))
        for a, b in zip(self.body[p], self.body[t]):
            if (a.op, a.target, a.type) != (b.op, b.target, b.type) or set(a.meta) != set(b.meta):
                raise _Mismatch(b.name)
            self.names.learn(a.name, b.name)
            for key, value in a.meta.items():
                if key == "nn_module_stack":
                    same = _stack(value, p, t) == b.meta[key]
                elif key == "torch_fn":
                    self.fns.learn(value[0], b.meta[key][0])
                    same = value[1] == b.meta[key][1]
                else:
                    same = _shape(value) == _shape(b.meta[key])
                if not same:
                    raise _Mismatch(f"{b.name}: {key}")
            for x, y in ((a.args, b.args), (a.kwargs, b.kwargs)):
                if not _same_args(x, y, to_t, self.layered):
                    raise _Mismatch(f"{b.name}: arguments")
        for node in self.post:  # the postlude reads the last layer's output and nothing else of any layer
            for arg in node.all_input_nodes:
                if arg in self.layered and arg is not self.out[t]:
                    raise _Mismatch(f"{node.name} reads {arg.name}")
        self._check_name_table()

    def _hf(self, node: Node) -> str:
        return self.params.get(node.name) or self.buffers[node.name]

    def _check_name_table(self) -> None:
        """The graph's table of used names (export's placeholders before it renamed them, the nodes it made and
        dropped): per layer the same, or the copies and the nodes the passes add would be named differently."""
        self.used = set(self.graph._graph_namespace._used_names)
        placeholders = len(self.graph.find_nodes(op="placeholder"))
        args = {n for n in self.used if _ARG.match(n)}
        if args and args != {f"arg{i}_1" for i in range(placeholders)}:
            raise _Mismatch("placeholder names")
        self.args = bool(args)
        self.lo: dict[str, int] = {}  # base -> its first counter in the template layer
        for node in self.body[self.tmpl]:
            base, n = _split(node.name)
            self.lo.setdefault(base, n)
        self.ph_names = {n.name for n in self.ph[self.tmpl]}
        if {_relayer(n.name, self.prev, self.tmpl) for n in self.ph[self.prev] if n.name in self.used} != (
            self.ph_names & self.used
        ):
            raise _Mismatch("layer placeholder names")
        for name in self.used - args - self.ph_names:
            base, n = _split(name)
            if base in self.lo:
                s, lo = self.names.of[base], self.lo[base]
                if lo - s <= n < lo and _join(base, n + s) not in self.used:
                    raise _Mismatch(name)
                if lo <= n < lo + s and _join(base, n - s) not in self.used:
                    raise _Mismatch(name)

    # --- growing -------------------------------------------------------------------------------------------
    def grow(self, want: int) -> tuple[dict[str, str], dict[str, str]]:
        graph, ns, t, extra = self.graph, self.graph._graph_namespace, self.tmpl, want - self.have
        used, counts = self._names_after(want)
        ns._used_names = set()  # every name below is explicit and final; the table is set after
        at = self.ph[t][-1]
        new_ph: list[list[Node]] = []
        for k in range(self.have, want):
            row = []
            for src in self.ph[t]:
                name = _relayer(src.name, t, k)
                with graph.inserting_after(at):
                    at = graph.create_node("placeholder", name, name=name, type_expr=src.type)
                at.meta = dict(src.meta)
                row.append(at)
            new_ph.append(row)
        at, prev_out = self.body[t][-1], self.out[t]
        for i, k in enumerate(range(self.have, want)):
            env: dict[Node, Node] = dict(zip(self.ph[t], new_ph[i]))
            env[self.out[t - 1]] = prev_out
            for src in self.body[t]:
                args = torch.fx.node.map_arg(src.args, lambda a: env.get(a, a))
                kwargs = torch.fx.node.map_arg(src.kwargs, lambda a: env.get(a, a))
                with graph.inserting_after(at):
                    at = graph.create_node(
                        src.op, src.target, args, kwargs, name=self.names.shift(src.name, k - t), type_expr=src.type
                    )
                at.meta = self._meta(src, k)
                env[src] = at
            prev_out = env[self.out[t]]
        post = set(self.post)
        self.out[t].replace_all_uses_with(prev_out, delete_user_cb=lambda user: user in post)
        for node in self.post:
            node._rename(self.names.shift(node.name, extra))  # free: the table holds only the copies' names yet
            if "torch_fn" in node.meta:
                name, fn = node.meta["torch_fn"]
                node.meta["torch_fn"] = (self.fns.shift(name, extra), fn)
        ns._used_names = used
        ns._base_count = counts
        return self._hf_names(new_ph)

    def _meta(self, src: Node, k: int) -> dict:
        meta = dict(src.meta)
        if "nn_module_stack" in meta:
            meta["nn_module_stack"] = _stack(meta["nn_module_stack"], self.tmpl, k)
        if "torch_fn" in meta:
            name, fn = meta["torch_fn"]
            meta["torch_fn"] = (self.fns.shift(name, k - self.tmpl), fn)
        return meta

    def _names_after(self, want: int) -> tuple[set[str], dict[str, int]]:
        """The name table export would end with for `want` layers: the used names and each base's last counter."""
        extra, ns, t = want - self.have, self.graph._graph_namespace, self.tmpl
        placeholders = len(self.graph.find_nodes(op="placeholder")) + extra * len(self.ph[t])
        used: set[str] = set()
        counts = dict(ns._base_count)
        for name in self.used:
            if name in self.ph_names:
                used.update(_relayer(name, t, k) for k in range(t, want))
                continue
            base, n = _split(name)
            if _ARG.match(name) or base not in self.lo:
                used.add(name)
                continue
            s, lo = self.names.of[base], self.lo[base]
            if n >= lo + s:  # the postlude's
                used.add(_join(base, n + extra * s))
            elif n >= lo:  # the template layer's: one per layer from it on
                used.update(_join(base, n + j * s) for j in range(extra + 1))
            else:
                used.add(name)
        if self.args:
            for i in range(placeholders):
                used.add(f"arg{i}_1")
                counts[f"arg{i}"] = 1
        for base, last in ns._base_count.items():
            if base in self.lo and last >= self.lo[base]:
                counts[base] = last + extra * self.names.of[base]
        return used, counts

    def _hf_names(self, new_ph: list[list[Node]]) -> tuple[dict[str, str], dict[str, str]]:
        """param_names and buffer_names in the grown graph's placeholder order."""
        t, kinds = self.tmpl, {k: ("p", v) for k, v in self.params.items()}
        kinds.update({k: ("b", v) for k, v in self.buffers.items()})
        for i, row in enumerate(new_ph):
            for src, node in zip(self.ph[t], row):
                kind, hf = kinds[src.name]
                kinds[node.name] = (kind, _relayer(hf, t, self.have + i))
        params: dict[str, str] = {}
        buffers: dict[str, str] = {}
        for node in self.graph.find_nodes(op="placeholder"):
            if node.name in kinds:
                kind, hf = kinds[node.name]
                (params if kind == "p" else buffers)[node.name] = hf
        return params, buffers


def _same_args(x, y, to_t: dict[Node, Node], layered: set[Node]) -> bool:
    """Whether arguments `x` of the previous layer's node, renamed to the template layer, are `y`."""

    def rename(a: Node):
        if a in to_t:
            return to_t[a]
        if a in layered:
            raise _Mismatch(a.name)
        return a  # the prelude's, shared by every layer

    try:
        mapped = torch.fx.node.map_arg(x, rename)
    except _Mismatch:
        return False
    return _args_equal(mapped, y)


def _args_equal(x, y) -> bool:
    if isinstance(x, (tuple, list)) and isinstance(y, (tuple, list)):
        return type(x) is type(y) and len(x) == len(y) and all(_args_equal(a, b) for a, b in zip(x, y))
    if isinstance(x, dict) and isinstance(y, dict):
        return x.keys() == y.keys() and all(_args_equal(x[k], y[k]) for k in x)
    if isinstance(x, Node) or isinstance(y, Node):
        return x is y
    return type(x) is type(y) and x == y
