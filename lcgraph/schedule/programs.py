"""Per-rank pipeline programs: build them, check them, dump them, estimate them.

A schedule is one program per pipeline rank; a program is the ordered list of actions that the runtime
interpreter executes. The builders emit compute only (F, B and a final OPT); `add_p2p` makes the
transfers between ranks explicit; `validate` proves that a set of programs is complete, respects the
Seq1F1B dependencies and cannot deadlock. The unit of work is (stage, micro-batch, sequence chunk).

P2P actions come in groups (`group_p2p`): the sends and receives that must progress together are
issued as one `batch_isend_irecv`, as NCCL needs (see `lcgraph.nccl` for the model that checks it).

Pure Python on purpose (no torch): schedules are planned, dumped and tested without GPUs.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, replace

from lcgraph.errors import LcgraphError

COMPUTE_KINDS = ("F", "B")
P2P_KINDS = ("SEND_F", "RECV_F", "SEND_B", "RECV_B")
COLLECTIVE_KINDS = ("RS", "AG")
KINDS = COMPUTE_KINDS + P2P_KINDS + ("OPT",) + COLLECTIVE_KINDS
SCHEDULES = ("gpipe", "1f1b", "seq1f1b", "interleaved_1f1b")
SPLIT_MODES = ("even", "uniform_comp")

# Token prefix and arrow of each p2p kind: "sF3.1>1" sends to rank 1, "rF3.1<0" receives from rank 0.
# The lower-case prefix keeps p2p tokens from reading as compute tokens (F or B followed by a digit).
_P2P_TOKEN = {"SEND_F": ("sF", ">"), "RECV_F": ("rF", "<"), "SEND_B": ("sB", ">"), "RECV_B": ("rB", "<")}
_MAX_LISTED = 8  # problems quoted in one error message


class ScheduleError(LcgraphError, ValueError):
    """Programs that are incomplete, out of dependency order, or that deadlock."""


@dataclass(frozen=True)
class Action:
    """One step of a rank's program.

    For p2p actions `stage` is the stage of the local compute the transfer belongs to: SEND_F(s) ships
    the output of F(s) and is received by RECV_F(s+1) on the next stage's rank. RS/AG (collectives
    added by later passes) carry their bucket index in `mb`.
    """

    kind: str
    stage: int
    mb: int = 0
    chunk: int = 0
    peer: int = -1
    group: int = -1  # p2p only: actions of one group are issued together (one batch_isend_irecv)

    def token(self, multi_stage: bool) -> str:
        """Short text form used by programs.txt; `multi_stage` appends '@<stage>' to staged actions."""
        if self.kind == "OPT":
            return "OPT"
        if self.kind in COLLECTIVE_KINDS:
            return f"{self.kind}{self.mb}"
        body = f"{self.mb}.{self.chunk}" + (f"@{self.stage}" if multi_stage else "")
        if self.kind in COMPUTE_KINDS:
            return self.kind + body
        if self.kind in _P2P_TOKEN:
            prefix, arrow = _P2P_TOKEN[self.kind]
            return f"{prefix}{body}{arrow}{self.peer}"
        raise ValueError(f"unknown action kind {self.kind!r}; valid kinds: {', '.join(KINDS)}")


Program = list[Action]
Key = tuple[str, int, int, int]  # (kind, stage, mb, chunk): identity of a staged action, peer ignored


def _key(action: Action) -> Key:
    return (action.kind, action.stage, action.mb, action.chunk)


def _describe(key: Key) -> str:
    kind, stage, mb, chunk = key
    return f"{kind}{mb}.{chunk}@{stage}"


@dataclass(frozen=True)
class ScheduleSpec:
    """What to schedule: `pp` ranks, m micro-batches of k sequence chunks, v stages per rank.

    Stage s lives on rank s % pp, so with v > 1 rank r holds stages r, r + pp, r + 2*pp, ...
    k > 1 is for seq1f1b (and gpipe); v > 1 only for interleaved_1f1b.
    """

    name: str
    pp: int
    microbatches: int
    seq_chunks: int = 1
    virtual_stages: int = 1

    def __post_init__(self) -> None:
        for field in ("pp", "microbatches", "seq_chunks", "virtual_stages"):
            if getattr(self, field) < 1:
                raise ValueError(f"ScheduleSpec.{field} must be >= 1, got {getattr(self, field)}")

    @property
    def num_stages(self) -> int:
        return self.pp * self.virtual_stages

    def rank_of(self, stage: int) -> int:
        return stage % self.pp


# ---------------------------------------------------------------------------------------------------
# Builders: compute-only programs, one per rank.
# ---------------------------------------------------------------------------------------------------


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


# ---------------------------------------------------------------------------------------------------
# Point-to-point transfers.
# ---------------------------------------------------------------------------------------------------


def _remote_neighbour(spec: ScheduleSpec, stage: int, step: int) -> int | None:
    """Rank of stage + step, or None when it does not exist or lives on this rank (a local hand-off)."""
    other = stage + step
    if not 0 <= other < spec.num_stages or spec.rank_of(other) == spec.rank_of(stage):
        return None
    return spec.rank_of(other)


def p2p_around(action: Action, spec: ScheduleSpec) -> tuple[Program, Program]:
    """The receives that must precede a compute action and the sends that follow it."""
    if action.kind not in COMPUTE_KINDS:
        return [], []
    upstream = -1 if action.kind == "F" else 1  # where the input comes from
    recv_from = _remote_neighbour(spec, action.stage, upstream)
    send_to = _remote_neighbour(spec, action.stage, -upstream)
    at = (action.stage, action.mb, action.chunk)
    before = [] if recv_from is None else [Action("RECV_" + action.kind, *at, peer=recv_from)]
    after = [] if send_to is None else [Action("SEND_" + action.kind, *at, peer=send_to)]
    return before, after


def add_p2p(programs: list[Program], spec: ScheduleSpec) -> list[Program]:
    """Make the transfers explicit (`with_transfers`), group them (`group_p2p`; with several stages per
    rank also `receive_ahead`), then split groups until every rank pair's batches mirror (`mirror_groups`)."""
    result = []
    for program in programs:
        grouped = group_p2p(with_transfers(program, spec))
        result.append(receive_ahead(grouped) if spec.virtual_stages > 1 else grouped)
    return mirror_groups(result)


