"""Figures the docs quote from lcgraph's commands, regenerated from the commands themselves.

    python3 tools/doc_figures.py            # rewrite every quoted block and figure from what its command prints now
    python3 tools/doc_figures.py --check    # exit 1 naming each one that differs (tests/test_doc_figures.py)

Two kinds of quotes in README.md and docs/*.md:
  block   a fenced block right after a line `<!-- output: NAME -->`: lines of a command's output (`...` stands for
          the lines left out), first the command itself as `$ ...` where the doc shows it
  figure  inline text between `<!-- figure: NAME -->` and `<!-- /figure -->`, taken from a run's files
COMMANDS says which command each NAME runs (each at most once per call) and what of its output the doc keeps. Lines
whose numbers vary from run to run (planning seconds, the output directory) are compared without them.

And one picture drawn from the code: docs/architecture.svg, lcgraph's packages and the imports between them
(`--only architecture` redraws it alone).
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import re
import subprocess
import sys
import tempfile
from collections import Counter
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


# --- docs/architecture.svg: the package import graph, drawn from the source ----------------------------------
PACKAGE = ROOT / "lcgraph"
ARCHITECTURE = ROOT / "docs" / "architecture.svg"
ROWS = [["app"], ["planner"], ["observability"], ["runtime"], ["graph", "schedule"], ["ops"]]
W, BOX_H, ROW_GAP, MARGIN = 900, 84, 50, 20
# the config's sections as the rooms receive them (lcgraph/runtime/config.py, planner/settings.py,
# observability/metrics.py, app/config.py), and the Protocols graph/ reads a layout through
SECTIONS = (
    "RunConfig",
    "PlanConfig",
    "PlanSettings",
    "ModelConfig",
    "DataConfig",
    "ParallelConfig",
    "OptimConfig",
    "TrainConfig",
    "LoggingConfig",
    "StageLayout",  # graph/: what it reads of the parallel section (a Protocol)
    "ChunkedShards",
    "Shards",
)
CHAR_W = 5.6  # rough width of one character of the module list (10.5 px sans-serif)


def package_edges() -> Counter:
    """(importer package, imported package) -> number of import statements."""
    edges: Counter = Counter()
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE).parts
        if len(parts) < 2:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("lcgraph."):
                there = node.module.split(".")[1]
                if there != parts[0] and (PACKAGE / there).is_dir():
                    edges[parts[0], there] += 1
    return edges


def sections(package: str) -> list[str]:
    """The config sections the package's modules name (define, import or annotate with), in SECTIONS' order."""
    named = set()
    for path in (PACKAGE / package).glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Name):
                named.add(node.id)
            elif isinstance(node, ast.ClassDef):
                named.add(node.name)
    return [s for s in SECTIONS if s in named]


def modules(package: str) -> list[tuple[str, int]]:
    return [
        (p.stem, len(p.read_text().splitlines()))
        for p in sorted((PACKAGE / package).glob("*.py"))
        if p.stem != "__init__"
    ]


def wrapped(text: str, width: int) -> list[str]:
    """`text` ("a 12, b 34, ...") in lines of at most `width` characters, broken after a comma."""
    lines = [""]
    for item in text.split(", "):
        joined = f"{lines[-1]}, {item}" if lines[-1] else item
        if len(joined) > width and lines[-1]:
            lines[-1] += ","
            lines.append(item)
        else:
            lines[-1] = joined
    return lines


def architecture_svg() -> str:
    """docs/architecture.svg: one row per layer (app on top, ops at the bottom), one box per package with its
    modules and lines of code and the config sections its modules name (`takes`), one arrow per pair of packages
    where the upper one imports the lower one, labelled with the number of import statements; read from the
    source's AST, like tests/test_layering.py."""
    boxes = {}
    for r, row in enumerate(ROWS):
        width = (W - MARGIN * (len(row) + 1)) / len(row)
        for c, name in enumerate(row):
            boxes[name] = (MARGIN + c * (width + MARGIN), MARGIN + r * (BOX_H + ROW_GAP), width)
    height = MARGIN * 2 + len(ROWS) * (BOX_H + ROW_GAP) - ROW_GAP
    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{height}" font-family="sans-serif">',
        '<defs><marker id="a" viewBox="0 0 10 10" refX="10" refY="5" markerWidth="7" markerHeight="7" '
        'orient="auto"><path d="M0,0 L10,5 L0,10 z" fill="#555"/></marker></defs>',
    ]
    for (src, dst), n in sorted(package_edges().items()):
        (x1, y1, w1), (x2, y2, w2) = boxes[src], boxes[dst]
        a, b = (x1 + w1 / 2 + (x2 - x1) * 0.05, y1 + BOX_H), (x2 + w2 / 2 - (x2 - x1) * 0.05, y2)
        out.append(
            f'<path d="M{a[0]:.0f},{a[1]} C{a[0]:.0f},{a[1] + 30} {b[0]:.0f},{b[1] - 30} {b[0]:.0f},{b[1]}" '
            f'fill="none" stroke="#555" stroke-opacity="0.55" marker-end="url(#a)"/>'
        )
        out.append(
            f'<text x="{(a[0] + b[0]) / 2 + 4:.0f}" y="{(a[1] + b[1]) / 2:.0f}" font-size="10" fill="#555">{n}</text>'
        )
    for name, (x, y, w) in boxes.items():
        mods = modules(name)
        text = ", ".join(f"{m} {n}" for m, n in mods)
        out.append(
            f'<rect x="{x:.0f}" y="{y}" width="{w:.0f}" height="{BOX_H}" rx="6" fill="#dbe7f3" stroke="#2b5d8a"/>'
        )
        out.append(
            f'<text x="{x + 8:.0f}" y="{y + 20}" font-size="15" font-weight="bold">lcgraph/{name}/ '
            f'<tspan font-weight="normal" font-size="11">{sum(n for _, n in mods)} lines</tspan></text>'
        )
        for i, line in enumerate(wrapped(text, int((w - 16) / CHAR_W))):
            out.append(f'<text x="{x + 8:.0f}" y="{y + 40 + 14 * i}" font-size="10.5" fill="#333">{line}</text>')
        takes = ", ".join(sections(name)) or "plain values, no config section"
        out.append(f'<text x="{x + 8:.0f}" y="{y + BOX_H - 8}" font-size="10.5" fill="#2b5d8a">takes: {takes}</text>')
    out.append("</svg>")
    return "\n".join(out) + "\n"


