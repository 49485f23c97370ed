"""Cost model: how long a stage's work takes on a device, and how much memory a stage holds.

The per-token sums come from `GraphCosts` (lcgraph/planner/graph_costs.py); rates come from a
`DeviceProfile` (lcgraph/planner/profile.py), measured by tools/profile_device.py.

The kernels charged are those the runtime calls. Per unit (a chunk of s tokens after a prefix of P):

    matmul       every linear at the measured rate of its [tokens, k] x [k, n] shape; backward 2x FLOPs
    attention    a diagonal block (s x s, causal) and, when P > 0, a prefix block (s x P, no mask), each
                 at its measured forward / backward rate; the two are merged through their LSE. With
                 parallel.cp > 1 the ring's steps instead, each overlapped with its K/V p2p (planner/ring.py)
    traffic      unfused elementwise bytes (norms, rotary, SwiGLU, adds) x the profile's traffic factor
                 (eager or compiled) / memory bandwidth; backward moves twice the bytes
    loss         the fused LM head + cross-entropy, all of its matmuls in the forward (grads computed there)
    grads        each unit's weight gradients added into the stage's gradient buffers
    optimizer    the fused AdamW over fp32 masters, plus the casts around it (grad -> fp32, master -> bf16)

`train.recompute` decides the reruns and what a unit keeps (RECOMPUTE_MODES): `none` keeps every saved
activation; `full` keeps each decoder layer's input (and the head's) and reruns its whole forward (attention
and loss included) in backward, one layer at a time; `keep_attention` also keeps each layer's attention output
and LSE and reruns everything but attention. `train.offload` parks a unit's kept bytes in host memory between its
forward and its backward (`offloaded_bytes`; copies and host memory: planner/offload.py). Collectives use ring formulas at the profile's NCCL bus bandwidth. See docs/planner.md.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from lcgraph.planner.documents import DocumentMix, chunk_blocks
from lcgraph.planner.graph_costs import Coeffs, GraphCosts
from lcgraph.planner.profile import ATTENTION_BACKWARD, DeviceProfile, load_profile, profile_names
from lcgraph.planner.ring import RingShape, ring_times, ring_transient
from lcgraph.runtime.recompute import recompute_mode

__all__ = ["DeviceProfile", "load_profile", "profile_names"]  # the profile lives next door; old imports work

BACKWARD_MATMUL = 2.0  # dX and dW
BACKWARD_TRAFFIC = 2.0  # elementwise backward reads the saved input and the incoming gradient
ADAM_STATE_BYTES = 8  # two fp32 moments per parameter
MASTER_BYTES = 4  # fp32 master copy when the model runs in a lower precision
OPTIMIZER_TRAFFIC = 28  # bytes one fused AdamW update moves per parameter (read master, grad, m, v; write 3)
# bf16 weights under ZeRO: one pass reads the bf16 gradient, master and moments and writes them, the bf16 weight
# and the zeroed gradient (runtime/mixed_adamw.py)
MIXED_ADAMW_TRAFFIC = 2 + 12 + 12 + 2 + 2
NORM_TRAFFIC = 2  # the global gradient norm reads every bf16 gradient once
CAST_TRAFFIC = 16  # torch's AdamW on bf16 weights: norm (2), grad -> fp32 (2 + 4), master -> bf16 (4 + 2), zeroing (2)
LSE_BYTES = 4  # fp32 log-sum-exp per query and head
# train.activation_budget < 1 without a fitted "compiled_budget" factor: a Llama-3.2-1B-shaped decoder layer,
# compiled (inductor on CPU, bf16, 1,024 tokens), saves 50.4 MiB under budget 0.9 against 74.4 MiB at 1: the
# SwiGLU product, a normalised activation and casts are rerun (docs/memory.md; tests/test_reference.py).
BUDGET_SAVED_RATIO = 50.4 / 74.4

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
    recompute: str = "none"  # RECOMPUTE_MODES
    recompute_layers: int = 1  # decoder layers per checkpointed segment (train.recompute_layers)
    kept_attention_layers: int = -1  # keep_attention: layers per stage that keep attention (-1: all)
    compiled: bool = False  # train.compile: elementwise ops fused (the profile's "compiled" factors)
    activation_budget: float = 1.0  # train.activation_budget < 1: the profile's "compiled_budget" factors
    fused_loss: bool = True  # train.fused_loss
    offload: str = "none"  # train.offload: what waits in host memory (planner/offload.py)
    cp: int = 1  # ring attention's degree: a sequence is sharded over sp x cp ranks
    documents: DocumentMix | None = None  # a document mask over packed documents of this mix (planner/documents.py)
    fp8: str | None = None  # train.fp8: the decoder layers' matmuls in FP8 under this recipe (ops/fp8.py)

    def __post_init__(self) -> None:
        self.recompute = recompute_mode(self.recompute)

    @property
    def replicas(self) -> int:
        return self.dp * self.cp * self.sp

    @property
    def gpus(self) -> int:
        return self.pp * self.dp * self.cp * self.sp

    @property
    def seq_shards(self) -> int:
        """Ranks one sequence is sharded over: Ulysses x ring."""
        return self.sp * self.cp


def profile_mode(layout: Layout) -> str:
    """The profile's factor key: eager, compiled, or compiled_budget (compiled, train.activation_budget < 1)."""
    if not layout.compiled:
        return "eager"
    return "compiled_budget" if layout.activation_budget < 1 else "compiled"


