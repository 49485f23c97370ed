"""Several GPUs on NCCL (run on a machine with 2+ GPUs: python -m pytest -m gpu tests/test_gpu_multi.py).

- the multi-GPU path starts and ends cleanly under torchrun and under lcgraph's own launcher;
- every schedule family trains with NCCL's buffers far smaller than its messages (a p2p ordering hang
  shows up as the process group's timeout, not as a stuck test);
- pp=2 1F1B, pp=2 Seq1F1B, sp=2 (Ulysses) and dp=2 (distributed optimizer) match the one-GPU run; the same
  comparison fails when a transfer is swapped (LCGRAPH_FAULT=swap) or a bucket's reduce-scatter is skipped
  (LCGRAPH_FAULT=skip_rs): the check can see the bugs it names.
Every override list here is composed and validated on CPU by tests/test_lease_commands.py.
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs")]

ROOT = Path(__file__).resolve().parents[1]
# Llama-3.2-1B's layer shape, 4 layers: an 8k-token hidden state is a 32 MiB message, 128x NCCL_BUFFSIZE below.
SHAPE = [
    "model=llama3_1b",
    "model.num_hidden_layers=4",
    "data.synthetic=true",
    "data.seq_len=8192",
    "train.dtype=bf16",
    "train.device=cuda",
    "logging.wandb.mode=disabled",
    "train.progress=false",
    "train.checkpoint_every=0",
    "optim.warmup_steps=1",
    "optim.lr=1e-4",
]
SMALL_BUFFERS = {"NCCL_BUFFSIZE": "262144", "NCCL_NVLS_ENABLE": "0"}
TIMEOUT = "train.comm_timeout_s=120"  # a hang ends the run through the process group's timeout
LCGRAPH = [sys.executable, "-m", "lcgraph"]
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "-m", "lcgraph"]


def _kill_tree(pid: int) -> None:
    """SIGKILL a launcher and every rank under it (a hung NCCL rank never ends by itself)."""
    import psutil

    parent = psutil.Process(pid)
    for p in [*parent.children(recursive=True), parent]:
        p.kill()


class RunFailed(AssertionError):
    """The launched run exited non-zero or outlived its timeout (a hang)."""


def _cli(args: list[str], launcher: list[str], run_dir: Path, timeout: int = 240, env: dict | None = None) -> dict:
    """Run lcgraph (a timed-out run is killed with its ranks; an outer `timeout` reaches them too); its summary.json."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **SMALL_BUFFERS, **(env or {})}
    cmd = [*launcher, *SHAPE, TIMEOUT, *args, f"hydra.run.dir={run_dir}"]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        _kill_tree(proc.pid)
        proc.communicate()
        raise RunFailed(f"no result within {timeout} s (hang): {' '.join(args)}") from None
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "output.log").write_text(out)
    shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)  # the final checkpoint: GiBs per run, unused here
    if proc.returncode != 0:
        raise RunFailed(f"exit {proc.returncode}: {out[-3000:]}")
    return json.loads((run_dir / "summary.json").read_text())


PP_1F1B = [
    "parallel.pp=2",
    "parallel.sp=1",
    "parallel.schedule=1f1b",
    "parallel.seq_chunks=1",
    "parallel.microbatches=4",
    "train.steps=3",
]
SP_OWN = [
    "parallel.pp=1",
    "parallel.sp=2",
    "parallel.microbatches=1",
    "parallel.schedule=1f1b",
    "parallel.seq_chunks=1",
    "train.steps=3",
]


def test_starts_and_ends_cleanly_under_torchrun_and_lcgraph(tmp_path):
    pp = _cli(PP_1F1B, TORCHRUN, tmp_path / "torchrun")
    own = _cli(SP_OWN, LCGRAPH, tmp_path / "own")
    for summary in (pp, own):
        assert summary["steps"] == 3 and summary["final_loss"] > 0
        peaks = summary["cuda_peak_bytes_per_rank"]
        assert len(peaks) == 2 and all(p > 0 for p in peaks)  # each rank used its own GPU


FAMILIES = {
    "gpipe": ["parallel.schedule=gpipe", "parallel.seq_chunks=1"],
    "1f1b": ["parallel.schedule=1f1b", "parallel.seq_chunks=1"],
    "seq1f1b-k2": ["parallel.schedule=seq1f1b", "parallel.seq_chunks=2"],
    "seq1f1b-k4": ["parallel.schedule=seq1f1b", "parallel.seq_chunks=4"],
    "interleaved-v2": ["parallel.schedule=interleaved_1f1b", "parallel.virtual_stages=2", "parallel.seq_chunks=1"],
}
FAMILY_BASE = ["parallel.pp=2", "parallel.sp=1", "parallel.dp=1", "parallel.microbatches=4", "train.steps=3"]


@pytest.mark.parametrize("family", list(FAMILIES))
def test_every_schedule_family_trains_with_tiny_nccl_buffers(family, tmp_path):
    """NCCL_BUFFSIZE=256 KiB makes every 32 MiB hidden-state message wait for its receiver; a p2p ordering
    hang ends through the process group's timeout (train.comm_timeout_s), not as a stuck test."""
    summary = _cli([*FAMILY_BASE, *FAMILIES[family]], LCGRAPH, tmp_path, timeout=300)
    assert summary["steps"] == 3


