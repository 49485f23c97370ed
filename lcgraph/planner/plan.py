"""`lcgraph-plan`: predict a layout's memory and speed before touching a GPU.

The same Hydra app as `lcgraph-train` (same conf/ groups, same `+recipe=NAME`, every override), so a
training command line with `lcgraph-train` replaced by `lcgraph-plan` plans that very run. It captures
the model on the meta device (shapes only), reads the per-node costs of the capture once
(`costs.GraphCosts`), splits layers like the trainer does, builds the per-rank programs and replays
them in the simulator against the cost model of a device profile. It prints one row per pipeline stage
and a table of alternative schedules, and writes plan.json, programs.txt and timeline.json (+ .png
with matplotlib) to the run directory.

Planner settings are optional keys of a `plan` section, added with '+' on the command line:

    +plan.device=h100           shipped profile name (h100, h200, a100) or a profile JSON path
    +plan.gpus_per_node=8       override the profile's node size
    +plan.dtype=bf16            plan for another dtype than train.dtype
    +plan.alternatives=false    skip the alternatives table
    +plan.chunks=[2,4,8]        seq1f1b chunk counts tried as alternatives
    +plan.timeline=false        do not write timeline.json / timeline.png
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from omegaconf import DictConfig

from lcgraph.errors import PlanError
from lcgraph.graph import passes
from lcgraph.graph.capture import CapturedGraph, capture
from lcgraph.observability.timeline import matplotlib_available, write_timeline
from lcgraph.planner import mfu
from lcgraph.planner.costs import CostModel, GraphCosts, Layout
from lcgraph.planner.devices import GpuProfile
from lcgraph.planner.profile import DeviceProfile, load_profile
from lcgraph.planner.simulator import SimResult, memory_peaks, simulate
from lcgraph.runtime.model import build_config
from lcgraph.runtime.recompute import AUTO, RECOMPUTE_MODES, recompute_mode
from lcgraph.schedule import nccl
from lcgraph.schedule import programs as schedule
from lcgraph.schedule.programs import ScheduleError, format_programs

DEFAULTS = {
    "device": "h100",
    "gpus_per_node": None,
    "dtype": None,
    "alternatives": True,
    "chunks": [2, 4, 8],
    "timeline": True,
}
GiB = 2**30
AUTO_USABLE = 0.9  # share of the device's memory `recompute=auto` may plan for: allocator slack, model error


def plan_settings(cfg: DictConfig) -> dict:
    """The `plan` section of the config over DEFAULTS (the section is optional: `+plan.KEY=VALUE`)."""
    from omegaconf import OmegaConf

    section = OmegaConf.select(cfg, "plan", default=None)
    given: dict = OmegaConf.to_container(section, resolve=True) if section is not None else {}  # type: ignore[assignment]
    unknown = sorted(set(given) - set(DEFAULTS))
    if unknown:
        raise PlanError(
            f"unknown planner setting(s) plan.{', plan.'.join(unknown)}; known: "
            f"{', '.join('plan.' + k for k in DEFAULTS)}"
        )
    settings = {**DEFAULTS, **given}
    settings["dtype"] = settings["dtype"] or cfg.train.dtype
    return settings


# --- one layout, evaluated -----------------------------------------------------------------------------------


@dataclass
class Evaluation:
    """A schedule evaluated for one layout: its programs, cost model and simulation."""

    label: str
    spec: schedule.ScheduleSpec
    programs: list
    cost: CostModel
    sim: SimResult
    tokens_per_step: int
    model_flops_per_token: float
    segment_peaks: dict[int, float] = field(default_factory=dict)  # best_segments: size -> predicted peak

    @property
    def gpus(self) -> int:
        return self.cost.layout.gpus

    def summary(self) -> dict:
        sim, dev = self.sim, self.cost.profile
        tokens_per_s_gpu = self.tokens_per_step / sim.step_time / self.gpus
        peak = max(sim.rank_peak)
        return {
            "schedule": self.spec.name,
            "seq_chunks": self.spec.seq_chunks,
            "chunk_lengths": list(self.cost.chunk_lengths),
            "step_time_s": sim.step_time,
            "pipeline_time_s": sim.pipeline_time,
            "tokens_per_step": self.tokens_per_step,
            "tokens_per_s_per_gpu": tokens_per_s_gpu,
            "mfu": mfu.mfu(self.model_flops_per_token, tokens_per_s_gpu, dev, self.cost.graph.dtype),
            "of_measured_matmul_peak": mfu.of_measured_matmul(
                self.model_flops_per_token, tokens_per_s_gpu, dev, self.cost.graph.dtype
            ),
            "bubble": sim.bubble,
            "peak_bytes": peak,
            "fits": peak <= dev.memory_bytes,
        }


def evaluate(
    graph,
    profile,
    layout,
    layer_counts: list[int],
    seq_len: int,
    schedule_name: str,
    microbatches: int,
    seq_chunks: int = 1,
    chunk_split: str = "uniform_comp",
    label: str | None = None,
) -> Evaluation:
    """Programs + cost model + simulation of one schedule; raises ValueError for an impossible one."""

    k = seq_chunks if schedule_name == "seq1f1b" else 1
    spec = schedule.ScheduleSpec(schedule_name, layout.pp, microbatches, k, layout.virtual_stages)
    programs = schedule.add_p2p(schedule.build_programs(spec), spec)
    nccl.check(programs, spec, nccl.Comms(layout.dp, layout.sp, graph.tied_params > 0, layout.zero))
    if k == 1:
        lengths = [seq_len]
    else:
        per_token, per_pair = graph.split_costs()
        lengths = schedule.split_sequence(seq_len, k, chunk_split, per_token, per_pair, align=layout.sp)
    cost = CostModel(graph, profile, layout, list(layer_counts), lengths)
    sim = simulate(programs, spec, cost)
    tokens = layout.dp * microbatches * layout.micro_batch * seq_len
    label = label or (schedule_name if k == 1 else f"{schedule_name} k={k} ({chunk_split})")
    return Evaluation(label, spec, programs, cost, sim, tokens, graph.model_flops_per_token(seq_len))


# --- the whole plan --------------------------------------------------------------------------------------------


@dataclass
class Plan:
    settings: dict
    main: Evaluation
    alternatives: list[tuple[str, Evaluation | str]]  # (label, evaluation or why not)
    model: dict
    capture_seconds: float
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)

    def stage_rows(self) -> list[dict]:
        ev, cost = self.main, self.main.cost
        rows, first = [], 0
        for s, count in enumerate(cost.layer_counts):
            mem, peak = cost.stage_memory(s), ev.sim.peaks[s]
            k = len(cost.chunk_lengths)
            parts = [cost.compute_parts(s, cost.chunk_lengths[c], cost.prefixes[c]) for c in range(k)]
            rows.append(
                {
                    "stage": s,
                    "rank": ev.spec.rank_of(s),
                    "layers": [first, first + count - 1] if count else [],
                    "params": cost.stages[s].params,
                    "weights_bytes": mem.weights,
                    "grads_bytes": mem.grads,
                    "optimizer_bytes": mem.optimizer,
                    "activations_bytes": peak.activations,
                    "kv_relay_bytes": peak.kv_relay,
                    # what the columns before leave of the total, so that the printed terms add up: recompute's
                    # rerun transient (the largest unit's activations while its backward runs), which the peak's
                    # static part holds beyond the stage memory, or, when OPT is the peak, its fp32 gradients
                    "rerun_bytes": peak.static - mem.total,
                    "optimizer_step_bytes": peak.optimizer_step,
                    "total_bytes": peak.total,
                    "memory_fraction": peak.total / cost.profile.memory_bytes,
                    "forward_s": [cost.forward_time(s, c) for c in range(k)],
                    "backward_s": [cost.backward_time(s, c) for c in range(k)],
                    "forward_parts_s": {name: sum(p[name] for p in parts) for name in parts[0]},
                    "busy_s": ev.sim.busy[ev.spec.rank_of(s)],
                }
            )
            first += count
        return rows

    def to_json(self) -> dict:
        ev, cost = self.main, self.main.cost
        chunks = range(len(cost.chunk_lengths))
        p2p = [cost.p2p_time(0, 1, c) for c in chunks] if len(cost.layer_counts) > 1 else []
        return {
            "model": self.model,
            "layout": {
                **dataclasses.asdict(cost.layout),
                "gpus": cost.layout.gpus,
                "schedule": ev.spec.name,
                "microbatches": ev.spec.microbatches,
                "seq_chunks": ev.spec.seq_chunks,
                "seq_len": sum(cost.chunk_lengths),
                "dtype": cost.graph.dtype,
            },
            "device": cost.profile.to_dict(),
            "layer_counts": list(cost.layer_counts),
            "chunk_lengths": list(cost.chunk_lengths),
            "stages": self.stage_rows(),
            "summary": {
                **ev.summary(),
                "p2p_s_per_chunk": p2p,
                "grad_sync_s": [cost.grad_sync_time(s) for s in range(len(cost.layer_counts))],
            },
            "alternatives": [
                {"label": label, **(alt.summary() if isinstance(alt, Evaluation) else {"error": alt})}
                for label, alt in self.alternatives
            ],
            "figures": cost.figures_used(),
            "settings": self.settings,
            "notes": self.notes,
            "capture_seconds": self.capture_seconds,
            "plan_seconds": self.seconds,
        }


def layer_counts(cfg: DictConfig, captured) -> tuple[list[int], list[int]]:
    """The trainer's layer counts (passes.plan_layer_counts), and a balanced split over pp stages for
    the alternatives (one stage per rank)."""

    par = cfg.parallel
    counts = passes.plan_layer_counts(captured, par, cfg.data.seq_len)
    if len(counts) == par.pp:
        return counts, counts
    costs, first, last = passes.layer_costs(captured, cfg.data.seq_len)
    return counts, passes.balance_layers(costs, first, last, par.pp)


@dataclass
class Setup:
    """What every evaluation of one config shares: profile, graph costs, layout, layer split."""

    settings: dict
    profile: DeviceProfile
    graph: GraphCosts
    captured: CapturedGraph
    layout: Layout
    counts: list[int]
    alt_counts: list[int]
    auto_segments: bool = False  # train.recompute_layers=0: the planner picks the segment size (best_segments)


def setup(cfg: DictConfig, captured=None, profile: DeviceProfile | None = None) -> Setup:
    """Capture (unless given) and read the config's layout; `train.recompute=auto` stays unresolved here.
    `profile` (the GPU a rank runs on) replaces `+plan.device`'s."""
    settings = plan_settings(cfg)
    profile = profile or load_profile(settings["device"])
    if settings["gpus_per_node"]:
        profile = dataclasses.replace(profile, gpus_per_node=int(settings["gpus_per_node"]))
    if captured is None:
        captured = capture(build_config(cfg.model))
    graph = GraphCosts.from_captured(captured, settings["dtype"])
    par, train = cfg.parallel, cfg.train
    mode = recompute_mode(train.get("recompute", False), allow_auto=True)
    segments = int(train.get("recompute_layers", 0))  # 0: best_segments picks
    layout = Layout(
        par.pp,
        par.dp,
        par.sp,
        cfg.data.micro_batch_size,
        par.zero,
        par.virtual_stages,
        recompute="none" if mode == AUTO else mode,
        recompute_layers=max(1, segments),
        kept_attention_layers=int(train.get("keep_attention_layers", -1)),
        compiled=bool(train.get("compile", False)),
        fused_loss=bool(train.get("fused_loss", True)),
    )
    counts, alt_counts = layer_counts(cfg, captured)
    return Setup(settings, profile, graph, captured, layout, counts, alt_counts, auto_segments=segments == 0)


