"""Costs read from the graph: what each decoder layer and each side of the model does per token.

Graph facts are read from the capture's NodeInfo annotations (flops_per_token, flops_per_pair,
bytes_per_token, part/layer/role) once: `GraphCosts.from_captured` sums them per decoder layer and per
side (embedding side, final norm, LM head + loss, shared rotary tables); any layer split then costs a
few additions. `lcgraph.planner.costs.CostModel` turns these sums into time and memory on a device.
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass, field, fields

import torch

from lcgraph.graph.fusion import fuse_pointwise
from lcgraph.graph.passes import retarget_device
from lcgraph.planner import mfu

DTYPE_BYTES = {"fp32": 4, "bf16": 2}

# ops whose output shares its input's storage: no new memory, no memory traffic
VIEW_OPS = {
    "view",
    "_unsafe_view",
    "reshape",
    "transpose",
    "unsqueeze",
    "squeeze",
    "slice",
    "select",
    "expand",
    "permute",
    "t",
    "alias",
    "flatten",
    "unflatten",
    "detach",
    "contiguous",
}
# ops that keep nothing for backward (their gradient needs no saved tensor)
NO_SAVE_OPS = VIEW_OPS | {
    "add",
    "sub",
    "neg",
    "cat",
    "to",
    "_to_copy",
    "clone",
    "mean",
    "sum",
    "embedding",
    "_assert_tensor_metadata",
    "sym_size",
    "repeat_interleave",
    "copy",
}
# ops that keep their own output for backward (on top of, or instead of, their inputs)
SAVES_OUTPUT_OPS = {"rsqrt", "exp", "sigmoid", "tanh", "_softmax", "softmax", "attention"}
# fused ops (graph/fusion.py) that keep only some of their inputs: op -> the argument positions kept
SAVES_ARGS = {"rotary": (2, 3)}  # cos and sin: rotary's backward rotates the gradient back, it needs no q or k
FREE_OPS = {"_assert_tensor_metadata", "sym_size"}  # bookkeeping, no kernel
COMPUTE_OPS = {"linear", "attention"}  # timed by FLOPs, not by memory traffic


# --- costs read from the graph -----------------------------------------------------------------------------


@dataclass
class Coeffs:
    """Costs of a group of nodes (a decoder layer, a side of the model), per token or per attended pair.

    Bytes are already at the plan's dtype (the loss keeps fp32: the logits are upcast for it).
    """

    matmul_per_token: float = 0.0  # forward matmul FLOPs
    attention_per_pair: float = 0.0  # forward attention FLOPs per causal (query, key) pair
    traffic_per_token: float = 0.0  # bytes read + written by unfused ops (everything but matmul/attention)
    saved_per_token: float = 0.0  # bytes autograd keeps for backward, K/V excluded
    kv_per_token: float = 0.0  # K and V after RoPE (what the KV relay caches)
    params: int = 0
    attention_layers: int = 0
    matmuls: dict[tuple[int, int], float] = field(default_factory=dict)  # (k, n) -> forward FLOPs per token

    def __add__(self, other: Coeffs) -> Coeffs:
        out = Coeffs(
            **{f.name: getattr(self, f.name) + getattr(other, f.name) for f in fields(self) if f.name != "matmuls"}
        )
        for shapes in (self.matmuls, other.matmuls):
            for key, flops in shapes.items():
                out.matmuls[key] = out.matmuls.get(key, 0.0) + flops
        return out


@dataclass
class GraphCosts:
    """Per-layer and per-side costs of a captured model, at one dtype; built once per capture."""

    layers: list[Coeffs]
    first: Coeffs  # embedding side: stage 0 only
    last: Coeffs  # final norm: last stage only
    shared: Coeffs  # rotary tables and other nodes recomputed on every stage
    hidden_size: int
    heads: int
    kv_heads: int
    head_dim: int
    dtype: str
    tied_params: int = 0  # parameters used on both the embedding side and the head side
    loss: Coeffs = field(default_factory=Coeffs)  # LM head + cross-entropy: last stage only
    vocab_size: int = 0

    @property
    def dtype_bytes(self) -> int:
        return DTYPE_BYTES[self.dtype]

    def groups(self) -> list[Coeffs]:
        return [*self.layers, self.first, self.last, self.shared, self.loss]

    @classmethod
    def from_captured(cls, captured, dtype: str = "bf16", fused: bool = False) -> GraphCosts:
        """`fused`: the stages run the fused RMSNorm, SwiGLU and rotary of graph/fusion.py (train.fuse), so what
        autograd keeps is read from a fused copy of the graph. Time stays the plain ops': the profile's factors
        were fitted on them, and the fused kernels are faster (docs/kernels.md), so it errs on the safe side."""
        costs = cls._read(captured, dtype)
        if fused:
            gm = copy.deepcopy(captured.gm)
            retarget_device(gm, torch.device("meta"))  # as a job prepares its stages: capture's asserts dropped
            fuse_pointwise(gm)
            kept = cls._read(dataclasses.replace(captured, gm=gm), dtype)
            for plain, fused_group in zip(costs.groups(), kept.groups()):
                plain.saved_per_token = fused_group.saved_per_token
        return costs

    @classmethod
    def _read(cls, captured, dtype: str) -> GraphCosts:
        if dtype not in DTYPE_BYTES:
            raise ValueError(f"dtype {dtype!r} unknown; choose one of {', '.join(DTYPE_BYTES)}")
        config = captured.config
        nodes = list(captured.graph.nodes)
        groups: dict[object, Coeffs] = {}
        for i in range(captured.num_layers()):
            groups[("layer", i)] = Coeffs()
        for key in ("first", "last", "loss", "shared"):
            groups[key] = Coeffs()
        base = _storage_bases(nodes)
        bpt = {n: _bytes_per_token(n, dtype) for n in nodes}
        saved: set = set()
        kv: set = set()
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        for node in nodes:
            info = node.meta["lcgraph"]
            group = groups.get(_group_key(info))
            op = _op_name(node)
            if node.op == "call_function":
                ins = [a for a in dict.fromkeys(node.all_input_nodes) if _is_activation(a)]
                if op in SAVES_ARGS:
                    kept = [node.args[i] for i in SAVES_ARGS[op]]
                    saved.update(base[a] for a in ins if a in kept)
                elif op not in NO_SAVE_OPS:
                    saved.update(base[a] for a in ins)
                if op in SAVES_OUTPUT_OPS:
                    saved.add(base[node])
                if op == "attention":
                    kv.update(base[a] for a in node.args[1:3])
                    head_dim = int(node.args[0].meta["val"].shape[3])
                    if group is not None:
                        group.attention_layers += 1
                if group is not None and op not in VIEW_OPS | FREE_OPS | COMPUTE_OPS:
                    group.traffic_per_token += bpt[node] + sum(bpt[a] for a in ins)
            if group is not None:
                group.matmul_per_token += info.flops_per_token
                if info.flops_per_token and op == "linear":
                    n, k = node.args[1].meta["val"].shape
                    group.matmuls[(int(k), int(n))] = group.matmuls.get((int(k), int(n)), 0.0) + info.flops_per_token
                group.attention_per_pair += info.flops_per_pair
        for node in saved | kv:
            group = groups.get(_group_key(node.meta["lcgraph"]))
            if group is not None:
                if node in kv:
                    group.kv_per_token += bpt[node]
                else:
                    group.saved_per_token += bpt[node]
        tied = 0
        for node in nodes:  # parameters count on every group that uses them (tied embeddings: both ends)
            if node.meta["lcgraph"].part != "param":
                continue
            users = {_group_key(u.meta["lcgraph"]) for u in node.users} & set(groups)
            for key in users:
                groups[key].params += node.meta["val"].numel()
            if {"first", "loss"} <= users:
                tied += node.meta["val"].numel()
        kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
        layers = [groups[("layer", i)] for i in range(captured.num_layers())]
        return cls(
            layers,
            groups["first"],
            groups["last"],
            groups["shared"],
            config.hidden_size,
            config.num_attention_heads,
            kv_heads,
            head_dim,
            dtype,
            tied,
            groups["loss"],
            config.vocab_size,
        )

    def stage(self, layers: list[int], is_first: bool, is_last: bool, loss: bool = True) -> Coeffs:
        """Costs of a stage; `loss=False` leaves out the LM head + loss (the fused loss is costed on its own)."""
        total = self.shared
        for i in layers:
            total = total + self.layers[i]
        if is_first:
            total = total + self.first
        if is_last:
            total = total + self.last + (self.loss if loss else Coeffs())
        if is_first and is_last and loss:
            total.params -= self.tied_params  # one copy of a tied embedding
        return total

    def total(self) -> Coeffs:
        return self.stage(list(range(len(self.layers))), True, True)

    def model_flops_per_token(self, seq_len: int, attention_kept: float = 1.0) -> float:
        """6*N + 6*L*h*S*f (lcgraph.planner.mfu), N read from the graph's linears (2N forward FLOPs per token)."""
        t = self.total()
        return mfu.flops_per_token(t.matmul_per_token / 2, len(self.layers), self.hidden_size, seq_len, attention_kept)

    def split_costs(self) -> tuple[float, float]:
        """(per token, per pair) forward FLOPs of the whole model: what schedule.split_sequence balances."""
        t = self.total()
        return t.matmul_per_token, t.attention_per_pair

    def ulysses_bytes_per_token(self, layers: int, sp: int) -> float:
        """Bytes per token through the all-to-alls of `layers` attention layers (q, k, v in, output out);
        K/V heads are repeated up to sp when there are fewer of them."""
        q = self.heads * self.head_dim * self.dtype_bytes
        kv = 2 * max(self.kv_heads, sp) * self.head_dim * self.dtype_bytes
        return layers * (2 * q + kv)


