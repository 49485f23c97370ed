"""Graph dumps: the fx graph after a pass, as readable text (one line per node with its annotations)."""

from __future__ import annotations

from pathlib import Path


def graph_text(gm) -> str:
    lines = []
    for n in gm.graph.nodes:
        info = n.meta.get("lcgraph")
        where = "" if info is None else f"  # {info.part}{'' if info.layer is None else info.layer} {info.role}"
        target = getattr(n.target, "__name__", str(n.target))
        lines.append(f"{n.op:13s} {n.name:40s} {target}{where}")
    return "\n".join(lines) + "\n"


def dump_graph(gm, path: Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.with_suffix(".txt").write_text(graph_text(gm))
