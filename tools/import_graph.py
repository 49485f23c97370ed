"""Draw lcgraph's package import graph as an SVG (docs/architecture.svg): `python tools/import_graph.py`.

One row per layer (app on top, ops at the bottom), one box per package with its modules and lines of
code and the config sections its modules name (`takes`), one arrow per pair of packages where the upper one
imports the lower one, labelled with the number of import statements. Read from the source's AST, like
tests/test_layering.py.
"""

from __future__ import annotations

import ast
import sys
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "lcgraph"
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


def svg() -> str:
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


if __name__ == "__main__":
    target = Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT / "docs" / "architecture.svg"
    target.write_text(svg())
    print(f"wrote {target}")