def _op_name(node) -> str:
    """'linear' for aten.linear.default, 'attention' for lcgraph::attention; '' for non-calls."""
    if node.op != "call_function":
        return ""
    name = getattr(node.target, "__name__", str(node.target))
    if hasattr(node.target, "_overloadpacket"):
        name = node.target._overloadpacket.__name__
    return name.split(".")[0]


def _group_key(info):
    if info.part == "layer":
        return ("layer", info.layer)
    return {"embed": "first", "norm": "last", "head": "loss", "loss": "loss", "shared": "shared"}.get(info.part)


def _is_activation(node) -> bool:
    info = node.meta.get("lcgraph")
    return info is not None and info.part not in ("param", "buffer", "input") and info.bytes_per_token > 0


def _storage_bases(nodes) -> dict:
    """Each node -> the node that allocated its storage (views resolve to their source)."""
    base: dict = {}
    for node in nodes:
        src = node.args[0] if node.op == "call_function" and node.args else None
        base[node] = base.get(src, node) if _op_name(node) in VIEW_OPS and src in base else node
    return base


def _bytes_per_token(node, dtype: str) -> float:
    """The node's bytes per token at the plan's dtype: floating tensors take the dtype's size, except
    in the loss (fp32 logits); integer tensors keep theirs."""
    info = node.meta.get("lcgraph")
    val = node.meta.get("val")
    if info is None or not info.bytes_per_token:
        return 0.0
    if info.part == "loss" or not getattr(val, "is_floating_point", lambda: False)():
        return info.bytes_per_token
    return info.bytes_per_token * DTYPE_BYTES[dtype] / val.element_size()
