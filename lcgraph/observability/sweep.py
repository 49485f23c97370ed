"""One comparison table for the jobs of a sweep.

It reads every job's summary.json (written by lcgraph's RunLogger) and the job's overrides (Hydra's
.hydra/overrides.yaml), then writes comparison.csv and comparison.json into the sweep directory and prints a
table: the swept keys, tokens/s, final loss, activation peak per pipeline stage and, when the summary has
them, bubble fraction and CUDA peak. The Hydra callback that keeps it current during a multirun is
lcgraph/app/sweep.py's `SweepTable`.

`python -m lcgraph.observability.sweep SWEEP_DIR` rebuilds the table of a finished (or interrupted) sweep.
"""

from __future__ import annotations

import csv
import json
import re
import sys
from pathlib import Path
from typing import Any

import yaml

METRICS = ("final_loss", "tokens_per_s", "activation_peak_bytes_per_stage", "bubble_fraction", "cuda_peak_bytes")


def _natural(path: Path) -> list:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", str(path))]


def _job_dirs(sweep_dir: Path) -> list[Path]:
    """Directories under the sweep holding a job: Hydra's .hydra/overrides.yaml or lcgraph's summary.json."""
    found = {p.parent.parent for p in sweep_dir.glob("**/.hydra/overrides.yaml")}
    found |= {p.parent for p in sweep_dir.glob("**/summary.json")}
    return sorted((d for d in found if d != sweep_dir), key=_natural)


def _overrides(job_dir: Path, known: dict[str, list[str]]) -> list[str]:
    path = job_dir / ".hydra" / "overrides.yaml"
    if path.is_file():
        return [str(o) for o in yaml.safe_load(path.read_text()) or []]
    return known.get(str(job_dir.resolve()), [])


def _split(override: str) -> tuple[str, str]:
    key, _, value = override.partition("=")
    return key.lstrip("+~"), value


def collect(
    sweep_dir: Path, known: dict[str, list[str]] | None = None, status: dict[str, str] | None = None
) -> list[dict]:
    """One row per job: its directory, overrides, summary metrics and status."""
    rows = []
    for job_dir in _job_dirs(sweep_dir):
        key = str(job_dir.resolve())
        summary_path = job_dir / "summary.json"
        summary = json.loads(summary_path.read_text()) if summary_path.is_file() else {}
        rows.append(
            {
                "job": str(job_dir.relative_to(sweep_dir)),
                "overrides": _overrides(job_dir, known or {}),
                "status": (status or {}).get(key, "completed" if summary else "no summary.json"),
                **{m: summary.get(m) for m in METRICS},
                "summary": summary,
            }
        )
    return rows


def swept_keys(rows: list[dict]) -> list[str]:
    """Override keys whose value differs between jobs (or is missing from some), in first-seen order."""
    values: dict[str, set] = {}
    for row in rows:
        for key, value in map(_split, row["overrides"]):
            values.setdefault(key, set()).add(value)
    return [
        k for k, vs in values.items() if len(vs) > 1 or any(k not in dict(map(_split, r["overrides"])) for r in rows)
    ]


def _mib(n: Any) -> str:
    return "" if n is None else f"{n / 2**20:.1f}"


def _number(value: Any, fmt: str) -> str:
    return "" if value is None else format(value, fmt)


def _cells(row: dict, keys: list[str]) -> dict[str, str]:
    over = dict(map(_split, row["overrides"]))
    peaks = row["activation_peak_bytes_per_stage"]
    return {
        "job": row["job"],
        **{k: over.get(k, "") for k in keys},
        "tokens_per_s": _number(row["tokens_per_s"], ".1f"),
        "final_loss": _number(row["final_loss"], ".4f"),
        "activation_peak_mib_per_stage": " / ".join(_mib(p) for p in peaks) if peaks else "",
        "bubble_fraction": _number(row["bubble_fraction"], ".3f"),
        "cuda_peak_mib": _mib(row["cuda_peak_bytes"]),
        "status": row["status"],
    }


def write_comparison(sweep_dir: Path, rows: list[dict]) -> tuple[Path, Path]:
    """comparison.csv (one formatted line per job) and comparison.json (overrides + whole summaries)."""
    keys = swept_keys(rows)
    table = [_cells(r, keys) for r in rows]
    csv_path, json_path = sweep_dir / "comparison.csv", sweep_dir / "comparison.json"
    with open(csv_path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(table[0]) if table else ["job"])
        writer.writeheader()
        writer.writerows(table)
    json_path.write_text(json.dumps({"sweep_dir": str(sweep_dir), "swept": keys, "jobs": rows}, indent=2))
    return csv_path, json_path


def print_table(sweep_dir: Path, rows: list[dict], file=None) -> None:
    from rich.console import Console
    from rich.table import Table

    keys = swept_keys(rows)
    table = Table(title=f"lcgraph sweep {sweep_dir}")
    cells = [_cells(r, keys) for r in rows]
    shown = [
        c
        for c in (cells[0] if cells else {"job": ""})
        if any(row[c] for row in cells) or c in ("job", "tokens_per_s", "final_loss")
    ]
    for column in shown:
        table.add_column(column, justify="right" if column not in ("job", "status", *keys) else "left")
    for row in cells:
        table.add_row(*(row[c] for c in shown))
    Console(file=file or sys.stdout, width=200).print(table)


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1 or not Path(args[0]).is_dir():
        print("usage: python -m lcgraph.observability.sweep SWEEP_DIR", file=sys.stderr)
        sys.exit(2)
    sweep_dir = Path(args[0])
    rows = collect(sweep_dir)
    write_comparison(sweep_dir, rows)
    print_table(sweep_dir, rows)


if __name__ == "__main__":
    main()
