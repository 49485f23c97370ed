"""Hydra's side of a sweep: the callback that keeps a multirun's comparison table current, and one W&B group
for all of its jobs.

`SweepTable` is a Hydra callback (registered in conf/config.yaml):

    hydra:
      callbacks:
        sweep_table:
          _target_: lcgraph.app.sweep.SweepTable

after each job and when the multirun ends it rewrites comparison.csv and comparison.json in the sweep
directory (lcgraph/observability/sweep.py builds them) and finally prints the table.

The `lcgraph_sweep_group` resolver gives every job of a multirun the same W&B group (the sweep
directory) and a plain run none: `logging.wandb.group: ${lcgraph_sweep_group:}`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from lcgraph.observability.sweep import collect, print_table, write_comparison


def sweep_group() -> str | None:
    """The sweep directory inside a multirun job, None in a single run or outside Hydra."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not HydraConfig.initialized():
        return None
    hc = HydraConfig.get()
    return str(hc.sweep.dir) if hc.mode == RunMode.MULTIRUN else None


def register_resolvers() -> None:
    OmegaConf.register_new_resolver("lcgraph_sweep_group", sweep_group, replace=True)


register_resolvers()  # importing the callback (Hydra does, before any job) makes the resolver available


class SweepTable(Callback):
    """Hydra callback: comparison.csv, comparison.json and a printed table when a multirun ends."""

    def __init__(self, print_table: bool = True):
        self.print = print_table
        self.sweep_dir: Path | None = None
        self.overrides: dict[str, list[str]] = {}
        self.status: dict[str, str] = {}

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        self.sweep_dir = Path(str(config.hydra.sweep.dir))

    def on_job_end(self, config: DictConfig, job_return, **kwargs: Any) -> None:
        """Remember the job's overrides and status, and rewrite the comparison files.

        Runs where the job runs: with a remote launcher (SLURM) it is a fresh instance there, and
        on_multirun_end reads the overrides from each job's .hydra/overrides.yaml instead.
        """
        out = job_return.hydra_cfg.hydra.runtime.output_dir if job_return.hydra_cfg is not None else None
        if out:
            key = str(Path(out).resolve())
            self.overrides[key] = list(job_return.overrides or [])
            self.status[key] = job_return.status.name.lower()
        if self.sweep_dir is not None and self.sweep_dir.is_dir():  # kept current: a failed job ends the sweep
            write_comparison(self.sweep_dir, collect(self.sweep_dir, self.overrides, self.status))

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = self.sweep_dir or Path(str(config.hydra.sweep.dir))
        if not sweep_dir.is_dir():
            return
        rows = collect(sweep_dir, self.overrides, self.status)
        csv_path, _ = write_comparison(sweep_dir, rows)
        if self.print:
            print_table(sweep_dir, rows)
            print(f"comparison: {csv_path}")
