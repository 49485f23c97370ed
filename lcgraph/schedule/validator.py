"""The validator and replay of per-rank programs, and the estimates that replay them.

`validate` proves that a set of programs is complete, respects the Seq1F1B dependencies and cannot
deadlock on an ideal network; `replay` runs the programs under a caller's timing (the planner's event
simulator uses it); `bubble_fraction` and `peak_inflight` estimate idle time and activation sets.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import replace

from lcgraph.schedule.actions import (
    COMPUTE_KINDS,
    KINDS,
    P2P_KINDS,
    Action,
    Program,
    ScheduleError,
    ScheduleSpec,
    issue_units,
    unit_token,
)
from lcgraph.schedule.p2p import p2p_around, remote_neighbour

_MAX_LISTED = 8  # problems quoted in one error message

Key = tuple[str, int, int, int]  # (kind, stage, mb, chunk): identity of a staged action, peer ignored


def _key(action: Action) -> Key:
    return (action.kind, action.stage, action.mb, action.chunk)


def _describe(key: Key) -> str:
    kind, stage, mb, chunk = key
    return f"{kind}{mb}.{chunk}@{stage}"


def _has_p2p(programs: list[Program]) -> bool:
    return any(a.kind in P2P_KINDS for program in programs for a in program)


def _dependencies(action: Action, spec: ScheduleSpec, explicit_p2p: bool) -> list[Key]:
    """Keys that must have run before `action` (the data dependencies of GPipe, 1F1B and Seq1F1B).

    With explicit p2p a remote input arrives through this rank's RECV; otherwise p2p is implicit and
    the remote compute itself is the dependency.
    """
    kind, stage, mb, chunk = _key(action)
    last_chunk = spec.seq_chunks - 1
    if kind == "SEND_F":
        return [("F", stage, mb, chunk)]
    if kind == "SEND_B":
        return [("B", stage, mb, chunk)]
    if kind not in COMPUTE_KINDS:
        return []  # a receive is posted at once; the compute that reads it waits for the message
    upstream = -1 if kind == "F" else 1
    deps: list[Key] = []
    if 0 <= stage + upstream < spec.num_stages:
        remote = remote_neighbour(spec, stage, upstream) is not None
        if remote and explicit_p2p:
            deps += [("RECV_" + kind, stage, mb, chunk), ("SEND_" + kind, stage + upstream, mb, chunk)]
        else:
            deps.append((kind, stage + upstream, mb, chunk))
    if kind == "F" and chunk > 0:
        deps.append(("F", stage, mb, chunk - 1))  # K/V of the earlier chunk
    if kind == "B":
        deps.append(("F", stage, mb, chunk))  # its own forward (on the last stage: the loss)
        if chunk < last_chunk:
            deps.append(("B", stage, mb, chunk + 1))  # dK/dV relayed from the later chunk
    return deps


def _problems(problems: list[str], header: str) -> ScheduleError:
    listed = problems[:_MAX_LISTED]
    more = f"\n  ... and {len(problems) - len(listed)} more" if len(problems) > len(listed) else ""
    return ScheduleError(header + "\n  " + "\n  ".join(listed) + more)


def _check_placement(programs: list[Program], spec: ScheduleSpec) -> None:
    """Every staged action is in range, of a known kind, and on the rank that owns its stage."""
    bounds = {"stage": spec.num_stages, "mb": spec.microbatches, "chunk": spec.seq_chunks}
    problems = []
    for rank, program in enumerate(programs):
        for action in program:
            if action.kind not in KINDS:
                problems.append(f"rank {rank}: unknown kind {action.kind!r} (valid: {', '.join(KINDS)})")
                continue
            if action.kind not in COMPUTE_KINDS + P2P_KINDS:
                continue
            for field, bound in bounds.items():
                if not 0 <= getattr(action, field) < bound:
                    problems.append(f"rank {rank}: {action.token(True)} has {field} outside [0, {bound})")
            if 0 <= action.stage < spec.num_stages and spec.rank_of(action.stage) != rank:
                problems.append(f"rank {rank}: {action.token(True)} belongs on rank {spec.rank_of(action.stage)}")
    if problems:
        raise _problems(problems, "actions out of place:")


def _check_complete(programs: list[Program], spec: ScheduleSpec) -> None:
    """One F and one B per (stage, mb, chunk), and each rank ends its compute with exactly one OPT."""
    problems = []
    counts = Counter(_key(a) for program in programs for a in program if a.kind in COMPUTE_KINDS)
    for stage in range(spec.num_stages):
        for mb in range(spec.microbatches):
            for chunk in range(spec.seq_chunks):
                for kind in COMPUTE_KINDS:
                    n = counts[(kind, stage, mb, chunk)]
                    if n != 1:
                        problems.append(f"{_describe((kind, stage, mb, chunk))} appears {n} times, expected once")
    for rank, program in enumerate(programs):
        compute = [a.kind for a in program if a.kind in COMPUTE_KINDS + ("OPT",)]
        if compute.count("OPT") != 1 or compute[-1] != "OPT":
            problems.append(
                f"rank {rank}: must end its compute with exactly one OPT "
                f"(has {compute.count('OPT')}, last compute {compute[-1] if compute else None})"
            )
    if problems:
        raise _problems(problems, "incomplete programs:")


def _check_p2p_matches(programs: list[Program], spec: ScheduleSpec) -> None:
    """With explicit p2p, each rank holds exactly the transfers its compute needs, peers included."""
    problems = []
    for rank, program in enumerate(programs):
        actual = Counter(a for a in program if a.kind in P2P_KINDS)
        expected: Counter[Action] = Counter()
        actual = Counter(replace(a, group=-1) for a in program if a.kind in P2P_KINDS)
        for action in program:
            before, after = p2p_around(action, spec)
            expected.update(before + after)
        for action in expected - actual:
            problems.append(f"rank {rank}: missing {action.token(True)}")
        for action in actual - expected:
            problems.append(f"rank {rank}: unexpected {action.token(True)}")
    if problems:
        raise _problems(problems, "p2p actions do not match the compute:")


def _check_groups(programs: list[Program]) -> None:
    """Each p2p action has a group, and a group's actions stand together in the program."""
    problems = []
    for rank, program in enumerate(programs):
        seen: set[int] = set()
        for unit in issue_units(program):
            head = unit[0]
            if head.kind not in P2P_KINDS:
                continue
            if head.group < 0 or head.group in seen:
                problems.append(
                    f"rank {rank}: {unit_token(unit, True)} has group {head.group}, "
                    "which is missing or split by other actions"
                )
            seen.add(head.group)
    if problems:
        raise _problems(problems, "p2p groups malformed:")


