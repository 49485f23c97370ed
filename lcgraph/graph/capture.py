"""Capture: an unmodified HF LLaMA -> one torch.fx graph with lcgraph annotations on every node.

`capture(model_or_config)` wraps the HF model with a summed cross-entropy loss (labels are shifted
by the data pipeline, before any chunking or sharding), exports it with torch.export (transformers 5
has no fx tracer) with a dynamic sequence dimension and explicit position ids, and annotates every
node once with a `NodeInfo`: which part of the model it belongs to, its role, its sequence dim and
its cost as a function of the sequence length. Everything downstream reads those annotations.

Attention becomes one `lcgraph::attention` node per layer (see attention.py); HF's mask building
disappears because the mask function returns None.

A model of more than three decoder layers is exported with three and the graph grown to the others
(repeat.py): the same graph, node for node, in a fraction of the export's time.
"""

from __future__ import annotations

import copy
import re
import time
from dataclasses import dataclass, field
from typing import Any

import sympy
import torch
import torch.nn.functional as F

from lcgraph.errors import TRACEBACK_ENV, CaptureError
from lcgraph.graph.repeat import grow_layers
from lcgraph.ops.attention import register_with_transformers

LLAMA_LIKE = ("llama", "mistral", "qwen2")  # decoder-only models with the LLaMA layer layout
IGNORE_INDEX = -100


@dataclass
class NodeInfo:
    """What lcgraph knows about one node; computed once at capture, carried by every pass."""

    part: str  # input | param | buffer | shared | embed | layer | norm | head | loss | output
    layer: int | None  # decoder layer index for part == "layer"
    role: str  # attention | projection | mlp | norm | rotary | residual | embedding | head | loss | glue | ...
    seq_dim: int | None  # which dim of the output is the sequence (None: not sequence-shaped)
    flops_per_token: float = 0.0  # matmul FLOPs (forward) that scale with the token count
    flops_per_pair: float = 0.0  # attention FLOPs (forward) per attended (query, key) pair
    bytes_per_token: float = 0.0  # output bytes that scale with the token count
    const_bytes: float = 0.0  # output bytes independent of the sequence length (parameters)

    def flops(self, seq_len: int, prefix: int = 0) -> float:
        """Forward FLOPs for a chunk of `seq_len` tokens that attends `prefix` earlier tokens causally."""
        pairs = seq_len * prefix + seq_len * (seq_len + 1) / 2
        return self.flops_per_token * seq_len + self.flops_per_pair * pairs


@dataclass
class CapturedGraph:
    """The captured graph plus what is needed to run it with real tensors."""

    gm: torch.fx.GraphModule
    config: Any  # the HF config (transformers.PretrainedConfig; its fields are per model type)
    param_names: dict[str, str]  # placeholder name -> HF parameter name
    buffer_names: dict[str, str]  # placeholder name -> HF buffer name
    input_names: list[str] = field(default_factory=lambda: ["input_ids", "position_ids", "labels"])
    capture_seconds: float = 0.0
    exported_layers: int = 0  # decoder layers torch.export traced; the others were grown from them (repeat.py)

    @property
    def graph(self) -> torch.fx.Graph:
        return self.gm.graph

    def num_layers(self) -> int:
        return self.config.num_hidden_layers


class _CausalLMLoss(torch.nn.Module):
    """HF causal LM + summed token cross-entropy; the caller divides by the step's token count."""

    def __init__(self, hf_model):
        super().__init__()
        self.hf = hf_model

    def forward(self, input_ids, position_ids, labels):
        logits = self.hf(input_ids=input_ids, position_ids=position_ids, use_cache=False).logits
        return F.cross_entropy(
            logits.float().flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX, reduction="sum"
        )


def check_llama_like(config) -> None:
    model_type = getattr(config, "model_type", None)
    if model_type not in LLAMA_LIKE:
        raise CaptureError(
            f"model_type {model_type!r} is not LLaMA-like; lcgraph captures {', '.join(LLAMA_LIKE)} decoder models. "
            "Point model.path at a LLaMA checkpoint directory."
        )


def build_meta_model(config, dtype=torch.float32):
    """The HF model with every parameter on the meta device: shapes only, no real weights.

    The dtype matters: HF casts back to the input dtype in norms and rotary, and export bakes it in.
    """
    from transformers import AutoModelForCausalLM

    config._attn_implementation = register_with_transformers()
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, attn_implementation=config._attn_implementation)
    return model.to(dtype)


