"""Graph passes: captured graph -> per-stage graphs that the runtime interprets.

Each pass is a small function with a docstring saying what it rewrites, what it assumes and what it
guarantees. `PASSES` lists them in the fixed order `compile_stages` applies them; `dump.graphs=true`
writes the graph after each one.

    retarget_device   device constants baked in at capture (meta) -> the run's device; capture-time asserts dropped
    partition         cut at decoder-layer boundaries into pp stage graphs (rotary tables recomputed per stage)
    kv_relay          attention -> attention over the K/V of earlier chunks and this one, read from one buffer (Seq1F1B)
    ulysses           all-to-all (sequence-sharded -> head-sharded) around every attention (parallel.sp)
    ring              attention -> ring attention over the cp ranks' zigzag pieces (parallel.cp; rules in graph/ring.py)
    fuse_loss         LM head + cross-entropy -> one blockwise op that never builds the full logits
    lower_attention   every other attention -> the kernel under autograd, keeping output and LSE for its backward
    fuse_pointwise    (graph/fusion.py, under train.fuse) RMSNorm, SwiGLU and rotary subgraphs -> fused ops that keep
                      only what their backward needs
    fp8_matmuls       (graph/fp8.py, under train.fp8) the decoder layers' linears -> FP8 scaled matmuls
    gather_waits      (runtime/optimizer.py, once the distributed optimizer has cut its buckets) a wait for each bucket's parameter
                      all-gather right before the forward first reads one of its parameters
    segment_layers    (runtime/recompute.py, under train.recompute) one submodule per decoder layer, each then
                      checkpointed on its own: a backward reruns one layer at a time, never the whole stage
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol, cast

import torch
import torch.fx as fx
from torch.fx.passes.split_module import split_module

from lcgraph.errors import PlanError
from lcgraph.graph.capture import CapturedGraph, NodeInfo
from lcgraph.graph.fp8 import fp8_matmuls
from lcgraph.graph.fusion import fuse_pointwise
from lcgraph.ops.collectives import heads_to_seq, seq_to_heads
from lcgraph.ops.fused import linear_cross_entropy
from lcgraph.ops.relay import layer_attention, relay_attention
from lcgraph.ops.ring import ring_layer_attention, ring_relay_attention

ATTENTION = torch.ops.lcgraph.attention.default


@dataclass
class StageGraph:
    """One pipeline stage: its graph, the HF names of the parameters it owns, and its layers."""

    index: int
    num_stages: int
    gm: fx.GraphModule
    layers: list[int]
    param_names: dict[str, str]  # placeholder -> HF parameter name
    buffer_names: dict[str, str]
    inputs: list[str] = field(default_factory=list)  # non-parameter placeholders, in order

    @property
    def is_first(self) -> bool:
        return self.index == 0

    @property
    def is_last(self) -> bool:
        return self.index == self.num_stages - 1

    def attention_nodes(self) -> list[fx.Node]:
        return [n for n in self.gm.graph.nodes if _is_attention(n)]


def _is_attention(node: fx.Node) -> bool:
    return node.meta.get("lcgraph") is not None and node.meta["lcgraph"].role == "attention"


# --- partition ---------------------------------------------------------------------------------------------


def layer_costs(captured: CapturedGraph, seq_len: int) -> tuple[list[float], float, float]:
    """Forward FLOPs per decoder layer, of the embedding side and of the head side (norm, head, loss)."""
    layers = [0.0] * captured.num_layers()
    first = last = 0.0
    for node in captured.graph.nodes:
        info: NodeInfo = node.meta["lcgraph"]
        cost = info.flops(seq_len) + info.bytes_per_token * seq_len / 100.0  # bytes: memory-bound glue, small weight
        if info.part == "layer":
            assert info.layer is not None  # every layer node has its index (capture)
            layers[info.layer] += cost
        elif info.part == "embed":
            first += cost
        elif info.part in ("norm", "head", "loss"):
            last += cost
    return layers, first, last


def balance_layers(costs: list[float], first: float, last: float, stages: int) -> list[int]:
    """Layer counts per stage minimising the most expensive stage (contiguous split, exact DP)."""
    n = len(costs)
    if stages > n:
        raise PlanError(f"parallel.pp={stages} stages but the model has {n} layers; use pp <= {n}")
    prefix = [0.0]
    for c in costs:
        prefix.append(prefix[-1] + c)
    INF = float("inf")
    # best[s][i]: minimal max-stage cost placing the first i layers on s stages
    best = [[INF] * (n + 1) for _ in range(stages + 1)]
    cut = [[0] * (n + 1) for _ in range(stages + 1)]
    best[0][0] = 0.0
    for s in range(1, stages + 1):
        for i in range(s, n - (stages - s) + 1):
            for j in range(s - 1, i):
                stage_cost = prefix[i] - prefix[j] + (first if s == 1 else 0.0) + (last if s == stages else 0.0)
                cand = max(best[s - 1][j], stage_cost)
                if cand < best[s][i]:
                    best[s][i], cut[s][i] = cand, j
    counts, i = [], n
    for s in range(stages, 0, -1):
        j = cut[s][i]
        counts.append(i - j)
        i = j
    return counts[::-1]


class StageLayout(Protocol):
    """What the stage split reads of the parallel config section."""

    @property
    def pp(self) -> int: ...
    @property
    def virtual_stages(self) -> int: ...
    @property
    def pp_layers(self) -> list[int] | None: ...


def plan_layer_counts(captured: CapturedGraph, parallel: StageLayout, seq_len: int) -> list[int]:
    """Layers per stage of a plan: `parallel.pp_layers` when given, else a FLOP-balanced split over
    pp * virtual_stages stages. The trainer and the planner both ask here, so they agree."""
    stages = parallel.pp * parallel.virtual_stages
    layers = captured.num_layers()
    if parallel.pp_layers:
        counts = list(parallel.pp_layers)
        if len(counts) != stages or sum(counts) != layers:
            raise PlanError(
                f"parallel.pp_layers={counts} must have {stages} entries summing to num_hidden_layers={layers}"
            )
        return counts
    costs, first, last = layer_costs(captured, seq_len)
    return balance_layers(costs, first, last, stages)


def stage_of_layers(counts: list[int]) -> list[int]:
    return [s for s, c in enumerate(counts) for _ in range(c)]


def partition(captured: CapturedGraph, layer_counts: list[int]) -> list[StageGraph]:
    """Cut the captured graph into len(layer_counts) stage graphs at decoder-layer boundaries.

    Assumes: exactly one tensor (the residual stream) crosses each boundary. Embedding goes to the first
    stage, final norm / head / loss to the last; shared nodes (rotary tables, position checks) are copied
    into every stage that uses them, so no stage waits for another to compute them. A parameter used on
    two stages (tied embeddings) appears in both. Guarantees: chaining the stage graphs computes the
    same values as the captured graph.
    """
    layer_stage = stage_of_layers(layer_counts)
    stages = len(layer_counts)
    owner = {n: _owner_stage(n, layer_stage, stages) for n in captured.graph.nodes}
    out = []
    for s in range(stages):
        layers = [i for i, st in enumerate(layer_stage) if st == s]
        out.append(_extract_stage(captured, owner, s, stages, layers))
    return out


def _owner_stage(node: fx.Node, layer_stage: list[int], stages: int) -> int | None:
    """Stage that computes `node`; None for nodes copied wherever used (placeholders, shared)."""
    info: NodeInfo = node.meta["lcgraph"]
    if info.part == "layer":
        assert info.layer is not None  # every layer node has its index (capture)
        return layer_stage[info.layer]
    if info.part == "embed":
        return 0
    if info.part in ("norm", "head", "loss", "output"):
        return stages - 1
    return None


def _needed(nodes: list[fx.Node], owner) -> set[fx.Node]:
    """Nodes `nodes` depend on that have no owner stage (copied into the stage)."""
    seen: set[fx.Node] = set()
    stack = [a for n in nodes for a in n.all_input_nodes]
    while stack:
        n = stack.pop()
        if n in seen or owner[n] is not None:
            continue
        seen.add(n)
        stack.extend(n.all_input_nodes)
    return seen


def _extract_stage(captured: CapturedGraph, owner, s: int, stages: int, layers: list[int]) -> StageGraph:
    own = [n for n in captured.graph.nodes if owner[n] == s]
    copied = _needed(own, owner)
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    crossing = {a for n in own for a in n.all_input_nodes if owner[a] is not None and owner[a] != s}
    if len(crossing) > 1 or (s == 0) != (not crossing):
        raise PlanError(f"stage {s}: expected one activation from the previous stage, found {len(crossing)}")
    hidden_in = None
    for node in captured.graph.nodes:  # placeholders first, in capture order
        if node.op == "placeholder" and node in copied:
            env[node] = graph.node_copy(node, lambda n: env[n])
    if crossing:
        (src,) = crossing
        hidden_in = graph.placeholder("hidden_in")
        hidden_in.meta = dict(src.meta)
        env[src] = hidden_in
    for node in captured.graph.nodes:
        if node.op == "placeholder" or node.op == "output":
            continue
        if node in copied or owner[node] == s:
            env[node] = graph.node_copy(node, lambda n: env[n])
    if s == stages - 1:
        out_node = captured.graph.output_node().args[0]
        (loss,) = out_node if isinstance(out_node, (tuple, list)) else (out_node,)
        assert isinstance(loss, fx.Node)  # the captured graph returns the loss node
        graph.output(env[loss])
    else:
        nxt = [n for n in captured.graph.nodes if owner[n] == s + 1]
        (boundary,) = {a for n in nxt for a in n.all_input_nodes if owner[a] is not None and owner[a] != s + 1}
        graph.output(env[boundary])
    graph.eliminate_dead_code()
    for node in [n for n in graph.nodes if n.op == "placeholder" and not n.users]:
        graph.erase_node(node)  # e.g. labels seen only through a shape on a stage without the loss
    gm = fx.GraphModule(captured.gm, graph)  # the root supplies submodules of higher-order ops (autocast regions)
    names = {n.name for n in graph.nodes if n.op == "placeholder"}
    params = {k: v for k, v in captured.param_names.items() if k in names}
    buffers = {k: v for k, v in captured.buffer_names.items() if k in names}
    inputs = [n.name for n in graph.nodes if n.op == "placeholder" and n.name not in params and n.name not in buffers]
    return StageGraph(s, stages, gm, layers, params, buffers, inputs)


# --- KV relay (Seq1F1B) ----------------------------------------------------------------------------------


def kv_relay(stage: StageGraph) -> StageGraph:
    """Rewrite every attention node to attend the cached K/V of earlier chunks of the same micro-batch.

    Assumes: the runtime tells `lcgraph.ops.relay` which (micro-batch, chunk) runs (RelayContext) and runs
    chunk backwards last-to-first within a micro-batch. Guarantees: outputs and gradients equal full-
    sequence attention; cross-chunk gradients travel through the relay, never through autograd edges.
    """

    for node in stage.attention_nodes():
        node.target = relay_attention
        node.args = (*node.args[:4], node.meta["lcgraph"].layer)  # the layer keys its K/V cache
    stage.gm.recompile()
    return stage


# --- fused loss ----------------------------------------------------------------------------------------

_PASS_THROUGH = {
    torch.ops.aten.to.dtype,
    torch.ops.aten.flatten.using_ints,
    torch.ops.aten.view.default,
    torch.ops.aten.reshape.default,
    torch.ops.aten.alias.default,
    torch.ops.aten._to_copy.default,
}


def fuse_loss(stage: StageGraph) -> StageGraph:
    """Replace lm_head linear -> fp32 cast -> cross_entropy(sum) with `fused.linear_cross_entropy`.

    Assumes: the last stage ends in HF's head and lcgraph's summed loss. Guarantees: the same loss and
    gradients (fp32 softmax per block) without materialising [tokens x vocab] logits.
    """

    graph = stage.gm.graph
    ce = next((n for n in graph.nodes if n.target == torch.ops.aten.cross_entropy_loss.default), None)
    if ce is None:
        return stage
    logits, labels = ce.args[:2]
    reduction = ce.args[3] if len(ce.args) > 3 else ce.kwargs.get("reduction", 1)
    while logits.target in _PASS_THROUGH:
        logits = logits.args[0]
    if logits.target != torch.ops.aten.linear.default or reduction != 2:  # 2: sum
        return stage
    with graph.inserting_before(ce):
        fused = graph.call_function(linear_cross_entropy, (logits.args[0], logits.args[1], labels))
    fused.meta = dict(ce.meta)
    fused.meta["lcgraph"] = NodeInfo(
        part="loss", layer=None, role="loss", seq_dim=None, flops_per_token=logits.meta["lcgraph"].flops_per_token
    )
    ce.replace_all_uses_with(fused)
    graph.erase_node(ce)
    graph.eliminate_dead_code()
    stage.gm.recompile()
    return stage


# --- attention lowering ---------------------------------------------------------------------------------


def lower_attention(stage: StageGraph) -> StageGraph:
    """Point every attention node the KV relay left alone at `layer_attention`, keyed by its layer.

    Assumes: runs after kv_relay and ulysses (it keeps their arguments). Guarantees: same attention as
    `lcgraph::attention`, one node per layer, whose forward saves output and LSE so that its backward
    calls the kernel's backward only; under recompute=keep_attention the rerun reuses the kept output.
    """

    for node in stage.attention_nodes():
        if node.target == ATTENTION:
            node.target = layer_attention
            node.args = (*node.args[:4], node.meta["lcgraph"].layer)
    stage.gm.recompile()
    return stage


# --- Ulysses ------------------------------------------------------------------------------------------------


def ulysses(stage: StageGraph, sp: int) -> StageGraph:
    """Insert all-to-all around each attention: [B, H, S/sp, D] x sp ranks <-> [B, H/sp, S, D].

    Assumes: the stage runs on sequence shards (inputs, positions and labels split by the data side)
    and heads % sp == 0, with kv_heads % sp == 0 or sp % kv_heads == 0 (K/V heads are then repeated up
    to sp first). Guarantees: each rank attends its own heads over the full sequence; the all-to-alls
    are autograd-aware (their backward is the inverse all-to-all).
    """

    if sp == 1:
        return stage
    graph = stage.gm.graph
    for node in stage.attention_nodes():
        # torch.fx types args as Argument; attention nodes take their q, k, v nodes first
        q, k, v = cast(tuple[fx.Node, fx.Node, fx.Node], node.args[:3])
        with graph.inserting_before(node):
            k_rep, v_rep = (_repeat_kv_node(graph, t, sp) for t in (k, v))
            q2, k2, v2 = (graph.call_function(seq_to_heads, (t,)) for t in (q, k_rep, v_rep))
        node.args = (q2, k2, v2, *node.args[3:])
        with graph.inserting_after(node):
            out = graph.call_function(heads_to_seq, (node,))
        node.replace_all_uses_with(out, delete_user_cb=lambda user: user is not out)
        for new in (q2, k2, v2, out):
            new.meta["lcgraph"] = NodeInfo(
                part=node.meta["lcgraph"].part, layer=node.meta["lcgraph"].layer, role="all_to_all", seq_dim=2
            )
    stage.gm.recompile()
    return stage


def ring(stage: StageGraph, cp: int) -> StageGraph:
    """Point every attention node at ring attention over the cp group (ops/ring.py).

    Assumes: runs after kv_relay and ulysses, before lower_attention (which then leaves these nodes alone); each
    rank holds its zigzag pieces (pieces r and 2cp-1-r of every Seq1F1B chunk, absolute position ids), which the
    data side cuts. Guarantees: every query attends exactly the causal keys of the whole sequence, the relayed
    prefix of earlier chunks included; K/V gradients return to the rank that holds those keys.
    """
    if cp == 1:
        return stage
    for node in stage.attention_nodes():
        chunked = node.target is relay_attention
        node.target = ring_relay_attention if chunked else ring_layer_attention
        node.args = (*node.args[:4], node.meta["lcgraph"].layer)
    stage.gm.recompile()
    return stage


def _repeat_kv_node(graph: fx.Graph, node: fx.Node, sp: int) -> fx.Node:
    kv_heads = node.meta["val"].shape[1]
    if kv_heads % sp == 0:
        return node
    return graph.call_function(torch.repeat_interleave, (node, sp // kv_heads), {"dim": 1})


def check_ulysses(config, sp: int) -> None:
    heads, kv = config.num_attention_heads, getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    if heads % sp:
        raise PlanError(
            f"parallel.sp={sp} must divide num_attention_heads={heads}; pick sp in "
            f"{[d for d in range(1, heads + 1) if heads % d == 0]}"
        )
    if kv % sp and sp % kv:
        raise PlanError(
            f"parallel.sp={sp} and num_key_value_heads={kv}: one must divide the other "
            "(K/V heads are replicated up to sp); change sp"
        )


def retarget_device(gm: torch.fx.GraphModule, device: torch.device) -> None:
    """Rewrite device constants baked in at capture (meta) to the device the graph will run on.

    Capture-time metadata asserts (which name the meta device) are dropped with them.
    """

    def fix(a):
        return device if isinstance(a, torch.device) else a

    for node in list(gm.graph.nodes):
        if node.target == torch.ops.aten._assert_tensor_metadata.default:
            gm.graph.erase_node(node)
    autocast = getattr(torch.ops.higher_order, "wrap_with_autocast", None)
    for node in gm.graph.nodes:
        if node.op == "call_function":
            node.args = torch.fx.node.map_aggregate(node.args, fix)
            node.kwargs = torch.fx.node.map_aggregate(node.kwargs, fix)
            if autocast is not None and node.target == autocast and node.args[0] == "meta":
                node.args = (device.type, *node.args[1:])  # autocast regions name a device type string
    for sub in gm.modules():
        if sub is not gm and isinstance(sub, torch.fx.GraphModule):
            retarget_device(sub, device)
    gm.recompile()


PASSES = (
    "retarget_device",
    "partition",
    "kv_relay",
    "ulysses",
    "ring",
    "fuse_loss",
    "lower_attention",
    "fuse_pointwise",
    "fp8_matmuls",
    "gather_waits",
)  # the last one is zero.gather_waits: it needs the optimizer's bucket layout


LAYER_PREFIX = "layer_"  # segment_layers names each decoder layer's submodule layer_<index>
EMBED, HEAD = "embed", "head"  # and what runs before the first layer and after the last


def segment_layers(gm: fx.GraphModule, group: int = 1) -> tuple[fx.GraphModule, dict[str, list[int]]]:
    """Split a stage graph into submodules: what runs before its first decoder layer, one per `group`
    consecutive layers, and what runs after its last (final norm, head, loss). Returns the new graph module
    and {submodule name: its layers}; a segment is named after its first layer, layer_<index>.

    Assumes: every layer node carries its NodeInfo layer (capture), and a stage's layers run one after the
    other, as HF's decoder loop runs them. Nodes without a layer between two layers (glue) join the layer
    before them. Guarantees: the same placeholders (so the same call) and the same result, op for op.
    """
    nodes = [n for n in gm.graph.nodes if n.op not in ("placeholder", "output")]
    layer_at = [_layer_of(n) for n in nodes]
    present = sorted({layer for layer in layer_at if layer is not None})
    last = max((i for i, layer in enumerate(layer_at) if layer is not None), default=-1)
    embed, head = 0, len(nodes) + 1  # partition numbers around the segments' (first layer + 1)

    def segment(layer: int) -> int:
        return present[0] + (layer - present[0]) // group * group + 1

    part: dict[fx.Node, int] = {}
    current = embed  # before the first layer: the embedding side and the rotary tables
    for i, (node, layer) in enumerate(zip(nodes, layer_at)):
        current = segment(layer) if layer is not None else current
        part[node] = current if i <= last else head
    name = {p: EMBED if p == embed else HEAD if p == head else f"{LAYER_PREFIX}{p - 1}" for p in part.values()}
    out = split_module(gm, gm, lambda n: part[n], keep_original_order=True, keep_original_input_name=True)
    for key, mod in list(out.named_children()):  # submod_<partition> -> readable names
        delattr(out, key)
        setattr(out, name[int(key.rsplit("_", 1)[1])], mod)
    for node in out.graph.nodes:
        if node.op == "call_module":
            node.target = name[int(str(node.target).rsplit("_", 1)[1])]
    out.recompile()
    layers: dict[str, list[int]] = {}
    for layer in present:
        layers.setdefault(name[segment(layer)], []).append(layer)
    return out, layers


def _layer_of(node: fx.Node) -> int | None:
    info = node.meta.get("lcgraph")
    return info.layer if info is not None and info.part == "layer" else None


def compile_stages(
    captured: CapturedGraph,
    layer_counts: list[int],
    device,
    seq_chunks: int,
    sp: int,
    only: set[int] | None = None,
    dump=None,
    fused_loss: bool = True,
    fuse: bool = False,
    cp: int = 1,
    fp8: str | None = None,
) -> dict[int, StageGraph]:
    """Run the passes in their fixed order; return the stage graphs (only those in `only`, when given).
    `fp8`: the FP8 recipe of the decoder layers' matmuls (train.fp8), None for none."""
    device = torch.device(device)
    retarget_device(captured.gm, device)
    if dump:
        dump("01_retarget_device", captured.gm)
    stages = partition(captured, layer_counts)
    chosen = {s.index: s for s in stages if only is None or s.index in only}
    steps = [
        ("03_kv_relay", kv_relay, seq_chunks > 1),
        ("04_ulysses", lambda st: ulysses(st, sp), sp > 1),
        ("04b_ring", lambda st: ring(st, cp), cp > 1),
        ("05_fuse_loss", fuse_loss, fused_loss),
        ("06_lower_attention", lower_attention, True),
        ("07_fuse_pointwise", lambda st: fuse_pointwise(st.gm), fuse),
        ("08_fp8_matmuls", lambda st: fp8_matmuls(st.gm, cast(str, fp8)), fp8 is not None),
    ]
    for s in chosen.values():
        if dump:
            dump(f"02_partition_stage{s.index}", s.gm)
        for name, apply, wanted in steps:
            if wanted:
                apply(s)
                if dump:
                    dump(f"{name}_stage{s.index}", s.gm)
    return chosen