@dataclass
class StageMemory:
    weights: float
    grads: float
    optimizer: float

    @property
    def total(self) -> float:
        return self.weights + self.grads + self.optimizer


# which profile figure each time term reads (the plan prints their provenance)
TERM_FIGURES = {
    "matmul": ("matmul_shapes",),
    "fp8_casts": ("fp8_speedup", "memory_bandwidth", "traffic_factor"),
    "attention_diag": ("attention_blocks",),
    "attention_prefix": ("attention_blocks",),
    "attention_merge": ("memory_bandwidth",),
    "traffic": ("memory_bandwidth", "traffic_factor"),
    "loss": ("fused_loss_flops",),
    "grads": ("memory_bandwidth",),
    "all_to_all": ("intra_node_bw", "inter_node_bw"),
    "optimizer": ("adamw_params_per_s", "memory_bandwidth"),
    "grad_sync": ("intra_node_bw", "inter_node_bw"),
    "p2p": ("intra_node_bw", "inter_node_bw"),
    "ring_p2p": ("intra_node_bw", "inter_node_bw"),
    "activations": ("saved_factor",),
    "offload": ("host_bandwidth",),
}


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
        layers = [list(range(starts[s], starts[s] + c)) for s, c in enumerate(self.layer_counts)]
        self.stages = [self.graph.stage(ls, s == 0, s == n - 1) for s, ls in enumerate(layers)]
        self.bodies = [self.graph.stage(ls, s == 0, s == n - 1, loss=False) for s, ls in enumerate(layers)]
        self.stage_layers = layers
        self.prefixes = [sum(self.chunk_lengths[:c]) for c in range(len(self.chunk_lengths))]
        self.mode = profile_mode(self.layout)

    def _is_last(self, stage: int) -> bool:
        return stage == len(self.layer_counts) - 1

    def _tokens(self, length: int) -> float:
        return self.layout.micro_batch * length / self.layout.seq_shards

    # --- compute -----------------------------------------------------------------------------------------
    def compute_parts(self, stage: int, length: int, prefix: int, grads: bool | None = None) -> dict[str, float]:
        """Forward seconds of one unit on one rank, by part. `grads`: whether the forward records what
        backward needs (the fused loss then computes its gradients too); default: unless recomputing."""
        c, lay, dev = self.bodies[stage], self.layout, self.profile
        grads = lay.recompute == "none" if grads is None else grads
        tokens = self._tokens(length)
        per_pair = c.attention_per_pair * lay.micro_batch / lay.sp
        diag, pre = self._attention(per_pair, length, prefix, backward=False)
        parts = {
            "matmul": self._matmul(c, tokens, backward=False),
            "attention_diag": diag,
            "attention_prefix": pre,
            "attention_merge": self._merge_bytes(stage, tokens) / dev.memory_bandwidth if pre else 0.0,
            "traffic": self._traffic(c, tokens),
            "fp8_casts": self._fp8_casts(c, tokens, backward=False),
            "loss": self._loss(stage, tokens, grads),
            "all_to_all": self._all_to_all(c, tokens),
        }
        return self._with_ring(parts, stage, length, prefix, backward=False)

    def _attention(self, per_pair: float, length: int, prefix: int, backward: bool) -> tuple[float, float]:
        """Seconds of a unit's diagonal and prefix attention: whole causal blocks, or under a document mask each
        span shape's pairs at that shape's rate (planner/documents.py)."""
        dev, d, dtype = self.profile, self.graph.head_dim, self.graph.dtype
        rate = lambda kind, sq, sk: dev.block_rate(kind, sq, sk, d, backward, dtype)
        mix = self.layout.documents
        if mix is None or prefix not in self.prefixes:
            diag, pre = per_pair * length * (length + 1) / 2, per_pair * length * prefix
            return diag / rate("diag", length, length) if diag else 0.0, pre / rate(
                "prefix", length, prefix
            ) if pre else 0.0
        blocks = chunk_blocks(mix, sum(self.chunk_lengths), tuple(self.chunk_lengths))[self.prefixes.index(prefix)]
        time = {"diag": 0.0, "prefix": 0.0}
        for b in blocks:
            time[b.kind] += per_pair * b.pairs / rate(b.kind, b.sq, b.sk)
        return time["diag"], time["prefix"]

    def _pairs_kept(self, length: int, prefix: int) -> float:
        """The share of a unit's causal pairs (diagonal and prefix) a document mask leaves (1 without one)."""
        mix = self.layout.documents
        if mix is None or prefix not in self.prefixes:
            return 1.0
        blocks = chunk_blocks(mix, sum(self.chunk_lengths), tuple(self.chunk_lengths))[self.prefixes.index(prefix)]
        return sum(b.pairs for b in blocks) / (length * (length + 1) / 2 + length * prefix)

    def _with_ring(self, parts: dict[str, float], stage: int, length: int, prefix: int, backward: bool) -> dict:
        """parallel.cp > 1: attention as the ring's steps (planner/ring.py), one LSE merge per kernel call."""
        lay = self.layout
        if lay.cp == 1:
            return parts
        c, dev, d, dtype = self.bodies[stage], self.profile, self.graph.head_dim, self.graph.dtype
        per_pair = c.attention_per_pair * lay.micro_batch / lay.sp * (ATTENTION_BACKWARD if backward else 1.0)
        per_pair *= self._pairs_kept(length, prefix)  # a document mask leaves the ring's blocks fewer pairs
        shape = RingShape(lay.cp, length, prefix)
        rate = lambda kind, sq, sk: dev.block_rate(kind, sq, sk, d, backward, dtype)
        link = dev.link_bw(lay.seq_shards)
        parts.update(
            ring_times(shape, per_pair, self._ring_payload(stage, shape), self.graph.dtype_bytes, rate, link, backward)
        )
        if not backward:
            merges = lay.cp + (1 if prefix else 0)
            parts["attention_merge"] = merges * self._merge_bytes(stage, self._tokens(length)) / dev.memory_bandwidth
        return parts

    def _ring_payload(self, stage: int, shape: RingShape) -> float:
        """Bytes of K/V one ring step sends, over the stage's attention layers (K/V heads this rank holds:
        Ulysses repeats them up to sp first)."""
        g, lay = self.graph, self.layout
        per_rank = max(g.kv_heads, lay.sp) / (g.kv_heads * lay.sp)
        return self.bodies[stage].kv_per_token * per_rank * lay.micro_batch * shape.payload_keys

    def ring_transient(self, stage: int) -> float:
        """The ring's buffers of one layer at its largest unit (the longest payload: the last chunk's)."""
        if self.layout.cp == 1:
            return 0.0
        g, c = self.graph, self.bodies[stage]
        chunk = max(range(len(self.chunk_lengths)), key=lambda i: self.chunk_lengths[i] + self.prefixes[i])
        shape = RingShape(self.layout.cp, self.chunk_lengths[chunk], self.prefixes[chunk])
        layers = max(1, c.attention_layers)
        queries = g.heads * g.head_dim * g.dtype_bytes * self._tokens(self.chunk_lengths[chunk])
        return ring_transient(self._ring_payload(stage, shape) / layers, queries, g.dtype_bytes)

    def backward_parts(self, stage: int, chunk: int) -> dict[str, float]:
        """Backward seconds of one unit, by part; `rerun` is the forward the recompute mode repeats."""
        length, prefix = self.chunk_lengths[chunk], self.prefixes[chunk]
        f = self.compute_parts(stage, length, prefix)
        c, dev = self.bodies[stage], self.profile
        tokens = self._tokens(length)
        per_pair = c.attention_per_pair * self.layout.micro_batch / self.layout.sp * ATTENTION_BACKWARD
        diag, pre = self._attention(per_pair, length, prefix, backward=True)
        parts = {
            "matmul": self._matmul(c, tokens, backward=True),
            "attention_diag": diag,
            "attention_prefix": pre,
            "traffic": BACKWARD_TRAFFIC * f["traffic"],
            "fp8_casts": self._fp8_casts(c, tokens, backward=True),
            "grads": 3 * self.stages[stage].params * self.graph.dtype_bytes / dev.memory_bandwidth,
            "all_to_all": f["all_to_all"],
            "rerun": self._rerun(stage, length, prefix),
        }
        return self._with_ring(parts, stage, length, prefix, backward=True)

    def _rerun(self, stage: int, length: int, prefix: int) -> float:
        mode = self.layout.recompute
        if mode == "none":
            return 0.0
        again = self.compute_parts(stage, length, prefix, grads=True)
        if mode == "keep_attention":  # the kept layers' attention output and LSE are not recomputed
            unkept = 1.0 - self.kept_attention(stage) / len(self.stage_layers[stage])
            for part in ("attention_diag", "attention_prefix", "attention_merge", "ring_p2p"):
                if part in again:
                    again[part] *= unkept
        return sum(again.values())

    def kept_attention(self, stage: int) -> int:
        """Layers of `stage` whose attention output and LSE a unit keeps (keep_attention only)."""
        if self.layout.recompute != "keep_attention":
            return 0
        layers, kept = len(self.stage_layers[stage]), self.layout.kept_attention_layers
        return layers if kept < 0 else min(kept, layers)

    def _matmul(self, c: Coeffs, tokens: float, backward: bool, head: bool = False) -> float:
        """Each linear at its own shape's rate, under train.fp8 at the FP8 rate unless it is the LM `head`;
        graphs without shape records at the peak rate."""
        factor = BACKWARD_MATMUL if backward else 1.0
        dtype = self.graph.dtype
        if not c.matmuls:
            return factor * c.matmul_per_token * tokens / self.profile.matmul_rate(dtype)
        fp8 = self.layout.fp8 is not None and not head
        rate = self.profile.matmul_rate
        # rowwise_with_gw_hp: of backward's two matmuls (dX, dW), the weight gradient's runs in high precision
        hp = 0.5 if backward and fp8 and self.layout.fp8 == "rowwise_with_gw_hp" else 0.0
        seconds = 0.0
        for (k, n), flops in c.matmuls.items():
            per_flop = (1 - hp) / rate(dtype, k, n, backward, fp8=fp8) + hp / rate(dtype, k, n, backward)
            seconds += factor * flops * tokens * per_flop
        return seconds

    def _fp8_casts(self, c: Coeffs, tokens: float, backward: bool) -> float:
        """Seconds of FP8 casts: each FP8 linear reads its high-precision operand twice (amax, then scale and
        cast) and writes one byte per element; forward casts the input, backward the output gradient (row-wise:
        along both axes) and the input again (rowwise_with_gw_hp: the gradient along one axis, the input not at
        all). The weights' casts, per unit not per token, are left out."""
        if not self.layout.fp8:
            return 0.0
        b = self.graph.dtype_bytes
        per_element = 2 * b + 1
        grads, inputs = {"rowwise": (2, 1), "rowwise_with_gw_hp": (1, 0)}.get(self.layout.fp8, (1, 1))
        moved = 0.0
        for (k, n), flops in c.matmuls.items():
            linears = flops / (2 * k * n)  # linears of this shape in the group (forward FLOPs 2kn a token each)
            moved += linears * ((grads * n + inputs * k) if backward else k) * per_element
        return self._factor(self.profile.traffic_factor, 1.0) * moved * tokens / self.profile.memory_bandwidth

    def _traffic(self, c: Coeffs, tokens: float) -> float:
        return (
            self._factor(self.profile.traffic_factor, 1.0)
            * c.traffic_per_token
            * tokens
            / self.profile.memory_bandwidth
        )

    def _merge_bytes(self, stage: int, tokens: float) -> float:
        """Merging the prefix and diagonal blocks through their LSE: read two outputs and LSEs, write one."""
        g = self.graph
        per_layer = 3 * (g.heads * g.head_dim * g.dtype_bytes + g.heads * LSE_BYTES)
        return self.bodies[stage].attention_layers * per_layer * tokens

    def _loss(self, stage: int, tokens: float, grads: bool) -> float:
        """The LM head + cross-entropy. Fused: 6hV FLOPs per token with gradients (forward), 2hV without."""
        if not self._is_last(stage):
            return 0.0
        g, dev = self.graph, self.profile
        if not self.layout.fused_loss:
            return self._matmul(g.loss, tokens, False, head=True) + self._traffic(g.loss, tokens)
        hv = g.hidden_size * g.vocab_size * tokens
        if grads:
            return 6 * hv / (dev.fused_loss_flops or dev.matmul_rate(g.dtype))
        return 2 * hv / (dev.fused_loss_nograd_flops or dev.matmul_rate(g.dtype))

    def _all_to_all(self, c: Coeffs, tokens: float) -> float:
        lay = self.layout
        if lay.sp == 1:
            return 0.0
        volume = tokens * self.graph.ulysses_bytes_per_token(c.attention_layers, lay.sp)
        return volume * (lay.sp - 1) / lay.sp / self.profile.link_bw(lay.sp, "all_to_all")

    def forward_time(self, stage: int, chunk: int) -> float:
        return sum(self.compute_parts(stage, self.chunk_lengths[chunk], self.prefixes[chunk]).values())

    def backward_time(self, stage: int, chunk: int) -> float:
        parts = self.backward_parts(stage, chunk)
        if not self.layout.fused_loss and self._is_last(stage):  # the unfused head's own backward
            tokens = self._tokens(self.chunk_lengths[chunk])
            parts["loss"] = self._matmul(self.graph.loss, tokens, True, head=True) + BACKWARD_TRAFFIC * self._traffic(
                self.graph.loss, tokens
            )
        return sum(parts.values())

    # --- communication -----------------------------------------------------------------------------------
    def p2p_time(self, src_stage: int, dst_stage: int, chunk: int) -> float:
        """Residual stream of one unit from one rank to its pipeline neighbour (same node or not)."""
        lay, dev = self.layout, self.profile
        nbytes = self._tokens(self.chunk_lengths[chunk]) * self.graph.hidden_size * self.graph.dtype_bytes
        per_node = dev.gpus_per_node
        src, dst = (lay.replicas * (s % lay.pp) // per_node for s in (src_stage, dst_stage))
        return nbytes / (dev.link_bw(2, "p2p") if src == dst else dev.inter_node_bw)

    def grad_sync_time(self, stage: int) -> float:
        """Reduce-scatter of gradients + all-gather of parameters over the dp*sp replicas (ring); an
        all-reduce without ZeRO moves the same bytes."""
        n = self.layout.replicas
        if n == 1:
            return 0.0
        nbytes = self.stages[stage].params * self.graph.dtype_bytes
        return 2 * nbytes * (n - 1) / n / self.profile.link_bw(n)

    def optimizer_time(self, stage: int) -> float:
        """AdamW over this rank's shard and the gradient norm. bf16 weights under ZeRO: one pass per bucket
        (mixed_adamw.py), plus zeroing the other replicas' gradient shards; else torch's fused AdamW and, for fp32,
        a norm and a zeroing pass over whole-stage buffers."""
        params, dev, lay = self.stages[stage].params, self.profile, self.layout
        shard = params / (lay.replicas if lay.zero else 1)
        if self.graph.dtype != "fp32" and lay.zero:
            zeroing = 2 * (params - shard)
            return (shard * MIXED_ADAMW_TRAFFIC + params * NORM_TRAFFIC + zeroing) / dev.memory_bandwidth
        adamw = (
            shard / dev.adamw_params_per_s
            if dev.adamw_params_per_s
            else shard * OPTIMIZER_TRAFFIC / dev.memory_bandwidth
        )
        casts = (CAST_TRAFFIC if self.graph.dtype != "fp32" else 4) * params / dev.memory_bandwidth
        return adamw + casts

    # --- memory ------------------------------------------------------------------------------------------
    def stage_memory(self, stage: int) -> StageMemory:
        params, nbytes = self.stages[stage].params, self.graph.dtype_bytes
        if not self.layout.zero:  # replicated AdamW steps the weights themselves: two moments in their dtype
            return StageMemory(params * nbytes, params * nbytes, params * 2 * nbytes)
        state = ADAM_STATE_BYTES + (MASTER_BYTES if self.graph.dtype != "fp32" else 0)
        return StageMemory(params * nbytes, params * nbytes, params * state / self.layout.replicas)

    def _factor(self, table: dict[str, float], budget_ratio: float) -> float:
        """The profile's factor for this mode; a profile fitted without compiled_budget runs takes the compiled
        one times `budget_ratio`."""
        if self.mode in table:
            return table[self.mode]
        return table["compiled"] * budget_ratio

    def _kept(self, stage: int, tokens: float) -> float:
        """Bytes a unit keeps for backward when nothing is recomputed, K/V excluded: the graph's saved
        tensors, each attention's LSE, and the fused loss's gradients (computed in its forward)."""
        kept = self._saved(self.bodies[stage], tokens)
        return kept + self._head_kept(tokens) if self._is_last(stage) else kept

    def _saved(self, c: Coeffs, tokens: float) -> float:
        """What autograd saves for the nodes of `c` (a stage body or a few layers), and their attention LSEs."""
        g = self.graph
        return (
            self._factor(self.profile.saved_factor, BUDGET_SAVED_RATIO) * c.saved_per_token
            + c.attention_layers * g.heads * LSE_BYTES
        ) * tokens

    def _head_kept(self, tokens: float) -> float:
        """The loss side's saved tensors; the fused loss's are its gradients, dL/dhidden (bf16) and dL/dW (fp32)."""
        g = self.graph
        if self.layout.fused_loss:
            return g.hidden_size * g.dtype_bytes * tokens + 4 * g.hidden_size * g.vocab_size
        return g.loss.saved_per_token * tokens

    def unit_activations(self, stage: int, chunk: int) -> tuple[float, float]:
        """(bytes kept for backward, K/V bytes) of one unit on one rank. With sequence chunks the relay
        holds one preallocated K/V buffer per micro-batch for the whole sequence: charged to chunk 0,
        the first in and the last out. Without chunks K/V are ordinary saved activations."""
        c, lay, g = self.bodies[stage], self.layout, self.graph
        tokens = self._tokens(self.chunk_lengths[chunk])
        kv_scale = c.kv_per_token * max(1.0, lay.sp / g.kv_heads)
        if lay.recompute == "none":
            saved = self._kept(stage, tokens)
        else:  # each layer's input (and the head's), and with keep_attention each attention's output and LSE
            segments = -(-len(self.stage_layers[stage]) // lay.recompute_layers)
            inputs = segments + (1 if self._is_last(stage) else 0)
            saved = inputs * g.hidden_size * g.dtype_bytes * tokens
            if lay.recompute == "keep_attention":
                saved += self.kept_attention(stage) * g.heads * (g.head_dim * g.dtype_bytes + LSE_BYTES) * tokens
        if len(self.chunk_lengths) == 1:
            return saved + kv_scale * tokens, 0.0
        whole = self._tokens(sum(self.chunk_lengths))
        return saved, (kv_scale * whole if chunk == 0 else 0.0)

    def offloaded_bytes(self, stage: int, chunk: int) -> float:
        """Bytes one unit sends to the host under train.offload (planner/offload.py): `attention` each kept
        layer's attention output and LSE; `all` everything the unit keeps but a later stage's received input
        (the runtime holds it for its gradient) and the relay's K/V."""
        mode, g = self.layout.offload, self.graph
        if mode == "none":
            return 0.0
        tokens = self._tokens(self.chunk_lengths[chunk])
        if mode == "attention":
            return self.kept_attention(stage) * g.heads * (g.head_dim * g.dtype_bytes + LSE_BYTES) * tokens
        kept, _ = self.unit_activations(stage, chunk)
        received = g.hidden_size * g.dtype_bytes * tokens if stage > 0 else 0.0
        return max(0.0, kept - received)

    def offload_transient(self, stage: int) -> float:
        """Offloaded bytes a stage still holds on the device: the unit being computed and the one coming back."""
        if self.layout.offload == "none":
            return 0.0
        return 2 * max(self.offloaded_bytes(stage, c) for c in range(len(self.chunk_lengths)))

    def recompute_transient(self, stage: int) -> float:
        """Recompute: what one rerun rebuilds while its backward runs, for the largest unit: one segment of
        `recompute_layers` decoder layers' activations (runtime/recompute.py), or on the last stage the fused
        loss's gradients when they are larger."""
        if self.layout.recompute == "none":
            return 0.0
        tokens = self._tokens(max(self.chunk_lengths))
        ls, group = self.stage_layers[stage], self.layout.recompute_layers
        segment = max(
            self._saved(sum((self.graph.layers[i] for i in ls[start : start + group]), Coeffs()), tokens)
            for start in range(0, len(ls), group)
        )
        return max(segment, self._head_kept(tokens)) if self._is_last(stage) else segment

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
        return (
            self.stage_memory(stage).total
            + self.recompute_transient(stage)
            + self.offload_transient(stage)
            + self.ring_transient(stage)
        )

    def step_bytes(self, stage: int) -> float:
        """What OPT allocates while it runs: nothing, every optimizer updates its tensors in place (a bf16 run's
        fp32 gradient exists only inside mixed_adamw's kernel)."""
        return 0.0

    def unit_bytes(self, stage: int, chunk: int) -> tuple[float, float]:
        """What a unit holds on the device between its forward and its backward (less what went to the host)."""
        kept, kv = self.unit_activations(stage, chunk)
        return kept - self.offloaded_bytes(stage, chunk), kv

    # --- honesty -----------------------------------------------------------------------------------------
    def figures_used(self) -> dict[str, dict]:
        """Each profile figure a nonzero term of this plan read: {figure: {status, source, terms}}."""
        terms: set[str] = {"activations"}
        for s in range(len(self.stages)):
            for c in range(len(self.chunk_lengths)):
                for parts in (
                    self.backward_parts(s, c),
                    self.compute_parts(s, self.chunk_lengths[c], self.prefixes[c]),
                ):
                    terms |= {name for name, t in parts.items() if t > 0 and name in TERM_FIGURES}
            if self.grad_sync_time(s) > 0:
                terms.add("grad_sync")
        terms.add("optimizer")
        if self.layout.offload != "none":
            terms.add("offload")
        if len(self.stages) > 1:
            terms.add("p2p")
        out: dict[str, dict] = {}
        for term in sorted(terms):
            for figure in self._figures(term):
                status, source = self.profile.status(figure)
                entry = out.setdefault(figure, {"status": status, "source": source, "terms": []})
                entry["terms"].append(term)
        return out

    def _figures(self, term: str) -> tuple[str, ...]:
        """The figures a term reads on this layout (a link: only the one its collectives cross)."""
        if term in ("all_to_all", "grad_sync", "p2p", "ring_p2p"):
            lay = self.layout
            ranks = {"all_to_all": lay.sp, "grad_sync": lay.replicas, "ring_p2p": lay.seq_shards}.get(term, lay.gpus)
            return (self.profile.link_figure(ranks, term),)
        dev = self.profile
        fallback = {  # figures a profile may lack: the term then reads the one it falls back to
            "matmul_shapes": "matmul_shapes" if dev.matmul_shapes else "matmul_flops",
            "attention_blocks": "attention_blocks" if dev.attention_blocks else "attention_flops",
            "fused_loss_flops": "fused_loss_flops" if dev.fused_loss_flops else "matmul_flops",
            "adamw_params_per_s": "adamw_params_per_s" if dev.adamw_params_per_s else "memory_bandwidth",
        }
        return tuple(dict.fromkeys(fallback.get(f, f) for f in TERM_FIGURES[term]))
