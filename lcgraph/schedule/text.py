"""programs.txt: the text form of per-rank programs (one line per rank) and its parser."""

from __future__ import annotations

import re
from dataclasses import replace

from lcgraph.schedule.actions import P2P_KINDS, P2P_TOKEN, Action, Program, ScheduleSpec, issue_units, unit_token


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
_KIND_OF_PREFIX = {"F": "F", "B": "B", **{prefix: kind for kind, (prefix, _) in P2P_TOKEN.items()}}


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
    arrow = P2P_TOKEN[kind][1] if kind in P2P_KINDS else None
    if match["arrow"] != arrow:
        raise ValueError(f"action token {token!r}: sends end in '>peer', receives in '<peer', compute has no peer")
    stage = rank if match["stage"] is None else int(match["stage"])
    peer = -1 if match["peer"] is None else int(match["peer"])
    return Action(kind, stage, int(match["mb"]), int(match["chunk"]), peer)