def with_transfers(program: Program, spec: ScheduleSpec) -> Program:
    """Each compute's receive just before it and its send just after it, not yet grouped.

    Stages on the same rank hand tensors over locally and get no transfer actions.
    """
    out: Program = []
    for action in program:
        before, after = p2p_around(action, spec)
        out += before + [action] + after
    return out


def group_p2p(program: Program) -> Program:
    """Make each run of p2p actions between two other actions one group, issued as one batch.

    Such a run holds the sends of the compute before it and the receives of the compute after it. On
    NCCL a large send completes only once the peer runs the matching receive, and each rank pair shares
    one in-order stream: issued alone, 1F1B's `sF(m+1)` on rank i and `sB(m)` on rank i+1 each sit in
    front of the receive the other needs. In one group they progress together (Megatron-LM's
    send_forward_recv_backward; torch.distributed.pipelining's fwd_send + bwd_recv batch).
    """
    out: Program = []
    group, previous_p2p = -1, False
    for action in program:
        is_p2p = action.kind in P2P_KINDS
        if is_p2p and not previous_p2p:
            group += 1
        out.append(replace(action, group=group if is_p2p else -1))
        previous_p2p = is_p2p
    return out


def receive_ahead(program: Program) -> Program:
    """A group of sends only takes along the receive of the next group with the same peer, posted early.

    Why: with several stages per rank, a rank's sends to a neighbour can run ahead of the order in
    which the neighbour receives them: rank 0 posts `sB0@2` alone and later `[sF3@0 rB1@2]`, while
    rank 1 sends `sB1@3` before it receives `rB0@1`. On one in-order stream each waits for the other.
    Posting `rB1@2` beside `sB0@2` lets both progress; the receive is still waited for only right
    before its tensor is used (Megatron-LM's interleaved schedule posts next step's receives likewise).
    """
    units = issue_units(program)
    for i, unit in enumerate(units):
        if not unit or unit[0].kind not in P2P_KINDS or any(a.kind.startswith("RECV") for a in unit):
            continue
        for peer in dict.fromkeys(a.peer for a in unit):
            j = next((j for j in range(i + 1, len(units)) if any(a.peer == peer for a in units[j])), None)
            recv = (
                None if j is None else next((a for a in units[j] if a.kind.startswith("RECV") and a.peer == peer), None)
            )
            if (
                j is not None and recv is not None
            ):  # only from the next group with this peer: never jump its stream order
                units[j] = [a for a in units[j] if a is not recv]
                unit.append(recv)
    return group_p2p([a for unit in units if unit for a in unit])


