"""Timelines as files: Chrome/Perfetto trace JSON (timeline.json) and a Gantt chart (timeline.png).

A timeline is a list of (rank, name, start, end) in seconds: what `lcgraph.planner.simulator.simulate` predicts,
or what the runtime measured (`Interpreter.timeline` holds (name, start, end) per rank; convert it with
`from_measured`). In the trace every rank is a process (pid = rank) with two threads: compute (tid 0:
F, B, OPT, RS, AG) and wire (tid 1: p2p groups and waits for received tensors, whose names do not start upper-case). Open the JSON
in https://ui.perfetto.dev or chrome://tracing.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

COLORS = {"F": "#4c78a8", "B": "#f58518", "OPT": "#54a24b", "RS": "#b279a2", "AG": "#9d755d"}
WIRE_COLOR = "#bab0ac"
# What a bar's name means (its coordinates after the letters), for the chart's legend.
MEANING = {
    "F": "F m.c: forward of micro-batch m, sequence chunk c (@v: virtual stage v)",
    "B": "B m.c: backward of micro-batch m, chunk c",
    "OPT": "OPT: optimizer step",
    "RS": "RS b: wait for bucket b's reduce-scatter",
    "AG": "AG b: all-gather of bucket b issued",
}


def legend_entries(timeline) -> list[tuple[str, str]]:
    """(kind, meaning) of every kind of compute bar the timeline holds, in COLORS order."""
    kinds = {_kind(e[1]) for e in timeline if _lane(e[1]) == 0}
    return [(k, MEANING[k]) for k in COLORS if k in kinds]


def is_wire(name: str) -> bool:
    """Transfers and waits for them (p2p tokens, groups, 'wait ...') start lower-case or with '['."""
    return not name[:1].isupper()


def _lane(name: str) -> int:
    return 1 if is_wire(name) else 0


def _kind(name: str) -> str:
    for prefix in ("OPT", "RS", "AG", "F", "B"):
        if name.startswith(prefix):
            return prefix
    return "wire"


def from_measured(timelines) -> list[tuple[int, str, float, float]]:
    """Runtime timelines -> (rank, name, start, end), seconds from the earliest start.

    `timelines`: a list indexed by rank, or a dict rank -> list, of `Interpreter.timeline` entries
    (name, start, end) in time.perf_counter seconds (one machine's monotonic clock).
    """
    items = timelines.items() if isinstance(timelines, dict) else enumerate(timelines)
    events = [(rank, name, start, end) for rank, entries in items for name, start, end in entries]
    t0 = min((e[2] for e in events), default=0.0)
    return [(rank, name, start - t0, end - t0) for rank, name, start, end in events]


def trace_events(timeline, label: str = "rank") -> dict:
    """Chrome trace format: complete events ("ph": "X") in microseconds, one process per rank."""
    events = []
    for rank in sorted({e[0] for e in timeline}):
        events.append({"ph": "M", "name": "process_name", "pid": rank, "tid": 0, "args": {"name": f"{label} {rank}"}})
        events.append({"ph": "M", "name": "process_sort_index", "pid": rank, "tid": 0, "args": {"sort_index": rank}})
        for tid, thread in ((0, "compute"), (1, "p2p")):
            events.append({"ph": "M", "name": "thread_name", "pid": rank, "tid": tid, "args": {"name": thread}})
    for rank, name, start, end in timeline:
        events.append(
            {
                "ph": "X",
                "name": name,
                "cat": _kind(name),
                "pid": rank,
                "tid": _lane(name),
                "ts": start * 1e6,
                "dur": max(end - start, 0.0) * 1e6,
            }
        )
    return {"traceEvents": events, "displayTimeUnit": "ms"}


def write_trace(timeline, path, label: str = "rank") -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(trace_events(timeline, label)))
    return path


def matplotlib_available() -> bool:
    return importlib.util.find_spec("matplotlib") is not None


def write_png(timeline, path, title: str = "", label: str = "rank") -> Path | None:
    """Gantt chart of the compute lanes (one row per `label`: rank, or stage for a prediction), with a legend
    of what each bar's name means; None when matplotlib is not installed."""
    if not matplotlib_available():
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ranks = sorted({e[0] for e in timeline})
    compute = [e for e in timeline if _lane(e[1]) == 0]
    span = max((e[3] for e in compute), default=1.0) or 1.0
    fig, ax = plt.subplots(figsize=(14, 0.55 * len(ranks) + 1.5))
    if compute:  # one call for every bar (thousands at many chunks): per-bar calls cost seconds
        ax.barh(
            [e[0] for e in compute],
            [end - start for _, _, start, end in compute],
            left=[e[2] for e in compute],
            height=0.8,
            color=[COLORS[_kind(e[1])] for e in compute],
            edgecolor="white",
            linewidth=0.3,
        )
    for rank, name, start, end in compute:
        if (end - start) > span / 45:  # label the bars wide enough to read
            ax.text((start + end) / 2, rank, name, ha="center", va="center", fontsize=6, color="white")
    ax.set_yticks(ranks, [f"{label} {r}" for r in ranks])
    ax.invert_yaxis()
    ax.set_xlabel("seconds")
    ax.set_title(title, loc="left")
    entries = legend_entries(timeline)
    handles = [plt.Rectangle((0, 0), 1, 1, color=COLORS[k]) for k, _ in entries]
    ax.legend(
        handles,
        [text for _, text in entries],
        loc="upper left",
        bbox_to_anchor=(1.0, 1.0),
        fontsize="small",
        frameon=False,
    )
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_timeline(timeline, out_dir, title: str = "", label: str = "rank") -> list[Path]:
    """timeline.json, plus timeline.png when matplotlib is installed; returns the files written."""
    out_dir = Path(out_dir)
    written = [write_trace(timeline, out_dir / "timeline.json", label)]
    png = write_png(timeline, out_dir / "timeline.png", title, label)
    return written + ([png] if png else [])
