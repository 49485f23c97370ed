"""Ring attention (parallel.cp) trained on CPU gloo ranks against HF eager LLaMA + torch AdamW in fp32: alone,
under Ulysses (sp x cp, K/V heads fewer than sp x cp), with data parallelism and the distributed optimizer
(dp x cp share optimizer state), and on a Seq1F1B pipeline (pp x cp, the relayed prefix passed around the ring).

The reference is test_reference's: nothing of lcgraph's forward, backward, loss or optimizer is used for it."""

from __future__ import annotations

import pytest
import torch
from test_reference import FP32, check, hf_reference, run_cfg

from lcgraph.app.job import shard_positions
from lcgraph.app.testing import compose, train_spawned
from lcgraph.app.validate import check_layout
from lcgraph.errors import PlanError
from lcgraph.ops import ring
from lcgraph.schedule import nccl
from lcgraph.schedule.actions import ScheduleSpec
from lcgraph.schedule.mesh import Coords
from lcgraph.schedule.p2p import add_p2p
from lcgraph.schedule.programs import build_programs

SEQ1F1B = ["parallel.schedule=seq1f1b", "parallel.seq_chunks=2", "parallel.chunk_split=uniform_comp"]
MQA = "model.num_key_value_heads=1"

TWO_RANKS = {  # label -> (overrides, sequences per step)
    "cp=2": (["parallel.cp=2", "parallel.microbatches=2"], 2),
    "cp=2 recompute=full (the rerun runs the ring again)": (
        ["parallel.cp=2", "parallel.microbatches=2", "train.recompute=full"],
        2,
    ),
    "cp=2 seq1f1b 2 chunks on one stage, keep_attention (the rerun reuses the ring's output)": (
        ["parallel.cp=2", "parallel.microbatches=2", *SEQ1F1B, "train.recompute=keep_attention"],
        2,
    ),
}
FOUR_RANKS = {  # label -> (overrides, sequences per step); the tiny model has 4 heads and 2 K/V heads
    "cp=4 (K/V heads fewer than cp)": (["parallel.cp=4", "parallel.microbatches=2"], 2),
    "sp=2 x cp=2": (["parallel.sp=2", "parallel.cp=2", "parallel.microbatches=2"], 2),
    "sp=2 x cp=2, one K/V head": (["parallel.sp=2", "parallel.cp=2", "parallel.microbatches=2", MQA], 2),
    "pp=2 x cp=2 seq1f1b, 2 uneven chunks": (
        ["parallel.pp=2", "parallel.cp=2", "parallel.microbatches=2", *SEQ1F1B],
        2,
    ),
    "dp=2 x cp=2, distributed optimizer": (["parallel.dp=2", "parallel.cp=2", "parallel.microbatches=1"], 2),
}


def _model(overrides: list[str]) -> tuple[str, ...]:
    return tuple(o for o in overrides if o.startswith("model."))


def _check_all(layouts: dict, world: int) -> list:
    labels = list(layouts)
    results = train_spawned([run_cfg(*layouts[k][0]) for k in labels], world=world)
    failed = []
    for label, result in zip(labels, results):
        overrides, batch = layouts[label]
        ref = hf_reference(run_cfg(*_model(overrides)), batch)
        try:
            check(result["losses"], result["params"], ref, rtol=FP32, label=label, grad_norms=result["grad_norms"])
        except AssertionError as exc:
            failed.append(str(exc).splitlines()[0])
    assert not failed, "\n".join(failed)
    return results


def test_two_rank_ring_layouts_match_hf_eager():
    _check_all(TWO_RANKS, world=2)


def test_four_rank_ring_layouts_match_hf_eager():
    results = _check_all(FOUR_RANKS, world=4)
    zero = results[list(FOUR_RANKS).index("dp=2 x cp=2, distributed optimizer")]
    per_rank = [rank["optimizer_state_bytes"] for rank in zero["ranks"]]
    assert len(set(per_rank)) == 1  # the dp x cp replicas split the optimizer state evenly


def test_zigzag_shards_cover_the_chunk_once_with_mirrored_pieces():
    """cp rank r holds pieces r and 2cp-1-r of each chunk; sp ranks split that; together every position once."""
    length, cp, sp = 48, 3, 2
    held = []
    for rank in range(cp * sp):
        c = Coords.of(rank, 1, 1, sp, cp)
        held.append(shard_positions(length, c))
    assert torch.equal(torch.cat(held).sort().values, torch.arange(length))
    c0 = torch.cat([shard_positions(length, Coords.of(r, 1, 1, sp, cp)) for r in range(sp)])  # cp rank 0
    assert torch.equal(c0, torch.cat([torch.arange(0, 8), torch.arange(40, 48)]))


def test_layouts_the_ring_cannot_split_are_refused_in_one_line():
    def layout(*overrides):
        cfg = compose(*overrides)
        check_layout(cfg, 4, 4, 2)

    layout("parallel.cp=2", "data.seq_len=64")
    layout("parallel.cp=2", "parallel.pp=2", *SEQ1F1B, "data.seq_len=64")
    with pytest.raises(PlanError, match=r"data.seq_len=60 does not split into 2 x parallel.cp=4 balanced chunks"):
        layout("parallel.cp=4", "data.seq_len=60")
    with pytest.raises(PlanError, match=r"balanced chunks per Seq1F1B chunk \(parallel.seq_chunks=2"):
        layout("parallel.cp=2", "parallel.sp=2", "parallel.pp=2", *SEQ1F1B[:2], "data.seq_len=40")
    with pytest.raises(PlanError, match="ring attention has no document mask"):
        from lcgraph.graph.ring import check_ring

        check_ring(compose("parallel.cp=2").parallel, 64, cross_document_attention=False)
    assert ring.cp_size() == 1  # nothing above touched a process group


@pytest.mark.parametrize("name,pp,m,k", [("seq1f1b", 2, 2, 2), ("seq1f1b", 4, 4, 4), ("1f1b", 2, 4, 1)])
@pytest.mark.parametrize("cp", [2, 4])
def test_the_nccl_model_replays_the_ring_steps_inside_every_forward_and_backward(name, pp, m, k, cp):
    """cp - 1 ring steps in each F and cp in each B (the last takes dK/dV home), each a p2p group with both cp
    neighbours on the ring's own communicator; with pipeline p2p, Ulysses and ZeRO they complete under NCCL's rules."""
    spec = ScheduleSpec(name, pp, m, k)
    programs = add_p2p(build_programs(spec), spec)
    comms = nccl.Comms(dp=1, sp=2, cp=cp)
    builder = nccl._Builder(programs, spec, comms, "pair")
    for rank in range(builder.world):
        builder.expand(rank)
    assert builder.world == pp * 2 * cp
    units = sum(1 for a in programs[0] if a.kind in ("F", "B"))
    ring_steps = [kr for kr in builder.kernels if kr.rank == 0 and kr.label.startswith("ring step")]
    assert len(ring_steps) == units // 2 * (cp - 1) + units // 2 * cp
    assert {op.peer for kr in ring_steps for op in kr.ops} == {2, 2 * (cp - 1)}  # cp neighbours: sp=2 apart
    nccl.check(programs, spec, comms)
    nccl.check(programs, spec, comms, streams="rank")
