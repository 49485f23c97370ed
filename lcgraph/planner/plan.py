"""`lcgraph-plan`: predict a layout's memory and speed before touching a GPU.

The same Hydra app as `lcgraph-train` (same conf/ groups, same `+recipe=NAME`, every override), so a
training command line with `lcgraph-train` replaced by `lcgraph-plan` plans that very run. It captures
the model on the meta device (shapes only), reads the per-node costs of the capture once
(`graph_costs.GraphCosts`), splits layers like the trainer does, builds the per-rank programs and replays
them in the simulator against the cost model of a device profile. It prints one row per pipeline stage
and a table of alternative schedules, and writes plan.json, programs.txt and timeline.json (+ .png
with matplotlib) to the run directory.

Planner settings are optional keys of a `plan` section, added with '+' on the command line:

    +plan.device=h100           shipped profile name (h100, h200, a100) or a profile JSON path
    +plan.profile=PATH          a profile JSON file, e.g. the one lcgraph-check fitted to your GPUs' links
    +plan.gpus_per_node=8       override the profile's node size
    +plan.dtype=bf16            plan for another dtype than train.dtype
    +plan.alternatives=false    skip the alternatives table
    +plan.chunks=[2,4,8]        seq1f1b chunk counts tried as alternatives
    +plan.timeline=false        do not write timeline.json / timeline.png
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field

from lcgraph.planner.devices import GpuProfile
from lcgraph.planner.evaluation import Evaluation, Setup, evaluate, evaluate_config, setup, size
from lcgraph.planner.offload import check_host
from lcgraph.planner.settings import PlanConfig, PlanSettings
from lcgraph.runtime.config import TrainConfig
from lcgraph.runtime.offload import OFFLOAD_MODES, offload_mode
from lcgraph.runtime.recompute import AUTO, RECOMPUTE_MODES, recompute_mode
from lcgraph.schedule.actions import ScheduleError

AUTO_USABLE = 0.9  # share of the device's memory `recompute=auto` may plan for: allocator slack, model error
OFFLOAD_TIE = 0.005  # step times this close count as equal: the plan that moves less to the host wins


# --- the whole plan --------------------------------------------------------------------------------------------


@dataclass
class Plan:
    settings: PlanSettings
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
                    # rerun transient (the largest unit's activations while its backward runs) and train.offload's
                    # two units on the device, which the peak's static part holds beyond the stage memory, or, when
                    # OPT is the peak, its fp32 gradients
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
                "documents": cost.layout.documents.source if cost.layout.documents else None,  # not its sample
                "gpus": cost.layout.gpus,
                "schedule": ev.spec.name,
                "microbatches": ev.spec.microbatches,
                "seq_chunks": ev.spec.seq_chunks,
                "seq_len": ev.seq_len,
                "run_length": ev.run_length,  # seq_len padded to what the chunks and shards divide
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
            "settings": dataclasses.asdict(self.settings),
            "notes": self.notes,
            "capture_seconds": self.capture_seconds,
            "plan_seconds": self.seconds,
        }


def offload_choices(cfg: PlanConfig, recompute: str) -> tuple[str, ...]:
    """train.offload values worth trying with a recompute mode: the given one, or under `auto` each that moves
    something this mode keeps (attention only with keep_attention)."""
    given = offload_mode(cfg.train.offload, allow_auto=True)
    if given != AUTO:
        return (given,) if given != "attention" or recompute == "keep_attention" else ()
    return tuple(m for m in OFFLOAD_MODES if m != "attention" or recompute == "keep_attention")


def _fits(ev: Evaluation, usable: float) -> bool:
    return max(ev.sim.rank_peak) <= usable and (ev.offload is None or ev.offload.fits_host)


def _label(ev: Evaluation) -> str:
    lay = ev.cost.layout
    partial = lay.recompute == "keep_attention" and lay.kept_attention_layers >= 0
    kept = f"({lay.kept_attention_layers})" if partial else ""
    return lay.recompute + kept + (f"+offload={lay.offload}" if lay.offload != "none" else "")


def _fastest(fitting: list[Evaluation]) -> Evaluation:
    """The fastest; among those within OFFLOAD_TIE of it, the one that moves least to the host."""
    best = min(ev.sim.step_time for ev in fitting)
    close = [ev for ev in fitting if ev.sim.step_time <= best * (1 + OFFLOAD_TIE)]
    return min(close, key=lambda ev: (OFFLOAD_MODES.index(ev.cost.layout.offload), ev.sim.step_time))


def choose_recompute(cfg: PlanConfig, st: Setup) -> tuple[str, str, Evaluation]:
    """The fastest recompute mode (with train.offload=auto: and offload mode) whose predicted peak fits
    AUTO_USABLE of the device and whose offloaded bytes fit the host, with a one-line reason. When
    keep_attention with every layer does not fit but full does, keep_attention keeping as many layers per stage
    as fit (train.keep_attention_layers) is tried too: between the two in memory and in time."""
    usable = AUTO_USABLE * st.profile.memory_bytes
    every = dataclasses.replace(st.layout, kept_attention_layers=-1)
    tried = [
        evaluate_config(cfg, st, dataclasses.replace(every, recompute=m, offload=off))
        for m in RECOMPUTE_MODES
        for off in offload_choices(cfg, m)
    ]
    fits = {m: any(_fits(ev, usable) for ev in tried if ev.cost.layout.recompute == m) for m in RECOMPUTE_MODES}
    if fits["full"] and not fits["keep_attention"]:
        partial = _most_kept_attention(cfg, st, usable)
        if partial is not None:
            tried.append(partial)
    fitting = [ev for ev in tried if _fits(ev, usable)]
    table = ", ".join(f"{_label(ev)} {ev.sim.step_time:.2f} s/{size(max(ev.sim.rank_peak))}" for ev in tried)
    if not fitting:
        full = [ev for ev in tried if ev.cost.layout.recompute == "full"] or tried
        ev = min(full, key=lambda ev: max(ev.sim.rank_peak))
        return ev.cost.layout.recompute, f"no mode fits {size(usable)} usable ({table}); {_label(ev)} keeps least", ev
    ev = _fastest(fitting)
    return ev.cost.layout.recompute, f"fastest that fits {size(usable)} usable of {st.profile.name} ({table})", ev


def choose_offload(cfg: PlanConfig, st: Setup, ev: Evaluation) -> tuple[Evaluation, str]:
    """train.offload=auto with a given recompute mode: the fastest that fits the device and the host, moving the
    least among equals (hidden copies cost no time), else the lowest peak."""
    usable = AUTO_USABLE * st.profile.memory_bytes
    layout = ev.cost.layout
    choices = offload_choices(cfg, layout.recompute)
    tried = [evaluate_config(cfg, st, dataclasses.replace(layout, offload=m)) for m in choices]
    table = ", ".join(f"{_label(t)} {t.sim.step_time:.2f} s/{size(max(t.sim.rank_peak))}" for t in tried)
    fitting = [t for t in tried if _fits(t, usable)]
    if fitting:
        return _fastest(fitting), f"fastest that fits {size(usable)} usable ({table})"
    return min(tried, key=lambda t: max(t.sim.rank_peak)), f"none fits {size(usable)} usable ({table}); lowest peak"


def _most_kept_attention(cfg: PlanConfig, st: Setup, usable: float) -> Evaluation | None:
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
    offload: str = "none"  # train.offload (runtime/offload.py), resolved


def given_recompute(train: TrainConfig) -> Recompute | None:
    """The config's recompute and offload as they are, when it leaves the planner nothing to choose (else None)."""
    mode = recompute_mode(train.recompute, allow_auto=True)
    layers, kept = train.recompute_layers, train.keep_attention_layers
    offload = offload_mode(train.offload, allow_auto=True)
    if offload == "none" and (mode == "none" or (mode != AUTO and layers > 0)):
        return Recompute(mode, max(1, layers), kept, "set in the config")
    return None


