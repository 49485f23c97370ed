"""Discrete-event simulation of per-rank programs: when each action runs, and what each stage holds.

`simulate(programs, spec, costs)` executes the programs of `schedule.build_programs` (with or without
`add_p2p`) the way the runtime does: each rank runs its actions in program order, an action starts
once the rank is free and its dependencies (schedule's Seq1F1B rules) are done; a send costs its rank
nothing and its message arrives after the link time (messages on one link queue behind each other);
a receive waits for its message. `costs` says how long things take and what they hold:

    costs.duration(action, rank) -> seconds     F, B, OPT (p2p: 0)
    costs.transfer(action) -> seconds           link time of a SEND_*
    costs.static_bytes(stage) -> bytes          weights, grads, optimizer state
    costs.step_bytes(stage) -> bytes            what OPT allocates while it runs (bf16: the fp32 gradients)
    costs.unit_bytes(stage, chunk) -> (activation bytes, K/V bytes) of one (mb, chunk) unit

`lcgraph.planner.costs.CostModel` is the real one; `UniformCosts` (equal chunks) is what the closed forms
of the schedule papers assume (GPipe, 1F1B, Seq1F1B: arXiv 2406.03488). Memory follows program order: F adds a unit's activations and K/V, B frees
them; while a micro-batch's backward is under way the KV relay also holds dK/dV for its pending prefix;
OPT holds its step bytes on top of what is left (usually nothing: it is the peak only for short sequences).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple

from lcgraph.schedule.actions import COMPUTE_KINDS, Action, Program, ScheduleSpec
from lcgraph.schedule.validator import replay


class Event(NamedTuple):
    """One interval of the timeline: compute on the rank, or a message on the wire (lower-case names)."""

    rank: int
    name: str
    start: float
    end: float


@dataclass
class StagePeak:
    """A stage's memory at the moment its total peaked (bytes, one rank)."""

    static: float = 0.0
    activations: float = 0.0
    kv_relay: float = 0.0
    optimizer_step: float = 0.0  # nonzero when the peak is OPT's: its transient fp32 gradients

    @property
    def total(self) -> float:
        return self.static + self.activations + self.kv_relay + self.optimizer_step


@dataclass
class SimResult:
    timeline: list[Event]
    busy: list[float]  # per rank: seconds of F and B
    pipeline_time: float  # end of the last F/B
    step_time: float  # end of the last action (OPT included)
    bubble: float  # idle share of ranks x pipeline_time
    peaks: dict[int, StagePeak] = field(default_factory=dict)  # per stage
    rank_peak: list[float] = field(default_factory=list)  # per rank, all its stages together


@dataclass
class UniformCosts:
    """Equal-cost chunks: a micro-batch's forward `f` and backward `b` on every stage, cut into k chunks;
    one micro-batch's activations on a stage are `activations`, its K/V `kv`. Free p2p and optimizer."""

    f: float = 1.0
    b: float = 2.0
    k: int = 1
    activations: float = 1.0
    kv: float = 0.0
    static: float = 0.0

    def duration(self, action: Action, rank: int) -> float:
        return {"F": self.f / self.k, "B": self.b / self.k}.get(action.kind, 0.0)

    def transfer(self, action: Action) -> float:
        return 0.0

    def static_bytes(self, stage: int) -> float:
        return self.static

    def step_bytes(self, stage: int) -> float:
        return 0.0

    def unit_bytes(self, stage: int, chunk: int) -> tuple[float, float]:
        return self.activations / self.k, self.kv / self.k


