"""train.recompute: which activations a unit keeps for its backward, and what the backward reruns.

    none            keep everything autograd saves
    keep_attention  keep each segment's input, and its attention outputs and LSEs (in every layer, or the first
                    train.keep_attention_layers of each stage); the backward reruns norms, projections, rotary
                    and MLP, and attention only where its output was not kept
    full            keep each segment's input; the backward reruns the whole segment, attention included

A segment is train.recompute_layers consecutive decoder layers (0: the planner picks, planner.evaluation.best_segments).
`seal` splits a stage graph into embed, segments and head (passes.segment_layers) and runs each segment under
non-reentrant activation checkpointing (torch.utils.checkpoint, use_reentrant=False): the autograd engine reruns
one segment at a time inside the backward, so longer segments keep fewer inputs per unit in flight and rebuild
more at once (docs/attention.md measures the trade). The rerun tells attention it is one (RelayContext.rerun):
the KV relay reads the K/V it already holds and hands back a kept output instead of running the kernel
(lcgraph/ops/relay.py). The head side (final norm, fused loss) runs without autograd and reruns in its
backward (reentrant checkpointing): recorded, its forward would hold an fp32 head gradient per unit in flight
(lcgraph/ops/fused.py), 1 GiB at Llama-3's vocab.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch
import torch.fx as fx
from torch.utils.checkpoint import checkpoint

from lcgraph.errors import PlanError
from lcgraph.graph.passes import HEAD, segment_layers
from lcgraph.ops.relay import RelayContext

RECOMPUTE_MODES = ("none", "keep_attention", "full")  # fastest first
AUTO = "auto"  # the planner picks the fastest mode that fits (planner.plan.resolve_recompute)
_RECOMPUTE_ALIASES = {True: "full", False: "none", None: "none", "true": "full", "false": "none"}

# Called with a checkpointed layer's tensor inputs, the only activations it holds until its backward (the
# interpreter's activation meter counts them: they bypass autograd's saved-tensor hooks). None: not counted.
held_inputs: Callable[[torch.Tensor], object] | None = None


def recompute_mode(value: object, allow_auto: bool = False) -> str:
    """`train.recompute` as one of RECOMPUTE_MODES (or `auto` where allowed); booleans (also as OmegaConf's
    "True"/"False") still work."""
    key = value.lower() if isinstance(value, str) else value
    mode = _RECOMPUTE_ALIASES.get(key, key)  # type: ignore[call-overload]
    if mode not in RECOMPUTE_MODES and not (allow_auto and mode == AUTO):
        choices = ", ".join(RECOMPUTE_MODES + ((AUTO,) if allow_auto else ()))
        raise PlanError(f"train.recompute={value} is unknown; use one of {choices} (or true/false)")
    return str(mode)


def _hold(args) -> None:
    if held_inputs is not None:
        for a in args:
            if isinstance(a, torch.Tensor):
                held_inputs(a)


class CheckpointedSegment(torch.nn.Module):
    """One segment of decoder layers (train.recompute_layers of them), run under activation checkpointing: its
    forward keeps only its inputs."""

    def __init__(self, inner: Callable[..., torch.Tensor], layers: list[int], compiled: bool = False):
        super().__init__()
        self.inner, self.layers, self.compiled = inner, layers, compiled

    def forward(self, *args):
        _hold(args)
        if self.compiled:
            # The rerun gets the parameters back from checkpoint's saved inputs as plain tensors: a compiled
            # segment guards on nn.Parameter, so the rerun would compile a second graph whose saved tensors
            # differ from the forward's (CheckpointError). A view makes both calls see plain tensors.
            args = tuple(a.view_as(a) if isinstance(a, torch.nn.Parameter) else a for a in args)
        relay = RelayContext.current
        unit = relay.unit if relay is not None else None
        return checkpoint(
            self.inner,
            *args,
            use_reentrant=False,
            context_fn=lambda: (contextlib.nullcontext(), _rerunning(relay, unit)),
        )


class RerunHead(torch.nn.Module):
    """The head side: forward without autograd (the fused loss then computes no gradients), rerun with it in the
    backward. Reentrant checkpointing does exactly that; the non-reentrant kind would record the forward."""

    def __init__(self, inner: Callable[..., torch.Tensor]):
        super().__init__()
        self.inner = inner

    def forward(self, *args):
        _hold(args)
        return checkpoint(self.inner, *args, use_reentrant=True, preserve_rng_state=False)


@contextlib.contextmanager
def _rerunning(relay: RelayContext | None, unit) -> Iterator[None]:
    """While autograd reruns a segment: its attention sees the unit it ran for, flagged as a rerun."""
    if relay is None:
        yield
        return
    current, unit_before, rerun_before = RelayContext.current, relay.unit, relay.rerun
    RelayContext.current, relay.unit, relay.rerun = relay, unit, True
    try:
        yield
    finally:
        RelayContext.current, relay.unit, relay.rerun = current, unit_before, rerun_before


def _compiled(module: torch.nn.Module, uneven: bool, budget: float = 1.0) -> Callable[..., torch.Tensor]:
    """Static shapes for chunks of one length. Uneven Seq1F1B chunks get one dynamic-shape graph from the first
    call: compiled static, every new length recompiled until dynamo's recompile limit sent the rest to eager,
    and dynamo's own switch to a dynamic graph at the second length can give a checkpoint rerun another graph
    than its forward ran (CheckpointError; pytorch/pytorch#166926). `budget` < 1: inductor under
    `activation_budget` (train.activation_budget)."""
    if budget >= 1.0:
        return torch.compile(module, dynamic=uneven)
    return torch.compile(module, dynamic=uneven, backend=activation_budget(budget))


def activation_budget(budget: float) -> Callable:
    """Inductor, with AOTAutograd's partitioner told to keep at most `budget` of the saved bytes it would keep by
    default (torch._functorch.config.activation_memory_budget). It then reruns the operators cheapest to rerun
    (by FLOPs: pointwise ones first) in the backward instead of saving their outputs: a decoder layer's SwiGLU
    product, a normalised activation and the casts around them. The partition is
    made when a graph is first compiled, inside this backend, so the setting stays local to these graphs."""
    inductor = torch._dynamo.lookup_backend("inductor")

    def backend(gm: fx.GraphModule, example_inputs):
        with torch._functorch.config.patch(activation_memory_budget=budget):
            return inductor(gm, example_inputs)

    return backend


def seal(
    gm: fx.GraphModule,
    mode: str,
    compile: bool = False,
    group: int = 1,
    uneven: bool = False,
    budget: float = 1.0,
) -> Callable[..., torch.Tensor]:
    """The module a stage runs: `gm` itself (compiled when asked) without recompute; else its layers checkpointed
    `group` at a time, each segment compiled on its own when asked (checkpoint boundaries stay outside the
    compiled code). `uneven`: the stage runs sequence chunks of several lengths (compiled with dynamic
    shapes). `budget`: train.activation_budget for the compiled graphs."""
    if recompute_mode(mode) == "none":
        return _compiled(gm, uneven, budget) if compile else gm
    out, layers = segment_layers(gm, group)
    for name, members in layers.items():
        inner = getattr(out, name)
        setattr(
            out, name, CheckpointedSegment(_compiled(inner, uneven, budget) if compile else inner, members, compile)
        )
    if hasattr(out, HEAD):
        setattr(out, HEAD, RerunHead(getattr(out, HEAD)))
    return out
