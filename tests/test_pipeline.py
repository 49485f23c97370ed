"""Pipeline stages and Seq1F1B: every schedule on real gloo ranks matches the single-process run.

One launch per pipeline width runs the whole grid of schedules x micro-batch counts (process start-up
dominates on 2 cores); the single-process references run in the test process.
"""

import pytest
import torch

from lcgraph.app.testing import assert_close_run, compose, train_local, train_spawned
from lcgraph.errors import PlanError
from lcgraph.graph import passes
from lcgraph.graph.capture import capture
from lcgraph.runtime.model import build_config

SCHEDULES = [
    ("gpipe", 1, "even"),
    ("1f1b", 1, "even"),
    ("seq1f1b", 2, "even"),
    ("seq1f1b", 2, "uniform_comp"),
    ("seq1f1b", 4, "even"),
    ("seq1f1b", 4, "uniform_comp"),
]
MICROBATCHES = (1, 2, 4)


def layout(pp, schedule, k, split, m, *extra):
    return compose(
        f"parallel.pp={pp}",
        f"parallel.schedule={schedule}",
        f"parallel.seq_chunks={k}",
        f"parallel.chunk_split={split}",
        f"parallel.microbatches={m}",
        *extra,
    )


@pytest.fixture(scope="module")
def references():
    return {m: train_local(compose(f"parallel.microbatches={m}")) for m in MICROBATCHES}


# pp=2 runs a Latin cover of the grid: each schedule with two of the three micro-batch counts (m < pp, = pp,
# > pp: where 1F1B-family warm-up and cool-down differ), each count with four schedules. pp=4 runs a cover
# too (each schedule; m < pp and m = pp for the 1F1B family): CI's two cores pay 6-8 s per layout.
GRIDS = {
    2: [(sch, m) for i, sch in enumerate(SCHEDULES) for m in MICROBATCHES if m != MICROBATCHES[i % 3]],
    4: [
        (SCHEDULES[0], 4),
        (SCHEDULES[1], 2),
        (SCHEDULES[1], 4),
        (SCHEDULES[2], 1),
        (SCHEDULES[3], 4),
        (SCHEDULES[4], 4),
        (SCHEDULES[5], 2),
    ],
}


@pytest.mark.parametrize("pp", sorted(GRIDS))
def test_every_schedule_matches_single_process(pp, references):
    grid = GRIDS[pp]
    results = train_spawned([layout(pp, s, k, split, m) for (s, k, split), m in grid], world=pp)
    for ((schedule, k, split), m), result in zip(grid, results):
        ref_losses, ref_params, _ = references[m]
        # 3e-5: a chunk's attention merges its prefix and diagonal blocks through the LSE, another fp32
        # summation order than one causal block (1.4e-5 seen on o_proj; a wrong relay is off by ~1e-1)
        assert_close_run(
            result["losses"],
            result["params"],
            ref_losses,
            ref_params,
            rtol=3e-5,
            label=f"pp={pp} {schedule} k={k} {split} m={m}",
        )


def test_seq1f1b_stage0_activation_peak_follows_p_plus_k_minus_1_over_k():
    """Peak live activations on stage 0: (p+k-1)/k micro-batches for seq1f1b against p for 1f1b."""
    p, k, m = 2, 4, 4
    cfgs = [layout(p, "1f1b", 1, "even", 1), layout(p, "1f1b", 1, "even", m), layout(p, "seq1f1b", k, "even", m)]
    one_mb, onef1b, seq = (r["ranks"][0]["activation_peaks"][0] for r in train_spawned(cfgs, world=p))
    assert onef1b == pytest.approx(p * one_mb, rel=0.15)
    assert seq == pytest.approx((p + k - 1) / k * one_mb, rel=0.15)
    assert seq < onef1b


def test_partition_balances_layers_and_stages_hold_only_their_parameters():
    captured = capture(build_config(compose("model.num_hidden_layers=6").model))
    costs, first, last = passes.layer_costs(captured, 64)
    counts = passes.balance_layers(costs, first, last, 3)
    assert sum(counts) == 6 and len(counts) == 3
    stages = passes.partition(captured, counts)
    names = [set(s.param_names.values()) for s in stages]
    assert "model.embed_tokens.weight" in names[0] and "lm_head.weight" in names[-1]
    assert all("model.layers.0.mlp.up_proj.weight" not in n for n in names[1:])
    assert [s.inputs for s in stages] == [
        ["input_ids", "position_ids"],
        ["position_ids", "hidden_in"],
        ["position_ids", "labels", "hidden_in"],
    ]


def test_partition_refuses_more_stages_than_layers():
    with pytest.raises(PlanError, match="5 stages but the model has 4 layers"):
        passes.balance_layers([1.0] * 4, 0.0, 0.0, 5)