def _check_local_order(programs: list[Program], spec: ScheduleSpec, explicit_p2p: bool) -> None:
    """Dependencies on the same rank must come earlier in that rank's program."""
    problems = []
    for rank, program in enumerate(programs):
        position = {_key(a): i for i, a in enumerate(program)}
        for i, action in enumerate(program):
            for dep in _dependencies(action, spec, explicit_p2p):
                if spec.rank_of(dep[1]) == rank and position.get(dep, len(program)) > i:
                    problems.append(f"rank {rank}: {action.token(True)} comes before its dependency {_describe(dep)}")
    if problems:
        raise _problems(problems, "dependency order violated:")


def replay(
    programs: list[Program], spec: ScheduleSpec, step: Callable[[int, Action, float], tuple[float, float]]
) -> list[float]:
    """Run every rank in program order; an action starts once its dependencies' results are available.

    `step(rank, action, start)` runs `action` on `rank` from time `start` and returns (the rank's clock
    after it, the time its result is available to dependents: later than the clock for a send that
    is still on the wire). Sends never block; a receive waits for its send. Returns each rank's finish
    time, or raises ScheduleError naming each stuck rank's next action when no rank can advance.
    """
    explicit_p2p = _has_p2p(programs)
    available: dict[Key, float] = {}
    clock = [0.0] * len(programs)
    position = [0] * len(programs)
    progressed = True
    while progressed:
        progressed = False
        for rank, program in enumerate(programs):
            while position[rank] < len(program):
                action = program[position[rank]]
                deps = _dependencies(action, spec, explicit_p2p)
                if any(dep not in available for dep in deps):
                    break
                start = max([clock[rank]] + [available[dep] for dep in deps])
                clock[rank], available[_key(action)] = step(rank, action, start)
                position[rank] += 1
                progressed = True
    stuck = []
    for rank, program in enumerate(programs):
        if position[rank] < len(program):
            action = program[position[rank]]
            waits = [_describe(d) for d in _dependencies(action, spec, explicit_p2p) if d not in available]
            stuck.append(f"rank {rank}: stuck at {action.token(True)} waiting for {', '.join(waits)}")
    if stuck:
        raise _problems(stuck, "deadlock: no rank can advance")
    return clock


def _timed_step(duration: Callable[[Action], float]):
    """A replay step where an action's result is available as soon as it finishes."""

    def step(rank: int, action: Action, start: float) -> tuple[float, float]:
        end = start + duration(action)
        return end, end

    return step


def validate(programs: list[Program], spec: ScheduleSpec) -> None:
    """Raise ScheduleError unless the programs are complete, dependency-ordered and deadlock-free on an
    ideal network (sends never block). `lcgraph.nccl.check` adds NCCL's rules and the collectives.

    Works on compute-only programs (p2p implicit) and on programs with explicit p2p actions.
    """
    if len(programs) != spec.pp:
        raise ScheduleError(f"expected {spec.pp} programs (one per rank), got {len(programs)}")
    explicit_p2p = _has_p2p(programs)
    _check_placement(programs, spec)
    _check_complete(programs, spec)
    if explicit_p2p:
        _check_p2p_matches(programs, spec)
        _check_groups(programs)
    _check_local_order(programs, spec, explicit_p2p)
    replay(programs, spec, _timed_step(lambda action: 0.0))


# ---------------------------------------------------------------------------------------------------
# Estimates: bubble and activation memory.
# ---------------------------------------------------------------------------------------------------


def bubble_fraction(programs: list[Program], spec: ScheduleSpec, f_time: float = 1.0, b_time: float = 2.0) -> float:
    """Idle share of ranks x makespan, replaying the programs with free p2p.

    f_time and b_time are one micro-batch's forward and backward on one rank; each (mb, chunk) unit on
    one stage costs its 1/(k*v) share, i.e. chunks are assumed to cost the same.
    """
    share = 1.0 / (spec.seq_chunks * spec.virtual_stages)
    cost = {"F": f_time * share, "B": b_time * share}

    def duration(action: Action) -> float:
        return cost.get(action.kind, 0.0)

    makespan = max(replay(programs, spec, _timed_step(duration)))
    busy = sum(duration(a) for program in programs for a in program)
    return 1.0 - busy / (len(programs) * makespan)


def peak_inflight(programs: list[Program], spec: ScheduleSpec) -> list[int]:
    """Per rank, the most (stage, mb, chunk) units whose F has run but whose B has not: the number of
    activation sets the rank must hold at once."""
    if len(programs) != spec.pp:
        raise ValueError(f"expected {spec.pp} programs (one per rank), got {len(programs)}")
    peaks = []
    for program in programs:
        live = peak = 0
        for action in program:
            live += {"F": 1, "B": -1}.get(action.kind, 0)
            peak = max(peak, live)
        peaks.append(peak)
    return peaks