def capture(
    model_or_config,
    batch_size: int = 1,
    example_seq_len: int = 16,
    dtype: torch.dtype = torch.float32,
    whole: bool = False,
) -> CapturedGraph:
    """Export `model_or_config` (an HF causal LM or its config) to an annotated fx graph on meta tensors.

    The sequence dim is dynamic; the batch (micro-batch size) and the parameter dtype are fixed at capture. A
    config's first EXPORTED_LAYERS layers are exported and the graph grown to the others (`_export`); `whole`
    exports every layer (the graph is the same: tests compare the two).
    """
    config = getattr(model_or_config, "config", model_or_config)
    check_llama_like(config)
    key = None
    if not isinstance(model_or_config, torch.nn.Module):
        key = (config.to_json_string(use_diff=False), batch_size, example_seq_len, dtype, whole)
        if key in _CACHE:  # passes edit the graph in place (passes.retarget_device): each caller gets its own copy
            return copy.deepcopy(_CACHE[key])
    captured = _export(model_or_config, config, batch_size, example_seq_len, dtype, grow=not whole)
    if key is not None:
        _CACHE.clear()  # one entry: a 70B graph is large, and a process captures one model at a time
        _CACHE[key] = copy.deepcopy(captured)
    return captured


# A process that builds several runs of one model (the tests' layout grids, a planner's alternatives, sweeps
# in one process) exports it once: torch.export of a tiny LLaMA takes seconds, a copy of its graph 50 ms.
_CACHE: dict[tuple, CapturedGraph] = {}


def _export(
    model_or_config, config, batch_size: int, example_seq_len: int, dtype: torch.dtype, grow: bool = True
) -> CapturedGraph:
    """Export and annotate. A config of more than EXPORTED_LAYERS layers is exported with EXPORTED_LAYERS and the
    graph grown to all of them (repeat.grow_layers: node for node the graph export gives, in a fraction of its time:
    2.5 s instead of 12 for Llama-2-70B's 80 layers on 2 cores); a model whose layers do not repeat exactly is
    exported whole."""
    started = time.perf_counter()
    layers = config.num_hidden_layers
    grown = None
    if grow and not isinstance(model_or_config, torch.nn.Module) and layers > EXPORTED_LAYERS:
        few = _fewer_layers(config, EXPORTED_LAYERS)
        if few is not None:
            gm, param_names, buffer_names = _exported(few, few, batch_size, example_seq_len, dtype)
            config._attn_implementation = few._attn_implementation
            layer_of = _layer_of(param_names, buffer_names)
            grown = grow_layers(gm, param_names, buffer_names, EXPORTED_LAYERS, layers, layer_of)
    if grown is None:
        gm, param_names, buffer_names = _exported(model_or_config, config, batch_size, example_seq_len, dtype)
    else:
        param_names, buffer_names = grown
    if getattr(config, "tie_word_embeddings", False):  # one tensor, one canonical name: the embedding's
        param_names = {k: "model.embed_tokens.weight" if v == "lm_head.weight" else v for k, v in param_names.items()}
    _sizes_from_position_ids(gm)
    gm.graph.eliminate_dead_code()
    gm.recompile()
    captured = CapturedGraph(gm, config, param_names, buffer_names)
    annotate(captured)
    captured.capture_seconds = time.perf_counter() - started
    captured.exported_layers = layers if grown is None else EXPORTED_LAYERS
    return captured


EXPORTED_LAYERS = 3  # HF's first layer traces differently; the next two show what every further layer adds


def _fewer_layers(config, layers: int):
    """A copy of `config` with its first `layers` decoder layers, or None where its layers differ by config
    (per-layer attention types)."""
    types = getattr(config, "layer_types", None)
    if types is not None and len(set(types)) > 1:
        return None
    few = copy.deepcopy(config)
    few.num_hidden_layers = layers
    if types is not None:
        few.layer_types = list(types[:layers])
    return few


def _layer_of(param_names: dict[str, str], buffer_names: dict[str, str]):
    """The decoder layer a node belongs to (its parameter's or its module's), as `annotate` reads it."""

    def layer_of(node: torch.fx.Node) -> int | None:
        if node.op == "placeholder":
            name = param_names.get(node.name) or buffer_names.get(node.name)
            m = _LAYER_RE.search(name) if name else None
        else:
            m = _LAYER_RE.search(_module_path(node)) if node.op != "output" else None
        return int(m.group(1)) if m else None

    return layer_of


