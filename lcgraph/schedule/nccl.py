"""Check a step's programs under NCCL's rules, not an ideal network's.

`validator.validate` proves the programs complete and dependency-ordered with sends that never block,
which is what gloo gives. NCCL is stricter, and this module replays one training step under its
rules, for every global rank of a (pp, dp, cp, sp) layout:

- Every communication is a *kernel* on an in-order stream: p2p on one stream per rank pair (or, with
  `streams="rank"`, one stream per rank: the stricter reading), each collective on its communicator's
  stream. A kernel runs once every earlier kernel of its rank on each of its streams has completed.
- Batches mirror: a batch's messages with a peer are exactly the messages of one batch at that peer
  (asymmetric batches were seen to hang on 2 H200s; NVIDIA/nccl#2130). `p2p.mirror_groups`
  builds programs that way.
- A p2p group (`batch_isend_irecv`) is one kernel whose sends and receives progress together. The
  n-th send from r to p is matched with the n-th receive at p from r: NCCL has no tags, so both must
  carry the same message. A matched pair completes only while both kernels run (a message larger than
  NCCL's buffers, the worst case, which this model always assumes).
- A collective completes once every member runs it; members must issue a communicator's collectives
  in the same order.
- The host issues kernels in program order and waits: for a p2p group holding a receive right before
  the compute that uses the received tensor, for the
  Ulysses all-to-alls inside F and B, for each step of ring attention inside F and B (parallel.cp: one p2p
  group per step with the next and the previous cp rank, on the ring's own communicator; cp - 1 steps
  forward, cp backward, the last one taking each K/V gradient home), for a reduce-scatter at its RS action, for every send at OPT,
  for the tied-embedding sum (and its reduce-scatter), gradient and grad-norm all-reduces at OPT, for the loss all-reduce after the
  step, and for the all-gathers (the next step's forward).

A step deadlocks when some rank can never finish; waits that cross communicators (a rank in an
all-reduce while a member of it waits for a p2p receive) are caught as well. Pure Python, no torch.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from typing import Literal

from lcgraph.schedule.actions import P2P_KINDS, Program, ScheduleError, ScheduleSpec, issue_units, unit_token
from lcgraph.schedule.mesh import Coords
from lcgraph.schedule.p2p import message_of, unmirrored_pairs

Streams = Literal["pair", "rank"]
_MAX_LISTED = 8


@dataclass(frozen=True)
class Comms:
    """The communication of a step beyond pipeline p2p, as the runtime issues it.

    `zero`: the distributed optimizer (RS/AG actions in the programs; `tied_buckets` names the
    (stage, bucket) of a tied embedding, all-reduced across first and last stage before its RS);
    otherwise gradients are all-reduced over the stage's dp*cp*sp replicas at OPT. `cp`: ring attention's
    degree, whose p2p runs inside every F and B on a communicator of its own. The tied sum runs at
    OPT (`tied_sum_at="rs"` models summing it at the bucket's RS action, which deadlocks interleaved).
    """

    dp: int = 1
    sp: int = 1
    tied: bool = False
    zero: bool = True
    tied_buckets: frozenset[tuple[int, int]] = frozenset()
    tied_sum_at: Literal["opt", "rs"] = "opt"  # where the runtime sums a tied bucket ("rs": the old placement)
    cp: int = 1


@dataclass
class _Op:
    kind: str  # "send", "recv" or "coll"
    label: str  # what it moves, for messages
    peer: int = -1  # p2p: the other global rank
    message: tuple = ()  # p2p: the (kind, stage, mb, chunk) of the transfer, identical at both ends


@dataclass
class _Kernel:
    rank: int
    label: str
    streams: tuple
    ops: list[_Op]
    comm: tuple = ()  # collectives: the communicator (name, members)
    after: list[int] = field(default_factory=list)  # kernels (by id) that must complete before it runs
    partners: list[list[int]] = field(default_factory=list)  # per op: kernels that must run beside it


@dataclass
class _Host:
    """One rank's host: ("issue", kernel) and ("wait", kernels, what it waits in) in program order."""

    items: list[tuple] = field(default_factory=list)
    position: int = 0


class _Builder:
    """Expands the pipeline programs into every global rank's kernels and waits."""

    def __init__(self, programs: list[Program], spec: ScheduleSpec, comms: Comms, streams: Streams):
        self.programs, self.spec, self.comms, self.streams = programs, spec, comms, streams
        self.kernels: list[_Kernel] = []
        self.world = spec.pp * comms.dp * comms.cp * comms.sp
        self.hosts = [_Host() for _ in range(self.world)]

    def coords(self, rank: int) -> Coords:
        return Coords.of(rank, self.spec.pp, self.comms.dp, self.comms.sp, self.comms.cp)

    def describe(self, rank: int) -> str:
        if self.world == self.spec.pp:
            return f"rank {rank}"
        c = self.coords(rank)
        ring = f", cp {c.cp_rank}" if c.cp > 1 else ""
        return f"rank {rank} (pp {c.pp_rank}, dp {c.dp_rank}{ring}, sp {c.sp_rank})"

    # --- kernels -----------------------------------------------------------------------------------------
    def issue(self, rank: int, label: str, streams: tuple, ops: list[_Op], comm: tuple = ()) -> int:
        self.kernels.append(_Kernel(rank, label, streams, ops, comm))
        self.hosts[rank].items.append(("issue", len(self.kernels) - 1))
        return len(self.kernels) - 1

    def wait(self, rank: int, kernels: list[int], label: str) -> None:
        if kernels:
            self.hosts[rank].items.append(("wait", kernels, label))

    def collective(self, rank: int, name: str, members: list[int], label: str, wait: bool = True) -> int | None:
        if len(members) < 2:
            return None
        comm = (name, tuple(sorted(members)))
        k = self.issue(rank, f"{label} on {name}", (comm,), [_Op("coll", label)], comm)
        if wait:
            self.wait(rank, [k], self.kernels[k].label)
        return k

    def p2p(self, rank: int, unit: Program, multi_stage: bool) -> int:
        me = self.coords(rank)
        ops = []
        for a in unit:
            peer = me.global_rank(a.peer)
            kind = "send" if a.kind.startswith("SEND") else "recv"
            ops.append(_Op(kind, a.token(multi_stage), peer, message_of(a)))
        streams = tuple(sorted({("p2p", op.peer) for op in ops})) if self.streams == "pair" else (("p2p",),)
        return self.issue(rank, unit_token(unit, multi_stage), streams, ops)

    def ring(self, rank: int, token: str, kind: str) -> None:
        """Ring attention's steps inside one F or B: each a p2p group with both cp neighbours, waited before
        the next step (its payload is the next step's input)."""
        me, cp = self.coords(rank), self.comms.cp
        nxt = me.global_rank(me.pp_rank, cp_rank=(me.cp_rank + 1) % cp)
        prev = me.global_rank(me.pp_rank, cp_rank=(me.cp_rank - 1) % cp)
        for step in range(cp - 1 if kind == "F" else cp):
            message = ("ring", token, step)
            ops = [_Op("send", f"ring step {step} of {token}", nxt, message)]
            ops.append(_Op("recv", f"ring step {step} of {token}", prev, message))
            streams = tuple(sorted({("ring", nxt), ("ring", prev)})) if self.streams == "pair" else (("ring",),)
            k = self.issue(rank, f"ring step {step} in {token}", streams, ops)
            self.wait(rank, [k], f"ring step {step} in {token}")

    # --- communicators -----------------------------------------------------------------------------------
    def members(self, name: str, rank: int) -> list[int]:
        me, c, pp = self.coords(rank), self.comms, self.spec.pp
        if name == "sp":
            return [me.global_rank(me.pp_rank, me.dp_rank, s) for s in range(c.sp)]
        if name == "replicas":
            return [me.replica_global_rank(i) for i in range(me.replicas)]
        if name == "pp":
            return [me.global_rank(r) for r in range(pp)]
        if name == "tied":
            ends = [0, pp - 1] if c.tied and pp > 1 and me.pp_rank in (0, pp - 1) else []
            return [me.global_rank(r) for r in ends]
        if name == "world":
            return list(range(self.world))
        raise ValueError(f"unknown communicator {name!r}")

    # --- one rank's step ---------------------------------------------------------------------------------
    def expand(self, rank: int) -> None:
        program = self.programs[self.coords(rank).pp_rank]
        multi_stage = self.spec.virtual_stages > 1
        last_b = {a.stage: i for i, a in enumerate(program) if a.kind == "B"}
        rs_of = defaultdict(list)
        for a in program:
            if a.kind == "RS":
                rs_of[a.stage].append(a.mb)
        sends, gathers, scatters = [], [], {}
        inbox: dict[tuple, int] = {}  # (F/B, stage, mb, chunk) -> the kernel receiving that input
        position = 0
        for unit in issue_units(program):
            head = unit[0]
            if head.kind in P2P_KINDS:
                k = self.p2p(rank, unit, multi_stage)
                sends.append(k)
                for a in unit:
                    if a.kind.startswith("RECV"):
                        inbox[(a.kind[-1], a.stage, a.mb, a.chunk)] = k
            elif head.kind in ("F", "B"):
                token = head.token(multi_stage)
                waiting = inbox.pop((head.kind, head.stage, head.mb, head.chunk), None)
                if waiting is not None:  # a receive is waited for right before its tensor is used
                    self.wait(rank, [waiting], f"{token} (waiting for {self.kernels[waiting].label})")
                if self.comms.sp > 1:
                    self.collective(rank, "sp", self.members("sp", rank), f"all-to-all in {token}")
                if self.comms.cp > 1:
                    self.ring(rank, token, head.kind)
                if head.kind == "B" and self.comms.zero and last_b.get(head.stage) == position:
                    for bucket in rs_of[head.stage]:  # issued by grad-ready hooks during the last backward
                        if (head.stage, bucket) not in self.comms.tied_buckets:
                            scatters[bucket] = self.collective(
                                rank, "replicas", self.members("replicas", rank), f"RS{bucket}", wait=False
                            )
            elif head.kind == "RS":
                if (head.stage, head.mb) in self.comms.tied_buckets and self.comms.tied_sum_at == "rs":
                    self.collective(rank, "tied", self.members("tied", rank), "tied-embedding gradient all-reduce")
                    scatters[head.mb] = self.collective(
                        rank, "replicas", self.members("replicas", rank), f"RS{head.mb}", wait=False
                    )
                scatter = scatters.get(head.mb)
                if scatter is not None:
                    self.wait(rank, [scatter], f"RS{head.mb}")
            elif head.kind == "AG":
                gathers.append(
                    self.collective(rank, "replicas", self.members("replicas", rank), f"AG{head.mb}", wait=False)
                )
            elif head.kind == "OPT":
                self.wait(rank, sends, "OPT (waiting for its sends)")
                tied = [(s, b) for s, buckets in rs_of.items() for b in buckets if (s, b) in self.comms.tied_buckets]
                self.optimizer_step(rank, tied if self.comms.tied_sum_at == "opt" else [])
            position += len(unit)
        self.collective(rank, "world", self.members("world", rank), "loss all-reduce")
        self.wait(rank, [g for g in gathers if g is not None], "the next forward's all-gathers")

    def optimizer_step(self, rank: int, tied_buckets: list[tuple[int, int]]) -> None:
        replicas = self.members("replicas", rank)
        for _, bucket in tied_buckets:  # sum the tied embedding across the pipeline's ends, then scatter it
            self.collective(rank, "tied", self.members("tied", rank), "tied-embedding gradient all-reduce")
            self.collective(rank, "replicas", replicas, f"RS{bucket}")
        if not self.comms.zero:
            self.collective(rank, "replicas", replicas, "gradient all-reduce")
            self.collective(rank, "tied", self.members("tied", rank), "tied-embedding gradient all-reduce")
        else:
            self.collective(rank, "replicas", replicas, "grad-norm all-reduce")
        self.collective(rank, "pp", self.members("pp", rank), "grad-norm all-reduce")

    # --- wiring ------------------------------------------------------------------------------------------
    def link(self) -> list[str]:
        """Stream order, p2p matching and collective matching; returns mismatches (a wrong program)."""
        problems: list[str] = []
        last_on: dict[tuple, int] = {}
        for i, k in enumerate(self.kernels):
            for stream in k.streams:
                if (k.rank, stream) in last_on:
                    k.after.append(last_on[(k.rank, stream)])
                last_on[(k.rank, stream)] = i
        queues: dict[tuple, list[tuple[int, int]]] = defaultdict(list)  # (src, dst, "send"/"recv") -> ops
        by_comm: dict[tuple, dict[int, list[int]]] = defaultdict(lambda: defaultdict(list))
        for i, k in enumerate(self.kernels):
            k.partners = [[] for _ in k.ops]
            for j, op in enumerate(k.ops):
                if op.kind == "send":
                    queues[(k.rank, op.peer, "send")].append((i, j))
                elif op.kind == "recv":
                    queues[(op.peer, k.rank, "recv")].append((i, j))
            if k.comm:
                by_comm[k.comm][k.rank].append(i)
        for (src, dst, side), ops in queues.items():
            if side == "recv":
                continue
            recvs = queues.get((src, dst, "recv"), [])
            for n, ((ks, js), (kr, jr)) in enumerate(zip(ops, recvs)):
                send, recv = self.kernels[ks].ops[js], self.kernels[kr].ops[jr]
                if send.message != recv.message:
                    problems.append(
                        f"{self.describe(src)} -> {self.describe(dst)}: message {n} is {send.label} "
                        f"but the receiver expects {recv.label} (NCCL matches by order, not tag)"
                    )
                self.kernels[ks].partners[js].append(kr)
                self.kernels[kr].partners[jr].append(ks)
            if len(ops) != len(recvs):
                problems.append(
                    f"{self.describe(src)} sends {len(ops)} messages to {self.describe(dst)}, "
                    f"which receives {len(recvs)}"
                )
        for (src, dst, side), recvs in queues.items():
            if side == "recv" and (src, dst, "send") not in queues:
                problems.append(
                    f"{self.describe(dst)} receives {len(recvs)} messages that {self.describe(src)} never sends"
                )
        for comm, per_rank in by_comm.items():
            sequences = {r: [self.kernels[i].label for i in ks] for r, ks in per_rank.items()}
            first = next(iter(sequences.values()))
            for r, seq in sequences.items():
                if seq != first or set(per_rank) != set(comm[1]):
                    problems.append(
                        f"communicator {comm[0]} {list(comm[1])}: members issue different "
                        f"collectives ({self.describe(r)}: {', '.join(seq[:4])} ...)"
                    )
                    break
            for n in range(len(first)):
                group = [per_rank[r][n] for r in per_rank if n < len(per_rank[r])]
                for i in group:
                    self.kernels[i].partners = [[g for g in group if g != i]]
        return problems


def check(programs: list[Program], spec: ScheduleSpec, comms: Comms | None = None, streams: Streams = "pair") -> None:
    """Raise ScheduleError if one step of `programs` (with explicit, grouped p2p) can hang under NCCL.

    The message names each stuck rank, the action its host waits in, and what each of the kernels it
    waits for still needs.
    """
    comms = comms or Comms()
    builder = _Builder(programs, spec, comms, streams)
    for rank in range(builder.world):
        builder.expand(rank)
    problems = builder.link()
    if problems:
        listed = problems[:_MAX_LISTED]
        raise ScheduleError("p2p or collective order mismatch:\n  " + "\n  ".join(listed))
    running, done = _replay(builder)
    stuck = [rank for rank, host in enumerate(builder.hosts) if host.position < len(host.items)]
    if stuck:
        lines = [_why_stuck(builder, rank, running, done) for rank in stuck[:_MAX_LISTED]]
        more = f"\n  ... and {len(stuck) - _MAX_LISTED} more ranks" if len(stuck) > _MAX_LISTED else ""
        raise ScheduleError(
            "deadlock under NCCL's rules (large messages, in-order streams):\n  " + "\n  ".join(lines) + more
        )
    asymmetric = unmirrored_pairs(programs)
    if asymmetric:
        raise ScheduleError(
            "batches that do not mirror (NCCL hangs on them; p2p.mirror_groups splits them):\n  "
            + "\n  ".join(asymmetric[:_MAX_LISTED])
        )


def _replay(b: _Builder) -> tuple[set[int], set[int]]:
    """Advance hosts and kernels until nothing changes; returns the running and the completed kernels.

    A host issues in order and stops at a wait until its kernels complete; an issued kernel runs once the kernels
    before it on its streams complete; a running kernel completes once its partners run. Every step only adds, so
    the end state is the same in any order: each kernel is looked at again only when what it waits for changes."""
    kernels = b.kernels
    issued: set[int] = set()
    running: set[int] = set()
    done: set[int] = set()
    before_left = [len(set(k.after)) for k in kernels]  # kernels before it on its streams not yet completed
    partners = [{p for ps in k.partners for p in ps} for k in kernels]
    partners_left = [len(ps) for ps in partners]  # partners not yet running
    completes: list[list[int]] = [[] for _ in kernels]  # kernel -> the kernels it is before
    runs: list[list[int]] = [[] for _ in kernels]  # kernel -> the kernels it partners
    for i, k in enumerate(kernels):
        for a in set(k.after):
            completes[a].append(i)
        for p in partners[i]:
            runs[p].append(i)
    blocked: dict[int, list[int]] = {}  # kernel -> hosts waiting for it to complete
    events: list[tuple[bool, int]] = []  # (completed, kernel): False when it starts running

    def try_run(i: int) -> None:
        if i in issued and before_left[i] == 0 and i not in running:
            running.add(i)
            events.append((False, i))

    def try_complete(i: int) -> None:
        if i in running and partners_left[i] == 0 and i not in done:
            done.add(i)
            events.append((True, i))

    def advance(rank: int) -> None:
        host = b.hosts[rank]
        while host.position < len(host.items):
            item = host.items[host.position]
            if item[0] == "issue":
                issued.add(item[1])
                try_run(item[1])
            else:
                missing = next((k for k in item[1] if k not in done), None)
                if missing is not None:
                    blocked.setdefault(missing, []).append(rank)
                    return
            host.position += 1

    for rank in range(len(b.hosts)):
        advance(rank)
    while events:
        completed, i = events.pop()
        if completed:
            for j in completes[i]:
                before_left[j] -= 1
                try_run(j)
            for rank in blocked.pop(i, []):
                advance(rank)
        else:
            try_complete(i)
            for j in runs[i]:
                partners_left[j] -= 1
                try_complete(j)
    return running, done


def _why_stuck(b: _Builder, rank: int, running: set[int], done: set[int]) -> str:
    _, kernels, what = b.hosts[rank].items[b.hosts[rank].position]
    reasons = []
    for i in kernels:
        k = b.kernels[i]
        if i in done:
            continue
        if i not in running:
            blockers = [b.kernels[a].label for a in k.after if a not in done]
            reasons.append(f"{k.label} is queued behind {', '.join(blockers)}")
            continue
        for op, partners in zip(k.ops, k.partners):
            for p in partners:
                if p not in running:
                    other = b.kernels[p]
                    reasons.append(f"{op.label} needs {b.describe(other.rank)} to run {other.label}")
    return f"{b.describe(rank)} waits in {what}: " + "; ".join(reasons)