def evaluate_config(cfg: DictConfig, st: Setup, layout: Layout | None = None) -> Evaluation:
    """The config's own schedule on `layout` (default: the setup's)."""
    par, layout = cfg.parallel, layout or st.layout
    ev = evaluate(
        st.graph,
        st.profile,
        layout,
        st.counts,
        cfg.data.seq_len,
        par.schedule,
        par.microbatches,
        par.seq_chunks,
        par.chunk_split,
        label=f"{par.schedule} (this config)",
    )
    return best_segments(ev) if st.auto_segments else ev


SEGMENT_TIE = 0.005  # peaks this close count as equal: the smaller segment (the smaller rerun) wins


def best_segments(ev: Evaluation) -> Evaluation:
    """`ev` with the recompute segment size (train.recompute_layers) of lowest predicted peak. Few units in
    flight want small segments (a small rerun); many want large ones (fewer inputs kept per unit). The step
    time does not depend on it (every layer reruns once either way), so only memory is replayed."""
    cost = ev.cost
    if cost.layout.recompute == "none":
        return ev
    best, tried = None, {}
    for group in range(1, max(cost.layer_counts) + 1):
        layout = dataclasses.replace(cost.layout, recompute_layers=group)
        trial = CostModel(cost.graph, cost.profile, layout, cost.layer_counts, cost.chunk_lengths)
        peaks, rank_peak = memory_peaks(ev.programs, ev.spec, trial)
        tried[group] = max(rank_peak)
        if best is None or max(rank_peak) < max(best[2]) * (1 - SEGMENT_TIE):
            best = (trial, peaks, rank_peak)
    assert best is not None  # a stage holds at least one layer
    trial, peaks, rank_peak = best
    sim = dataclasses.replace(ev.sim, peaks=peaks, rank_peak=rank_peak)
    return dataclasses.replace(ev, cost=trial, sim=sim, segment_peaks=tried)