ONE_GPU = ["parallel=single", "parallel.microbatches=4", "train.steps=5"]
# name -> (overrides, LCGRAPH_FAULT): every layout sees the one-GPU run's 4 micro-batches (dp x microbatches = 4)
EXACT = {
    "pp=2 1f1b": (["parallel=single", "parallel.pp=2", "parallel.schedule=1f1b", "parallel.microbatches=4"], ""),
    "pp=2 seq1f1b k=2": (
        [
            "parallel=single",
            "parallel.pp=2",
            "parallel.schedule=seq1f1b",
            "parallel.seq_chunks=2",
            "parallel.chunk_split=uniform_comp",
            "parallel.microbatches=4",
        ],
        "",
    ),
    "sp=2": (["parallel=single", "parallel.sp=2", "parallel.microbatches=4"], ""),
    "dp=2": (["parallel=single", "parallel.dp=2", "parallel.microbatches=2"], ""),
}
# broken on purpose: must NOT match (a run that fails or hangs counts as caught). The seq1f1b swap sends the
# 2 uneven chunks' messages in each other's place (sizes differ: NCCL hangs or corrupts); skip_rs steps every
# replica's first bucket on its own, unreduced gradients: one 4 GB bucket holds every matrix, so the gradient norm
# of that step drops by about 1/sqrt(1 + the two replicas' gradient correlation), far beyond bf16 noise.
BROKEN = {
    "pp=2 seq1f1b k=2 swap": (EXACT["pp=2 seq1f1b k=2"][0], "swap:1:0"),
    "dp=2 skip_rs": ([*EXACT["dp=2"][0], "parallel.bucket_mb=4000"], "skip_rs:1:0"),
}
BROKEN_TIMEOUT = "train.comm_timeout_s=30"  # a broken run that hangs ends within a minute


def _metrics(run_dir: Path) -> tuple[list[float], list[float]]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows], [r["grad_norm"] for r in rows]


@pytest.fixture(scope="module")
def one_gpu(tmp_path_factory) -> tuple[list[float], list[float]]:
    run_dir = tmp_path_factory.mktemp("one")
    assert _cli(ONE_GPU, LCGRAPH, run_dir)["steps"] == 5
    return _metrics(run_dir)


def _compare(name: str, run_dir: Path, ref: tuple[list[float], list[float]]) -> None:
    """Loss within bf16 tolerance at every step, and the gradient norm, which a wrong shard, relay or reduction
    moves (uniform random tokens keep the loss near ln(vocab) in any layout)."""
    loss, norm = _metrics(run_dir)
    assert len(loss) == len(ref[0]) == 5, f"{name}: {len(loss)} steps"
    torch.testing.assert_close(
        torch.tensor(loss), torch.tensor(ref[0]), rtol=5e-3, atol=0, msg=lambda m: f"{name}: loss vs one GPU: {m}"
    )
    torch.testing.assert_close(
        torch.tensor(norm), torch.tensor(ref[1]), rtol=5e-2, atol=0, msg=lambda m: f"{name}: grad norm vs one GPU: {m}"
    )


# the broken variants right after their clean layout, the layouts other runs also train last: a call cut by its
# time limit loses the least
ORDER = ["pp=2 seq1f1b k=2", "pp=2 seq1f1b k=2 swap", "dp=2", "dp=2 skip_rs", "sp=2", "pp=2 1f1b"]


@pytest.mark.parametrize("name", ORDER)
def test_layouts_match_one_gpu(name, one_gpu, tmp_path):
    """Each layout on NCCL against the one-GPU run: same tokens, same seed, 5 steps; the broken ones must not match."""
    if name in EXACT:
        overrides, _ = EXACT[name]
        _cli([*overrides, "train.steps=5"], LCGRAPH, tmp_path)
        _compare(name, tmp_path, one_gpu)
        return
    overrides, fault = BROKEN[name]
    try:
        _cli(
            [*overrides, "train.steps=5", BROKEN_TIMEOUT], LCGRAPH, tmp_path, timeout=150, env={"LCGRAPH_FAULT": fault}
        )
    except RunFailed as failed:
        print(f"{name}: caught, the run failed: {str(failed)[-300:]}")
        return
    with pytest.raises(AssertionError) as caught:
        _compare(name, tmp_path, one_gpu)
    print(f"{name}: caught: {str(caught.value)[:300]}")


# 4 and 8 GPUs: the same comparison for the wider layouts (skipped with fewer GPUs)
WIDE = {
    "pp=4 seq1f1b k=2": (
        [
            "parallel=single",
            "parallel.pp=4",
            "parallel.schedule=seq1f1b",
            "parallel.seq_chunks=2",
            "parallel.chunk_split=uniform_comp",
            "parallel.microbatches=4",
        ],
        4,
    ),
    "sp=4": (["parallel=single", "parallel.sp=4", "parallel.microbatches=4"], 4),
    "pp=2 x sp=2": (
        [
            "parallel=single",
            "parallel.pp=2",
            "parallel.sp=2",
            "parallel.schedule=seq1f1b",
            "parallel.seq_chunks=2",
            "parallel.microbatches=4",
        ],
        4,
    ),
    "pp=2 x sp=2 x dp=2": (
        [
            "parallel=single",
            "parallel.pp=2",
            "parallel.sp=2",
            "parallel.dp=2",
            "parallel.schedule=seq1f1b",
            "parallel.seq_chunks=2",
            "parallel.microbatches=2",
        ],
        8,
    ),
}


@pytest.mark.parametrize("name", list(WIDE))
def test_wide_layouts_match_one_gpu(name, one_gpu, tmp_path):
    overrides, gpus = WIDE[name]
    if torch.cuda.device_count() < gpus:
        pytest.skip(f"needs {gpus} CUDA GPUs")
    _cli([*overrides, "train.steps=5"], LCGRAPH, tmp_path, timeout=300)
    _compare(name, tmp_path, one_gpu)
