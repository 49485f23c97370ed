"""Ring attention (parallel.cp) trained on CPU gloo ranks against HF eager LLaMA + torch AdamW in fp32: alone,
under Ulysses (sp x cp, K/V heads fewer than sp x cp), with data parallelism and the distributed optimizer
(dp x cp share optimizer state), and on a Seq1F1B pipeline (pp x cp, the relayed prefix passed around the ring).

The reference is test_reference's: nothing of lcgraph's forward, backward, loss or optimizer is used for it."""

from __future__ import annotations

import pytest
import torch
from test_reference import FP32, check, hf_reference, run_cfg

from lcgraph.app.testing import compose, train_spawned
from lcgraph.app.validate import check_layout
from lcgraph.errors import PlanError
from lcgraph.graph.ring import balanced_pairs, piece_work, shard_positions
from lcgraph.planner.costs import CostModel, Layout
from lcgraph.planner.graph_costs import GraphCosts
from lcgraph.planner.profile import load_profile
from lcgraph.planner.ring import RingShape, ring_times
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


def test_layouts_too_short_for_the_ring_are_refused_in_one_line_and_others_padded():
    def layout(*overrides):
        cfg = compose(*overrides)
        check_layout(cfg, 4, 4, 2)

    layout("parallel.cp=2", "data.seq_len=64")
    layout("parallel.cp=2", "parallel.pp=2", *SEQ1F1B, "data.seq_len=64")
    layout("parallel.cp=4", "data.seq_len=60")  # padded to 64 (graph/ring.py: padded_length)
    with pytest.raises(PlanError, match=r"data.seq_len=7 is too short for 2 x parallel.cp=4 zigzag pieces"):
        layout("parallel.cp=4", "data.seq_len=7")
    with pytest.raises(PlanError, match=r"zigzag pieces per Seq1F1B chunk \(parallel.seq_chunks=2\) of parallel.sp=2"):
        layout("parallel.cp=2", "parallel.sp=2", "parallel.pp=2", *SEQ1F1B[:2], "data.seq_len=12")
    layout("parallel.cp=2", "data.seq_len=64", "data.cross_document_attention=false")  # packed documents too
    with pytest.raises(PlanError, match="train.attention=efficient with parallel.cp=2"):
        layout("parallel.cp=2", "data.seq_len=64", "train.attention=efficient")
    layout("parallel.cp=1", "data.seq_len=64", "train.attention=efficient")  # without the ring it is fine


def test_the_ring_never_runs_the_efficient_kernel():
    """Its backward from the ring's merged output and LSE broke on an H200: auto's fallback to it runs math in
    the ring, and asked for by name it is refused."""
    from lcgraph.ops import attention, ring

    q = torch.zeros(1, 2, 4, 8)
    try:
        attention.set_backend("efficient")
        with pytest.raises(RuntimeError, match="does not run the efficient kernel"):
            ring.ring_backend(q)
        attention.set_backend("auto")
        assert ring.ring_backend(q) == attention.resolve_backend(q) == "math"  # CPU: auto is math anyway
    finally:
        attention.set_backend("auto")


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


# --- the planner ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("cp,length,prefix", [(2, 64, 0), (4, 256, 0), (4, 256, 512), (3, 96, 48)])
def test_ring_steps_cover_one_cp_share_of_the_causal_pairs(cp, length, prefix):
    """Step 0 (causal block + its prefix) and cp - 1 equal later steps hold exactly 1/cp of the chunk's causal
    pairs and of its prefix pairs: the zigzag balance the planner charges every rank."""
    shape = RingShape(cp, length, prefix)
    pairs = shape.diag_pairs() + shape.prefix_pairs() + (cp - 1) * shape.step_pairs()
    assert pairs == pytest.approx((length * (length + 1) / 2 + length * prefix) / cp)


def test_ring_p2p_hides_behind_compute_until_a_send_outlasts_a_step():
    shape = RingShape(4, 256, 0)
    rate = lambda kind, sq, sk: 1.0
    slow = ring_times(shape, 1.0, payload_bytes=10.0, dtype_bytes=2, rate=rate, link_bw=1e9, backward=False)
    assert slow["ring_p2p"] == 0.0  # every send hides behind its step's blocks
    step = shape.step_pairs()
    send = 4 * step  # each send lasts four later steps
    fast = ring_times(shape, 1.0, payload_bytes=send, dtype_bytes=2, rate=rate, link_bw=1.0, backward=False)
    # forward: steps 0..2 each wait for their send, the last step computes alone
    assert fast["ring_p2p"] == pytest.approx(3 * send - (shape.diag_pairs() + 2 * step))
    back = ring_times(shape, 1.0, payload_bytes=send, dtype_bytes=2, rate=rate, link_bw=1.0, backward=True)
    grads = 2 * send  # fp32 accumulators of a bf16 payload
    sends = send + 2 * (send + grads) + grads + grads  # the last send (accumulators home) overlaps nothing
    assert back["ring_p2p"] == pytest.approx(sends - (shape.diag_pairs() + 3 * step))