def resolve_recompute(cfg: PlanConfig, captured=None, gpu: GpuProfile | None = None) -> Recompute:
    """`train.recompute`, `train.recompute_layers` and `train.keep_attention_layers` as what to run, and why:
    given values as they are, `auto` / 0 chosen by the planner.

    The app calls this before its ranks start (app.job.resolve_plan) with `gpu`, the profile of the GPU they run on;
    without one (CPU) `+plan.device` names the profile, default h100."""
    if (given := given_recompute(cfg.train)) is not None:
        return given
    ev, notes = _resolved(cfg, setup(cfg, captured, gpu.profile if gpu else None))
    notes = [f"planned for {gpu.note}", *notes] if gpu else notes
    lay = ev.cost.layout
    return Recompute(lay.recompute, lay.recompute_layers, lay.kept_attention_layers, "; ".join(notes), lay.offload)


def _resolved(cfg: PlanConfig, st: Setup) -> tuple[Evaluation, list[str]]:
    """The config's own evaluation with `train.recompute=auto` and `train.recompute_layers=0` resolved, and a
    note on each choice the planner made (what lcgraph-plan prints and the trainer logs)."""
    notes = []
    offload = offload_mode(cfg.train.offload, allow_auto=True)
    if recompute_mode(cfg.train.recompute, allow_auto=True) == AUTO:
        mode, reason, ev = choose_recompute(cfg, st)
        auto = f" + train.offload=auto -> {ev.cost.layout.offload}" if offload == AUTO else ""
        notes.append(f"train.recompute=auto -> {mode}{auto}: {reason}")
    else:
        ev = evaluate_config(cfg, st, st.layout)
        if offload == AUTO:
            ev, reason = choose_offload(cfg, st, ev)
            notes.append(f"train.offload=auto -> {ev.cost.layout.offload}: {reason}")
    check_host(ev.offload)
    if ev.offload is not None:
        notes.append(ev.offload.line())
    if st.auto_segments and ev.cost.layout.recompute != "none":
        notes.append(f"train.recompute_layers=0 (auto) -> {ev.cost.layout.recompute_layers}: {_segment_note(ev)}")
    return ev, notes


