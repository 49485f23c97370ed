"""Point-to-point transfers between pipeline ranks: make them explicit in compute-only programs, group
them into batches issued together (one `batch_isend_irecv`, as NCCL needs), and split groups until
every rank pair's batches mirror. `lcgraph.schedule.nccl` checks the result under NCCL's rules.
"""

from __future__ import annotations

from dataclasses import replace

from lcgraph.schedule.actions import COMPUTE_KINDS, P2P_KINDS, Action, Program, ScheduleSpec, issue_units


def remote_neighbour(spec: ScheduleSpec, stage: int, step: int) -> int | None:
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
    recv_from = remote_neighbour(spec, action.stage, upstream)
    send_to = remote_neighbour(spec, action.stage, -upstream)
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
