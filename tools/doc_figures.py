"""Figures the docs quote from lcgraph's commands, regenerated from the commands themselves.

    python3 tools/doc_figures.py            # rewrite every quoted block and figure from what its command prints now
    python3 tools/doc_figures.py --check    # exit 1 naming each one that differs (tests/test_doc_figures.py)

Two kinds of quotes in README.md and docs/*.md:
  block   a fenced block right after a line `<!-- output: NAME -->`: lines of a command's output (`...` stands for
          the lines left out), first the command itself as `$ ...` where the doc shows it
  figure  inline text between `<!-- figure: NAME -->` and `<!-- /figure -->`, taken from a run's files
COMMANDS says which command each NAME runs (each at most once per call) and what of its output the doc keeps. Lines
whose numbers vary from run to run (planning seconds, the output directory) are compared without them.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
RUN_DIR = "<run directory>"  # what the output's temporary run directory reads as in the docs
VOLATILE = (re.compile(r"^planned in "),)  # lines compared without their numbers


@dataclass(frozen=True)
class Command:
    argv: tuple[str, ...]  # after `python -m`
    shown: str  # as the doc shows it (no hydra.run.dir)
    extra: tuple[str, ...] = ()  # overrides that change nothing the doc quotes


PLAN_1B = Command(
    (
        "lcgraph.app.plan_cli",
        "model=llama3_1b",
        "data.seq_len=32768",
        "parallel=seq1f1b",
        "parallel.pp=4",
        "parallel.microbatches=4",
        "train.dtype=bf16",
    ),
    "lcgraph-plan model=llama3_1b data.seq_len=32768 parallel=seq1f1b parallel.pp=4 parallel.microbatches=4 "
    "train.dtype=bf16",
)
PLAN_70B = Command(
    ("lcgraph.app.plan_cli", "+recipe=llama70b_1m", "+plan.device=h200"),
    "lcgraph-plan +recipe=llama70b_1m +plan.device=h200",
)
DEFAULT_RUN = Command(("lcgraph",), "lcgraph-train", ("train.progress=false",))


def _lines(prefixes: tuple[str, ...]) -> Callable[[str, Path], str]:
    """The output's lines that start with one of `prefixes`, in order, `...` between runs of them."""

    def keep(out: str, _: Path) -> str:
        kept, gap = [], False
        for line in out.splitlines():
            if line.startswith(prefixes):
                if gap and kept:
                    kept.append("...")
                kept.append(line)
                gap = False
            else:
                gap = True
        return "\n".join(kept)

    return keep


def _paragraph(first: str) -> Callable[[str, Path], str]:
    """The line starting with `first` and the lines the console wrapped it onto."""

    def keep(out: str, _: Path) -> str:
        lines = out.splitlines()
        start = next(i for i, ln in enumerate(lines) if ln.startswith(first))
        end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith(("note:", "planned in"))), None)
        return "\n".join(lines[start:end])

    return keep


def _whole(shown: str) -> Callable[[str, Path], str]:
    return lambda out, _: "\n".join([f"$ {shown}", *out.rstrip("\n").splitlines()])


def _loss(out: str, run: Path) -> str:
    s = json.loads((run / "summary.json").read_text())
    return f"{s['first_loss']:.2f} -> {s['final_loss']:.2f}"


QUOTES: dict[str, tuple[Command, Callable[[str, Path], str]]] = {
    "plan-1b-32k": (PLAN_1B, _whole(PLAN_1B.shown)),
    "plan-70b-1m": (PLAN_70B, _lines(("llama2_70b:", "seq ", "step "))),
    "plan-70b-1m-recompute": (PLAN_70B, _paragraph("note: train.recompute=auto")),
    "default-run-loss": (DEFAULT_RUN, _loss),
}

BLOCK = re.compile(r"(<!-- output: (?P<name>[\w-]+) -->\n```\w*\n)(?P<body>[^`]*?)(\n```)", re.S)
FIGURE = re.compile(r"(<!-- figure: (?P<name>[\w-]+) -->)(?P<body>.*?)(<!-- /figure -->)", re.S)


def run(cmd: Command, cache: dict) -> tuple[str, Path]:
    """The command's stdout (the run directory read as RUN_DIR) and its run directory; once per command."""
    if cmd not in cache:
        run_dir = Path(tempfile.mkdtemp(prefix="lcgraph-doc-figures-"))
        proc = subprocess.run(
            [sys.executable, "-m", *cmd.argv, *cmd.extra, f"hydra.run.dir={run_dir}"],
            capture_output=True,
            text=True,
            cwd=ROOT,
            env={**os.environ, "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1"},
            timeout=900,
        )
        if proc.returncode:
            raise RuntimeError(f"{cmd.shown} failed:\n{proc.stderr[-3000:]}")
        cache[cmd] = (proc.stdout.replace(str(run_dir), RUN_DIR), run_dir)
    return cache[cmd]


def expected(name: str, cache: dict) -> str:
    if name not in QUOTES:
        raise KeyError(f"no command for the quote {name!r}: add it to tools/doc_figures.py QUOTES")
    cmd, keep = QUOTES[name]
    out, run_dir = run(cmd, cache)
    return "\n".join(ln.rstrip() for ln in keep(out, run_dir).splitlines())  # the console pads some lines


def _norm(text: str) -> str:
    lines = [re.sub(r"\d+(\.\d+)?", "N", ln) if any(p.match(ln) for p in VOLATILE) else ln for ln in text.splitlines()]
    return "\n".join(ln.rstrip() for ln in lines)


def quotes(text: str) -> list[tuple[re.Match, str]]:
    return [(m, "block") for m in BLOCK.finditer(text)] + [(m, "figure") for m in FIGURE.finditer(text)]


def refresh(
    check: bool, only: set[str] | None = None, docs: list[Path] | None = None, cache: dict | None = None
) -> list[str]:
    """Rewrite (or, with `check`, compare) every quote of `docs` (default: all); returns what differs as
    `file: NAME`. `cache` keeps the commands' outputs across calls."""
    cache = {} if cache is None else cache
    differ, seen = [], set()
    for path in docs or DOCS:
        text = path.read_text()
        new = text
        for m, _ in sorted(quotes(text), key=lambda q: q[0].start(), reverse=True):
            name = m.group("name")
            seen.add(name)
            if only and name not in only:
                continue
            want = expected(name, cache)
            if _norm(m.group("body")) != _norm(want):
                differ.append(f"{path.name}: {name}")
                new = new[: m.start("body")] + want + new[m.end("body") :]
        if new != text and not check:
            path.write_text(new)
    missing = set(QUOTES) - seen
    if missing and not only and docs is None:
        differ += [f"quoted nowhere: {name}" for name in sorted(missing)]
    return differ


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--check", action="store_true", help="compare only; exit 1 if any quote differs")
    ap.add_argument("--only", nargs="*", help="these quote names only")
    args = ap.parse_args(argv)
    differ = refresh(args.check, set(args.only) if args.only else None)
    for line in differ:
        print(("differs: " if args.check else "rewrote: ") + line)
    return 1 if args.check and differ else 0


if __name__ == "__main__":
    sys.exit(main())
