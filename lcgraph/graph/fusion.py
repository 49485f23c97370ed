"""The `fuse_pointwise` pass: captured RMSNorm, SwiGLU and rotary subgraphs -> the fused ops of
`lcgraph.ops.fused_pointwise`, which keep only what their backward needs.

The capture leaves each of them as plain aten ops (what torch.export records of HF's modules):

    RMSNorm   x -> to(fp32) -> pow(2) -> mean(-1) -> add(eps) -> rsqrt -> mul -> to(x.dtype) -> mul(weight)
    SwiGLU    silu(gate) -> mul(up)
    rotary    add(mul(x, cos), mul(cat(neg(x[..., D/2:]), x[..., :D/2]), sin)), once for q and once for k

The pass finds them by their shape (ops and edges, never by node names), checks that each match computes
what the fused op computes (dtypes, the square, the half split), and points the users of the subgraph's
output at one fused node that carries the output's annotations (part, layer, role, bytes). Subgraph nodes
no one else reads are then dead and go. A subgraph that does not match exactly stays as it is.
"""

from __future__ import annotations

import operator
from collections import Counter
from typing import cast

import torch
import torch.fx as fx

from lcgraph.graph.capture import NodeInfo
from lcgraph.ops.fused_pointwise import rms_norm

aten = torch.ops.aten
ROTARY = torch.ops.lcgraph.rotary.default
SWIGLU = torch.ops.lcgraph.swiglu.default
RMS_NORM = rms_norm
_CASTS = (aten.to.dtype, aten._to_copy.default)


def fuse_wanted(mode: str, device: torch.device | str, compiled: bool = False) -> bool:
    """train.fuse: `on`, `off`, or `auto`: on for eager CUDA stages. CPU keeps the plain ops, and so does a
    compiled stage: inductor already recomputes these pointwise ops in backward instead of keeping their
    inputs, so on one H200 at 16k the fused ops left the compiled peak where it was (40.7 GiB) and cost 4% of
    speed (docs/kernels.md)."""
    return mode == "on" or (mode == "auto" and torch.device(device).type == "cuda" and not compiled)


def fuse_pointwise(gm: fx.GraphModule) -> Counter[str]:
    """Rewrite every RMSNorm, SwiGLU and (q, k) rotary pair of `gm` into one fused node each.

    Assumes: the aten ops HF LLaMA's modules export to (see the module docstring), with `val` metadata.
    Guarantees: the same values in fp32 (the fused ops compute HF's formulas) and a graph whose fused
    nodes keep the replaced outputs' NodeInfo. Returns how many of each it fused ("rms_norm", ...).
    """
    graph = gm.graph
    done: Counter[str] = Counter()
    for node in list(graph.nodes):
        if node.target == aten.rsqrt.default and _fuse_rms_norm(graph, node):
            done["rms_norm"] += 1
        elif node.target == aten.silu.default and _fuse_swiglu(graph, node):
            done["swiglu"] += 1
    done["rotary"] = _fuse_rotary_pairs(graph)
    graph.eliminate_dead_code()
    graph.lint()
    gm.recompile()
    return done


# --- helpers --------------------------------------------------------------------------------------------


def _users(node: fx.Node) -> list[fx.Node]:
    """Users that compute something (capture-time metadata asserts are not)."""
    return [u for u in node.users if u.target != aten._assert_tensor_metadata.default]


def _only_user(node: fx.Node) -> fx.Node | None:
    users = _users(node)
    return users[0] if len(users) == 1 else None


def _val(node) -> torch.Tensor | None:
    val = node.meta.get("val") if isinstance(node, fx.Node) else None
    return val if isinstance(val, torch.Tensor) else None


def _other(node: fx.Node, one: fx.Node):
    """The operand of a binary `node` that is not `one` (None when `one` is not an operand)."""
    a, b = node.args[:2]
    return b if a is one else a if b is one else None


def _replace(graph: fx.Graph, old: fx.Node, target, args: tuple) -> fx.Node:
    """A call of `target` before `old` that takes over its users, its value and its annotations."""
    with graph.inserting_before(old):
        new = graph.call_function(target, args)
    new.meta = {k: v for k, v in old.meta.items() if k in ("val", "lcgraph", "nn_module_stack", "stack_trace")}
    old.replace_all_uses_with(new)
    return new


# --- RMSNorm --------------------------------------------------------------------------------------------