def choose_recompute(cfg: DictConfig, st: Setup) -> tuple[str, str, Evaluation]:
    """The fastest recompute mode whose predicted peak fits AUTO_USABLE of the device, with a one-line reason.
    When keep_attention with every layer does not fit but full does, keep_attention keeping as many layers per
    stage as fit (train.keep_attention_layers) is tried too: between the two in memory and in time."""
    usable = AUTO_USABLE * st.profile.memory_bytes
    every = dataclasses.replace(st.layout, kept_attention_layers=-1)
    tried = [(m, evaluate_config(cfg, st, dataclasses.replace(every, recompute=m))) for m in RECOMPUTE_MODES]
    fits = {m: max(ev.sim.rank_peak) <= usable for m, ev in tried}
    if fits["full"] and not fits["keep_attention"]:
        partial = _most_kept_attention(cfg, st, usable)
        if partial is not None:
            tried.append((f"keep_attention({partial.cost.layout.kept_attention_layers})", partial))
    fitting = [(m, ev) for m, ev in tried if max(ev.sim.rank_peak) <= usable]
    table = ", ".join(f"{m} {ev.sim.step_time:.2f} s/{_size(max(ev.sim.rank_peak))}" for m, ev in tried)
    if not fitting:
        mode, ev = tried[RECOMPUTE_MODES.index("full")]
        return mode, f"no mode fits {_size(usable)} usable ({table}); full keeps the least", ev
    _, ev = min(fitting, key=lambda x: x[1].sim.step_time)
    return ev.cost.layout.recompute, f"fastest that fits {_size(usable)} usable of {st.profile.name} ({table})", ev


