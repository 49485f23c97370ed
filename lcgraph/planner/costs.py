"""Cost model: how long a stage's work takes on a device, and how much memory a stage holds.

Everything is read from the capture's NodeInfo annotations (flops_per_token, flops_per_pair,
bytes_per_token, part/layer/role); nothing is measured. `GraphCosts.from_captured` walks the graph
once and sums the annotations per decoder layer and per side (embedding side, head side, shared
rotary tables); any layer split then costs a few additions, so a planner can try many layouts
after a single capture.

Time of one (chunk of s tokens, prefix of P tokens) unit on a stage, per rank of a (pp, dp, sp) mesh:

    forward  = matmul_flops / matmul_rate + attention_flops / attention_rate(s, head_dim)
               + traffic_bytes / memory_bandwidth + ulysses_bytes / link_bandwidth
    backward = 2 x matmul + 2.5 x attention (includes recomputing QK^T) + 2 x traffic + same all-to-alls

Collectives use ring formulas (bytes * (n - 1) / n / bandwidth); p2p is bytes / bandwidth. A profile
(`DeviceProfile`, JSON in lcgraph/planner/profiles/) holds the rates. See docs/planner.md.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from lcgraph.errors import ProfileError

PROFILES_DIR = Path(__file__).resolve().parent / "profiles"
DTYPE_BYTES = {"fp32": 4, "bf16": 2}

BACKWARD_MATMUL = 2.0  # dX and dW
BACKWARD_ATTENTION = 2.5  # dQ, dK, dV plus recomputing the scores
BACKWARD_TRAFFIC = 2.0  # elementwise backward reads the saved input and the incoming gradient
ADAM_STATE_BYTES = 8  # two fp32 moments per parameter
MASTER_BYTES = 4  # fp32 master copy when the model runs in a lower precision
OPTIMIZER_TRAFFIC = 32  # bytes moved per parameter by one AdamW update (master, moments, grad, param)
# Unfused eager kernels move more bytes than the forward graph's tensors show (fp32 upcasts inside
# RMSNorm, contiguous copies before matmuls, gradient accumulation). Calibrated on a measured
# HF eager step of Llama-3.2-1B at 16k spends 146 ms in memory-bound glue on an H100, where the
# annotations alone predict 78 ms.
TRAFFIC_CALIBRATION = 1.9

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
FREE_OPS = {"_assert_tensor_metadata", "sym_size"}  # bookkeeping, no kernel
COMPUTE_OPS = {"linear", "attention"}  # timed by FLOPs, not by memory traffic


# --- device profiles ---------------------------------------------------------------------------------------


@dataclass
class DeviceProfile:
    """Rates of one GPU and its links. Units: bytes, FLOP/s, bytes/s."""

    name: str
    memory_bytes: float
    matmul_flops: float  # dense bf16 matmul, as measured (also the MFU denominator)
    attention_flops: dict[int, list[tuple[int, float]]]  # head dim -> [(seq_len, fwd+bwd FLOP/s)], causal
    memory_bandwidth: float
    intra_node_bw: float  # per GPU per direction (NVLink)
    inter_node_bw: float  # per GPU per direction (InfiniBand)
    gpus_per_node: int = 8
    fp32_flops: float = 0.0  # fp32 (no tensor cores): used for train.dtype=fp32 plans
    description: str = ""
    source: str = ""

    @classmethod
    def from_dict(cls, data: dict) -> DeviceProfile:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"device profile {data.get('name')!r}: unknown keys {unknown}; known: {sorted(known)}")
        data = dict(data)
        data["attention_flops"] = {
            int(d): sorted((int(s), float(r)) for s, r in table) for d, table in data["attention_flops"].items()
        }
        return cls(**data)

    def to_dict(self) -> dict:
        out = asdict(self)
        out["attention_flops"] = {str(d): [list(p) for p in table] for d, table in self.attention_flops.items()}
        return out

    def matmul_rate(self, dtype: str) -> float:
        return self.fp32_flops if dtype == "fp32" and self.fp32_flops else self.matmul_flops

    def attention_rate(self, seq_len: float, head_dim: int, dtype: str = "bf16") -> float:
        """Causal attention FLOP/s for `seq_len` queries: the nearest head dim's table, linear in log2(seq_len)."""
        if dtype == "fp32" and self.fp32_flops:
            return self.fp32_flops
        dim = min(self.attention_flops, key=lambda d: (abs(math.log2(d / head_dim)), -d))
        table = self.attention_flops[dim]
        x = math.log2(max(seq_len, 1))
        if x <= math.log2(table[0][0]):
            return table[0][1]
        for (s0, r0), (s1, r1) in zip(table, table[1:]):
            x0, x1 = math.log2(s0), math.log2(s1)
            if x <= x1:
                return r0 + (r1 - r0) * (x - x0) / (x1 - x0)
        return table[-1][1]

    def link_bw(self, ranks: int) -> float:
        """Bandwidth per GPU of a collective over `ranks` consecutive ranks (inside a node or across nodes)."""
        return self.intra_node_bw if ranks <= self.gpus_per_node else self.inter_node_bw