def _segment_note(ev: Evaluation) -> str:
    """Why this segment size: its peak against one layer per segment and the whole stage in one segment."""
    sizes = ev.segment_peaks
    if not sizes:
        return f"predicted peak {size(max(ev.sim.rank_peak))}"
    most = max(sizes)
    return (
        f"the lowest predicted peak, {size(max(ev.sim.rank_peak))} (1 layer: {size(sizes[1])}, "
        f"{most} layers: {size(sizes[most])})"
    )


def build_plan(cfg: PlanConfig, captured=None) -> Plan:
    """Capture (unless given), cost, simulate the configured layout and the alternatives."""

    started = time.perf_counter()
    st = setup(cfg, captured)
    graph, profile, config, par, seq = st.graph, st.profile, st.captured.config, cfg.parallel, cfg.data.seq_len
    kv = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    main, notes = _resolved(cfg, st)
    st.layout = main.cost.layout  # the resolved mode and segment size, for the alternatives too
    alternatives: list[tuple[str, Evaluation | str]] = [(main.label, main)]
    if profile.fp8_speedup and st.settings.dtype == "bf16":  # the other precision of the same run beside it
        other = None if st.layout.fp8 else "tensorwise"
        label = f"{main.label}, " + (f"train.fp8={other}" if other else "bf16 matmuls")
        alternatives.append((label, evaluate_config(cfg, st, dataclasses.replace(st.layout, fp8=other))))
    if st.settings.alternatives:
        alternatives += _alternatives(
            graph,
            profile,
            dataclasses.replace(st.layout, virtual_stages=1),
            st.alt_counts,
            seq,
            par,
            st.settings.chunks,
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
    if st.settings.dtype == "fp32":
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