def _most_kept_attention(cfg: DictConfig, st: Setup, usable: float) -> Evaluation | None:
    """keep_attention with the most layers per stage keeping their attention that still fits, or None."""
    layout = dataclasses.replace(st.layout, recompute="keep_attention")
    lo, hi = 0, max(st.counts) - 1  # hi + 1 = every layer: known not to fit
    best = None
    while lo < hi:  # the peak grows with the kept layers: bisect on the largest that fits
        mid = (lo + hi + 1) // 2
        ev = evaluate_config(cfg, st, dataclasses.replace(layout, kept_attention_layers=mid))
        if max(ev.sim.rank_peak) <= usable:
            lo, best = mid, ev
        else:
            hi = mid - 1
    return best if lo > 0 else None


@dataclass(frozen=True)
class Recompute:
    """What the runtime recomputes (runtime/recompute.py), as resolved from the config by the planner."""

    mode: str  # RECOMPUTE_MODES
    segment_layers: int  # decoder layers per checkpoint segment
    kept_attention_layers: int  # keep_attention: layers per stage keeping their attention (-1: all)
    reason: str


def resolve_recompute(cfg: DictConfig, captured=None, gpu: GpuProfile | None = None) -> Recompute:
    """`train.recompute`, `train.recompute_layers` and `train.keep_attention_layers` as what to run, and why:
    given values as they are, `auto` / 0 chosen by the planner.

    The app calls this before training with `gpu`, the profile of the GPU the rank runs on (devices.py);
    without one (CPU) `+plan.device` names the profile, default h100."""
    train = cfg.train
    mode = recompute_mode(train.get("recompute", False), allow_auto=True)
    layers, kept = int(train.get("recompute_layers", 0)), int(train.get("keep_attention_layers", -1))
    if mode == "none" or (mode != AUTO and layers > 0):
        return Recompute(mode, max(1, layers), kept, "set in the config")
    ev, notes = _resolved(cfg, setup(cfg, captured, gpu.profile if gpu else None))
    notes = [f"planned for {gpu.note}", *notes] if gpu else notes
    lay = ev.cost.layout
    return Recompute(lay.recompute, lay.recompute_layers, lay.kept_attention_layers, "; ".join(notes))