def _exported(
    model_or_config, config, batch_size: int, example_seq_len: int, dtype: torch.dtype
) -> tuple[torch.fx.GraphModule, dict[str, str], dict[str, str]]:
    """torch.export's graph (lifted: parameters and buffers are placeholders) and the placeholders' HF names."""
    if isinstance(model_or_config, torch.nn.Module):
        model_or_config.config._attn_implementation = register_with_transformers()
        # an HF PreTrainedModel method; nn.Module.__getattr__ types it as a Tensor
        model_or_config.set_attn_implementation(model_or_config.config._attn_implementation)  # type: ignore[operator]
        model = model_or_config
    else:
        model = build_meta_model(config, dtype)
    seq = torch.export.Dim("seq", min=2, max=1 << 24)
    example = {
        k: torch.zeros(batch_size, example_seq_len, dtype=torch.long, device="meta")
        for k in ("input_ids", "position_ids", "labels")
    }
    try:
        ep = torch.export.export(
            _CausalLMLoss(model), (), kwargs=example, dynamic_shapes={k: {1: seq} for k in example}, strict=False
        )
    except Exception as exc:  # export errors are long; keep the first line and say what to do
        raise CaptureError(
            f"torch.export failed for {type(model).__name__}: {str(exc).splitlines()[0]} "
            f"(set {TRACEBACK_ENV}=1 for the full cause)"
        ) from exc
    return (ep.graph_module, *_signature_names(ep))


def _signature_names(ep) -> tuple[dict[str, str], dict[str, str]]:
    from torch.export.graph_signature import InputKind

    params: dict[str, str] = {}
    buffers: dict[str, str] = {}
    for spec in ep.graph_signature.input_specs:
        if not spec.target:  # user inputs: neither parameter nor buffer
            continue
        name = spec.target.removeprefix("hf.")
        if spec.kind == InputKind.PARAMETER:
            params[spec.arg.name] = name
        elif spec.kind in (InputKind.BUFFER, InputKind.CONSTANT_TENSOR):
            buffers[spec.arg.name] = name
    return params, buffers


def _sizes_from_position_ids(gm: torch.fx.GraphModule) -> None:
    """Read the sequence length from position_ids, the one input every pipeline stage receives.

    export may take it from labels or input_ids (they share the symbol); a stage without those inputs
    would otherwise need them just for their shape.
    """
    inputs = {n.name: n for n in gm.graph.nodes if n.op == "placeholder"}
    for node in gm.graph.nodes:
        if node.target == torch.ops.aten.sym_size.int and node.args[0].name in ("labels", "input_ids"):
            node.args = (inputs["position_ids"], *node.args[1:])


# --- annotation ----------------------------------------------------------------------------------------------

_LAYER_RE = re.compile(r"(?:^|\.)layers\.(\d+)(?:\.|$)")


def _module_path(node: torch.fx.Node) -> str:
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return ""
    path = list(stack.values())[-1][0]
    path = "" if path.startswith("_empty_nn_module_stack") else path
    return re.sub(r"^hf\.?", "", path)


def _part_of(path: str, captured: CapturedGraph, node: torch.fx.Node) -> tuple[str, int | None]:
    if node.op == "placeholder":
        if node.name in captured.param_names:
            name = captured.param_names[node.name]
            m = _LAYER_RE.search(name)
            return ("param", int(m.group(1)) if m else None)
        return ("buffer", None) if node.name in captured.buffer_names else ("input", None)
    if node.op == "output":
        return ("output", None)
    m = _LAYER_RE.search(path)
    if m:
        return ("layer", int(m.group(1)))
    if "embed_tokens" in path:
        return ("embed", None)
    if path.endswith("model.norm") or path == "norm" or path.endswith(".norm"):
        return ("norm", None)
    if "lm_head" in path or node.target == torch.ops.aten.alias.default:
        return ("head", None)
    if path == "":
        return ("wrapper", None)  # resolved by annotate(): loss after the head, shared before it
    return ("shared", None)  # rotary tables, position-id checks: recomputed on every stage that needs them