def profile_names() -> list[str]:
    return sorted(p.stem for p in PROFILES_DIR.glob("*.json"))


def load_profile(name_or_path: str) -> DeviceProfile:
    """A shipped profile by name (h100, h200, a100) or any profile JSON by path."""
    path = Path(name_or_path)
    if not path.suffix:
        path = PROFILES_DIR / f"{name_or_path}.json"
    if not path.is_file():
        raise ProfileError(
            f"device profile {name_or_path!r} not found; shipped profiles: "
            f"{', '.join(profile_names())}, or give the path of a JSON file "
            "(tools/profile_device.py writes one)"
        )
    return DeviceProfile.from_dict(json.loads(path.read_text()))


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

    def __add__(self, other: Coeffs) -> Coeffs:
        return Coeffs(**{f.name: getattr(self, f.name) + getattr(other, f.name) for f in fields(self)})


@dataclass
class GraphCosts:
    """Per-layer and per-side costs of a captured model, at one dtype; built once per capture."""

    layers: list[Coeffs]
    first: Coeffs  # embedding side: stage 0 only
    last: Coeffs  # final norm, head, loss: last stage only
    shared: Coeffs  # rotary tables and other nodes recomputed on every stage
    hidden_size: int
    heads: int
    kv_heads: int
    head_dim: int
    dtype: str
    tied_params: int = 0  # parameters used on both the embedding side and the head side

    @property
    def dtype_bytes(self) -> int:
        return DTYPE_BYTES[self.dtype]

    @classmethod
    def from_captured(cls, captured, dtype: str = "bf16") -> GraphCosts:
        if dtype not in DTYPE_BYTES:
            raise ValueError(f"dtype {dtype!r} unknown; choose one of {', '.join(DTYPE_BYTES)}")
        config = captured.config
        nodes = list(captured.graph.nodes)
        groups: dict[object, Coeffs] = {}
        for i in range(captured.num_layers()):
            groups[("layer", i)] = Coeffs()
        for key in ("first", "last", "shared"):
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
                if op not in NO_SAVE_OPS:
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
            if {"first", "last"} <= users:
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
        )

    def stage(self, layers: list[int], is_first: bool, is_last: bool) -> Coeffs:
        total = self.shared
        for i in layers:
            total = total + self.layers[i]
        if is_first:
            total = total + self.first
        if is_last:
            total = total + self.last
        if is_first and is_last:
            total.params -= self.tied_params  # one copy of a tied embedding
        return total

    def total(self) -> Coeffs:
        return self.stage(list(range(len(self.layers))), True, True)

    def model_flops_per_token(self, seq_len: int) -> float:
        """MFU convention (PaLM, arXiv 2204.02311, appendix B): 6N (matmul weights, head included) + 6*L*h*S for causal attention,
        i.e. 3 x forward FLOPs per token of a full causal sequence of `seq_len`."""
        t = self.total()
        return 3.0 * (t.matmul_per_token + t.attention_per_pair * (seq_len + 1) / 2)

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
    return {"embed": "first", "norm": "last", "head": "last", "loss": "last", "shared": "shared"}.get(info.part)


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