def message_of(action: Action) -> tuple[str, int, int, int]:
    """The transfer a p2p action moves, named identically at both ends: (F/B, sender's stage, mb, chunk).

    RECV_F(s) receives what SEND_F(s - 1) sends; RECV_B(s) what SEND_B(s + 1) sends.
    """
    if action.kind.startswith("SEND"):
        return (action.kind[-1], action.stage, action.mb, action.chunk)
    return (action.kind[-1], action.stage + (-1 if action.kind == "RECV_F" else 1), action.mb, action.chunk)


def _pair_batches(programs: list[Program], rank: int, peer: int) -> list[frozenset]:
    """`rank`'s p2p groups restricted to its messages with `peer`, in issue order (empty ones dropped)."""
    batches = []
    for unit in issue_units(programs[rank]):
        if unit[0].kind in P2P_KINDS:
            messages = frozenset(message_of(a) for a in unit if a.peer == peer)
            if messages:
                batches.append(messages)
    return batches


def _pairs(programs: list[Program]) -> list[tuple[int, int]]:
    pairs = {(min(r, a.peer), max(r, a.peer)) for r, p in enumerate(programs) for a in p if a.kind in P2P_KINDS}
    return sorted(pairs)


def unmirrored_pairs(programs: list[Program]) -> list[str]:
    """Rank pairs whose batches do not mirror: NCCL needs each batch's messages with a peer to be
    exactly the messages of one batch at that peer (asymmetric batches hang; NVIDIA/nccl#2130)."""
    problems = []
    for r, p in _pairs(programs):
        mine, theirs = _pair_batches(programs, r, p), _pair_batches(programs, p, r)
        for n, (a, b) in enumerate(zip(mine, theirs)):
            if a != b:
                problems.append(
                    f"rank {r} and rank {p} batch their messages differently: batch {n} with the peer holds "
                    f"{_messages(a)} on rank {r} but {_messages(b)} on rank {p}"
                )
                break
    return problems


def _messages(batch: frozenset) -> str:
    return "{" + ", ".join(f"{k}{m}.{c} of stage {s}" for k, s, m, c in sorted(batch)) + "}"


def _common_blocks(mine: list[frozenset], theirs: list[frozenset]) -> list[frozenset] | None:
    """The coarsest order-preserving refinement of two batch sequences over the same messages, or None
    when they cross (a message batched earlier on one side than another that the other side has first)."""
    blocks, i, j = [], 0, 0
    a = set(mine[0]) if mine else set()
    b = set(theirs[0]) if theirs else set()
    while a and b:
        block = a & b
        if not block:
            return None
        blocks.append(frozenset(block))
        a -= block
        b -= block
        if not a and i + 1 < len(mine):
            i += 1
            a = set(mine[i])
        if not b and j + 1 < len(theirs):
            j += 1
            b = set(theirs[j])
    return blocks if not a and not b else None


def mirror_groups(programs: list[Program]) -> list[Program]:
    """Split p2p groups until every rank pair's batches mirror each other.

    Why: two ranks that batch the same messages differently hang on NCCL. gpipe's last forward and first
    backward share one group on rank 0 (`[sF3.0>1 rB0.0<1]`) but are two batches on rank 1, which
    computes in between; split, both ranks issue `sF3`/`rF3` and then `rB0`/`sB0` as mirrored pairs.
    Splitting keeps each message's position in its rank's stream order, so `nccl.check` still decides
    whether the result can hang. Pairs whose batches cross are left as they are (the check reports them).
    """
    cuts: dict[tuple[int, int], list[frozenset]] = {}
    for r, p in _pairs(programs):
        blocks = _common_blocks(_pair_batches(programs, r, p), _pair_batches(programs, p, r))
        if blocks is not None:
            cuts[(r, p)] = cuts[(p, r)] = blocks
    return [_split_groups(program, rank, cuts) for rank, program in enumerate(programs)]


