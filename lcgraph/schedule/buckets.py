"""The distributed optimizer's actions in a rank's program: where reduce-scatters are waited for and all-gathers
issued (runtime/optimizer.py says what each does)."""

from __future__ import annotations

from lcgraph.schedule.actions import Action, issue_units


def add_bucket_actions(program: list[Action], actions: dict[int, tuple[list[Action], list[Action]]]) -> list[Action]:
    """Insert the RS<b> of every stage the rank holds after its last backward (and after the p2p group
    that sends that backward's gradient), and AG<b> right after OPT.

    RS is where the program waits for a reduce-scatter issued during backward (and, for a tied
    embedding, first all-reduces it with the other end of the pipeline). Waiting after the rank's last
    backward, not each stage's, matters with several stages per rank: a tied all-reduce after stage
    2p-1's last backward would stall rank p-1 while rank 0 still needs its gradients for stage 0, a
    cycle of waits across two communicators (found by `lcgraph.nccl.check`).
    """
    units = issue_units(program)
    last = None
    for i, unit in enumerate(units):
        a = unit[0]
        if a.kind == "B":
            sends = i + 1 < len(units) and any(
                x.kind == "SEND_B" and (x.stage, x.mb, x.chunk) == (a.stage, a.mb, a.chunk) for x in units[i + 1]
            )
            last = i + 1 if sends else i
    mine = [actions[s] for s in sorted({a.stage for a in program if a.kind == "B"}) if s in actions]
    out = []
    for i, unit in enumerate(units):
        out.extend(unit)
        if i == last:
            for rs, _ in mine:
                out.extend(rs)
        if unit[0].kind == "OPT":
            for _, ag in mine:
                out.extend(ag)
    return out
