"""What `lcgraph-plan` shows and writes: the per-stage and alternatives tables, which figures are measured
and which assumed, and the plan files (plan.json, programs.txt, timeline.json / .png).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from lcgraph.observability.timeline import matplotlib_available, write_timeline
from lcgraph.planner import mfu
from lcgraph.planner.documents import kept_fraction
from lcgraph.planner.evaluation import size
from lcgraph.planner.plan import Plan
from lcgraph.schedule.text import format_programs


def _duration(seconds: float) -> str:
    """A step time readable at any size: tiny CPU plans in microseconds or milliseconds, not '0.000 s'."""
    if seconds >= 1.0:
        return f"{seconds:.3f} s"
    if seconds >= 1e-3:
        return f"{seconds * 1e3:.3f} ms"
    return f"{seconds * 1e6:.1f} us"


def _count(n: float) -> str:
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f}{unit}"
    return f"{n:.0f}"


def _ms_list(values: list[float]) -> str:
    ms = [f"{v * 1e3:.0f}" if v >= 0.1 else f"{v * 1e3:.1f}" for v in values]
    return "/".join(ms) if len(ms) <= 4 else f"{ms[0]}..{ms[-1]} ({len(ms)})"


def print_plan(plan: Plan, console=None) -> None:
    from rich.console import Console
    from rich.table import Table

    console = console or Console(width=None if sys.stdout.isatty() else 160)
    ev, cost = plan.main, plan.main.cost
    lay, dev, m = cost.layout, cost.profile, plan.model
    seq = ev.seq_len
    console.print(
        f"[bold]{m['name']}[/]: {m['layers']} layers, hidden {m['hidden_size']}, {m['heads']} heads "
        f"({m['kv_heads']} kv, head dim {m['head_dim']}), {_count(m['params'])} params"
    )
    console.print(
        f"seq {seq:,} x {lay.micro_batch} per micro-batch, {ev.spec.microbatches} micro-batches x dp "
        f"{lay.dp} | pp {lay.pp} x dp {lay.dp} x sp {lay.sp}{f' x cp {lay.cp}' if lay.cp > 1 else ''} = {lay.gpus} x {dev.name} "
        f"({size(dev.memory_bytes)}) | {cost.graph.dtype}, optimizer "
        f"{'distributed (ZeRO-1, reduce-scatter)' if lay.zero else 'replicated (all-reduce)'}"
    )
    console.print(f"{ev.label}: chunks {cost.chunk_lengths}, layers per stage {cost.layer_counts}")
    if ev.run_length != seq:
        pad = ev.run_length - seq
        console.print(
            f"padding: the programs run {ev.run_length:,} tokens, {pad:,} of them padding the loss ignores "
            f"(+{pad / seq:.1%} tokens computed): the chunks and shards divide {ev.run_length:,}, not {seq:,}"
        )
    if lay.documents is not None:
        kept = kept_fraction(lay.documents, seq)
        console.print(f"document mask: {lay.documents.source}; {kept:.1%} of the causal attention pairs kept")
    table = Table(
        title="per stage: one rank's memory at the stage's peak (G = GiB), times per chunk of one micro-batch"
    )
    for col in (
        "stage",
        "rank",
        "layers",
        "params",
        "weights",
        "grads",
        "optim",
        "activ.",
        "KV relay",
        "transient",
        "total / GPU",
        "fwd ms",
        "bwd ms",
    ):
        table.add_column(col, justify="right")
    for r in plan.stage_rows():
        layers = f"{r['layers'][0]}-{r['layers'][1]}" if r["layers"] else "-"
        style = "red" if r["total_bytes"] > dev.memory_bytes else ""
        total = f"{size(r['total_bytes'])} ({r['memory_fraction']:.0%})"
        table.add_row(
            str(r["stage"]),
            str(r["rank"]),
            layers,
            _count(r["params"]),
            size(r["weights_bytes"]),
            size(r["grads_bytes"]),
            size(r["optimizer_bytes"]),
            size(r["activations_bytes"]),
            size(r["kv_relay_bytes"]),
            size(r["rerun_bytes"] + r["optimizer_step_bytes"]),  # the peak's moment has at most one of them
            f"[{style}]{total}[/]" if style else total,
            _ms_list(r["forward_s"]),
            _ms_list(r["backward_s"]),
        )
    console.print(table)
    s = ev.summary()
    fits = (
        f"fits: peak {size(s['peak_bytes'])} of {size(dev.memory_bytes)}"
        if s["fits"]
        else f"[red]does NOT fit: peak {size(s['peak_bytes'])} > {size(dev.memory_bytes)}[/]"
    )
    console.print(
        f"step {_duration(s['step_time_s'])} | {s['tokens_per_s_per_gpu']:,.0f} tokens/s per GPU | "
        f"MFU {mfu.mfu_text(s['mfu'])} ({mfu.mfu_text(s['of_measured_matmul_peak'])} of measured matmul peak) | "
        f"bubble {s['bubble']:.1%} | {fits}"
    )
    for line in figure_lines(cost.figures_used()):
        console.print(line, markup=False)
    if len(plan.alternatives) > 1:
        alt = Table(title="alternatives (same layout and micro-batches)")
        for col in ("schedule", "chunks", "step s", "tokens/s/GPU", "MFU", "bubble", "peak mem", "fits"):
            alt.add_column(col, justify="right")
        for label, a in plan.alternatives:
            if isinstance(a, str):
                alt.add_row(label, "", "", "", "", "", "", f"n/a: {a[:60]}")
                continue
            x = a.summary()
            chunks = _short_chunks(x["chunk_lengths"])
            alt.add_row(
                label,
                chunks,
                f"{x['step_time_s']:.3f}",
                f"{x['tokens_per_s_per_gpu']:,.0f}",
                mfu.mfu_text(x["mfu"]),
                f"{x['bubble']:.1%}",
                size(x["peak_bytes"]),
                "yes" if x["fits"] else "[red]no[/]",
            )
        console.print(alt)
    for note in plan.notes:
        console.print(f"note: {note}")
    console.print(f"planned in {plan.seconds:.1f} s (capture {plan.capture_seconds:.1f} s)")


def _clipped(text: str, limit: int) -> str:
    """`text` cut at a word boundary within `limit` characters (plan.json keeps it whole)."""
    return text if len(text) <= limit else text[: text.rfind(" ", 0, limit)] + " ..."


def figure_lines(figures: dict[str, dict]) -> list[str]:
    """Which of the plan's figures are measured and which assumed (with their source), one line each group."""
    measured = [f for f, e in figures.items() if e["status"] == "measured"]
    assumed = [f"{f} ({_clipped(e['source'], 100)})" for f, e in figures.items() if e["status"] != "measured"]
    return [
        f"figures measured: {', '.join(measured) or 'none'}",
        f"figures assumed: {'; '.join(assumed) or 'none'}",
    ]


def _short_chunks(lengths: list[int]) -> str:
    if len(lengths) == 1:
        return f"{lengths[0]:,}"
    return f"{lengths[0]:,}..{lengths[-1]:,}"


def write_plan(plan: Plan, out_dir) -> list[Path]:
    """plan.json, programs.txt and (unless +plan.timeline=false) timeline.json / timeline.png."""

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    ev = plan.main
    (out / "programs.txt").write_text(format_programs(ev.programs, ev.spec))
    written = [out / "plan.json", out / "programs.txt"]
    if plan.settings.timeline:
        if not matplotlib_available():
            plan.notes.append("matplotlib is not installed: wrote timeline.json only (pip install matplotlib)")
        written += write_timeline(ev.sim.timeline, out, title=f"{ev.label}: predicted step", label="pipeline rank")
    (out / "plan.json").write_text(json.dumps(plan.to_json(), indent=2) + "\n")
    return written
