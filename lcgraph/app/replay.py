"""The NCCL replay of `lcgraph-check`: pipeline programs walked on the real backend with stand-in compute.

The NCCL model (lcgraph/schedule/nccl.py) is a claim about the hardware; the replay tests it on the user's GPUs.
Each rank walks its program as the runtime issues it: every p2p group is one `batch_isend_irecv` of messages of
`mbytes` MiB, a compute first waits for the receive that feeds it and then runs a few matmuls, OPT waits for every
send. A case that does not finish within the process group's timeout hangs and fails the launch. Programs come in
three forms:

    built       what lcgraph issues (`add_p2p`: grouped, receive-ahead, mirrored)
    unmirrored  grouped (and receive-ahead) but not mirrored: the form that hung on 2 H200s
    ungrouped   every transfer its own batch: the classic 1F1B deadlock

`lcgraph-check` replays the built form of every schedule family; `nccl.png` beside it draws 1F1B issued ungrouped
and built, red where the model says a rank waits forever (`python -m lcgraph.app.replay --picture PATH` alone).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from lcgraph.schedule import nccl
from lcgraph.schedule.actions import P2P_KINDS, Program, ScheduleError, ScheduleSpec, issue_units, unit_token
from lcgraph.schedule.p2p import add_p2p, group_p2p, receive_ahead, ungroup_p2p, with_transfers
from lcgraph.schedule.programs import build_programs

FAMILIES = ("gpipe", "1f1b", "seq1f1b:2", "seq1f1b:4", "interleaved_1f1b:2")


@dataclass(frozen=True)
class Case:
    """One schedule family in one form on `pp` ranks: `chunks` sequence chunks, `virtual` stages per rank."""

    schedule: str
    pp: int
    microbatches: int
    chunks: int = 1
    virtual: int = 1
    form: str = "built"

    @property
    def spec(self) -> ScheduleSpec:
        return ScheduleSpec(self.schedule, self.pp, self.microbatches, self.chunks, self.virtual)

    @property
    def label(self) -> str:
        n = f" k={self.chunks}" if self.chunks > 1 else f" v={self.virtual}" if self.virtual > 1 else ""
        return f"{self.schedule}{n} pp={self.pp}" + ("" if self.form == "built" else f" {self.form}")


def parse_family(item: str, pp: int, microbatches: int, form: str = "built") -> Case:
    """NAME[:N] -> a Case: N sequence chunks for seq1f1b (default 2), N virtual stages for interleaved (default 2)."""
    name, _, n = item.partition(":")
    chunks = int(n or 2) if name == "seq1f1b" else 1
    virtual = int(n or 2) if name == "interleaved_1f1b" else 1
    return Case(name, pp, microbatches, chunks, virtual, form)


def cases_for(ranks: int, forms: tuple[str, ...] = ("built",)) -> list[Case]:
    """Every family on all `ranks` as pipeline stages, 2 micro-batches per stage."""
    return [parse_family(f, ranks, 2 * ranks, form) for f in FAMILIES for form in forms]


def programs_in_form(case: Case) -> list[Program]:
    spec = case.spec
    if case.form == "built":
        return add_p2p(build_programs(spec), spec)
    grouped = [group_p2p(with_transfers(p, spec)) for p in build_programs(spec)]
    if spec.virtual_stages > 1:
        grouped = [receive_ahead(p) for p in grouped]
    return grouped if case.form == "unmirrored" else [ungroup_p2p(p) for p in grouped]


def model_verdict(case: Case) -> str:
    """The NCCL model's verdict on the case's programs: passes, or rejects and its first reason."""
    try:
        nccl.check(programs_in_form(case), case.spec)
        return "passes"
    except ScheduleError as error:
        return "rejects: " + str(error).splitlines()[1].strip()[:120]


# --- on the ranks ----------------------------------------------------------------------------------------------
def _wait_once(works: list, waited: set[int]) -> None:
    """Each work once: a second wait on a finished gloo receive never returns."""
    for w in works:
        if id(w) not in waited:
            w.wait()
            waited.add(id(w))


def replay_case(case: Case, device: torch.device, mbytes: float, matmuls: int) -> float:
    """This rank's program of `case`, issued as the runtime issues it; seconds it took (every rank)."""
    rank = dist.get_rank()
    program = programs_in_form(case)[rank]
    numel = max(1, int(mbytes * 2**20) // 2)
    n = 2048 if device.type == "cuda" else 64  # CPU: only the order of the transfers is under test
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16) / n**0.5
    sends: list = []
    pending: dict = {}
    waited: set[int] = set()
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    dist.barrier()
    sync()
    start = time.perf_counter()
    for unit in issue_units(program):
        head = unit[0]
        if head.kind in P2P_KINDS:
            ops = []
            for x in unit:
                buf = torch.ones(numel, device=device, dtype=torch.bfloat16)
                ops.append(dist.P2POp(dist.isend if x.kind.startswith("SEND") else dist.irecv, buf, x.peer))
            works = dist.batch_isend_irecv(ops)
            sends += works
            for x in unit:
                if x.kind.startswith("RECV"):
                    pending[(x.kind[-1], x.stage, x.mb, x.chunk)] = works
        elif head.kind in ("F", "B"):
            _wait_once(pending.pop((head.kind, head.stage, head.mb, head.chunk), []), waited)
            for _ in range(matmuls):
                a = (a @ a).clamp_(-1, 1)
        elif head.kind == "OPT":
            _wait_once(sends, waited)
    done = torch.ones(1, device=device)
    dist.all_reduce(done)
    sync()
    return time.perf_counter() - start


