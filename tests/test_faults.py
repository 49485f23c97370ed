"""Faults fail fast, say why and lose nothing: NaN gradients (skip or stop), replicas that drift apart, a rank
killed mid-step, a rank stuck in a collective, SIGTERM / SIGINT to the launcher. Faults are injected through the
LCGRAPH_FAULT test hook (runtime/faults.py); each multi-rank case is one launch of 2 spawned gloo ranks of
lcgraph-train's own loop.
"""

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest
import torch

from lcgraph.app.config import typed
from lcgraph.app.testing import TINY, cli_env, compose, run_here, run_spawned, torchrun
from lcgraph.errors import TrainingFault
from lcgraph.runtime.checkpoint import CHECKPOINTS, complete_checkpoints
from lcgraph.runtime.faults import FAULT_ENV, read_heartbeats

SMALL = ["model.num_hidden_layers=2", "data.seq_len=32", "data.synthetic=true"]
PP2 = ["parallel.pp=2", "parallel.microbatches=2", *SMALL]
DP2 = ["parallel.dp=2", *SMALL]
FP32 = 1e-5
# constant LR after the warm-up step: a run's schedule does not depend on train.steps, so a stopped run of 1000
# steps and an uninterrupted one of a few steps train alike
STEADY = [*PP2, "optim.min_lr_ratio=1.0", "train.comm_timeout_s=20"]


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


@contextlib.contextmanager
def launcher(run_dir, *overrides: str, fault: str = "") -> Iterator[subprocess.Popen]:
    """`lcgraph-train` (python -m lcgraph) on 2 spawned CPU ranks, in its own session: however the test ends,
    the launcher and its ranks (one process group) are killed on the way out (check for leftover ranks inside)."""
    cmd = [sys.executable, "-m", "lcgraph", *TINY, *overrides, f"hydra.run.dir={run_dir}"]
    env = cli_env({FAULT_ENV: fault})
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, start_new_session=True
    )
    try:
        yield proc
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()


def wait_for_steps(proc: subprocess.Popen, run_dir, steps: int, deadline_s: float = 60.0) -> None:
    """Until the run has logged `steps` steps (metrics.jsonl lines); fails if the launcher ends first."""
    path, end = run_dir / "metrics.jsonl", time.monotonic() + deadline_s
    while not (path.is_file() and len(path.read_text().splitlines()) >= steps):
        assert proc.poll() is None, f"the launcher ended (exit {proc.returncode}): {proc.communicate()[0][-6000:]}"
        assert time.monotonic() < end, f"{steps} steps not logged in {deadline_s:.0f} s"
        time.sleep(0.05)


