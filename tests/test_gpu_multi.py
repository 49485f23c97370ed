"""Several GPUs on NCCL (run on a machine with 2+ GPUs: python -m pytest -m gpu tests/test_gpu_multi.py).

- the multi-GPU path starts and ends cleanly under torchrun and under lcgraph's own launcher;
- every schedule family trains with NCCL's buffers far smaller than its messages (a p2p ordering hang
  shows up as the process group's timeout, not as a stuck test);
- pp=2, sp=2 (Ulysses), dp=2 (distributed optimizer) and pp=2 with Seq1F1B match the one-GPU run.
"""

import json
import os
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
    "optim.warmup_steps=1",
    "optim.lr=1e-4",
]
SMALL_BUFFERS = {"NCCL_BUFFSIZE": "262144"}
TIMEOUT = "train.comm_timeout_s=120"  # a hang ends the run through the process group's timeout


def _cli(args: list[str], launcher: list[str], run_dir: Path, timeout: int = 240) -> dict:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **SMALL_BUFFERS}
    done = subprocess.run(
        [*launcher, *SHAPE, TIMEOUT, *args, f"hydra.run.dir={run_dir}"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return json.loads((run_dir / "summary.json").read_text())


def test_starts_and_ends_cleanly_under_torchrun_and_lcgraph(tmp_path):
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "-m", "lcgraph"]
    pp = _cli(
        [
            "parallel.pp=2",
            "parallel.sp=1",
            "parallel.schedule=1f1b",
            "parallel.seq_chunks=1",
            "parallel.microbatches=4",
            "train.steps=3",
        ],
        torchrun,
        tmp_path / "torchrun",
    )
    own = _cli(
        [
            "parallel.pp=1",
            "parallel.sp=2",
            "parallel.microbatches=1",
            "parallel.schedule=1f1b",
            "parallel.seq_chunks=1",
            "train.steps=3",
        ],
        [sys.executable, "-m", "lcgraph"],
        tmp_path / "own",
    )
    for summary in (pp, own):
        assert summary["steps"] == 3 and summary["final_loss"] > 0
        peaks = summary["cuda_peak_bytes_per_rank"]
        assert len(peaks) == 2 and all(p > 0 for p in peaks)  # each rank used its own GPU


FAMILIES = {
    "gpipe": ["parallel.schedule=gpipe", "parallel.seq_chunks=1"],
    "1f1b": ["parallel.schedule=1f1b", "parallel.seq_chunks=1"],
    "seq1f1b k=2": ["parallel.schedule=seq1f1b", "parallel.seq_chunks=2"],
    "seq1f1b k=4": ["parallel.schedule=seq1f1b", "parallel.seq_chunks=4"],
    "interleaved v=2": ["parallel.schedule=interleaved_1f1b", "parallel.virtual_stages=2", "parallel.seq_chunks=1"],
}


@pytest.mark.parametrize("family", list(FAMILIES))
def test_every_schedule_family_trains_with_tiny_nccl_buffers(family, tmp_path):
    """NCCL_BUFFSIZE=256 KiB makes every 32 MiB hidden-state message wait for its receiver; a p2p ordering
    hang ends through the process group's timeout (train.comm_timeout_s), not as a stuck test."""
    summary = _cli(
        ["parallel.pp=2", "parallel.sp=1", "parallel.microbatches=4", "train.steps=3", *FAMILIES[family]],
        [sys.executable, "-m", "lcgraph"],
        tmp_path,
        timeout=300,
    )
    assert summary["steps"] == 3


EXACT = {
    "pp=2 1f1b": ["parallel.pp=2", "parallel.schedule=1f1b", "parallel.seq_chunks=1", "parallel.microbatches=4"],
    "pp=2 seq1f1b k=2": [
        "parallel.pp=2",
        "parallel.schedule=seq1f1b",
        "parallel.seq_chunks=2",
        "parallel.chunk_split=even",
        "parallel.microbatches=4",
    ],
    "sp=2": [
        "parallel.pp=1",
        "parallel.sp=2",
        "parallel.schedule=1f1b",
        "parallel.seq_chunks=1",
        "parallel.microbatches=4",
    ],
    "dp=2": [
        "parallel.pp=1",
        "parallel.dp=2",
        "parallel.schedule=1f1b",
        "parallel.seq_chunks=1",
        "parallel.microbatches=2",
    ],
}


def _metrics(run_dir: Path) -> tuple[list[float], list[float]]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows], [r["grad_norm"] for r in rows]


def test_layouts_match_one_gpu(tmp_path):
    """pp=2, pp=2 Seq1F1B, sp=2 and dp=2 on NCCL against the one-GPU run: same tokens (dp x micro-batches = 4),
    same seed. Uniform random tokens keep the loss near ln(vocab) in any layout, so the gradient norm, which a
    wrong shard, relay or reduction moves, is compared too."""
    one = _cli(
        ["parallel=single", "parallel.microbatches=4", "train.steps=5"],
        [sys.executable, "-m", "lcgraph"],
        tmp_path / "one",
    )
    assert one["steps"] == 5
    ref_loss, ref_norm = _metrics(tmp_path / "one")
    for name, overrides in EXACT.items():
        run_dir = tmp_path / name.replace(" ", "_").replace("=", "")
        _cli(
            [*overrides, "parallel.sp=1" if "sp=2" not in name else "parallel.dp=1", "train.steps=5"],
            [sys.executable, "-m", "lcgraph"],
            run_dir,
        )
        loss, norm = _metrics(run_dir)
        torch.testing.assert_close(
            torch.tensor(loss), torch.tensor(ref_loss), rtol=5e-3, atol=0, msg=lambda m: f"{name}: loss vs one GPU: {m}"
        )
        torch.testing.assert_close(
            torch.tensor(norm),
            torch.tensor(ref_norm),
            rtol=5e-2,
            atol=0,
            msg=lambda m: f"{name}: grad norm vs one GPU: {m}",
        )