def _role_of(node: torch.fx.Node, path: str, part: str) -> str:
    target = node.target
    if target == torch.ops.lcgraph.attention.default:
        return "attention"
    if part in ("param", "buffer", "input", "output", "loss"):
        return part
    if part == "embed":
        return "embedding"
    if part == "head":
        return "head"
    if path.endswith(("q_proj", "k_proj", "v_proj", "o_proj")):
        return "projection"
    if ".mlp" in path or path.endswith("mlp") or "act_fn" in path:
        return "mlp"
    if path.endswith("norm"):
        return "norm"
    if "rotary" in path:
        return "rotary"
    if path.endswith("self_attn"):
        return "rotary" if target in _ROTARY_OPS else "glue"
    if target == torch.ops.aten.add.Tensor and part == "layer":
        return "residual"
    return "glue"


_ROTARY_OPS = {
    torch.ops.aten.mul.Tensor,
    torch.ops.aten.add.Tensor,
    torch.ops.aten.neg.default,
    torch.ops.aten.cat.default,
    torch.ops.aten.slice.Tensor,
    torch.ops.aten.unsqueeze.default,
}


class _SeqPoly:
    """Evaluates symbolic sizes at given sequence lengths (cached: a 70B graph repeats a few shapes)."""

    def __init__(self, seq_symbol):
        self.sym = seq_symbol
        self.cache: dict = {}

    def at(self, size, seq_len: int) -> int:
        if not isinstance(size, torch.SymInt):
            return int(size)
        expr = size.node.expr
        key = (expr, seq_len)
        if key not in self.cache:
            self.cache[key] = int(sympy.sympify(expr).subs(self.sym, seq_len))
        return self.cache[key]

    def has_seq(self, size) -> bool:
        return isinstance(size, torch.SymInt) and self.sym in size.node.expr.free_symbols

    def numel(self, shape, seq_len: int) -> int:
        total = 1
        for s in shape:
            total *= self.at(s, seq_len)
        return total

    def linear_coeffs(self, fn) -> tuple[float, float]:
        """(per-token, constant) for a function that is linear in the sequence length."""
        one, two = fn(1), fn(2)
        return float(two - one), float(2 * one - two)


def _seq_symbol(gm: torch.fx.GraphModule):
    for node in gm.graph.nodes:
        if node.op == "placeholder" and node.name == "input_ids":
            size = node.meta["val"].shape[1]
            return next(iter(size.node.expr.free_symbols))
    raise CaptureError("captured graph has no input_ids placeholder")


def annotate(captured: CapturedGraph) -> None:
    """Attach a NodeInfo to every node (part, layer, role, seq dim, costs)."""
    poly = _SeqPoly(_seq_symbol(captured.gm))
    seen_head = False
    for node in captured.graph.nodes:
        path = _module_path(node)
        part, layer = _part_of(path, captured, node)
        seen_head = seen_head or part == "head"
        if part == "wrapper":
            part = "loss" if seen_head else "shared"
        info = NodeInfo(part=part, layer=layer, role=_role_of(node, path, part), seq_dim=None)
        val = node.meta.get("val")
        if isinstance(val, torch.Tensor):
            dims = [i for i, s in enumerate(val.shape) if poly.has_seq(s)]
            info.seq_dim = dims[0] if dims else None
            size = val.element_size()
            info.bytes_per_token, info.const_bytes = poly.linear_coeffs(lambda s: poly.numel(val.shape, s) * size)
        _add_flops(node, info, poly)
        node.meta["lcgraph"] = info


def _add_flops(node: torch.fx.Node, info: NodeInfo, poly: _SeqPoly) -> None:
    if node.target == torch.ops.aten.linear.default:
        x, w = node.args[0].meta["val"], node.args[1].meta["val"]
        out_features = poly.at(w.shape[0], 1)
        info.flops_per_token, _ = poly.linear_coeffs(lambda s: 2 * poly.numel(x.shape, s) * out_features)
    elif node.target == torch.ops.lcgraph.attention.default:
        q = node.args[0].meta["val"]
        batch, heads, dim = (poly.at(q.shape[i], 1) for i in (0, 1, 3))
        info.flops_per_pair = 4.0 * batch * heads * dim  # QK^T and PV: 2 FLOPs per MAC each


def graph_flops(captured: CapturedGraph, seq_len: int) -> float:
    """Forward FLOPs of the whole captured graph for one sequence of `seq_len` tokens."""
    return sum(n.meta["lcgraph"].flops(seq_len) for n in captured.graph.nodes)