def _split_groups(program: Program, rank: int, cuts: dict[tuple[int, int], list[frozenset]]) -> Program:
    out: Program = []
    group = 0
    for unit in issue_units(program):
        if unit[0].kind not in P2P_KINDS:
            out += unit
            continue
        per_peer: dict[int, list[list[Action]]] = {}
        for peer in dict.fromkeys(a.peer for a in unit):
            mine = [a for a in unit if a.peer == peer]
            messages = {message_of(a) for a in mine}
            blocks = [block for block in cuts.get((rank, peer), []) if block & messages]
            per_peer[peer] = [[a for a in mine if message_of(a) in block] for block in blocks] or [mine]
        for n in range(max(len(v) for v in per_peer.values())):
            part = [a for a in unit if any(n < len(v) and a in v[n] for v in per_peer.values())]
            out += [replace(a, group=group) for a in part]
            group += 1
    return out


def ungroup_p2p(program: Program) -> Program:
    """Every p2p action a group of its own: how programs were issued before `group_p2p` (a known-bad form)."""
    out: Program = []
    group = -1
    for action in program:
        if action.kind in P2P_KINDS:
            group += 1
            action = replace(action, group=group)
        out.append(action)
    return out


def issue_units(program: Program) -> list[Program]:
    """The program as the runtime issues it: one p2p group per unit, every other action alone."""
    units: list[Program] = []
    for action in program:
        joins = (
            action.kind in P2P_KINDS
            and units
            and units[-1][-1].kind in P2P_KINDS
            and units[-1][-1].group == action.group
        )
        if joins:
            units[-1].append(action)
        else:
            units.append([action])
    return units


def unit_token(unit: Program, multi_stage: bool) -> str:
    """programs.txt's form of one issue unit: a group of several p2p actions is bracketed."""
    body = " ".join(a.token(multi_stage) for a in unit)
    return f"[{body}]" if len(unit) > 1 else body


# ---------------------------------------------------------------------------------------------------
# Validation and replay.
# ---------------------------------------------------------------------------------------------------


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
        remote = _remote_neighbour(spec, stage, upstream) is not None
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


# ---------------------------------------------------------------------------------------------------
# Sequence chunk lengths.
# ---------------------------------------------------------------------------------------------------


