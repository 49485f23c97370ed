"""Per-rank pipeline programs, built per schedule family: gpipe, 1F1B, interleaved 1F1B, Seq1F1B.

The builders emit compute only (F, B and a final OPT); `lcgraph.schedule.p2p.add_p2p` makes the
transfers between ranks explicit and `lcgraph.schedule.validator.validate` proves a set of programs
complete and deadlock-free.
"""

from __future__ import annotations

from collections.abc import Callable

from lcgraph.schedule.actions import SCHEDULES, Action, Program, ScheduleSpec


def _forward_units(spec: ScheduleSpec) -> list[tuple[int, int]]:
    """(mb, chunk) in forward order: a chunk needs the K/V of the earlier chunks of its micro-batch."""
    return [(mb, c) for mb in range(spec.microbatches) for c in range(spec.seq_chunks)]


def _backward_units(spec: ScheduleSpec) -> list[tuple[int, int]]:
    """(mb, chunk) in backward order: FIFO over micro-batches, LIFO over chunks, because the last
    chunk's attention backward produces the dK/dV that every earlier chunk needs."""
    k = spec.seq_chunks
    return [(mb, c) for mb in range(spec.microbatches) for c in reversed(range(k))]


def _one_f_one_b(forwards: Program, backwards: Program, warmup: int) -> Program:
    """Warm-up forwards, then alternate one forward and one backward, then drain the backwards."""
    warmup = min(warmup, len(forwards))
    program = forwards[:warmup]
    for fwd, bwd in zip(forwards[warmup:], backwards):
        program += [fwd, bwd]
    return program + backwards[len(forwards) - warmup :]


def _build_gpipe(spec: ScheduleSpec, rank: int) -> Program:
    """All forwards, then all backwards in micro-batch order (chunks of one micro-batch LIFO)."""
    forwards = [Action("F", rank, mb, c) for mb, c in _forward_units(spec)]
    backwards = [Action("B", rank, mb, c) for mb, c in _backward_units(spec)]
    return forwards + backwards


def _build_1f1b(spec: ScheduleSpec, rank: int) -> Program:
    """Megatron's non-interleaved 1F1B: rank r runs p - r - 1 warm-up forwards."""
    if spec.seq_chunks != 1:
        raise ValueError(
            f"1f1b has no sequence chunks (got seq_chunks={spec.seq_chunks}); use name='seq1f1b' to split sequences"
        )
    m, p = spec.microbatches, spec.pp
    forwards = [Action("F", rank, mb) for mb in range(m)]
    backwards = [Action("B", rank, mb) for mb in range(m)]
    return _one_f_one_b(forwards, backwards, warmup=p - rank - 1)


def _build_seq1f1b(spec: ScheduleSpec, rank: int) -> Program:
    """Seq1F1B: 1F1B over (mb, chunk) units; k - 1 extra warm-up forwards fill the chunk pipeline."""
    p, k = spec.pp, spec.seq_chunks
    forwards = [Action("F", rank, mb, c) for mb, c in _forward_units(spec)]
    backwards = [Action("B", rank, mb, c) for mb, c in _backward_units(spec)]
    return _one_f_one_b(forwards, backwards, warmup=(p - rank - 1) + (k - 1))


def _interleaved_order(spec: ScheduleSpec, rank: int, kind: str) -> Program:
    """Megatron's interleaved order: groups of p micro-batches sweep the rank's stages in turn,
    first to last for forwards and last to first for backwards."""
    p, v, m = spec.pp, spec.virtual_stages, spec.microbatches
    stages = [j * p + rank for j in range(v)]
    if kind == "B":
        stages.reverse()
    program = []
    for first in range(0, m, p):
        group = range(first, min(first + p, m))
        program += [Action(kind, stage, mb) for stage in stages for mb in group]
    return program


def _build_interleaved_1f1b(spec: ScheduleSpec, rank: int) -> Program:
    """Megatron's interleaved 1F1B: v stages per rank, 2*(p - r - 1) + (v - 1)*p warm-up forwards.

    (v - 1)*p forwards take the first group of p micro-batches through all but this rank's last stage;
    2*(p - r - 1) more fill the round trip to the last rank and back before the first backward arrives.
    """
    p, v, m = spec.pp, spec.virtual_stages, spec.microbatches
    if spec.seq_chunks != 1:
        raise ValueError(
            f"interleaved_1f1b has no sequence chunks (got seq_chunks={spec.seq_chunks}); "
            "set seq_chunks=1 or use name='seq1f1b'"
        )
    if v == 1:
        return _build_1f1b(spec, rank)  # the 2*(p - r - 1) warm-up would only cost memory here
    if m % p != 0 and m > p:
        # A partial last group behind full ones deadlocks with this warm-up count (validate shows it).
        raise ValueError(
            f"interleaved_1f1b needs microbatches a multiple of pp, or at most pp (got "
            f"microbatches={m}, pp={p}); use {m - m % p} or {m + p - m % p} micro-batches"
        )
    forwards = _interleaved_order(spec, rank, "F")
    backwards = _interleaved_order(spec, rank, "B")
    return _one_f_one_b(forwards, backwards, warmup=2 * (p - rank - 1) + (v - 1) * p)


_BUILDERS: dict[str, Callable[[ScheduleSpec, int], Program]] = {
    "gpipe": _build_gpipe,
    "1f1b": _build_1f1b,
    "seq1f1b": _build_seq1f1b,
    "interleaved_1f1b": _build_interleaved_1f1b,
}


def build_programs(spec: ScheduleSpec) -> list[Program]:
    """Compute-only programs (F, B, then OPT), one per pipeline rank."""
    if spec.name not in _BUILDERS:
        raise ValueError(f"unknown schedule {spec.name!r}; valid names: {', '.join(SCHEDULES)}")
    if spec.virtual_stages != 1 and spec.name != "interleaved_1f1b":
        raise ValueError(
            f"{spec.name} runs one stage per rank (got virtual_stages="
            f"{spec.virtual_stages}); use name='interleaved_1f1b' or virtual_stages=1"
        )
    builder = _BUILDERS[spec.name]
    return [builder(spec, rank) + [Action("OPT", -1)] for rank in range(spec.pp)]
