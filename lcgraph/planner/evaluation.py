"""One layout evaluated: the per-rank programs, the cost model and the simulation of a schedule, and the
setup that every evaluation of one config shares (planner settings, device profile, graph costs, layout,
layer split), with the recompute segment size of lowest predicted peak (`best_segments`).
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass, field

from lcgraph.errors import PlanError
from lcgraph.graph import passes
from lcgraph.graph.capture import CapturedGraph, capture
from lcgraph.graph.fusion import fuse_wanted
from lcgraph.graph.ring import padded_length, ring_align
from lcgraph.ops.fp8 import fp8_recipe
from lcgraph.planner import mfu
from lcgraph.planner.costs import CostModel, Layout
from lcgraph.planner.documents import DocumentMix, kept_fraction, pairs_before
from lcgraph.planner.graph_costs import GraphCosts
from lcgraph.planner.offload import OffloadPlan, offload_plan
from lcgraph.planner.profile import DeviceProfile, load_profile
from lcgraph.planner.settings import PlanConfig, PlanSettings
from lcgraph.planner.simulator import SimResult, memory_peaks, simulate
from lcgraph.runtime import data
from lcgraph.runtime.config import ParallelConfig, TrainConfig
from lcgraph.runtime.model import build_config
from lcgraph.runtime.offload import offload_mode
from lcgraph.runtime.recompute import AUTO, recompute_mode
from lcgraph.schedule import nccl
from lcgraph.schedule.actions import ScheduleSpec
from lcgraph.schedule.p2p import add_p2p
from lcgraph.schedule.programs import build_programs
from lcgraph.schedule.sequence import split_sequence

GiB = 2**30


def size(n: float) -> str:
    """Bytes in binary units, short: 16.4G, 340M, 12K."""
    for unit, scale in (("G", GiB), ("M", 2**20), ("K", 2**10)):
        if n >= scale:
            return f"{n / scale:.1f}{unit}"
    return f"{n:.0f}"


# --- one layout, evaluated -----------------------------------------------------------------------------------


@dataclass
class Evaluation:
    """A schedule evaluated for one layout: its programs, cost model and simulation."""

    label: str
    spec: ScheduleSpec
    programs: list
    cost: CostModel
    sim: SimResult
    tokens_per_step: int
    model_flops_per_token: float
    segment_peaks: dict[int, float] = field(default_factory=dict)  # best_segments: size -> predicted peak
    offload: OffloadPlan | None = None  # train.offload's host bytes and copy time (planner/offload.py)

    @property
    def gpus(self) -> int:
        return self.cost.layout.gpus

    @property
    def seq_len(self) -> int:
        """The window's real tokens (the programs may run more: `run_length`)."""
        lay = self.cost.layout
        return self.tokens_per_step // (lay.dp * self.spec.microbatches * lay.micro_batch)

    @property
    def run_length(self) -> int:
        """The length the programs run: seq_len plus the padding the chunks and shards need (ring.padded_length)."""
        return sum(self.cost.chunk_lengths)

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
            "offload": self.offload.summary() if self.offload is not None else None,
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
    settings: PlanSettings | None = None,
) -> Evaluation:
    """Programs + cost model + simulation of one schedule; raises ValueError for an impossible one."""

    k = seq_chunks if schedule_name == "seq1f1b" else 1
    spec = ScheduleSpec(schedule_name, layout.pp, microbatches, k, layout.virtual_stages)
    comms = nccl.Comms(layout.dp, layout.sp, graph.tied_params > 0, layout.zero, cp=layout.cp)
    programs = [list(p) for p in checked_programs(spec, comms)]
    length = padded_length(seq_len, k, chunk_split, ring_align(layout))  # what the programs run (padding included)
    if k == 1:
        lengths = [length]
    else:
        per_token, per_pair = graph.split_costs()
        curve = pairs_before(layout.documents, length) if layout.documents is not None else None
        lengths = split_sequence(length, k, chunk_split, per_token, per_pair, ring_align(layout), curve)
    cost = CostModel(graph, profile, layout, list(layer_counts), lengths)
    sim = simulate(programs, spec, cost)
    offload = offload_plan(programs, spec, cost, settings or PlanSettings())
    if offload is not None:  # what the copies do not hide lengthens the step
        sim = dataclasses.replace(sim, step_time=sim.step_time + offload.exposed_s)
    tokens = layout.dp * microbatches * layout.micro_batch * seq_len
    label = label or (schedule_name if k == 1 else f"{schedule_name} k={k} ({chunk_split})")
    kept = kept_fraction(layout.documents, seq_len) if layout.documents is not None else 1.0
    flops = graph.model_flops_per_token(seq_len, kept)
    return Evaluation(label, spec, programs, cost, sim, tokens, flops, offload=offload)


@functools.lru_cache(maxsize=16)
def checked_programs(spec: ScheduleSpec, comms: nccl.Comms) -> list:
    """The per-rank programs of `spec` with explicit p2p, checked against NCCL's rules (raises ScheduleError).
    Kept per process: the recompute and offload modes a plan tries share one schedule, and checking a Seq1F1B of
    many chunks replays every rank's kernels (seconds at 64 chunks); the programs depend on nothing else."""
    programs = add_p2p(build_programs(spec), spec)
    nccl.check(programs, spec, comms)
    return programs