def replay_on_ranks(cases: list[Case], device: torch.device, mbytes: float, matmuls: int, out: Path) -> None:
    """Every case in turn on this launch's ranks; rank 0 rewrites `out` after each, so a hang names its case."""
    rows: list[dict] = []
    for case in cases:
        if dist.get_rank() == 0:
            rows.append({"case": case.label, **asdict(case), "model": model_verdict(case), "hardware": "running"})
            out.write_text(json.dumps(rows, indent=1) + "\n")
        seconds = replay_case(case, device, mbytes, matmuls)
        if dist.get_rank() == 0:
            rows[-1].update(hardware="ok", seconds=round(seconds, 4))
            out.write_text(json.dumps(rows, indent=1) + "\n")


def read_replay(path: Path, cases: list[Case], failure: str | None) -> list[dict]:
    """The rows rank 0 wrote; with a failed launch, the case it was in is marked HANG/ERROR and later ones not run."""
    rows = json.loads(path.read_text()) if path.is_file() else []
    for row in rows:
        if row["hardware"] == "running":
            row["hardware"] = f"HANG or ERROR: {failure or 'the launch ended'}"[:300]
    for case in cases[len(rows) :]:
        rows.append({"case": case.label, **asdict(case), "model": model_verdict(case), "hardware": "not run"})
    for row in rows:
        row["agrees"] = row["model"].startswith("passes") == (row["hardware"] == "ok")
    path.write_text(json.dumps(rows, indent=1) + "\n")
    return rows


def replay_table(rows: list[dict]) -> str:
    lines = [f"{'case':28s} {'backend':24s} {'seconds':>8s}  NCCL model"]
    for r in rows:
        seconds = f"{r['seconds']:8.3f}" if "seconds" in r else f"{'-':>8s}"
        lines.append(f"{r['case']:28s} {r['hardware'][:24]:24s} {seconds}  {r['model']}")
    return "\n".join(lines)


def replay_passed(rows: list[dict]) -> bool:
    """Every built program finished and the model accepted it."""
    built = [r for r in rows if r["form"] == "built"]
    return bool(built) and all(r["hardware"] == "ok" and r["agrees"] for r in built)


# --- the picture -----------------------------------------------------------------------------------------------
def stuck_units(programs: list[Program], spec: ScheduleSpec) -> dict[int, set[str]]:
    """rank -> the unit tokens the NCCL model says it waits in (and the kernels it waits for)."""
    try:
        nccl.check(programs, spec)
    except ScheduleError as error:
        found: dict[int, set[str]] = {}
        for rank, what, rest in re.findall(r"rank (\d+) waits in (\S+) \(waiting for (.+?)\):", str(error)):
            found.setdefault(int(rank), set()).update({what, rest})
        return found
    return {}


def draw_deadlock(path: Path) -> Path:
    """1F1B (pp=2, 4 micro-batches) issued ungrouped, where NCCL's rules deadlock it, and grouped, as lcgraph
    builds it: one row per rank's program as issued, red where a rank waits forever."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    case = Case("1f1b", 2, 4)
    grouped = programs_in_form(case)
    panels = [
        ("ungrouped (every send and receive alone): deadlock", [ungroup_p2p(p) for p in grouped]),
        ("grouped (lcgraph): each send beside the receive that must progress with it", grouped),
    ]
    fig, axes = plt.subplots(2, 1, figsize=(15, 3.6))
    for ax, (title, programs) in zip(axes, panels):
        stuck = stuck_units(programs, case.spec)
        for rank, program in enumerate(programs):
            x = 0.0
            for unit in issue_units(program):
                token = unit_token(unit, False)
                width = 0.35 + 0.11 * len(token)
                p2p = unit[0].kind in P2P_KINDS
                color = "#e45756" if token in stuck.get(rank, set()) else ("#9ecae9" if p2p else "#d9d9d9")
                ax.add_patch(plt.Rectangle((x, -rank - 0.3), width, 0.6, color=color, ec="white"))
                ax.text(x + width / 2, -rank, token, ha="center", va="center", fontsize=7)
                x += width + 0.05
            ax.text(-0.2, -rank, f"rank {rank}", ha="right", va="center", fontsize=8)
        ax.set_title(title, fontsize=9, loc="left")
        ax.set_xlim(-1.2, 16.5)
        ax.set_ylim(-1.6, 0.6)
        ax.axis("off")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=130)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m lcgraph.app.replay", description=draw_deadlock.__doc__)
    ap.add_argument("--picture", type=Path, default=Path("docs/nccl.png"), help="where to draw (docs/nccl.png)")
    print(f"wrote {draw_deadlock(ap.parse_args(argv).picture)}")


if __name__ == "__main__":
    os.environ.setdefault("MPLBACKEND", "Agg")
    main()
