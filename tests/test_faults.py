"""Faults fail fast, say why and lose nothing: NaN gradients (skip or stop), replicas that drift apart, a rank
killed mid-step, a rank stuck in a collective. Faults are injected through the LCGRAPH_FAULT test hook
(runtime/faults.py); each multi-rank case is one launch of 2 spawned gloo ranks of lcgraph-train's own loop.
"""

import json
import os
import signal
import subprocess
import sys

import pytest
import torch

from lcgraph.app.cli import run
from lcgraph.app.testing import TINY, compose, run_spawned, torchrun
from lcgraph.errors import TrainingFault
from lcgraph.runtime.checkpoint import CHECKPOINTS, complete_checkpoints
from lcgraph.runtime.faults import FAULT_ENV, read_heartbeats

SMALL = ["model.num_hidden_layers=2", "data.seq_len=32", "data.synthetic=true"]
PP2 = ["parallel.pp=2", "parallel.microbatches=2", *SMALL]
DP2 = ["parallel.dp=2", *SMALL]
FP32 = 1e-5


def metrics(run_dir) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def launch(monkeypatch, fault: str, cfgs: list, dirs: list) -> str | None:
    """Run the configs on 2 ranks with `fault` injected; the one-line TrainingFault message, if any."""
    monkeypatch.setenv(FAULT_ENV, fault)
    try:
        run_spawned(cfgs, dirs, world=2)
    except TrainingFault as exc:
        return str(exc)
    finally:
        monkeypatch.delenv(FAULT_ENV)
    return None


def assert_no_rank_left(run_dir) -> None:
    for beat in read_heartbeats([run_dir], 0).values():
        with pytest.raises(ProcessLookupError):
            os.kill(beat["pid"], 0)


def test_sigterm_stops_both_ranks_after_one_step_nan_gradients_are_skipped_and_drifted_copies_are_named(
    monkeypatch, tmp_path
):
    """pp=2, tied embeddings, on_nonfinite=skip; two runs in one launch. The first: rank 1 gets SIGTERM in step 3;
    both ranks (rank 0 only through the loss all-reduce) finish step 3, write its checkpoint and leave the run
    cleanly (the launch goes on); it runs replicated AdamW (parallel.zero=false), whose skip of step 2's NaN
    update is checked too. The second, with a replica check every 2 steps: NaN gradients on stage 1 at step 2 drop that
    update on both ranks (stage 0's rank only learns it through the grad-norm all-reduce), and training goes on.
    Before step 4 rank 1's copy of the tied embedding is changed: the check after step 2 passed, the one after
    step 4 stops the run naming the tensor and its stages."""
    stop, drift = tmp_path / "stop", tmp_path / "drift"
    pp2 = [*PP2, "model.tie_word_embeddings=true", "train.on_nonfinite=skip"]
    cfgs = [
        compose(*pp2, "train.steps=4", "train.comm_timeout_s=20", "parallel.zero=false"),  # replicated AdamW
        compose(*pp2, "train.steps=6", "train.check_every=2"),
    ]
    message = launch(monkeypatch, "term:2:1,nan:1:1,perturb:3:1", cfgs, [stop, drift])
    assert [r["step"] for r in metrics(stop)] == [1, 2, 3]
    assert [s for s, _ in complete_checkpoints(stop / CHECKPOINTS)] == [3]
    stop_rows = metrics(stop)  # the NaN at step 2 hits this run too: replicated AdamW skips it as well
    assert [r.get("nonfinite_stages") for r in stop_rows] == [None, [1], None] and stop_rows[1]["skipped"]
    rows = metrics(drift)
    assert [r.get("nonfinite_stages") for r in rows] == [None, [1], None, None]
    assert rows[1]["skipped"] and not rows[1]["nonfinite_loss"]
    assert all(torch.isfinite(torch.tensor([r["loss"] for r in rows])))
    assert rows[2]["loss"] != rows[1]["loss"] and rows[3]["loss"] != rows[2]["loss"]  # the other steps updated
    assert message is not None and message.startswith("step 4: the copies of model.embed_tokens.weight on stage 0, 1")