def test_sigterm_stops_both_ranks_after_one_step_nan_gradients_are_skipped_and_drifted_copies_are_named(
    monkeypatch, tmp_path
):
    """pp=2, tied embeddings, on_nonfinite=skip; two runs in one launch. The first: rank 1 gets SIGTERM in step 3;
    both ranks (rank 0 only through the loss all-reduce) finish step 3, write its checkpoint and leave the run
    cleanly (the launch goes on); it runs replicated AdamW (parallel.zero=false), whose skip of step 2's NaN
    update is checked too. The second, with a replica check every 2 steps: NaN gradients on stage 1 at step 2 drop that
    update on both ranks (stage 0's rank only learns it through the grad-norm all-reduce), and training goes on.
    After step 4's update two elements of rank 1's copy of the tied embedding change places (the same bits, summed): the
    check after step 2 passed, the one after step 4 stops the run naming the tensor and its stages."""
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
    matches the killed run's step 3, whose row moved to superseded/; then NaN gradients at step 4 with train.on_nonfinite=stop end the run
    naming the step and stage, and step 2 stays the newest checkpoint."""
    dp2 = compose(*DP2, "train.steps=5", "train.checkpoint_every=2", "train.check_every=1")
    message = launch(monkeypatch, "kill:3:1", [dp2], [tmp_path])
    assert message is not None and message.startswith("rank 1 died (SIGKILL) at step 4 during B0.0")
    assert_no_rank_left(tmp_path)
    killed = metrics(tmp_path)
    monkeypatch.setenv(FAULT_ENV, "nan:3:0")
    one = compose(*SMALL, "parallel.microbatches=2", "train.steps=5", "train.checkpoint_every=2", "train.resume=auto")
    with pytest.raises(TrainingFault, match=r"^step 4: non-finite gradients, first at stage 0"):
        run_here(typed(one), str(tmp_path))
    after = metrics(tmp_path)  # the killed run's step 3 moved aside for the recomputed one (checkpoint.supersede_later)
    (superseded,) = (tmp_path / "superseded").glob("*-after-step-00000002")
    replaced = [json.loads(line) for line in (superseded / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in killed] == [1, 2, 3] and [r["step"] for r in after] == [1, 2, 3]
    assert replaced == killed[2:] and after[:2] == killed[:2]
    assert abs(after[2]["loss"] - killed[2]["loss"]) <= FP32 * killed[2]["loss"]
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


def test_sigterm_to_the_launcher_stops_at_a_checkpoint_and_the_resumed_run_matches_an_uninterrupted_one(tmp_path):
    """Preemption: `lcgraph-train` (pp=2 on 2 spawned ranks, 1000 steps, no periodic checkpoint) gets SIGTERM,
    the launcher alone, after its second step. Its elastic agent passes the signal on; the ranks finish the step
    they are in, write its checkpoint and leave; the launcher says so and exits 0, no rank left. Resumed from that
    checkpoint (train.resume=auto) for 2 more steps, the run's losses equal an uninterrupted run's, step by step
    (the second resumed step needs the AdamW moments, the data position and the RNG states restored too)."""
    stop, ref = tmp_path / "stop", tmp_path / "ref"
    with launcher(stop, *STEADY, "train.steps=1000") as proc:
        wait_for_steps(proc, stop, 2)
        proc.send_signal(signal.SIGTERM)
        out = proc.communicate(timeout=60)[0]
        assert proc.returncode == 0, out[-6000:]
        assert_no_rank_left(stop)  # before the way out kills what is left
    steps = [r["step"] for r in metrics(stop)]
    n = steps[-1]
    assert steps == list(range(1, n + 1)) and n >= 2
    assert f"lcgraph: stopped by SIGTERM: checkpoint at step {n};" in out, out[-6000:]
    assert [s for s, _ in complete_checkpoints(stop / CHECKPOINTS)] == [n]
    resumed = compose(*STEADY, f"train.steps={n + 2}", "train.resume=auto")
    got, want = run_spawned([resumed, compose(*STEADY, f"train.steps={n + 2}")], [stop, ref], world=2)
    assert [r["step"] for r in metrics(stop)] == list(range(1, n + 3))
    torch.testing.assert_close(torch.tensor(got), torch.tensor(want), rtol=1e-6, atol=0)


def test_sigint_twice_to_the_launcher_of_a_stuck_run_exits_at_once_without_a_checkpoint(tmp_path):
    """Ctrl-C twice on a run that does not stop: rank 1 hangs in step 3's backward (so the first SIGINT, to the
    launcher alone, cannot finish the step); a second SIGINT 1.5 s later ends the launcher with an error at
    once, long before train.comm_timeout_s (20 s: the ranks' own deadline and the agent's shutdown wait), with no
    rank left and no checkpoint, whole or partial."""
    with launcher(tmp_path, *STEADY, "train.steps=1000", fault="hang:2:1") as proc:
        wait_for_steps(proc, tmp_path, 2)
        proc.send_signal(signal.SIGINT)
        time.sleep(1.5)
        assert proc.poll() is None
        proc.send_signal(signal.SIGINT)
        second = time.monotonic()
        out = proc.communicate(timeout=60)[0]
        took = time.monotonic() - second
        assert proc.returncode != 0 and took < 8, (proc.returncode, took, out[-6000:])
        assert_no_rank_left(tmp_path)  # before the way out kills what is left
    assert "lcgraph: error: stopped by SIGINT before a checkpoint was written" in out, out[-6000:]
    assert len(metrics(tmp_path)) == 2 and not list((tmp_path / CHECKPOINTS).glob("*"))


def test_the_replica_checksum_sees_swapped_and_compensating_elements_and_any_single_change():
    from lcgraph.runtime.faults import checksum

    torch.manual_seed(0)
    for t in (torch.randn(1000), torch.randn(1000).bfloat16()):
        swapped = t.clone()
        swapped[[3, 700]] = swapped[[700, 3]]
        bits = t.view(torch.int32 if t.element_size() == 4 else torch.int16)
        compensated = bits.clone()
        compensated[5] += 1
        compensated[9] -= 1
        assert checksum(swapped) != checksum(t)
        assert checksum(compensated.view(t.dtype)) != checksum(t)
        for i in (0, 1, 999):
            flipped = bits.clone()
            flipped[i] ^= 1 << 7
            assert checksum(flipped.view(t.dtype)) != checksum(t)
        assert checksum(t.clone()) == checksum(t)
