"""The vocabulary of pipeline schedules: the Action, a Program (one rank's ordered actions), the
ScheduleSpec being scheduled, and how a program is issued (its p2p groups as units, their text tokens).

A schedule is one program per pipeline rank; the runtime interpreter executes a program in order. The
unit of work is (stage, micro-batch, sequence chunk). Pure Python on purpose (no torch): schedules are
planned, dumped and tested without GPUs.
"""

from __future__ import annotations

from dataclasses import dataclass

from lcgraph.errors import LcgraphError

COMPUTE_KINDS = ("F", "B")
P2P_KINDS = ("SEND_F", "RECV_F", "SEND_B", "RECV_B")
COLLECTIVE_KINDS = ("RS", "AG")
KINDS = COMPUTE_KINDS + P2P_KINDS + ("OPT",) + COLLECTIVE_KINDS
SCHEDULES = ("gpipe", "1f1b", "seq1f1b", "interleaved_1f1b")
SPLIT_MODES = ("even", "uniform_comp")

# Token prefix and arrow of each p2p kind: "sF3.1>1" sends to rank 1, "rF3.1<0" receives from rank 0.
# The lower-case prefix keeps p2p tokens from reading as compute tokens (F or B followed by a digit).
P2P_TOKEN = {"SEND_F": ("sF", ">"), "RECV_F": ("rF", "<"), "SEND_B": ("sB", ">"), "RECV_B": ("rB", "<")}


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
        if self.kind in P2P_TOKEN:
            prefix, arrow = P2P_TOKEN[self.kind]
            return f"{prefix}{body}{arrow}{self.peer}"
        raise ValueError(f"unknown action kind {self.kind!r}; valid kinds: {', '.join(KINDS)}")


Program = list[Action]


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
