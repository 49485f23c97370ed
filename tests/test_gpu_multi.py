"""Several GPUs on NCCL (run on a machine with 2+ GPUs: python -m pytest -m gpu tests/test_gpu_multi.py).

- the multi-GPU path starts and ends cleanly under torchrun and under lcgraph's own launcher;
- every schedule family trains with NCCL's buffers far smaller than its messages (a p2p ordering hang
  shows up as the process group's timeout, not as a stuck test);
- `lcgraph-check` passes on every GPU of the machine (each layout they hold against one GPU, the NCCL replay, the
  links) and fails when a transfer is swapped (LCGRAPH_FAULT=swap): the check can see the bugs it names.
Every override list here is composed and validated on CPU by tests/test_bench_tools.py.
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lcgraph.app import check
from lcgraph.runtime.faults import FAULT_ENV

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


def test_lcgraph_check_passes_on_every_gpu_of_this_machine(tmp_path):
    """`lcgraph-check --gpus N` on NCCL: every layout N GPUs hold matches one GPU, every family's programs replay
    with tiny buffers, the links are measured into a profile."""
    gpus = torch.cuda.device_count()
    assert check.main(["--gpus", str(gpus), "--out", str(tmp_path), "--timeout", "60"]) == 0
    result = json.loads((tmp_path / "check.json").read_text())
    assert result["meta"]["backend"] == "nccl" and result["meta"]["ranks"] == gpus
    assert len(result["exactness"]["rows"]) == len(check.layouts_for(gpus))


def test_lcgraph_check_fails_when_a_transfer_is_swapped(tmp_path, monkeypatch):
    """swap:1:0: rank 0's first send of step 2 goes out after its next p2p group. On NCCL the uneven Seq1F1B chunks'
    messages differ in size (a hang the process group's timeout ends, or corrupted numbers); 1F1B reads the wrong
    micro-batch. Either way the check must say FAIL."""
    monkeypatch.setenv(FAULT_ENV, "swap:1:0")
    argv = ["--gpus", "2", "--only", "exactness", "--out", str(tmp_path), "--timeout", "30"]
    assert check.main(argv) == 1
    rows = json.loads((tmp_path / "check.json").read_text())["exactness"]["rows"]
    assert not next(r for r in rows if r["layout"] == "pp=2 1f1b")["passed"]
