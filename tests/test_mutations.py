"""The exactness checks notice a broken transfer or reduction: the layouts of the several-GPU exactness test, on
gloo ranks in fp32, match the single-process run clean and stop matching under LCGRAPH_FAULT's swap / skip_rs.

- swap:1:0 on pp=2 1f1b: rank 0's first send of step 2 goes out after its next p2p group, so stage 1 reads
  micro-batch 1's activations as micro-batch 0's (same shapes: gloo runs on, the numbers go wrong);
- swap:1:0 on pp=2 seq1f1b, uneven chunks: the two chunks' messages change places and their sizes differ, so
  the receiving rank fails (gloo aborts it) instead of reading the wrong chunk;
- skip_rs:1:0 on dp=2 (distributed optimizer): every replica steps its first bucket on its own gradients.
The same hooks break the NCCL runs in tests/test_gpu_multi.py.
"""

import pytest
import torch
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

from lcgraph.app.testing import assert_close_run, compose, train_local, train_spawned
from lcgraph.runtime.faults import FAULT_ENV

STEPS = ["train.steps=3"]
PP_1F1B = ["parallel.pp=2", "parallel.schedule=1f1b", "parallel.seq_chunks=1", "parallel.microbatches=4"]
DP = ["parallel.dp=2", "parallel.microbatches=2"]
SEQ_UNEVEN = [
    "parallel.pp=2",
    "parallel.schedule=seq1f1b",
    "parallel.seq_chunks=2",
    "parallel.chunk_split=uniform_comp",
    "parallel.microbatches=2",
]


@pytest.fixture(scope="module")
def reference():
    """One process, 4 micro-batches: the same tokens as pp=2 x 4 micro-batches and dp=2 x 2."""
    losses, params, extra = train_local(compose("parallel.microbatches=4", *STEPS))
    return losses, params, extra["grad_norms"]


def _runs(fault: str, monkeypatch) -> list[dict]:
    monkeypatch.setenv(FAULT_ENV, fault)  # the spawned ranks inherit it; swap fires on pp only, skip_rs on dp only
    return train_spawned([compose(*PP_1F1B, *STEPS), compose(*DP, *STEPS)], world=2)


def test_clean_layouts_match_and_swapped_transfer_or_skipped_reduce_scatter_do_not(reference, monkeypatch):
    ref_losses, ref_params, ref_norms = reference
    clean = _runs("", monkeypatch)
    for name, run in zip(("pp=2 1f1b", "dp=2"), clean):
        assert_close_run(run["losses"], run["params"], ref_losses, ref_params, rtol=3e-5, label=name)
    broken = _runs("swap:1:0,skip_rs:1:0", monkeypatch)
    for name, run, ok in zip(("pp=2 1f1b swap", "dp=2 skip_rs"), broken, clean):
        # step 1 untouched; step 2 pairs the wrong activations (swap) or steps on unreduced gradients (skip_rs)
        assert run["losses"][0] == pytest.approx(ok["losses"][0], rel=1e-6), name
        with pytest.raises(AssertionError):
            assert_close_run(run["losses"], run["params"], ref_losses, ref_params, rtol=3e-5, label=name)
        assert run["grad_norms"][1] != pytest.approx(ref_norms[1], rel=1e-4), name


def test_swapped_transfer_of_uneven_chunks_fails_the_run(monkeypatch):
    monkeypatch.setenv(FAULT_ENV, "swap:0:0")
    with pytest.raises(ChildFailedError):
        train_spawned([compose(*SEQ_UNEVEN, "train.steps=1")], world=2)
    assert torch.distributed.is_available()
