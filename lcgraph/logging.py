"""What a run reports: metrics.jsonl, W&B (offline by default), a rich progress bar, summary.json."""

from __future__ import annotations

import json
import time
from pathlib import Path

from omegaconf import OmegaConf


class RunLogger:
    def __init__(self, cfg, run_dir: Path, enabled: bool = True):
        self.enabled, self.run_dir, self.cfg = enabled, run_dir, cfg
        self.history: list[dict] = []
        self.started = time.perf_counter()
        if not enabled:
            return
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
        self.metrics = open(run_dir / "metrics.jsonl", "w")
        self.wandb = self._init_wandb()
        self.progress = self._init_progress() if cfg.train.progress else None

    def _init_wandb(self):
        w = self.cfg.logging.wandb
        if w.mode == "disabled":
            return None
        import wandb

        run = wandb.init(project=w.project, entity=w.entity, group=w.group, mode=w.mode, dir=str(self.run_dir),
                         config=OmegaConf.to_container(self.cfg, resolve=True), reinit="finish_previous")
        run.define_metric("step")
        for key in ("loss", "lr", "grad_norm", "tokens_per_s", "step_time_s", "tokens"):
            run.define_metric(f"train/{key}", step_metric="step")
        return run

    def _init_progress(self):
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        progress = Progress(TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(),
                            TextColumn("loss {task.fields[loss]:.4f}"), TextColumn("{task.fields[tps]:.0f} tok/s"),
                            TimeRemainingColumn(), transient=False)
        progress.start()
        self.task = progress.add_task("train", total=self.cfg.train.steps, loss=float("nan"), tps=0.0)
        return progress

    def note(self, text: str) -> None:
        if self.enabled:
            print(f"lcgraph: {text}", flush=True)

    def log(self, metrics: dict) -> None:
        if not self.enabled:
            return
        self.history.append(metrics)
        self.metrics.write(json.dumps(metrics) + "\n")
        self.metrics.flush()
        if self.wandb is not None:
            self.wandb.log({"step": metrics["step"], **{f"train/{k}": v for k, v in metrics.items() if k != "step"}})
        if self.progress is not None:
            self.progress.update(self.task, advance=1, loss=metrics["loss"], tps=metrics["tokens_per_s"])

    def finish(self, extra: dict | None = None) -> dict:
        if not self.enabled:
            return {}
        if self.progress is not None:
            self.progress.stop()
        h = self.history
        tail = h[len(h) // 2:] or h
        summary = {
            "steps": len(h), "final_loss": h[-1]["loss"] if h else None, "first_loss": h[0]["loss"] if h else None,
            "tokens_per_s": sum(m["tokens"] for m in tail) / max(1e-9, sum(m["step_time_s"] for m in tail)),
            "wall_s": time.perf_counter() - self.started, **(extra or {}),
        }
        (self.run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
        self.metrics.close()
        if self.wandb is not None:
            self.wandb.summary.update({k: v for k, v in summary.items() if not isinstance(v, list)})
            self.wandb.finish()
        return summary