def _resolved(cfg: DictConfig, st: Setup) -> tuple[Evaluation, list[str]]:
    """The config's own evaluation with `train.recompute=auto` and `train.recompute_layers=0` resolved, and a
    note on each choice the planner made (what lcgraph-plan prints and the trainer logs)."""
    notes = []
    if recompute_mode(cfg.train.get("recompute", False), allow_auto=True) == AUTO:
        mode, reason, ev = choose_recompute(cfg, st)
        notes.append(f"train.recompute=auto -> {mode}: {reason}")
    else:
        ev = evaluate_config(cfg, st, st.layout)
    if st.auto_segments and ev.cost.layout.recompute != "none":
        notes.append(f"train.recompute_layers=0 (auto) -> {ev.cost.layout.recompute_layers}: {_segment_note(ev)}")
    return ev, notes


def _segment_note(ev: Evaluation) -> str:
    """Why this segment size: its peak against one layer per segment and the whole stage in one segment."""
    sizes = ev.segment_peaks
    if not sizes:
        return f"predicted peak {_size(max(ev.sim.rank_peak))}"
    most = max(sizes)
    return (
        f"the lowest predicted peak, {_size(max(ev.sim.rank_peak))} (1 layer: {_size(sizes[1])}, "
        f"{most} layers: {_size(sizes[most])})"
    )


def build_plan(cfg: DictConfig, captured=None) -> Plan:
    """Capture (unless given), cost, simulate the configured layout and the alternatives."""

    started = time.perf_counter()
    st = setup(cfg, captured)
    graph, profile, config, par, seq = st.graph, st.profile, st.captured.config, cfg.parallel, cfg.data.seq_len
    kv = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    main, notes = _resolved(cfg, st)
    st.layout = main.cost.layout  # the resolved mode and segment size, for the alternatives too
    alternatives: list[tuple[str, Evaluation | str]] = [(main.label, main)]
    if st.settings["alternatives"]:
        alternatives += _alternatives(
            graph,
            profile,
            dataclasses.replace(st.layout, virtual_stages=1),
            st.alt_counts,
            seq,
            par,
            st.settings["chunks"],
        )
    model = {
        "name": cfg.model.name,
        "layers": config.num_hidden_layers,
        "hidden_size": config.hidden_size,
        "heads": config.num_attention_heads,
        "kv_heads": kv,
        "head_dim": graph.head_dim,
        "intermediate_size": config.intermediate_size,
        "vocab_size": config.vocab_size,
        "params": graph.total().params,
    }
    plan = Plan(st.settings, main, alternatives, model, st.captured.capture_seconds, notes=notes)
    if st.settings["dtype"] == "fp32":
        plan.notes.append(
            "dtype fp32: matmul and attention are timed at the profile's fp32 rate; plan bf16 runs "
            "with train.dtype=bf16 or +plan.dtype=bf16"
        )
    plan.seconds = time.perf_counter() - started
    return plan


