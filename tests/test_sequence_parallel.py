"""Ulysses sequence parallelism and the distributed optimizer, alone and composed with pipeline stages and Seq1F1B.

A step's global batch is dp x microbatches sequences, so every layout is compared with the single-process
run over the same sequences (dp=2, m=2 against m=4). The model has 4 heads and 2 kv heads, so sp=4
exercises K/V head replication.
"""

import pytest
import torch

from lcgraph.app.testing import assert_close_run, compose, train_local, train_spawned
from lcgraph.errors import PlanError
from lcgraph.graph import passes
from lcgraph.runtime import optimizer as zero

M = 2
LAYOUTS = {  # world size -> (pp, sp, dp) layouts
    2: [(1, 2, 1)],
    4: [(1, 4, 1), (2, 2, 1), (1, 2, 2)],
    8: [(2, 2, 2)],
}


def layout(pp, sp, dp, *extra):
    schedule = (
        ["parallel.schedule=seq1f1b", "parallel.seq_chunks=2", "parallel.chunk_split=uniform_comp"] if pp > 1 else []
    )
    return compose(
        f"parallel.pp={pp}",
        f"parallel.sp={sp}",
        f"parallel.dp={dp}",
        f"parallel.microbatches={M}",
        "parallel.bucket_mb=0.05",
        *schedule,
        *extra,
    )


@pytest.fixture(scope="module")
def references():
    return {dp: train_local(compose(f"parallel.microbatches={M * dp}")) for dp in (1, 2)}


@pytest.mark.parametrize("world", sorted(LAYOUTS))
def test_ulysses_distributed_optimizer_layouts_match_single_process(world, references):
    layouts = LAYOUTS[world]
    results = train_spawned([layout(*lay) for lay in layouts], world=world)
    for (pp, sp, dp), result in zip(layouts, results):
        ref_losses, ref_params, ref_extra = references[dp]
        assert_close_run(result["losses"], result["params"], ref_losses, ref_params, label=f"pp={pp} sp={sp} dp={dp}")
        # distributed optimizer: the dp*sp replicas of a stage split its optimizer state evenly, and all ranks together
        # hold one unsharded copy (padding aside): each rank keeps 1/(dp*sp) of its stage's state
        per_rank = [rank["optimizer_state_bytes"] for rank in result["ranks"]]
        assert sum(per_rank) == pytest.approx(ref_extra["optimizer_state_bytes"], rel=0.05)
        for stage in range(pp):
            replicas = per_rank[stage * dp * sp : (stage + 1) * dp * sp]
            assert len(set(replicas)) == 1, replicas
        # the reduce-scatters are program actions, the first issued while the step's last backward runs
        for rank in result["ranks"]:
            assert any(t.startswith("RS") for t in rank["program"]) and any(t.startswith("AG") for t in rank["program"])
            issues = [t for what, _, _, t in rank["events"] if what == "rs_issue"]
            (backward_end,) = [t for what, _, _, t in rank["events"] if what == "backward_end"]
            assert issues and min(issues) < backward_end
            # each bucket's all-gather (issued at the step before's end) is waited once, by its graph node
            waits = [b for what, _, b, _ in rank["events"] if what == "ag_wait"]
            assert sorted(waits) == sorted(int(t[2:]) for t in rank["program"] if t.startswith("AG"))
            # the records hold the last step only (a long run must not grow them)
            actions = [e for e in rank["timeline"] if not e[0].startswith("wait ")]  # a receive's wait: its own entry
            assert len(actions) <= len(rank["program"])
            assert min(start for _, start, _ in rank["timeline"]) < min(t for *_, t in rank["events"])


def test_kv_heads_fewer_than_sp_are_replicated_and_bad_layouts_are_refused():
    cfg = compose("parallel.sp=4").model
    from lcgraph.runtime.model import build_config

    config = build_config(cfg)
    passes.check_ulysses(config, 4)  # 4 heads, 2 kv heads: K/V replicated to 4
    with pytest.raises(PlanError, match="sp=3 must divide num_attention_heads=4"):
        passes.check_ulysses(config, 3)
    with pytest.raises(PlanError, match="sp=6 and num_key_value_heads=4"):
        passes.check_ulysses(_heads(12, 4), 6)  # neither divides the other


def _heads(h, kv):
    class C:
        num_attention_heads, num_key_value_heads = h, kv

    return C()


def test_all_to_all_is_inserted_around_every_attention():
    from lcgraph.graph.capture import capture
    from lcgraph.ops.collectives import heads_to_seq, seq_to_heads
    from lcgraph.runtime.model import build_config

    captured = capture(build_config(compose().model))
    (stage,) = passes.partition(captured, [4])
    stage = passes.ulysses(stage, 4)
    targets = [n.target for n in stage.gm.graph.nodes]
    assert targets.count(seq_to_heads) == 3 * 4 and targets.count(heads_to_seq) == 4
    assert targets.count(torch.repeat_interleave) == 2 * 4  # kv heads 2 < sp 4


def test_gather_waits_come_before_the_first_read_of_each_buckets_parameters():
    from lcgraph.graph.capture import capture
    from lcgraph.runtime.model import build_config

    captured = capture(build_config(compose().model))
    (stage,) = passes.partition(captured, [4])
    names = stage.param_names.values()
    bucket_of = {n: int(n.split(".")[2]) if ".layers." in n else 9 for n in names}  # a bucket per layer + rest

    def wait(index):
        pass

    assert zero.gather_waits(stage, bucket_of, wait) == {0, 1, 2, 3, 9}
    nodes = list(stage.gm.graph.nodes)
    waits = {n.args[0]: i for i, n in enumerate(nodes) if n.target is wait}
    assert sorted(waits) == [0, 1, 2, 3, 9]  # one wait per bucket
    assert all(nodes[i].meta["lcgraph"].role == "all_gather_wait" for i in waits.values())
    for ph, name in stage.param_names.items():
        first_read = min(nodes.index(u) for u in next(n for n in nodes if n.name == ph).users)
        assert waits[bucket_of[name]] < first_read, name
    assert waits[0] < waits[1] < waits[2] < waits[3]  # in the order the forward reads the layers