class _Memory:
    """Live bytes per stage in program order; K/V relay doubles (dK/dV parked) once a backward began."""

    def __init__(self, spec: ScheduleSpec, costs):
        self.costs, self.spec = costs, spec
        self.static = {s: costs.static_bytes(s) for s in range(spec.num_stages)}
        self.act = {s: 0.0 for s in self.static}
        self.pending_kv: dict[tuple[int, int], float] = {}  # (stage, mb) -> K/V of chunks not yet backward
        self.started: set[tuple[int, int]] = set()  # (stage, mb) whose backward began
        self.kv = {s: 0.0 for s in self.static}
        self.peaks = {s: StagePeak(self.static[s]) for s in self.static}
        self.rank_peak = [0.0] * spec.pp

    def _relay_kv(self, key: tuple[int, int]) -> float:
        """K/V the relay holds for (stage, mb): pending chunks, plus their dK/dV once its backward began."""
        doubled = key in self.started and self.spec.seq_chunks > 1
        return self.pending_kv.get(key, 0.0) * (2.0 if doubled else 1.0)

    def apply(self, action: Action, rank: int) -> None:
        if action.kind == "OPT":
            for s in range(rank, self.spec.num_stages, self.spec.pp):
                self._record(s, self.costs.step_bytes(s))
            return
        if action.kind not in COMPUTE_KINDS:
            return
        s, key = action.stage, (action.stage, action.mb)
        act, kv = self.costs.unit_bytes(s, action.chunk)
        self.kv[s] -= self._relay_kv(key)
        if action.kind == "F":
            self.act[s] += act
            self.pending_kv[key] = self.pending_kv.get(key, 0.0) + kv
        else:
            self.act[s] -= act
            self.pending_kv[key] = self.pending_kv.get(key, 0.0) - kv
            self.started.add(key)
            if action.chunk == 0:  # the micro-batch is done on this stage: the relay frees its cache
                self.pending_kv.pop(key)
        self.kv[s] += self._relay_kv(key)
        self._record(s)

    def _record(self, s: int, step: float = 0.0) -> None:
        now = StagePeak(self.static[s], self.act[s], self.kv[s], step)
        if now.total > self.peaks[s].total:
            self.peaks[s] = now
        rank = self.spec.rank_of(s)
        stages = range(rank, self.spec.num_stages, self.spec.pp)
        total = sum(self.static[t] + self.act[t] + self.kv[t] for t in stages)
        if step:  # OPT: every stage of the rank casts its gradients at once
            total += sum(self.costs.step_bytes(t) for t in stages)
        self.rank_peak[rank] = max(self.rank_peak[rank], total)


def memory_peaks(programs: list[Program], spec: ScheduleSpec, costs) -> tuple[dict[int, StagePeak], list[float]]:
    """The memory half of `simulate` without its clock: a rank's memory follows its own program order only, so
    replaying each program in order gives the same peaks (the planner tries memory-only variants with it)."""
    memory = _Memory(spec, costs)
    for s in range(spec.num_stages):
        memory._record(s)
    for rank, program in enumerate(programs):
        for action in program:
            memory.apply(action, rank)
    return memory.peaks, memory.rank_peak


def simulate(programs: list[Program], spec: ScheduleSpec, costs) -> SimResult:
    """Run the programs against `costs`; raise ScheduleError if they deadlock."""
    multi_stage = spec.virtual_stages > 1
    link_free: dict[tuple[int, int], float] = {}
    busy = [0.0] * len(programs)
    timeline: list[Event] = []
    memory = _Memory(spec, costs)
    for s in range(spec.num_stages):
        memory._record(s)
    pipeline_end = 0.0

    def step(rank: int, action: Action, start: float) -> tuple[float, float]:
        nonlocal pipeline_end
        end = available = start + costs.duration(action, rank)
        if action.kind.startswith("SEND"):  # the link carries one message at a time
            link = (rank, action.peer)
            sent = max(end, link_free.get(link, 0.0))
            available = link_free[link] = sent + costs.transfer(action)
            timeline.append(Event(rank, action.token(multi_stage), sent, available))
        elif end > start or action.kind in COMPUTE_KINDS:
            timeline.append(Event(rank, action.token(multi_stage), start, end))
        if action.kind in COMPUTE_KINDS:
            busy[rank] += end - start
            pipeline_end = max(pipeline_end, end)
        memory.apply(action, rank)
        return end, available

    clock = replay(programs, spec, step)
    step_time = max(clock + [e.end for e in timeline], default=0.0)
    bubble = 1.0 - sum(busy) / (len(programs) * pipeline_end) if pipeline_end > 0 else 0.0
    timeline.sort(key=lambda e: (e.rank, e.start, e.end))
    return SimResult(timeline, busy, pipeline_end, step_time, bubble, memory.peaks, memory.rank_peak)