def _alternatives(graph, profile, layout, counts, seq, par, chunks) -> list[tuple[str, Evaluation | str]]:
    """gpipe, 1f1b and seq1f1b with each chunk count (uniform_comp), same layout and micro-batches."""

    candidates = [("gpipe", 1), ("1f1b", 1)] + [("seq1f1b", int(k)) for k in chunks]
    out: list[tuple[str, Evaluation | str]] = []
    for name, k in candidates:
        label = name if k == 1 else f"seq1f1b k={k}"
        try:
            out.append(
                (
                    label,
                    evaluate(
                        graph, profile, layout, counts, seq, name, par.microbatches, k, "uniform_comp", label=label
                    ),
                )
            )
        except (ValueError, ScheduleError) as exc:
            out.append((label, str(exc).splitlines()[0]))
    return out


# --- output ------------------------------------------------------------------------------------------------------


def _duration(seconds: float) -> str:
    """A step time readable at any size: tiny CPU plans in microseconds or milliseconds, not '0.000 s'."""
    if seconds >= 1.0:
        return f"{seconds:.3f} s"
    if seconds >= 1e-3:
        return f"{seconds * 1e3:.3f} ms"
    return f"{seconds * 1e6:.1f} us"


def _size(n: float) -> str:
    """Bytes in binary units, short: 16.4G, 340M, 12K."""
    for unit, scale in (("G", GiB), ("M", 2**20), ("K", 2**10)):
        if n >= scale:
            return f"{n / scale:.1f}{unit}"
    return f"{n:.0f}"


def _count(n: float) -> str:
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f}{unit}"
    return f"{n:.0f}"


def _ms_list(values: list[float]) -> str:
    ms = [f"{v * 1e3:.0f}" if v >= 0.1 else f"{v * 1e3:.1f}" for v in values]
    return "/".join(ms) if len(ms) <= 4 else f"{ms[0]}..{ms[-1]} ({len(ms)})"


