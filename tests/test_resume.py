"""Full-state checkpoints: a resumed run equals the uninterrupted one, in the same layout exactly and in another
layout within fp32 tolerance; a cut-off write is never loaded; another model shape is refused; HF export loads.

One launch of 2 spawned ranks runs the three distributed runs (lcgraph-train's own loop, gloo, fp32):
A  dp=2 with the distributed optimizer (ZeRO shards), tied embeddings, 20 steps, a checkpoint every 10;
B  the same layout resumed from A's step-10 checkpoint;
C  pp=2 (2 micro-batches: the same global batch) resumed from the same checkpoint, a checkpoint every 3;
D  ring attention over cp=2 ranks (2 micro-batches) resumed from the same checkpoint.
"""

import json
import os
import shutil
import stat

import pytest
import torch
import torch.distributed.checkpoint as dcp

from lcgraph.app.cli import check_resume
from lcgraph.app.export import main as export_main
from lcgraph.app.testing import compose, job_of, run_config, run_here, run_losses, run_spawned
from lcgraph.errors import CheckpointError
from lcgraph.runtime.checkpoint import CHECKPOINTS, layout, read_manifest, same_layout

STEPS = ["train.steps=20", "model.tie_word_embeddings=true"]
DP2 = ["parallel.dp=2", *STEPS]
PP2 = ["parallel.pp=2", "parallel.microbatches=2", *STEPS]
CP2 = ["parallel.cp=2", "parallel.microbatches=2", *STEPS]
ONE = ["parallel.microbatches=2", *STEPS]  # one process, the same global batch of 2 rows
FP32 = 1e-5


pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("resume")
    dirs = [root / "a", root / "b", root / "c", root / "d"]
    step10 = dirs[0] / CHECKPOINTS / "step-00000010"
    cfgs = [
        compose(*DP2, "train.checkpoint_every=10"),
        compose(*DP2, f"train.resume={step10}"),
        compose(*PP2, f"train.resume={step10}", "train.checkpoint_every=3", "train.keep_checkpoints=2"),
        compose(*CP2, f"train.resume={step10}"),
    ]
    losses = run_spawned(cfgs, dirs, world=2)
    return dict(zip("abcd", losses)), dict(zip("abcd", dirs)), step10


def test_dp2_zero_run_resumed_at_step_10_equals_the_uninterrupted_20_steps_exactly(runs):
    losses, _, _ = runs
    assert len(losses["a"]) == 20 and len(losses["b"]) == 10
    assert torch.equal(torch.tensor(losses["b"]), torch.tensor(losses["a"][10:]))


def test_dp2_checkpoint_resumed_as_pp2_matches_and_keeps_the_newest_checkpoints(runs):
    losses, dirs, _ = runs
    torch.testing.assert_close(torch.tensor(losses["c"]), torch.tensor(losses["a"][10:]), rtol=FP32, atol=0)
    kept = sorted(p.name for p in (dirs["c"] / CHECKPOINTS).iterdir())
    assert kept == ["step-00000018", "step-00000020"]  # saved at 12, 15, 18 and the end; keep_checkpoints=2


def test_the_manifest_records_cp_and_a_checkpoint_resumes_under_another_cp_as_under_another_sp(runs):
    """The layout in manifest.json names cp (1 for A, 2 for D); D, resumed from A's dp=2 checkpoint over a ring of
    2, matches A (DCP reshards; RNG states are only restored in the same layout). A manifest written before cp
    existed reads as cp=1."""
    losses, dirs, step10 = runs
    torch.testing.assert_close(torch.tensor(losses["d"]), torch.tensor(losses["a"][10:]), rtol=FP32, atol=0)
    saved = read_manifest(step10)["layout"]
    assert saved["cp"] == 1 and read_manifest(dirs["d"] / CHECKPOINTS / "step-00000020")["layout"]["cp"] == 2
    dp2, cp2 = (run_config(*DP2, *more) for more in ([], ["parallel.cp=2"]))
    mine, ring = (layout(c.parallel, c.train.dtype) for c in (dp2, cp2))
    assert same_layout(saved, mine) and not same_layout(saved, ring)
    without_cp = {k: v for k, v in saved.items() if k != "cp"}
    assert same_layout(without_cp, mine) and not same_layout(without_cp, ring)


def test_checkpoint_and_exported_files_get_the_mode_the_umask_gives(runs, tmp_path):
    """Every file of a checkpoint and of its HF export is 0666 less the umask (0644 under 022), not the owner-only
    0600 of a temporary file: an exported model is read by other users (a serving account, a container)."""
    _, _, step10 = runs
    umask = os.umask(0o027)
    try:
        export_main([str(step10), str(tmp_path / "hf")])
    finally:
        os.umask(umask)
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in (tmp_path / "hf").glob("*.safetensors")}
    assert modes == {"model.safetensors": 0o640}, {n: oct(m) for n, m in modes.items()}
    written = {p.relative_to(step10): stat.S_IMODE(p.stat().st_mode) for p in step10.rglob("*") if p.is_file()}
    assert written and all(m == 0o666 & ~umask for m in written.values()), {str(p): oct(m) for p, m in written.items()}


