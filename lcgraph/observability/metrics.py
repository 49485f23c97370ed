"""What a run reports: metrics.jsonl, W&B (offline by default), a rich progress bar, summary.json.

metrics.jsonl has one flat dict per step, as the trainer returns it. W&B gets the same numbers under
sections, all plotted against `step`:

    train/   loss, lr, grad_norm, tokens
    perf/    tokens_per_s, step_time_s, tflops_per_gpu, mfu and of_measured_matmul_peak (on a GPU with a
             profile), bubble_fraction
    memory/  cuda_step_peak_bytes per step (GPU), activation peak per stage, CUDA peak per rank (at the end)
    comm/    p2p_s, grad_sync_s, comm_s per step (rank 0), comm_s per rank (last step, at the end)

and at the end: timeline.png as an image, every graph picture (graphs/*.html) as HTML, plan.json (from
`lcgraph-plan` into the same directory) as tables. `wandb sync RUN_DIR/wandb/offline-run-*` uploads.

The trainer fills in tflops_per_gpu (model FLOPs per token x the step's tokens / step time / ranks) and mfu
(that over the GPU's datasheet dense peak) through lcgraph.planner.mfu, the one definition the planner and
tools/bench.py use too (formula in docs/observability.md).
The bar, the summary and the final line show one throughput: tokens over time of the second half of the
steps so far. `logging.wandb.mode=online` without an API key or without a route to the W&B server warns once
and logs offline instead.
"""

from __future__ import annotations

import json
import netrc
import os
import socket
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional
from urllib.parse import urlparse

from lcgraph.runtime.checkpoint import METRICS
from lcgraph.runtime.config import choice

SECTIONS = {
    "train": ("loss", "lr", "grad_norm", "tokens"),
    "perf": (
        "tokens_per_s",
        "step_time_s",
        "tflops_per_gpu",
        "mfu",
        "of_measured_matmul_peak",
        "bubble_fraction",
        "measured_step_s",
        "measured_pipeline_s",
    ),
    "comm": ("p2p_s", "grad_sync_s", "comm_s"),
    "eval": ("eval_loss",),
}
SUMMARIES = {
    "train/loss": "min,last",
    "eval/eval_loss": "min,last",
    "perf/tokens_per_s": "mean,max",
    "perf/step_time_s": "mean,min",
    "perf/mfu": "mean,max",
    "perf/tflops_per_gpu": "mean,max",
}


def _evals(history: list[dict]) -> list[dict]:
    """The steps that ran a held-out evaluation (train.eval_every)."""
    return [m for m in history if "eval_loss" in m]


def metric_key(name: str) -> str:
    """W&B key of a flat metric name: its section + name ("loss" -> "train/loss"); names with a '/' stay."""
    if "/" in name:
        return name
    for section, names in SECTIONS.items():
        if name in names:
            return f"{section}/{name}"
    if "bytes" in name or "memory" in name:
        return f"memory/{name}"
    if name.startswith("comm") or name.endswith("_comm_s"):
        return f"comm/{name}"
    return f"train/{name}"