def test_a_rank_killed_mid_step_is_named_and_auto_resume_goes_on_until_a_nan_stops_it(monkeypatch, tmp_path):
    """dp=2 with ZeRO (replicas checked every step), a checkpoint every 2 steps; rank 1 is SIGKILLed in its first
    backward of step 4. The launch ends with one line naming rank 1 and that action, no rank left running. Resumed
    in one process (train.resume=auto, the same global batch), step 3 is recomputed from the step-2 checkpoint and
    matches the killed run's step 3; then NaN gradients at step 4 with train.on_nonfinite=stop end the run
    naming the step and stage, and step 2 stays the newest checkpoint."""
    dp2 = compose(*DP2, "train.steps=5", "train.checkpoint_every=2", "train.check_every=1")
    message = launch(monkeypatch, "kill:3:1", [dp2], [tmp_path])
    assert message is not None and message.startswith("rank 1 died (SIGKILL) at step 4 during B0.0")
    assert_no_rank_left(tmp_path)
    killed = metrics(tmp_path)
    monkeypatch.setenv(FAULT_ENV, "nan:3:0")
    one = compose(*SMALL, "parallel.microbatches=2", "train.steps=5", "train.checkpoint_every=2", "train.resume=auto")
    with pytest.raises(TrainingFault, match=r"^step 4: non-finite gradients, first at stage 0"):
        run(one, str(tmp_path))
    resumed = metrics(tmp_path)[len(killed) :]
    assert [r["step"] for r in killed] == [1, 2, 3] and [r["step"] for r in resumed] == [3]
    assert abs(resumed[0]["loss"] - killed[2]["loss"]) <= FP32 * killed[2]["loss"]
    assert [s for s, _ in complete_checkpoints(tmp_path / CHECKPOINTS)] == [2]


def test_a_rank_stuck_in_its_backward_times_out_the_others_and_is_named(monkeypatch, tmp_path):
    """pp=2, train.comm_timeout_s=10 (setup skew under load stays below it): rank 1 sleeps in its first backward of step 2; rank 0's receive times out,
    and the report names rank 1 (the oldest heartbeat) with its action; no rank is left running."""
    cfg = compose(*PP2, "train.steps=3", "train.comm_timeout_s=10")
    message = launch(monkeypatch, "hang:1:1", [cfg], [tmp_path])
    assert message is not None and message.startswith("rank 1 stopped making progress at step 2 during B0.0")
    assert "rank 0: step 2" in message
    assert_no_rank_left(tmp_path)


def test_a_second_stop_signal_exits_at_once_and_one_ctrl_c_seen_twice_does_not():
    """The first SIGINT only asks for a stop; one arriving within a second (the same Ctrl-C, passed on by the
    launcher) changes nothing; one a second later ends the process at once with 128 + SIGINT."""
    code = (
        "import os, signal, sys, time\n"
        "from lcgraph.runtime.faults import graceful_stop, stop_requested\n"
        "with graceful_stop():\n"
        "    os.kill(os.getpid(), signal.SIGINT); os.kill(os.getpid(), signal.SIGINT); time.sleep(0.1)\n"
        "    print(stop_requested(), flush=True); time.sleep(1.2)\n"
        "    os.kill(os.getpid(), signal.SIGINT); time.sleep(5)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.stdout.strip() == "True" and done.returncode == 128 + signal.SIGINT


def test_torchrun_restarts_resume_from_the_last_checkpoint_by_themselves(tmp_path):
    """torchrun --max-restarts=1 with train.resume=auto: rank 1 is SIGKILLed in step 3 (a checkpoint every step);
    the agent restarts both ranks, which resume from the step-2 checkpoint by themselves and finish with exit 0.
    The injected fault does not fire again after the restart (TORCHELASTIC_RESTART_COUNT > 0)."""
    run_dir = tmp_path / "run"
    # TORCH_ELASTIC_SHUTDOWN_TIMEOUT: how long the agent waits for the surviving rank it signals
    env = {FAULT_ENV: "kill:2:1", "TORCH_ELASTIC_SHUTDOWN_TIMEOUT": "5"}
    overrides = [*PP2, "parallel.sp=1", "train.steps=4", "train.checkpoint_every=1", "train.resume=auto"]
    tiny = [o for o in TINY if not o.startswith("parallel=")]
    out = torchrun([*tiny, *overrides, "train.comm_timeout_s=10"], run_dir, "--max-restarts", "1", env=env)
    assert out.returncode == 0, out.stderr[-6000:]
    steps = [r["step"] for r in metrics(run_dir)]
    assert steps[:2] == [1, 2] and steps[-2:] == [3, 4], steps  # step 3 died once (or not: it is not logged)
    assert [s for s, _ in complete_checkpoints(run_dir / CHECKPOINTS)][-1] == 4