def print_plan(plan: Plan, console=None) -> None:
    from rich.console import Console
    from rich.table import Table

    console = console or Console(width=None if sys.stdout.isatty() else 160)
    ev, cost = plan.main, plan.main.cost
    lay, dev, m = cost.layout, cost.profile, plan.model
    seq = sum(cost.chunk_lengths)
    console.print(
        f"[bold]{m['name']}[/]: {m['layers']} layers, hidden {m['hidden_size']}, {m['heads']} heads "
        f"({m['kv_heads']} kv, head dim {m['head_dim']}), {_count(m['params'])} params"
    )
    console.print(
        f"seq {seq:,} x {lay.micro_batch} per micro-batch, {ev.spec.microbatches} micro-batches x dp "
        f"{lay.dp} | pp {lay.pp} x dp {lay.dp} x sp {lay.sp} = {lay.gpus} x {dev.name} "
        f"({_size(dev.memory_bytes)}) | {cost.graph.dtype}, optimizer "
        f"{'distributed (ZeRO-1, reduce-scatter)' if lay.zero else 'replicated (all-reduce)'}"
    )
    console.print(f"{ev.label}: chunks {cost.chunk_lengths}, layers per stage {cost.layer_counts}")
    table = Table(
        title="per stage: one rank's memory at the stage's peak (G = GiB), times per chunk of one micro-batch"
    )
    for col in (
        "stage",
        "rank",
        "layers",
        "params",
        "weights",
        "grads",
        "optim",
        "activ.",
        "KV relay",
        "transient",
        "total / GPU",
        "fwd ms",
        "bwd ms",
    ):
        table.add_column(col, justify="right")
    for r in plan.stage_rows():
        layers = f"{r['layers'][0]}-{r['layers'][1]}" if r["layers"] else "-"
        style = "red" if r["total_bytes"] > dev.memory_bytes else ""
        total = f"{_size(r['total_bytes'])} ({r['memory_fraction']:.0%})"
        table.add_row(
            str(r["stage"]),
            str(r["rank"]),
            layers,
            _count(r["params"]),
            _size(r["weights_bytes"]),
            _size(r["grads_bytes"]),
            _size(r["optimizer_bytes"]),
            _size(r["activations_bytes"]),
            _size(r["kv_relay_bytes"]),
            _size(r["rerun_bytes"] + r["optimizer_step_bytes"]),  # the peak's moment has at most one of them
            f"[{style}]{total}[/]" if style else total,
            _ms_list(r["forward_s"]),
            _ms_list(r["backward_s"]),
        )
    console.print(table)
    s = ev.summary()
    fits = (
        f"fits: peak {_size(s['peak_bytes'])} of {_size(dev.memory_bytes)}"
        if s["fits"]
        else f"[red]does NOT fit: peak {_size(s['peak_bytes'])} > {_size(dev.memory_bytes)}[/]"
    )
    console.print(
        f"step {_duration(s['step_time_s'])} | {s['tokens_per_s_per_gpu']:,.0f} tokens/s per GPU | "
        f"MFU {mfu.mfu_text(s['mfu'])} ({mfu.mfu_text(s['of_measured_matmul_peak'])} of measured matmul peak) | "
        f"bubble {s['bubble']:.1%} | {fits}"
    )
    for line in figure_lines(cost.figures_used()):
        console.print(line, markup=False)
    if len(plan.alternatives) > 1:
        alt = Table(title="alternatives (same layout and micro-batches)")
        for col in ("schedule", "chunks", "step s", "tokens/s/GPU", "MFU", "bubble", "peak mem", "fits"):
            alt.add_column(col, justify="right")
        for label, a in plan.alternatives:
            if isinstance(a, str):
                alt.add_row(label, "", "", "", "", "", "", f"n/a: {a[:60]}")
                continue
            x = a.summary()
            chunks = _short_chunks(x["chunk_lengths"])
            alt.add_row(
                label,
                chunks,
                f"{x['step_time_s']:.3f}",
                f"{x['tokens_per_s_per_gpu']:,.0f}",
                mfu.mfu_text(x["mfu"]),
                f"{x['bubble']:.1%}",
                _size(x["peak_bytes"]),
                "yes" if x["fits"] else "[red]no[/]",
            )
        console.print(alt)
    for note in plan.notes:
        console.print(f"note: {note}")
    console.print(f"planned in {plan.seconds:.1f} s (capture {plan.capture_seconds:.1f} s)")


def _clipped(text: str, limit: int) -> str:
    """`text` cut at a word boundary within `limit` characters (plan.json keeps it whole)."""
    return text if len(text) <= limit else text[: text.rfind(" ", 0, limit)] + " ..."


def figure_lines(figures: dict[str, dict]) -> list[str]:
    """Which of the plan's figures are measured and which assumed (with their source), one line each group."""
    measured = [f for f, e in figures.items() if e["status"] == "measured"]
    assumed = [f"{f} ({_clipped(e['source'], 100)})" for f, e in figures.items() if e["status"] != "measured"]
    return [
        f"figures measured: {', '.join(measured) or 'none'}",
        f"figures assumed: {'; '.join(assumed) or 'none'}",
    ]


def _short_chunks(lengths: list[int]) -> str:
    if len(lengths) == 1:
        return f"{lengths[0]:,}"
    return f"{lengths[0]:,}..{lengths[-1]:,}"


def write_plan(plan: Plan, out_dir) -> list[Path]:
    """plan.json, programs.txt and (unless +plan.timeline=false) timeline.json / timeline.png."""

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    ev = plan.main
    (out / "programs.txt").write_text(format_programs(ev.programs, ev.spec))
    written = [out / "plan.json", out / "programs.txt"]
    if plan.settings["timeline"]:
        if not matplotlib_available():
            plan.notes.append("matplotlib is not installed: wrote timeline.json only (pip install matplotlib)")
        written += write_timeline(ev.sim.timeline, out, title=f"{ev.label}: predicted step", label="pipeline rank")
    (out / "plan.json").write_text(json.dumps(plan.to_json(), indent=2) + "\n")
    return written