def throughput(history: list[dict]) -> float:
    """Tokens per second over the second half of the steps so far (the bar, the summary, the final line)."""
    tail = history[len(history) // 2 :] or history
    return sum(m["tokens"] for m in tail) / max(1e-9, sum(m["step_time_s"] for m in tail))


def wandb_unreachable(timeout_s: float = 3.0) -> str | None:
    """Why online W&B cannot work here (no API key, no route to its server), or None.

    W&B keeps its key in WANDB_API_KEY or in ~/.netrc (`wandb login`); without either, or without a route, its
    online init fails after a minute or two instead of logging."""
    url = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai"))
    host = url.hostname or "api.wandb.ai"
    key = os.environ.get("WANDB_API_KEY")
    if not key:
        try:
            auth = netrc.netrc(os.environ.get("NETRC")).authenticators(host)
            key = auth[2] if auth else None
        except (OSError, netrc.NetrcParseError):
            key = None
    if not key:
        return "no W&B API key (run `wandb login` or set WANDB_API_KEY)"
    try:
        socket.create_connection((host, url.port or 443), timeout=timeout_s).close()
    except OSError as exc:
        return f"{host} is unreachable ({exc})"
    return None


def _tail_means(history: list[dict], names: tuple[str, ...]) -> dict:
    tail = history[len(history) // 2 :] or history
    return {n: sum(m[n] for m in tail) / len(tail) for n in names if tail and all(n in m for m in tail)}


def spread(values: dict) -> dict:
    """End-of-run numbers as W&B keys: scalars by section; lists named *_per_stage / *_per_rank one key each."""
    out = {}
    for name, v in values.items():
        if isinstance(v, bool):
            continue
        if isinstance(v, (int, float)):
            out[metric_key(name)] = v
        elif isinstance(v, list):
            unit = next((u for u in ("stage", "rank") if name.endswith(f"_per_{u}")), "")
            base = metric_key(name.removesuffix(f"_per_{unit}") if unit else name)
            out.update({f"{base}/{unit}{i}": x for i, x in enumerate(v) if isinstance(x, (int, float))})
    return out


WandbMode = Literal["offline", "online", "disabled"]


@dataclass
class WandbConfig:
    mode: str = choice(WandbMode, "offline")
    project: str = "lcgraph"
    entity: Optional[str] = None
    group: Optional[str] = None


@dataclass
class LoggingConfig:
    wandb: WandbConfig = field(default_factory=WandbConfig)


class RunLogger:
    """Rank 0's reports; `append` (a resumed run) adds to metrics.jsonl instead of starting it anew.

    `steps` sizes the progress bar (`progress=False`: none); `record` is the run's config as W&B keeps it."""

    def __init__(
        self,
        logging: LoggingConfig,
        run_dir: Path,
        steps: int,
        progress: bool = True,
        record: dict | None = None,
        enabled: bool = True,
        append: bool = False,
    ):
        self.enabled, self.run_dir, self.logging, self.steps = enabled, Path(run_dir), logging, steps
        self.record = record or {}
        self.history: list[dict] = []
        self.started = time.perf_counter()
        if not enabled:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.metrics = open(self.run_dir / METRICS, "a" if append else "w")
        self.wandb = self._init_wandb()
        self.progress = self._init_progress() if progress else None

    def _init_wandb(self):
        w = self.logging.wandb
        if w.mode == "disabled":
            return None
        import wandb

        mode = w.mode
        why = wandb_unreachable() if mode == "online" else None
        if why:
            print(f"lcgraph: warning: logging.wandb.mode=online but {why}; logging offline", file=sys.stderr)
            mode = "offline"
        run = wandb.init(
            project=w.project,
            entity=w.entity,
            group=w.group,
            mode=mode,
            dir=str(self.run_dir),
            config=self.record,
            reinit="finish_previous",
        )
        run.define_metric("step")
        for section in ("train", "perf", "memory", "comm", "timeline", "graphs", "plan"):
            run.define_metric(f"{section}/*", step_metric="step")
        for key, summary in SUMMARIES.items():
            run.define_metric(key, step_metric="step", summary=summary)
        return run

    def _init_progress(self):
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        progress = Progress(
            TextColumn("[bold]train"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]:.4f}"),
            TextColumn("{task.fields[tps]:.0f} tok/s"),
            TimeRemainingColumn(),
            transient=False,
        )
        progress.start()
        self.task = progress.add_task("train", total=self.steps, loss=float("nan"), tps=0.0)
        return progress

    def note(self, text: str) -> None:
        if self.enabled:
            print(f"lcgraph: {text}", flush=True)

    def log(self, metrics: dict) -> None:
        """One step's metrics (must hold step, loss, tokens, step_time_s, tokens_per_s; any other key is kept)."""
        if not self.enabled:
            return
        self.history.append(metrics)
        self.metrics.write(json.dumps(metrics) + "\n")
        self.metrics.flush()
        if self.wandb is not None:
            self.wandb.log({"step": metrics["step"], **{metric_key(k): v for k, v in metrics.items() if k != "step"}})
        if self.progress is not None:
            self.progress.update(self.task, advance=1, loss=metrics["loss"], tps=throughput(self.history))

    def finish(self, extra: dict | None = None) -> dict:
        """Write summary.json (first/final loss, tokens/s over the second half, `extra`); close W&B."""
        if not self.enabled:
            return {}
        if self.progress is not None:
            self.progress.stop()
        h = self.history
        summary = {
            "steps": len(h),
            "final_loss": h[-1]["loss"] if h else None,
            "first_loss": h[0]["loss"] if h else None,
            **({"eval_loss": evals[-1]["eval_loss"], "eval_step": evals[-1]["step"]} if (evals := _evals(h)) else {}),
            "tokens_per_s": throughput(h),
            **_tail_means(h, ("tflops_per_gpu", "mfu")),
            **(
                {"cuda_step_peak_bytes": max(m["cuda_step_peak_bytes"] for m in h)}
                if h and "cuda_step_peak_bytes" in h[0]
                else {}
            ),
            "wall_s": time.perf_counter() - self.started,
            **(extra or {}),
        }
        (self.run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
        self.metrics.close()
        if self.wandb is not None:
            step = h[-1]["step"] if h else 0
            self.wandb.log({"step": step, **spread(extra or {})})
            try:
                self._log_files(step)
            except Exception as exc:  # noqa: BLE001 - a picture W&B cannot take must not fail the run
                print(f"lcgraph: warning: W&B media not logged: {type(exc).__name__}: {exc}", file=sys.stderr)
            self.wandb.summary.update({k: v for k, v in summary.items() if not isinstance(v, (list, dict))})
            self.wandb.finish()
        return summary

    def _log_files(self, step: int) -> None:
        """The run directory's pictures and plan as W&B media: timeline PNGs, graph pages, plan tables."""
        import wandb

        media: dict[str, wandb.Image | wandb.Html] = {}
        for name, key in (("timeline.png", "timeline/measured"), ("timeline_predicted.png", "timeline/predicted")):
            if (self.run_dir / name).is_file():
                media[key] = wandb.Image(str(self.run_dir / name))
        for page in sorted((self.run_dir / "graphs").glob("*.html")):
            media[f"graphs/{page.stem}"] = wandb.Html(str(page), inject=False)
        plan = self.run_dir / "plan.json"
        if plan.is_file():
            media.update(plan_tables(json.loads(plan.read_text())))
        if media:
            self.wandb.log({"step": step, **media})
        for name in ("timeline.json", "timeline_predicted.json", "plan.json", "programs.txt"):
            if (self.run_dir / name).is_file():
                self.wandb.save(str(self.run_dir / name), base_path=str(self.run_dir), policy="end")


def plan_tables(plan: dict) -> dict:
    """plan.json (lcgraph-plan) as W&B tables: one row per stage, one per alternative schedule."""
    import wandb

    def table(rows: list[dict]):
        columns = list(dict.fromkeys(k for r in rows for k in r))
        cell = lambda v: json.dumps(v) if isinstance(v, (list, dict)) else v
        return wandb.Table(columns=columns, data=[[cell(r.get(c)) for c in columns] for r in rows])

    out = {}
    if plan.get("stages"):
        out["plan/stages"] = table(plan["stages"])
    if plan.get("alternatives"):
        out["plan/alternatives"] = table(plan["alternatives"])
    if plan.get("summary"):
        out["plan/summary"] = table([plan["summary"]])
    return out
