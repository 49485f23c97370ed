"""`lcgraph-plan`: the Hydra task around lcgraph.planner.plan (validate, plan, print, write).

The planner predicts; this module is the command: it refuses a config that cannot work before the
capture's seconds are spent, and turns a user's mistake into one line.
"""

from __future__ import annotations

import gc
from pathlib import Path

from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from lcgraph.app.cli import hydra_app, one_line_errors
from lcgraph.app.config import RunConfig, typed
from lcgraph.app.pictures import draw
from lcgraph.app.validate import check_choices, check_keys, check_layout
from lcgraph.planner.plan import Plan, build_plan
from lcgraph.planner.report import print_plan, write_plan
from lcgraph.runtime.model import build_config


def checked(composed: DictConfig) -> RunConfig:
    """Check the config's choices and layout (cheap, before the capture); the config, typed."""
    check_keys(composed)
    check_choices(composed)
    cfg = typed(composed)
    config = build_config(cfg.model)
    kv = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    check_layout(composed, config.num_hidden_layers, config.num_attention_heads, kv)
    return cfg


def checked_plan(composed: DictConfig) -> Plan:
    """Check the config, then build the plan."""
    return build_plan(checked(composed).planned())


def plan_main(composed: DictConfig) -> None:
    """The Hydra task: plan, print, write to the run directory."""
    with one_line_errors("lcgraph-plan", sweep_goes_on=False):
        cfg = checked(composed)
        plan = build_plan(cfg.planned())
    out = HydraConfig.get().runtime.output_dir
    written = write_plan(plan, out)
    draw(cfg, Path(out) / "graphs")  # the graph after every pass, per stage (as `dump.graphs=true` trains)
    print_plan(plan)
    print(f"wrote {', '.join(p.name for p in written)} and graphs/ to {out}")


# The collector's thresholds for the command. A plan allocates millions of objects that live until it exits (the
# graph's nodes, the programs' actions, the NCCL check's kernels); at Python's defaults (700, 10, 10) full
# collections rescan them all again and again: 2 of the 8 s of the 70B 1M-token plan on 2 cores.
GC_THRESHOLDS = (100_000, 50, 100)


def main() -> None:
    gc.set_threshold(*GC_THRESHOLDS)
    hydra_app(plan_main)


if __name__ == "__main__":
    main()
