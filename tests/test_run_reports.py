"""What a newcomer's run reports and where: a run directory of its own, the final line the bar ended on, TFLOP/s
(6*N + 6*L*h*S per token) per step, and W&B online without a key going on offline."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from lcgraph.app.cli import claim_run_dir
from lcgraph.app.testing import TINY, compose, run_config
from lcgraph.errors import LaunchError
from lcgraph.observability.metrics import RunLogger

CLI = [o for o in TINY if o != "logging.wandb.mode=disabled"]


def test_a_run_directory_is_claimed_once_and_a_resumed_run_appends(tmp_path):
    claim_run_dir(tmp_path, resume=False)
    with pytest.raises(LaunchError, match="already holds a run"):
        claim_run_dir(tmp_path, resume=False)
    claim_run_dir(tmp_path, resume=True)
    cfg = run_config()
    for append in (False, True):
        logger = RunLogger(cfg.logging, tmp_path, cfg.train.steps, cfg.train.progress, append=append)
        logger.log({"step": 1, "loss": 1.0, "tokens": 64, "step_time_s": 1.0, "tokens_per_s": 64.0})
        logger.finish()
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 2


@pytest.mark.slow
def test_single_process_run_reports_and_wandb_online_without_a_key_goes_offline(tmp_path):
    run = tmp_path / "run"
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_") and k != "NETRC"}
    env |= {"HOME": str(tmp_path), "LCGRAPH_CACHE": os.path.expanduser("~/.cache/lcgraph")}
    cmd = [sys.executable, "-m", "lcgraph", *CLI, "train.steps=3", "logging.wandb.mode=online", f"hydra.run.dir={run}"]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stderr.count("logging.wandb.mode=online but no W&B API key") == 1, out.stderr[-3000:]
    assert list((run / "wandb").glob("offline-run-*"))
    steps = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    summary = json.loads((run / "summary.json").read_text())
    cfg = compose("train.steps=3")
    h, L, seq = cfg.model.hidden_size, cfg.model.num_hidden_layers, cfg.data.seq_len
    kv = cfg.model.num_key_value_heads * h // cfg.model.num_attention_heads
    n = L * (h * (2 * h + 2 * kv) + 3 * h * cfg.model.intermediate_size) + h * cfg.model.vocab_size
    for m in steps:
        want = (6 * n + 6 * L * h * seq) * m["tokens"] / m["step_time_s"] / 1e12
        assert abs(m["tflops_per_gpu"] - want) <= 1e-9 * want, m
    tail = steps[1:]  # the second half of 3 steps, as the bar shows it (not the last step alone)
    tps = sum(m["tokens"] for m in tail) / sum(m["step_time_s"] for m in tail)
    final = out.stdout.strip().splitlines()[-2]
    assert final.startswith(f"final loss {steps[-1]['loss']:.4f}, {tps:.0f} tokens/s"), final
    assert abs(summary["tokens_per_s"] - tps) <= 1e-9 * tps
    again = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert again.returncode == 2 and "already holds a run" in again.stderr and "Traceback" not in again.stderr