def _fuse_rms_norm(graph: fx.Graph, rsqrt: fx.Node) -> bool:
    add = rsqrt.args[0]
    if not (isinstance(add, fx.Node) and add.target == aten.add.Tensor and isinstance(add.args[1], float)):
        return False
    mean = add.args[0]
    if not (isinstance(mean, fx.Node) and mean.target == aten.mean.dim and list(cast(list, mean.args[1])) == [-1]):
        return False
    square = mean.args[0]
    if not (isinstance(square, fx.Node) and square.target == aten.pow.Tensor_Scalar and square.args[1] == 2):
        return False
    x32 = square.args[0]
    normed = _only_user(rsqrt)
    if normed is None or normed.target != aten.mul.Tensor or _other(normed, rsqrt) is not x32:
        return False
    x = x32.args[0] if isinstance(x32, fx.Node) and x32.target in _CASTS else x32
    back = _only_user(normed)
    if back is not None and back.target in _CASTS:
        scaled = _only_user(back)
    else:
        scaled, back = back, normed
    if scaled is None or scaled.target != aten.mul.Tensor:
        return False
    weight = _other(scaled, back)
    xv, wv, bv, x32v = _val(x), _val(weight), _val(back), _val(x32)
    if xv is None or wv is None or bv is None or x32v is None or wv.dim() != 1:
        return False
    if x32v.dtype != torch.float32 or bv.dtype != xv.dtype:  # HF's casts: up to fp32, back to x's dtype
        return False
    _replace(graph, scaled, RMS_NORM, (x, weight, add.args[1]))
    return True


# --- SwiGLU ---------------------------------------------------------------------------------------------


def _fuse_swiglu(graph: fx.Graph, silu: fx.Node) -> bool:
    mul = _only_user(silu)
    if mul is None or mul.target != aten.mul.Tensor:
        return False
    up = _other(mul, silu)
    gv, uv = _val(silu.args[0]), _val(up)
    if gv is None or uv is None or gv.shape != uv.shape or gv.dtype != uv.dtype:
        return False
    _replace(graph, mul, SWIGLU, (silu.args[0], up))
    return True


# --- rotary ---------------------------------------------------------------------------------------------


def _rotary_parts(add: fx.Node) -> tuple[fx.Node, fx.Node, fx.Node] | None:
    """(x, cos, sin) when `add` is x * cos + rotate_half(x) * sin, in either operand order."""
    if add.target != aten.add.Tensor or len(add.args) != 2:
        return None
    for plain, rotated in (add.args, add.args[::-1]):
        if not all(isinstance(n, fx.Node) and n.target == aten.mul.Tensor for n in (plain, rotated)):
            continue
        for cat, sin in (rotated.args, rotated.args[::-1]):
            x = _rotate_half_of(cat)
            if x is not None and isinstance(sin, fx.Node) and x in plain.args:
                cos = _other(cast(fx.Node, plain), x)
                if isinstance(cos, fx.Node) and _val(x) is not None and _val(x).dim() == 4:
                    return x, cos, sin
    return None


def _rotate_half_of(cat) -> fx.Node | None:
    """x when `cat` is cat([-x[..., D/2:], x[..., :D/2]], -1)."""
    if not isinstance(cat, fx.Node) or cat.target != aten.cat.default or cat.args[1] not in (-1, 3):
        return None
    parts = cast(list, cat.args[0])
    if len(parts) != 2 or not all(isinstance(p, fx.Node) for p in parts) or parts[0].target != aten.neg.default:
        return None
    high, low = parts[0].args[0], parts[1]
    if not all(isinstance(n, fx.Node) and n.target == aten.slice.Tensor for n in (high, low)):
        return None
    x = low.args[0]
    xv = _val(x)
    if high.args[0] is not x or xv is None or not isinstance(x, fx.Node):
        return None
    half = xv.shape[-1] // 2
    if tuple(low.args[1:4]) not in ((3, 0, half), (-1, 0, half)) or tuple(high.args[1:3]) not in (
        (3, half),
        (-1, half),
    ):
        return None
    return x


def _fuse_rotary_pairs(graph: fx.Graph) -> int:
    """Pair the rotaries of one layer that share cos/sin (q then k, in graph order) into one node each."""
    groups: dict[tuple, list[tuple[fx.Node, fx.Node]]] = {}
    for node in graph.nodes:
        parts = _rotary_parts(node)
        if parts is not None:
            x, cos, sin = parts
            groups.setdefault((cos, sin, node.meta["lcgraph"].layer), []).append((node, x))
    order = {n: i for i, n in enumerate(graph.nodes)}
    fused = 0
    for (cos, sin, _), found in groups.items():
        for (q_add, q), (k_add, k) in zip(found[0::2], found[1::2]):
            last_input = max((q, k, cos, sin), key=order.__getitem__)
            first_use = min((order[u] for a in (q_add, k_add) for u in a.users), default=len(order))
            if order[last_input] >= first_use or _val(q).dtype != _val(k).dtype:
                continue
            with graph.inserting_after(last_input):
                pair = graph.call_function(ROTARY, (q, k, cos, sin))
            info = q_add.meta["lcgraph"]
            pair.meta["lcgraph"] = NodeInfo(part=info.part, layer=info.layer, role="rotary", seq_dim=None)
            pair.meta["val"] = (q_add.meta.get("val"), k_add.meta.get("val"))
            anchor = pair
            for i, old in enumerate((q_add, k_add)):
                with graph.inserting_after(anchor):
                    anchor = out = graph.call_function(operator.getitem, (pair, i))
                out.meta = {k: v for k, v in old.meta.items() if k in ("val", "lcgraph", "nn_module_stack")}
                old.replace_all_uses_with(out)
            fused += 1
    return fused