# --- a layout on a device ----------------------------------------------------------------------------------


@dataclass
class Layout:
    """The parallel layout and step shape the costs are evaluated for."""

    pp: int = 1
    dp: int = 1
    sp: int = 1
    micro_batch: int = 1  # sequences per micro-batch
    zero: bool = True  # optimizer state sharded over the dp*sp replicas of a stage
    virtual_stages: int = 1
    recompute: bool = False  # train.recompute: units keep only their stage input; backward reruns forward

    @property
    def replicas(self) -> int:
        return self.dp * self.sp

    @property
    def gpus(self) -> int:
        return self.pp * self.dp * self.sp


@dataclass
class StageMemory:
    weights: float
    grads: float
    optimizer: float

    @property
    def total(self) -> float:
        return self.weights + self.grads + self.optimizer


@dataclass
class CostModel:
    """Durations and bytes of one plan: graph costs x device x layout x chunk lengths x layer split.

    Implements what `lcgraph.planner.simulator.simulate` asks of its costs: duration, transfer, static_bytes
    and unit_bytes of an action / stage / chunk.
    """

    graph: GraphCosts
    profile: DeviceProfile
    layout: Layout
    layer_counts: list[int]
    chunk_lengths: list[int]
    stages: list[Coeffs] = field(init=False)

    def __post_init__(self) -> None:
        n = len(self.layer_counts)
        starts = [sum(self.layer_counts[:s]) for s in range(n)]
        self.stages = [
            self.graph.stage(list(range(starts[s], starts[s] + c)), s == 0, s == n - 1)
            for s, c in enumerate(self.layer_counts)
        ]
        self.prefixes = [sum(self.chunk_lengths[:c]) for c in range(len(self.chunk_lengths))]

    # --- compute -----------------------------------------------------------------------------------------
    def compute_parts(self, stage: int, length: int, prefix: int) -> dict[str, float]:
        """Forward seconds of one unit on one rank, by part: matmul, attention, traffic, all_to_all."""
        c, lay, dev, dtype = self.stages[stage], self.layout, self.profile, self.graph.dtype
        tokens = lay.micro_batch * length / lay.sp
        pairs = lay.micro_batch * (length * prefix + length * (length + 1) / 2) / lay.sp
        a2a = 0.0
        if lay.sp > 1:
            volume = tokens * self.graph.ulysses_bytes_per_token(c.attention_layers, lay.sp)
            a2a = volume * (lay.sp - 1) / lay.sp / dev.link_bw(lay.sp)
        return {
            "matmul": c.matmul_per_token * tokens / dev.matmul_rate(dtype),
            "attention": c.attention_per_pair * pairs / dev.attention_rate(length, self.graph.head_dim, dtype)
            if c.attention_per_pair
            else 0.0,
            "traffic": TRAFFIC_CALIBRATION * c.traffic_per_token * tokens / dev.memory_bandwidth,
            "all_to_all": a2a,
        }

    def forward_time(self, stage: int, chunk: int) -> float:
        return sum(self.compute_parts(stage, self.chunk_lengths[chunk], self.prefixes[chunk]).values())

    def backward_time(self, stage: int, chunk: int) -> float:
        p = self.compute_parts(stage, self.chunk_lengths[chunk], self.prefixes[chunk])
        rerun = self.forward_time(stage, chunk) if self.layout.recompute else 0.0
        return (
            BACKWARD_MATMUL * p["matmul"]
            + BACKWARD_ATTENTION * p["attention"]
            + BACKWARD_TRAFFIC * p["traffic"]
            + p["all_to_all"]
            + rerun
        )

    # --- communication -----------------------------------------------------------------------------------
    def p2p_time(self, src_stage: int, dst_stage: int, chunk: int) -> float:
        """Residual stream of one unit from one rank to its pipeline neighbour (same node or not)."""
        lay, dev = self.layout, self.profile
        nbytes = lay.micro_batch * self.chunk_lengths[chunk] / lay.sp * self.graph.hidden_size * self.graph.dtype_bytes
        per_node = dev.gpus_per_node
        src, dst = (lay.replicas * (s % lay.pp) // per_node for s in (src_stage, dst_stage))
        return nbytes / (dev.intra_node_bw if src == dst else dev.inter_node_bw)

    def grad_sync_time(self, stage: int) -> float:
        """Reduce-scatter of gradients + all-gather of parameters over the dp*sp replicas (ring); an
        all-reduce without ZeRO moves the same bytes."""
        n = self.layout.replicas
        if n == 1:
            return 0.0
        nbytes = self.stages[stage].params * self.graph.dtype_bytes
        return 2 * nbytes * (n - 1) / n / self.profile.link_bw(n)

    def optimizer_time(self, stage: int) -> float:
        shard = self.stages[stage].params / (self.layout.replicas if self.layout.zero else 1)
        return shard * OPTIMIZER_TRAFFIC / self.profile.memory_bandwidth

    # --- memory ------------------------------------------------------------------------------------------
    def stage_memory(self, stage: int) -> StageMemory:
        params, nbytes = self.stages[stage].params, self.graph.dtype_bytes
        state = ADAM_STATE_BYTES + (MASTER_BYTES if self.graph.dtype != "fp32" else 0)
        shards = self.layout.replicas if self.layout.zero else 1
        return StageMemory(params * nbytes, params * nbytes, params * state / shards)

    def unit_activations(self, stage: int, chunk: int) -> tuple[float, float]:
        """(bytes kept for backward, K/V bytes) of one unit on one rank. Without sequence chunks there is
        no relay: K/V are ordinary saved activations and come back in the first number."""
        c, lay = self.stages[stage], self.layout
        tokens = lay.micro_batch * self.chunk_lengths[chunk] / lay.sp
        kv = c.kv_per_token * tokens * max(1.0, lay.sp / self.graph.kv_heads)
        saved = c.saved_per_token * tokens
        if lay.recompute:  # only the unit's input stays; its full activations exist during its backward
            saved = self.graph.hidden_size * self.graph.dtype_bytes * tokens
        return (saved, kv) if len(self.chunk_lengths) > 1 else (saved + kv, 0.0)

    def recompute_transient(self, stage: int) -> float:
        """Recompute: the largest unit's full activations, alive while its backward runs."""
        if not self.layout.recompute:
            return 0.0
        c, lay = self.stages[stage], self.layout
        return c.saved_per_token * lay.micro_batch * max(self.chunk_lengths) / lay.sp

    # --- the simulator's interface -----------------------------------------------------------------------
    def duration(self, action, rank: int) -> float:
        """Seconds `action` occupies `rank` (sends and receives: none; the link time is `transfer`)."""
        if action.kind == "F":
            return self.forward_time(action.stage, action.chunk)
        if action.kind == "B":
            return self.backward_time(action.stage, action.chunk)
        if action.kind == "OPT":
            stages = [s for s in range(len(self.stages)) if s % self.layout.pp == rank]
            return sum(self.grad_sync_time(s) + self.optimizer_time(s) for s in stages)
        return 0.0

    def transfer(self, action) -> float:
        if action.kind == "SEND_F":
            return self.p2p_time(action.stage, action.stage + 1, action.chunk)
        if action.kind == "SEND_B":
            return self.p2p_time(action.stage, action.stage - 1, action.chunk)
        return 0.0

    def static_bytes(self, stage: int) -> float:
        return self.stage_memory(stage).total + self.recompute_transient(stage)

    def unit_bytes(self, stage: int, chunk: int) -> tuple[float, float]:
        return self.unit_activations(stage, chunk)