def _numberless(text: str) -> str:
    return re.sub(r"\d+(\.\d+)?", "N", text)


def _norm(text: str) -> str:
    lines = [_numberless(ln) if any(p.match(ln) for p in VOLATILE) else ln for ln in text.splitlines()]
    return "\n".join(ln.rstrip() for ln in lines)


def quotes(text: str) -> list[tuple[re.Match, str]]:
    return [(m, "block") for m in BLOCK.finditer(text)] + [(m, "figure") for m in FIGURE.finditer(text)]


def redraw(check: bool, target: Path = ARCHITECTURE) -> list[str]:
    """Rewrite (or, with `check`, compare) the architecture picture; returns `file: architecture` if it differs in
    more than its numbers (a module's lines, an arrow's imports and their places move with every change)."""
    want = architecture_svg()
    if target.is_file() and _numberless(target.read_text()) == _numberless(want):
        return []
    if not check:
        target.write_text(want)
    return [f"{target.name}: architecture"]


def refresh(
    check: bool, only: set[str] | None = None, docs: list[Path] | None = None, cache: dict | None = None
) -> list[str]:
    """Rewrite (or, with `check`, compare) every quote of `docs` (default: all, and the architecture picture);
    returns what differs as `file: NAME`. `cache` keeps the commands' outputs across calls."""
    cache = {} if cache is None else cache
    differ, seen = [], set()
    if docs is None and (not only or "architecture" in only):
        differ += redraw(check)
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