def layer_counts(par: ParallelConfig, seq_len: int, captured) -> tuple[list[int], list[int]]:
    """The trainer's layer counts (passes.plan_layer_counts), and a balanced split over pp stages for
    the alternatives (one stage per rank)."""

    counts = passes.plan_layer_counts(captured, par, seq_len)
    if len(counts) == par.pp:
        return counts, counts
    costs, first, last = passes.layer_costs(captured, seq_len)
    return counts, passes.balance_layers(costs, first, last, par.pp)


@dataclass
class Setup:
    """What every evaluation of one config shares: profile, graph costs, layout, layer split."""

    settings: PlanSettings
    profile: DeviceProfile
    graph: GraphCosts
    captured: CapturedGraph
    layout: Layout
    counts: list[int]
    alt_counts: list[int]
    auto_segments: bool = False  # train.recompute_layers=0: the planner picks the segment size (best_segments)


def fused_ops_planned(train: TrainConfig) -> bool:
    """Whether the planned run's stages get the fused RMSNorm, SwiGLU and rotary (train.fuse, graph/fusion.py):
    a plan is for a GPU unless train.device=cpu."""
    device = "cpu" if train.device == "cpu" else "cuda"
    return fuse_wanted(train.fuse, device, train.compile)


def setup(cfg: PlanConfig, captured=None, profile: DeviceProfile | None = None) -> Setup:
    """Capture (unless given) and read the config's layout; `train.recompute=auto` stays unresolved here.
    `profile` (the GPU a rank runs on) replaces `+plan.device`'s."""
    dtype = cfg.settings.dtype or cfg.train.dtype
    settings = dataclasses.replace(cfg.settings, dtype=dtype)
    profile = profile or load_profile(settings.profile or settings.device)
    if settings.gpus_per_node:
        profile = dataclasses.replace(profile, gpus_per_node=int(settings.gpus_per_node))
    if captured is None:
        captured = capture(build_config(cfg.model))
    par, train = cfg.parallel, cfg.train
    mode = recompute_mode(train.recompute, allow_auto=True)
    segments = train.recompute_layers  # 0: best_segments picks
    offload = offload_mode(train.offload, allow_auto=True)  # auto: resolved with the recompute mode
    layout = Layout(
        par.pp,
        par.dp,
        par.sp,
        cfg.data.micro_batch_size,
        par.zero,
        par.virtual_stages,
        recompute="none" if mode == AUTO else mode,
        recompute_layers=max(1, segments),
        kept_attention_layers=train.keep_attention_layers,
        compiled=train.compile,
        activation_budget=train.activation_budget,
        fused_loss=train.fused_loss,
        offload="none" if offload == AUTO else offload,
        cp=par.cp,
        documents=document_mix(cfg),
        fp8=planned_fp8(train, profile),
    )
    counts, alt_counts = layer_counts(par, cfg.data.seq_len, captured)
    graph = GraphCosts.from_captured(captured, dtype, fused=fused_ops_planned(train))
    return Setup(settings, profile, graph, captured, layout, counts, alt_counts, auto_segments=segments == 0)


def planned_fp8(train: TrainConfig, profile: DeviceProfile) -> str | None:
    """train.fp8's recipe, refused in one line on a device profile without FP8 tensor cores."""
    recipe = fp8_recipe(train.fp8)
    if recipe and not profile.fp8_speedup:
        raise PlanError(
            f"train.fp8={recipe} needs FP8 tensor cores, which the {profile.name} profile has none of "
            "(fp8_speedup 0); plan for an h100 or h200 (+plan.device=h100) or set train.fp8=false"
        )
    return recipe


DEFAULT_MEAN_DOCUMENT = 8192  # priced when a masked plan has no corpus to read and no data.mean_document_tokens


def document_mix(cfg: PlanConfig) -> DocumentMix | None:
    """The packed documents a masked plan prices (None: no document mask, or one endless synthetic document): the
    prepared corpus's own lengths when its cache exists, else log-normal around data.mean_document_tokens, else
    around DEFAULT_MEAN_DOCUMENT (the plan says so)."""
    d = cfg.data
    if d.cross_document_attention:
        return None
    mean = d.mean_document_tokens
    if d.synthetic:  # the documents the run's synthetic corpus will hold
        if mean <= 0:
            return None
        drawn = data.lognormal_offsets(data.synthetic_size(d.seq_len), mean, cfg.train.seed)
        return DocumentMix.from_offsets(drawn, f"synthetic log-normal documents of mean {mean:,} tokens")
    cached = data.cached_offsets(d, cfg.model.path, build_config(cfg.model).vocab_size)
    if cached is not None:
        return DocumentMix.from_offsets(cached, f"the prepared corpus of data.path={d.path}")
    if mean > 0:
        return DocumentMix.lognormal(mean)
    mix = DocumentMix.lognormal(DEFAULT_MEAN_DOCUMENT)
    return dataclasses.replace(mix, source=f"{mix.source} (assumed: no prepared corpus; set data.mean_document_tokens)")


def evaluate_config(cfg: PlanConfig, st: Setup, layout: Layout | None = None) -> Evaluation:
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
        settings=st.settings,
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