def test_planned_cp_divides_per_rank_work_and_shards_optimizer_state(tiny_graph):
    one = _cost(tiny_graph, [4096])
    cp2 = _cost(tiny_graph, [4096], cp=2)
    assert cp2.layout.gpus == 2 * one.layout.gpus and cp2.layout.replicas == 2
    parts1, parts2 = one.compute_parts(0, 4096, 0), cp2.compute_parts(0, 4096, 0)
    assert parts2["matmul"] == pytest.approx(parts1["matmul"] / 2)
    assert parts2["attention_diag"] + parts2["attention_prefix"] < parts1["attention_diag"]  # 1/cp of the pairs
    assert parts2["ring_p2p"] >= 0.0 and "ring_p2p" not in parts1
    assert cp2.unit_activations(0, 0)[0] < one.unit_activations(0, 0)[0] / 2 + cp2.ring_transient(0)
    assert cp2.stage_memory(0).optimizer == pytest.approx(one.stage_memory(0).optimizer / 2)
    assert cp2.ring_transient(0) > 0 == one.ring_transient(0)
    assert "ring_p2p" in cp2.backward_parts(0, 0)


@pytest.fixture(scope="module")
def tiny_graph():
    from transformers import LlamaConfig

    from lcgraph.graph.capture import capture

    shape = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4)
    return GraphCosts.from_captured(capture(LlamaConfig(**shape, num_key_value_heads=2)), "bf16")


def _cost(graph, chunks, **layout):
    return CostModel(graph, load_profile("h100"), Layout(**{"pp": 2, **layout}), [2, 2], chunks)


@pytest.mark.slow
def test_llama70b_1m_80gb_recipe_fits_an_h100_where_the_h200_layout_does_not(tmp_path):
    """The 80 GB recipe (pp=8 x cp=2 x sp=8) plans within an H100's 80 GB, captured on meta, no weights; the H200
    recipe's layout (no ring) on an H100 does not fit, whatever it recomputes."""
    import json
    import subprocess
    import sys

    def plan(*overrides: str) -> dict:
        out = tmp_path / str(len(list(tmp_path.iterdir())))
        done = subprocess.run(
            [
                sys.executable,
                "-m",
                "lcgraph.app.plan_cli",
                *overrides,
                "+plan.alternatives=false",
                f"hydra.run.dir={out}",
            ],
            capture_output=True,
            text=True,
            timeout=900,
        )
        assert done.returncode == 0, done.stderr[-2000:]
        return json.loads((out / "plan.json").read_text())

    ring_plan = plan("+recipe=llama70b_1m_80gb", "+plan.device=h100")
    assert ring_plan["layout"]["gpus"] == 128 and ring_plan["layout"]["cp"] == 2 and ring_plan["summary"]["fits"]
    no_ring = plan("+recipe=llama70b_1m", "+plan.device=h100", "train.recompute=full", "train.recompute_layers=1")
    assert not no_ring["summary"]["fits"]


def test_ring_pieces_under_a_mask_are_paired_by_the_work_it_leaves():
    """Each piece's work is the pairs a dense document mask keeps for its queries (counted element by element);
    causal work rising along the chunk pairs as the zigzag, and a mask that leaves the middle pieces the most work
    pairs them otherwise, the heaviest pair lighter than the zigzag's."""

    torch.manual_seed(0)
    docs = torch.cumsum(torch.rand(2, 48) < 0.15, dim=1)  # two rows of random documents
    for offset, length, cp in [(0, 48, 2), (16, 32, 4), (8, 24, 3)]:
        n = length // (2 * cp)
        dense = [
            sum(int(((docs[b, : t + 1] == docs[b, t])).sum()) for b in range(2) for t in range(offset + i * n, offset + (i + 1) * n))
            for i in range(2 * cp)
        ]  # fmt: skip
        assert piece_work(docs, offset, length, cp) == dense
    causal = piece_work(torch.zeros(1, 32, dtype=torch.long), 0, 32, 2)
    assert balanced_pairs(causal) == ((0, 3), (1, 2))  # the zigzag
    one_long_then_single_tokens = torch.tensor([[0] * 20 + list(range(1, 13))])
    work = piece_work(one_long_then_single_tokens, 0, 32, 2)
    assert work == [36, 100, 78, 8]
    pairs = balanced_pairs(work)
    assert pairs == ((0, 2), (1, 3))
    assert max(work[a] + work[b] for a, b in pairs) == 114 < max(work[0] + work[3], work[1] + work[2])