def test_uniform_comp_chunks_come_from_the_graph_costs():
    from lcgraph.app.testing import job_of

    cfg = compose(
        "parallel.pp=1",
        "parallel.schedule=seq1f1b",
        "parallel.seq_chunks=4",
        "parallel.chunk_split=uniform_comp",
        "data.seq_len=256",
    )
    job = job_of(cfg, "/tmp/lcgraph-unused")
    lengths = job.chunk_lengths
    assert sum(lengths) == 256 and lengths == sorted(lengths, reverse=True) and lengths[0] > lengths[-1]


def test_kv_relay_chunked_attention_equals_full_attention_forward_and_backward():
    """Three uneven chunks over one K/V buffer (no prefix concatenation) equal unchunked attention, values
    and gradients; the relay copies each chunk's K/V once and frees its buffers after chunk 0's backward."""
    from lcgraph.ops.attention import attention_fn
    from lcgraph.ops.relay import RelayContext, relay_attention

    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 4, 24, 8, dtype=torch.float64, requires_grad=True) for _ in range(3))
    k2, v2 = k[:, :2].detach().requires_grad_(True), v[:, :2].detach().requires_grad_(True)  # GQA: 2 kv heads
    full = attention_fn(q, k2, v2, 0.3)
    grad = torch.randn_like(full)
    full.backward(grad)
    bounds = [0, 11, 18, 24]
    ctx = RelayContext([11, 7, 6])
    RelayContext.current = ctx
    leaves, outs = [], []
    for c in range(3):
        sl = slice(bounds[c], bounds[c + 1])
        qc, kc, vc = (t.detach()[:, :, sl].clone().requires_grad_(True) for t in (q, k2, v2))
        ctx.unit = (0, c)
        outs.append(relay_attention(qc, kc, vc, 0.3, 0))
        leaves.append((qc, kc, vc))
    for c in reversed(range(3)):  # last chunk first: it relays dK/dV to the earlier ones
        outs[c].backward(grad[:, :, bounds[c] : bounds[c + 1]])
    RelayContext.current = None
    torch.testing.assert_close(torch.cat(outs, 2), full)
    for i, ref in enumerate((q.grad, k2.grad, v2.grad)):
        torch.testing.assert_close(torch.cat([leaf[i].grad for leaf in leaves], 2), ref)
    assert not ctx.caches  # freed after chunk 0's backward
    assert ctx.copied_bytes == 2 * k2.numel() * 8  # K and V of every position, written once (fp64)
    assert ctx.accumulated_bytes == 2 * (11 + 18) * 2 * 8 * 8  # dK/dV of the prefixes of chunks 1 and 2


def test_interleaved_1f1b_with_two_stages_per_rank_matches_single_process(references):
    cfgs = [
        compose(
            "parallel.pp=2",
            "parallel.virtual_stages=2",
            "parallel.schedule=interleaved_1f1b",
            f"parallel.microbatches={m}",
        )
        for m in (2, 4)
    ]
    for m, result in zip((2, 4), train_spawned(cfgs, world=2)):
        assert result["ranks"][0]["program"].count("F0.0") == 2  # rank 0 runs stages 0 and 2
        assert_close_run(
            result["losses"], result["params"], references[m][0], references[m][1], label=f"interleaved v=2 m={m}"
        )


@pytest.mark.parametrize(
    "chunks,mode,group,kept",
    [
        (1, "full", 1, -1),
        (1, "keep_attention", 1, -1),
        (4, "none", 1, -1),
        (4, "full", 1, -1),
        (4, "keep_attention", 1, -1),
        (4, "full", 3, -1),
        (4, "keep_attention", 2, 1),
    ],
)
def test_recompute_modes_match_single_process_and_run_attention_kernels_once(chunks, mode, group, kept, references):
    """train.recompute=full|keep_attention: decoder layers checkpointed in segments, rerun in their backward (with the KV
    relay when chunked), same losses and parameters as recompute=none. Attention's kernel forward runs once per
    layer, unit and step (twice with full, which keeps nothing, and for the layers past
    train.keep_attention_layers), its backward once."""
    from lcgraph.ops.attention import KERNEL_CALLS

    m, steps, layers = 2, 5, 4
    extra = ["parallel.schedule=seq1f1b", f"parallel.seq_chunks={chunks}"] if chunks > 1 else []
    KERNEL_CALLS.clear()
    extra += [f"train.recompute_layers={group}", f"train.keep_attention_layers={kept}"]  # group 3: segments 3 + 1
    losses, params, info = train_local(compose(f"parallel.microbatches={m}", f"train.recompute={mode}", *extra))
    assert_close_run(losses, params, references[m][0], references[m][1], label=f"recompute={mode} k={chunks}")
    runs = steps * m * chunks * layers
    rerun = {"none": 0, "full": layers, "keep_attention": layers - kept if kept >= 0 else 0}[mode]
    assert dict(KERNEL_CALLS) == {"forward": runs + steps * m * chunks * rerun, "backward": runs}
    peak, ref_peak = info["activation_peaks"][0], references[m][2]["activation_peaks"][0]
    if mode != "none":  # beyond each layer's input and the head's (~7% of all at this tiny width), only the
        # relay's buffers and the kept attention outputs stay
        assert peak <= 0.1 * ref_peak + info["relay_peaks"][0]