def test_a_checkpoint_cut_off_mid_write_is_never_loaded_and_the_previous_one_is(runs, tmp_path):
    """Resumed with train.resume=auto in one process from a run directory whose newer checkpoints were cut
    off: one whose writer died before the rename (step-20.tmp, even with its manifest), one with a torn
    manifest (step-30). It must go on from step 10 and match A."""
    losses, dirs, step10 = runs
    saves = tmp_path / CHECKPOINTS
    shutil.copytree(step10, saves / step10.name)
    shutil.copytree(dirs["a"] / CHECKPOINTS / "step-00000020", saves / "step-00000020.tmp")
    torn = saves / "step-00000030"
    shutil.copytree(step10, torn)
    manifest = (torn / "manifest.json").read_text().replace('"step": 10', '"step": 30')
    (torn / "manifest.json").write_text(manifest[: len(manifest) // 2])
    run_here(run_config(*ONE, "train.resume=auto"), str(tmp_path))
    resumed = run_losses(tmp_path)
    torch.testing.assert_close(torch.tensor(resumed), torch.tensor(losses["a"][10:]), rtol=FP32, atol=0)


def test_a_checkpoint_of_another_model_shape_is_refused_in_one_line(runs, tmp_path):
    _, _, step10 = runs
    with pytest.raises(CheckpointError) as err:
        check_resume(run_config(*ONE, "model.hidden_size=32", f"train.resume={step10}"), tmp_path)
    assert "hidden_size=64" in str(err.value) and "hidden_size=32" in str(err.value) and "\n" not in str(err.value)


def test_export_of_the_dp2_checkpoint_loads_in_transformers_and_lcgraph_with_the_trained_weights(runs, tmp_path):
    """The step-10 checkpoint (ZeRO-sharded over 2 ranks) exported to HF: loaded back with model.path, its loss
    on step 10's batch is A's logged loss at that step; from_pretrained's logits give the same loss."""
    from transformers import LlamaForCausalLM

    losses, _, step10 = runs
    out = tmp_path / "hf"
    export_main([str(step10), str(out)])
    job = job_of(run_config(*ONE, "model=hf", f"model.path={out}"), tmp_path / "run")
    position = {"data": job.sampler.state_dict()}  # step 10's data position (the weights come from the export)
    dcp.load(position, checkpoint_id=step10, no_dist=True)
    job.sampler.load_state_dict(position["data"])
    units, total = job.step_units(10)
    loss = job.run_step(10)["loss"]
    assert abs(loss - losses["a"][10]) <= FP32 * losses["a"][10]
    hf = LlamaForCausalLM.from_pretrained(out)
    with torch.no_grad():
        summed = sum(
            torch.nn.functional.cross_entropy(
                hf(input_ids=u.input_ids, position_ids=u.position_ids).logits.flatten(0, 1),
                u.labels.flatten(),
                reduction="sum",
            )
            for u in units.values()
        )
    assert abs(float(summed) / total - loss) <= FP32 * loss


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs")
def test_bf16_zero_run_on_two_gpus_resumes_in_the_same_layout_and_as_pp2(tmp_path):
    """NCCL, bf16 with separate fp32 masters in the checkpoint: A dp=2 for 20 steps, B resumed at step 10
    in the same layout, C resumed as pp=2."""
    gpu = ["train.device=cuda", "train.dtype=bf16"]
    dirs = [tmp_path / "a", tmp_path / "b", tmp_path / "c"]
    step10 = dirs[0] / CHECKPOINTS / "step-00000010"
    cfgs = [
        compose(*DP2, *gpu, "train.checkpoint_every=10"),
        compose(*DP2, *gpu, f"train.resume={step10}"),
        compose(*PP2, *gpu, f"train.resume={step10}"),
    ]
    a, b, c = run_spawned(cfgs, dirs, world=2)
    torch.testing.assert_close(torch.tensor(b), torch.tensor(a[10:]), rtol=1e-3, atol=0)
    torch.testing.assert_close(torch.tensor(c), torch.tensor(a[10:]), rtol=1e-2, atol=0)


# --- what a resume must read from the checkpoint (one process, fp32 unless said) ---------------------------------
def _dcp_tensor(path, key, shape):
    out = {key: torch.empty(shape)}
    dcp.load(out, checkpoint_id=path, no_dist=True)
    return out[key]


@pytest.mark.parametrize("zero,dtype", [("true", "fp32"), ("false", "fp32"), ("true", "bf16")])
def test_a_run_that_skipped_a_step_resumes_bit_for_bit(zero, dtype, tmp_path, monkeypatch):
    """NaN gradients at step 2 with on_nonfinite=skip drop that update, so AdamW has taken one step fewer than the
    trainer: its step count (bias correction) must come from the checkpoint, not from the step number. In bf16 the
    update is dropped on the device (mixed_adamw.py)."""
    from lcgraph.runtime.faults import FAULT_ENV

    base = ["train.on_nonfinite=skip", f"parallel.zero={zero}", "train.checkpoint_every=3", "train.keep_checkpoints=0"]
    base.append(f"train.dtype={dtype}")
    monkeypatch.setenv(FAULT_ENV, "nan:1:0")
    run_here(run_config(*base), str(tmp_path / "a"))
    monkeypatch.setenv(FAULT_ENV, "")
    run_here(run_config(*base, f"train.resume={tmp_path / 'a' / CHECKPOINTS / 'step-00000003'}"), str(tmp_path / "b"))
    whole, resumed = run_losses(tmp_path / "a"), run_losses(tmp_path / "b")
    assert [json.loads(r).get("skipped") for r in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()][1]
    assert torch.equal(torch.tensor(resumed), torch.tensor(whole[3:])), (resumed, whole)


def test_rolling_back_into_the_run_directory_moves_the_later_trajectory_aside(tmp_path):
    """A run reaches step 4, then resumes from its step-2 checkpoint in the same directory with lr 0: the new
    step 4 holds step 2's weights (not the old step 4's), metrics read steps 1-4 once, and the old steps 3-4
    (checkpoint and rows) are kept under superseded/."""
    from lcgraph.runtime.checkpoint import SUPERSEDED

    run_dir, base = tmp_path / "run", ["train.steps=4", "train.checkpoint_every=2", "train.keep_checkpoints=0"]
    run_here(run_config(*base), str(run_dir))
    saves = run_dir / CHECKPOINTS
    old_rows = (run_dir / "metrics.jsonl").read_text().splitlines()
    key, shape = "model.lm_head.weight", (512, 64)
    old4 = _dcp_tensor(saves / "step-00000004", key, shape)
    run_here(run_config(*base, "optim.lr=0", f"train.resume={saves / 'step-00000002'}"), str(run_dir))
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    new4, step2 = _dcp_tensor(saves / "step-00000004", key, shape), _dcp_tensor(saves / "step-00000002", key, shape)
    assert torch.equal(new4, step2) and not torch.equal(new4, old4)
    (moved,) = (run_dir / SUPERSEDED).iterdir()
    assert moved.name.endswith("after-step-00000002")
    assert (moved / "metrics.jsonl").read_text().splitlines() == old_rows[2:]
    assert torch.equal(_dcp_tensor(moved / CHECKPOINTS / "step-00000004", key, shape), old4)


@pytest.mark.parametrize("saved,resumed", [("bf16", "fp32"), ("fp32", "bf16")])
def test_a_resume_in_the_other_dtype_takes_the_fp32_masters(saved, resumed, tmp_path):
    """bf16 -> fp32: the fp32 weights are the checkpoint's masters, not its bf16 weights; fp32 -> bf16: the masters
    are the checkpoint's fp32 weights, not the bf16 rounding of them."""
    from lcgraph.runtime.checkpoint import load_checkpoint

    run_here(run_config("train.steps=2", f"train.dtype={saved}"), str(tmp_path / "a"))
    ckpt = tmp_path / "a" / CHECKPOINTS / "step-00000002"
    job = job_of(run_config(f"train.dtype={resumed}"), tmp_path / "b")
    load_checkpoint(job, ckpt)
    for name, p in job.all_params().items():
        if saved == "bf16":
            want, got = _dcp_tensor(ckpt, f"optim.{name}.master", (p.numel(),)), p.detach().view(-1)
        else:
            b = next(b for b in job.optimizer.buckets if name in b.names)
            offset = sum(q.numel() for q in b.params[: b.names.index(name)])
            want, got = _dcp_tensor(ckpt, f"model.{name}", p.shape).view(-1), b.master[offset : offset + p.numel()]
        assert torch.equal(got, want), name


def test_a_run_that_crashed_before_its_first_checkpoint_starts_over_with_one_trajectory(tmp_path):
    """train.resume=auto finds no checkpoint: the run starts at step 0, and the crashed attempt's rows move to
    superseded/ instead of being followed by a second step 1."""
    from lcgraph.runtime.checkpoint import SUPERSEDED

    run_here(run_config("train.steps=2"), str(tmp_path))
    shutil.rmtree(tmp_path / CHECKPOINTS)  # as if it had died before writing one
    old = (tmp_path / "metrics.jsonl").read_text().splitlines()
    run_here(run_config("train.steps=2", "train.resume=auto"), str(tmp_path))
    assert [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [1, 2]
    (moved,) = (tmp_path / SUPERSEDED).iterdir()
    assert (moved / "metrics.jsonl").read_text().splitlines() == old
