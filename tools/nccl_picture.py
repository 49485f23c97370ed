"""Draw docs/nccl.png: 1F1B (pp=2, 4 micro-batches) issued ungrouped, where NCCL's rules deadlock it, and
grouped, as lcgraph builds it. Each row is a rank's program as issued; red marks where a rank waits forever
under `lcgraph.schedule.nccl.check`.

    python3 tools/nccl_picture.py [--out docs/nccl.png]
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lcgraph.schedule import nccl  # noqa: E402
from lcgraph.schedule.actions import P2P_KINDS, ScheduleError, ScheduleSpec, issue_units, unit_token  # noqa: E402
from lcgraph.schedule.p2p import add_p2p, ungroup_p2p  # noqa: E402
from lcgraph.schedule.programs import build_programs  # noqa: E402


def stuck_units(programs, spec) -> dict[int, set[str]]:
    """rank -> the unit tokens the NCCL model says it waits in (and the kernels it waits for)."""
    try:
        nccl.check(programs, spec)
    except ScheduleError as error:
        found: dict[int, set[str]] = {}
        for rank, what, rest in re.findall(r"rank (\d+) waits in (\S+) \(waiting for (.+?)\):", str(error)):
            found.setdefault(int(rank), set()).update({what, rest})
        return found
    return {}


def draw_row(ax, y: float, units, stuck: set[str]) -> None:
    x = 0.0
    for unit in units:
        token = unit_token(unit, False)
        width = 0.35 + 0.11 * len(token)
        p2p = unit[0].kind in P2P_KINDS
        color = "#e45756" if token in stuck else ("#9ecae9" if p2p else "#d9d9d9")
        ax.add_patch(plt.Rectangle((x, y - 0.3), width, 0.6, color=color, ec="white"))
        ax.text(x + width / 2, y, token, ha="center", va="center", fontsize=7)
        x += width + 0.05


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, default=Path("docs/nccl.png"))
    args = ap.parse_args()
    spec = ScheduleSpec("1f1b", 2, 4)
    grouped = add_p2p(build_programs(spec), spec)
    cases = [
        ("ungrouped (every send and receive alone): deadlock", [ungroup_p2p(p) for p in grouped]),
        ("grouped (lcgraph): each send beside the receive that must progress with it", grouped),
    ]
    fig, axes = plt.subplots(2, 1, figsize=(15, 3.6))
    for ax, (title, programs) in zip(axes, cases):
        stuck = stuck_units(programs, spec)
        for rank, program in enumerate(programs):
            draw_row(ax, -rank, issue_units(program), stuck.get(rank, set()))
            ax.text(-0.2, -rank, f"rank {rank}", ha="right", va="center", fontsize=8)
        ax.set_title(title, fontsize=9, loc="left")
        ax.set_xlim(-1.2, 16.5)
        ax.set_ylim(-1.6, 0.6)
        ax.axis("off")
    fig.tight_layout()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=130)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    main()