def split_sequence(
    seq_len: int, k: int, mode: str, flops_per_token: float = 1.0, flops_per_pair: float = 0.0, align: int = 1
) -> list[int]:
    """Lengths of the k chunks of one sequence, in order.

    "even": equal lengths. "uniform_comp": equal cost, where a chunk of length s ending at position P
    costs flops_per_token*s + flops_per_pair*(s*(P - s) + s*(s + 1)/2) (its causal attention pairs),
    so later chunks are shorter. Lengths are multiples of `align`.
    """
    if k < 1 or align < 1:
        raise ValueError(f"k and align must be >= 1, got k={k}, align={align}")
    if mode == "even":
        if seq_len % (k * align) != 0:
            raise ValueError(
                f"even split needs seq_len divisible by k*align = {k}*{align} = {k * align}, "
                f"got seq_len={seq_len}; pad the sequence to a multiple of {k * align} "
                "or change k/align"
            )
        return [seq_len // k] * k
    if mode == "uniform_comp":
        return _equal_cost_split(seq_len, k, flops_per_token, flops_per_pair, align)
    raise ValueError(f"unknown split mode {mode!r}; valid modes: {', '.join(SPLIT_MODES)}")


def _equal_cost_split(seq_len: int, k: int, per_token: float, per_pair: float, align: int) -> list[int]:
    """Cut where the prefix cost reaches i/k of the total, from the last chunk backwards.

    Cutting at absolute boundaries (not chunk by chunk) keeps rounding errors from accumulating.
    """
    if seq_len % align != 0 or seq_len < k * align:
        raise ValueError(
            f"uniform_comp needs seq_len a multiple of align={align} and at least "
            f"k*align={k * align}, got seq_len={seq_len}; pad the sequence or lower k/align"
        )
    if per_token < 0 or per_pair < 0 or per_token + per_pair == 0:
        raise ValueError(
            f"costs must be >= 0 and not both zero, got flops_per_token={per_token}, flops_per_pair={per_pair}"
        )
    target = _prefix_cost(seq_len, per_token, per_pair) / k
    lengths = []
    end = seq_len
    for i in range(k - 1, 0, -1):  # the boundary where chunk i starts
        start = round(_prefix_position(i * target, per_token, per_pair) / align) * align
        start = min(max(start, i * align), end - align)  # leave >= align for this chunk and each earlier one
        lengths.append(end - start)
        end = start
    lengths.append(end)  # the first chunk takes the remainder
    return lengths[::-1]


def _prefix_cost(position: float, per_token: float, per_pair: float) -> float:
    """Cost of tokens [0, position): linear work plus the causal pairs position*(position+1)/2."""
    return per_token * position + per_pair * position * (position + 1) / 2


def _prefix_position(cost: float, per_token: float, per_pair: float) -> float:
    """Inverse of _prefix_cost (positive root, written to stay exact when per_pair is 0)."""
    linear = per_token + per_pair / 2
    return 2 * cost / (linear + (linear * linear + 2 * per_pair * cost) ** 0.5)


# ---------------------------------------------------------------------------------------------------
# Text dump (programs.txt) and its parser.
# ---------------------------------------------------------------------------------------------------


def format_programs(programs: list[Program], spec: ScheduleSpec) -> str:
    """One line per rank, 'rank R: ' then the action tokens; '@<stage>' when a rank holds several;
    a p2p group of several actions in brackets, '[sF1.0>1 rB0.0<1]'."""
    multi_stage = spec.virtual_stages > 1
    lines = [
        f"rank {rank}: " + " ".join(unit_token(u, multi_stage) for u in issue_units(program))
        for rank, program in enumerate(programs)
    ]
    return "\n".join(lines) + "\n"


_TOKEN_RE = re.compile(
    r"(?P<kind>F|B|sF|rF|sB|rB)(?P<mb>\d+)\.(?P<chunk>\d+)(?:@(?P<stage>\d+))?"
    r"(?:(?P<arrow>[<>])(?P<peer>\d+))?"
    r"|(?P<coll>RS|AG)(?P<bucket>\d+)|(?P<opt>OPT)"
)
_KIND_OF_PREFIX = {"F": "F", "B": "B", **{prefix: kind for kind, (prefix, _) in _P2P_TOKEN.items()}}


def parse_programs(text: str) -> list[Program]:
    """Inverse of format_programs. Without '@<stage>' a staged action is on stage = its rank."""
    programs: list[Program] = []
    for line in text.splitlines():
        if not line.strip():
            continue
        head, _, body = line.partition(":")
        rank = int(head.removeprefix("rank").strip())
        if rank != len(programs):
            raise ValueError(f"expected 'rank {len(programs)}:', got {head!r}")
        programs.append(_parse_body(body, rank))
    return programs


def _parse_body(body: str, rank: int) -> Program:
    """Tokens of one rank; '[' opens a p2p group and ']' closes it; a bare p2p token is a group of one."""
    program: Program = []
    group, open_group = -1, False
    for raw in body.split():
        opens, closes = raw.startswith("["), raw.endswith("]")
        token = raw.removeprefix("[").removesuffix("]")
        if (opens and open_group) or (closes and not (opens or open_group)):
            raise ValueError(f"rank {rank}: unbalanced brackets at {raw!r}")
        action = _parse_token(token, rank)
        if action.kind in P2P_KINDS:
            if not open_group:
                group += 1
            action = replace(action, group=group)
        elif opens or open_group:
            raise ValueError(f"rank {rank}: {token!r} in a p2p group; groups hold sends and receives only")
        open_group = (open_group or opens) and not closes
        program.append(action)
    if open_group:
        raise ValueError(f"rank {rank}: a p2p group is not closed with ']'")
    return program


def _parse_token(token: str, rank: int) -> Action:
    match = _TOKEN_RE.fullmatch(token)
    if match is None:
        raise ValueError(f"cannot parse action token {token!r}")
    if match["opt"]:
        return Action("OPT", -1)
    if match["coll"]:
        return Action(match["coll"], -1, int(match["bucket"]))
    kind = _KIND_OF_PREFIX[match["kind"]]
    arrow = _P2P_TOKEN[kind][1] if kind in P2P_KINDS else None
    if match["arrow"] != arrow:
        raise ValueError(f"action token {token!r}: sends end in '>peer', receives in '<peer', compute has no peer")
    stage = rank if match["stage"] is None else int(match["stage"])
    peer = -1 if match["peer"] is None else int(match["peer"])
    return Action(kind, stage, int(match["mb"]), int(match["chunk"]), peer)
