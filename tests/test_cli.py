"""The app end to end: a local HF model directory, checkpoint round trip, and the torchrun launch path."""

import json
import os
import subprocess
import sys

import torch

from lcgraph.app.testing import TINY, compose, hf_model_dir, torchrun, train_local

TINY_CLI = [o for o in TINY if not o.startswith("parallel=")] + ["train.steps=3"]


def _hf_dir(tmp_path):
    return hf_model_dir(tmp_path)


def test_model_path_loads_a_local_hf_directory_and_the_checkpoint_round_trips(tmp_path):
    path, hf = _hf_dir(tmp_path)
    cfg = compose("model=hf", f"model.path={path}", "train.steps=1", "optim.lr=0")
    losses, params, extra = train_local(cfg)
    job = extra["job"]
    assert torch.equal(params["model.layers.1.mlp.down_proj.weight"], hf.model.layers[1].mlp.down_proj.weight)
    job.sampler.load_state_dict({**job.sampler.state_dict(), "consumed": 0})  # the batch step 0 trained on
    unit = job.step_units(0)[0][(0, 0)]
    with torch.no_grad():
        logits = hf(input_ids=unit.input_ids, position_ids=unit.position_ids).logits
    ref = torch.nn.functional.cross_entropy(logits.flatten(0, 1), unit.labels.flatten())
    assert abs(losses[0] - float(ref)) < 1e-5 * float(ref)

    from lcgraph.runtime.checkpoint import export_hf, save_checkpoint

    save_checkpoint(job, tmp_path / "saves", 1)
    export_hf(tmp_path / "saves", tmp_path / "ckpt")
    _, reloaded, _ = train_local(compose("model=hf", f"model.path={tmp_path / 'ckpt'}", "train.steps=0"))
    assert set(reloaded) == set(params)
    assert all(torch.equal(reloaded[n], params[n]) for n in params)


def test_missing_model_path_is_one_clear_error(tmp_path):
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "lcgraph",
            "model=hf",
            f"model.path={tmp_path}/nope",
            *TINY_CLI,
            f"hydra.run.dir={tmp_path}/run",
        ],
        capture_output=True,
        text=True,
    )
    assert out.returncode != 0
    assert "lcgraph: error: model.path=" in out.stderr and "Traceback" not in out.stderr


def test_torchrun_ranks_share_rank0s_run_directory(tmp_path):
    run = tmp_path / "run"
    layout = [*TINY_CLI, "parallel=seq1f1b", "parallel.seq_chunks=2"]
    out = torchrun(layout, run)
    assert out.returncode == 0, out.stderr[-3000:]
    lines = (run / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 3 and all("loss" in json.loads(ln) for ln in lines)
    assert "rank 1:" in (run / "programs.txt").read_text()
    assert json.loads((run / "checkpoints" / "step-00000003" / "manifest.json").read_text())["complete"]

    # a user's error under torchrun: one line from rank 0, and the agent's report names it as the root cause
    bad = torchrun([*layout, "data.path=/nonexistent/corpus.txt"], tmp_path / "bad")
    assert bad.returncode != 0
    ours = [ln for ln in bad.stderr.splitlines() if ln.startswith("lcgraph: error:")]
    assert len(ours) == 1 and "/nonexistent/corpus.txt" in ours[0], bad.stderr[-3000:]
    root = bad.stderr.split("Root Cause", 1)[-1]
    assert "traceback : lcgraph: error: rank " in root and "/nonexistent/corpus.txt" in root, root


def test_same_config_and_seed_give_the_same_losses():
    first, _, _ = train_local(compose("train.steps=3"))
    again, _, _ = train_local(compose("train.steps=3"))
    other, _, _ = train_local(compose("train.steps=3", "train.seed=1"))
    assert first == again and first != other


def test_the_default_plan_is_pp2_sp2_seq1f1b_on_four_spawned_ranks(tmp_path):
    cfg = compose(tiny=False)
    assert (cfg.parallel.pp, cfg.parallel.sp, cfg.parallel.schedule, cfg.model.num_hidden_layers) == (
        2,
        2,
        "seq1f1b",
        4,
    )
    run = tmp_path / "run"
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "lcgraph",
            "train.steps=2",
            "data.seq_len=64",
            "data.max_corpus_mb=0.3",
            "train.progress=false",
            "logging.wandb.mode=disabled",
            f"hydra.run.dir={run}",
        ],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().splitlines()[-1] == f"run directory: {run}"
    programs = (run / "programs.txt").read_text().splitlines()
    assert len(programs) == 2 and "RS" in programs[0] and "AG" in programs[1]  # pipeline ranks, ZeRO actions
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 2
