"""Planner: simulator vs the closed-form bubbles of GPipe, 1F1B and Seq1F1B (arXiv 2406.03488), cost and memory model, lcgraph-plan end to end."""

import json
import os
import subprocess
import sys

import pytest

from lcgraph.observability.timeline import from_measured, trace_events, write_timeline
from lcgraph.planner.costs import CostModel, DeviceProfile, Layout, load_profile, profile_names
from lcgraph.planner.graph_costs import GraphCosts
from lcgraph.planner.simulator import UniformCosts, simulate
from lcgraph.schedule import nccl
from lcgraph.schedule.actions import ScheduleSpec
from lcgraph.schedule.p2p import add_p2p
from lcgraph.schedule.programs import build_programs
from lcgraph.schedule.text import parse_programs
from lcgraph.schedule.validator import bubble_fraction, validate

TINY_SHAPE = dict(
    vocab_size=512,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
)


def programs(name, p, m, k=1, v=1, p2p=True):
    spec = ScheduleSpec(name, p, m, k, v)
    progs = build_programs(spec)
    return (add_p2p(progs, spec) if p2p else progs), spec


@pytest.fixture(scope="module")
def tiny_graph():
    from transformers import LlamaConfig

    from lcgraph.graph.capture import capture

    return GraphCosts.from_captured(capture(LlamaConfig(**TINY_SHAPE)), "bf16")


# --- simulator vs closed forms (equal-cost chunks, free p2p) ----------------------------------------------


@pytest.mark.parametrize("p,m,k", [(2, 4, 2), (4, 8, 2), (4, 8, 4), (3, 5, 4), (4, 4, 8)])
def test_seq1f1b_bubble_and_stage0_activations_match_closed_form(p, m, k):
    progs, spec = programs("seq1f1b", p, m, k)
    sim = simulate(progs, spec, UniformCosts(f=1.0, b=2.3, k=k))
    assert sim.bubble == pytest.approx((p - 1) / (k * m + p - 1))
    assert sim.peaks[0].activations == pytest.approx((p + k - 1) / k)  # in units of one micro-batch


@pytest.mark.parametrize("p,m", [(2, 4), (4, 8), (4, 4), (3, 7)])
def test_1f1b_and_gpipe_bubble_and_activations_match_closed_form(p, m):
    for name, stage0 in (("1f1b", p), ("gpipe", m)):
        progs, spec = programs(name, p, m)
        sim = simulate(progs, spec, UniformCosts(f=1.0, b=2.0))
        assert sim.bubble == pytest.approx((p - 1) / (m + p - 1)), name
        assert sim.peaks[0].activations == pytest.approx(stage0), name


def test_interleaved_bubble_and_rank0_memory_match_closed_form():
    p, m, v = 4, 8, 2
    progs, spec = programs("interleaved_1f1b", p, m, v=v)
    sim = simulate(progs, spec, UniformCosts(f=1.0, b=2.0, k=v))  # each stage holds 1/v of a micro-batch
    assert sim.bubble == pytest.approx((p - 1) / (v * m + p - 1))
    assert sim.rank_peak[0] == pytest.approx(p * (1 + (p - 1) / (p * v)))


def test_seq1f1b_halves_stage0_activations_against_1f1b_at_same_bubble_or_better():
    p, m, k = 4, 8, 4
    one, spec1 = programs("1f1b", p, m)
    seq, speck = programs("seq1f1b", p, m, k)
    a = simulate(one, spec1, UniformCosts(k=1))
    b = simulate(seq, speck, UniformCosts(k=k))
    assert b.peaks[0].activations <= a.peaks[0].activations / 2
    assert b.bubble < a.bubble


def test_simulator_agrees_with_schedule_bubble_estimate_with_and_without_p2p():
    for name, p, m, k in (("seq1f1b", 3, 4, 2), ("1f1b", 4, 6, 1)):
        progs, spec = programs(name, p, m, k, p2p=False)
        expected = bubble_fraction(progs, spec, 1.0, 2.0)
        for prog in (progs, add_p2p(progs, spec)):
            assert simulate(prog, spec, UniformCosts(1.0, 2.0, k)).bubble == pytest.approx(expected)


class _SlowLinks(UniformCosts):
    def transfer(self, action):
        return 0.25


def test_transfers_delay_the_step_and_show_on_the_wire_lane():
    progs, spec = programs("1f1b", 3, 4)
    free = simulate(progs, spec, UniformCosts())
    slow = simulate(progs, spec, _SlowLinks())
    assert slow.step_time > free.step_time
    wire = [e for e in slow.timeline if e.name[0].islower()]
    assert wire and all(e.end - e.start >= 0.25 - 1e-12 for e in wire)


def test_timeline_respects_pipeline_and_chunk_dependencies():
    progs, spec = programs("seq1f1b", 3, 3, 3)
    sim = simulate(progs, spec, UniformCosts(1.0, 2.0, 3))
    at = {(e.rank, e.name): e for e in sim.timeline}
    for r in range(1, 3):
        assert at[(r, "F1.2")].start >= at[(r - 1, "F1.2")].end  # upstream stage first
    assert at[(0, "F1.1")].start >= at[(0, "F1.0")].end  # K/V of the earlier chunk
    assert at[(0, "B1.0")].start >= at[(0, "B1.1")].end  # dK/dV relayed from the later chunk


def test_kv_relay_doubles_while_a_micro_batch_runs_its_backward():
    progs, spec = programs("seq1f1b", 1, 1, 4)
    sim = simulate(progs, spec, UniformCosts(k=4, activations=0.0, kv=4.0))
    assert sim.peaks[0].kv_relay == pytest.approx(6.0)  # after B of chunk 3: K/V + dK/dV of chunks 0..2


# --- profiles and cost model -------------------------------------------------------------------------------


def test_attention_rate_interpolates_linearly_in_log_seq_and_picks_the_nearest_head_dim():
    """Behaviour on a hand-made profile (round numbers), not the shipped values read back."""
    prof = DeviceProfile.from_dict(
        {
            "name": "toy",
            "memory_bytes": 1e9,
            "matmul_flops": 100.0,
            "fp32_flops": 7.0,
            "attention_flops": {"128": [[1024, 10.0], [4096, 30.0]], "64": [[1024, 1.0], [4096, 3.0]]},
            "memory_bandwidth": 1.0,
            "intra_node_bw": 1.0,
            "inter_node_bw": 1.0,
        }
    )
    assert prof.attention_rate(2048, 128) == pytest.approx(20.0)  # halfway in log2: 10 + (30 - 10) / 2
    assert prof.attention_rate(2048, 64) == pytest.approx(2.0)
    assert prof.attention_rate(1024 * 2**1.5, 128) == pytest.approx(25.0)  # three quarters of the way
    assert prof.attention_rate(16, 128) == 10.0 and prof.attention_rate(1 << 20, 128) == 30.0  # clamped at the ends
    assert prof.attention_rate(2048, 96) == pytest.approx(20.0)  # nearer 128 than 64 in log2
    assert prof.attention_rate(2048, 80) == pytest.approx(2.0)  # nearer 64 (in log2)
    assert prof.attention_rate(2048, 128, "fp32") == 7.0 and prof.matmul_rate("fp32") == 7.0
    assert prof.matmul_rate("bf16") == 100.0


def test_shipped_profiles_are_well_formed_and_round_trip():
    assert {"h100", "h200", "a100"} <= set(profile_names())
    for name in profile_names():
        prof = load_profile(name)
        assert DeviceProfile.from_dict(prof.to_dict()) == prof
        for table in prof.attention_flops.values():  # longer sequences never run attention much slower
            rates = [r for _, r in table]  # (measured rates dip a few % at the longest lengths)
            assert all(b >= 0.9 * a for a, b in zip(rates, rates[1:])), (name, rates)
            assert all(0 < r < 1e15 for r in rates)  # measured cuDNN attention can beat the square-matmul figure
        assert prof.inter_node_bw <= prof.intra_node_bw
    assert load_profile("h200").memory_bytes > load_profile("h100").memory_bytes
    with pytest.raises(ValueError, match="unknown keys"):
        DeviceProfile.from_dict({**load_profile("h100").to_dict(), "tflops": 1})
    with pytest.raises(FileNotFoundError, match="shipped profiles"):
        load_profile("tpu")


def test_graph_costs_reproduce_the_mfu_convention_and_parameter_count(tiny_graph):
    c = TINY_SHAPE
    h, f, L, V = c["hidden_size"], c["intermediate_size"], c["num_hidden_layers"], c["vocab_size"]
    kv_dim = h // c["num_attention_heads"] * c["num_key_value_heads"]
    per_layer = 2 * h * h + 2 * h * kv_dim + 3 * h * f
    n = L * per_layer + V * h  # matmul weights with the head, no embedding
    seq = 1000
    from transformers import LlamaConfig

    from lcgraph.planner.mfu import model_flops_per_token

    # 6N + 6LhS (lcgraph.planner.mfu), N read from the graph's linears: the same N the config gives the trainer
    assert tiny_graph.model_flops_per_token(seq) == pytest.approx(6 * n + 6 * L * h * seq)
    assert tiny_graph.model_flops_per_token(seq) == pytest.approx(model_flops_per_token(LlamaConfig(**c), seq))
    assert tiny_graph.total().params == n + V * h + (2 * L + 1) * h  # + embedding + norms
    assert tiny_graph.total().attention_layers == L
    assert tiny_graph.head_dim == h // c["num_attention_heads"]


def _cost(graph, chunks, **layout):
    return CostModel(graph, load_profile("h100"), Layout(**{"pp": 2, **layout}), [2, 2], chunks)


def test_zero_shards_optimizer_state_over_dp_times_sp(tiny_graph):
    one = _cost(tiny_graph, [1024], dp=1, sp=1, zero=True)
    sharded = _cost(tiny_graph, [1024], dp=2, sp=4, zero=True)
    assert sharded.stage_memory(0).optimizer == pytest.approx(one.stage_memory(0).optimizer / 8)
    assert (sharded.stage_memory(0).weights, sharded.stage_memory(0).grads) == (
        one.stage_memory(0).weights,
        one.stage_memory(0).grads,
    )


def test_an_activation_budget_plans_less_kept_per_unit_and_a_fitted_factor_wins(tiny_graph):
    """train.activation_budget < 1 (compiled): the profile's compiled_budget factor, else the compiled one scaled
    by the partition's measured ratio (LSEs and the loss's gradients are not scaled); eager plans are unchanged."""
    import dataclasses

    from lcgraph.planner.costs import BUDGET_SAVED_RATIO

    def kept(**layout):
        return _cost(tiny_graph, [1024], **layout)._kept(1, 1024)

    full, budget = kept(compiled=True), kept(compiled=True, activation_budget=0.9)
    assert full * BUDGET_SAVED_RATIO < budget < full * 0.9
    assert kept(compiled=False, activation_budget=0.9) == kept(compiled=False)
    fitted = _cost(tiny_graph, [1024], compiled=True, activation_budget=0.9)
    fitted.profile = dataclasses.replace(
        fitted.profile, saved_factor={"eager": 1.0, "compiled": 1.0, "compiled_budget": 0.1}
    )
    assert fitted._kept(1, 1024) < budget


@pytest.mark.parametrize("zero", [True, False])
def test_planned_optimizer_state_is_what_a_bf16_job_holds(zero, tmp_path):
    """The planner's optimizer bytes against the live state of a bf16 CPU job after one step: ZeRO's fp32
    masters and moments, or replicated AdamW's moments in the weights' dtype (lcgraph as it was charged 12 B)."""
    from lcgraph.app.testing import job_of, planned, run_config
    from lcgraph.planner.plan import build_plan

    overrides = ["parallel=single", "train.dtype=bf16", f"parallel.zero={str(zero).lower()}", "train.steps=1"]
    job = job_of(run_config(*overrides), tmp_path)
    job.run_step(0)
    live = sum(t.numel() * t.element_size() for t in job.optimizer.checkpoint_state().values())
    cost = build_plan(planned(*overrides, "+plan.alternatives=false")).main.cost
    assert sum(cost.stage_memory(s).optimizer for s in range(len(cost.stages))) == pytest.approx(live, rel=1e-3)


def test_sequence_parallel_and_chunks_divide_per_rank_work_and_memory(tiny_graph):
    one = _cost(tiny_graph, [4096])
    sp2 = _cost(tiny_graph, [4096], sp=2)
    parts1, parts2 = one.compute_parts(0, 4096, 0), sp2.compute_parts(0, 4096, 0)
    for part in ("matmul", "attention_diag", "traffic"):
        assert parts2[part] == pytest.approx(parts1[part] / 2)
    assert parts1["all_to_all"] == 0 < parts2["all_to_all"]
    assert sp2.unit_activations(0, 0)[0] == pytest.approx(one.unit_activations(0, 0)[0] / 2)
    # sp=4 > kv_heads=2: each rank holds a repeated K/V head, so K/V do not shrink below one head
    sp4 = _cost(tiny_graph, [4096], sp=4)
    assert sp4.unit_activations(0, 0)[0] > one.unit_activations(0, 0)[0] / 4
    chunked = _cost(tiny_graph, [2048, 2048])
    (act0, kv0), (act1, kv1) = chunked.unit_activations(0, 0), chunked.unit_activations(0, 1)
    assert kv0 > 0 and one.unit_activations(0, 0)[1] == 0  # K/V move to the relay column only with chunks
    assert kv1 == 0  # one preallocated buffer per micro-batch, charged to its first chunk
    assert act0 + act1 + kv0 == pytest.approx(one.unit_activations(0, 0)[0])
    # a later chunk attends its prefix: same tokens, more attention pairs, longer
    assert chunked.forward_time(0, 1) > chunked.forward_time(0, 0)
    assert chunked.backward_time(0, 0) > chunked.forward_time(0, 0)


def test_p2p_and_grad_sync_use_the_link_they_cross(tiny_graph):
    inside = _cost(tiny_graph, [4096], dp=2)  # pipeline neighbours 2 ranks apart: same node
    across = _cost(tiny_graph, [4096], dp=8)  # 8 ranks apart: next node
    assert across.p2p_time(0, 1, 0) == pytest.approx(inside.p2p_time(0, 1, 0) * 450 / 50)
    assert _cost(tiny_graph, [4096]).grad_sync_time(0) == 0.0
    assert across.grad_sync_time(0) > 0


# --- timeline files ----------------------------------------------------------------------------------------


def test_trace_json_is_valid_chrome_trace(tmp_path):
    progs, spec = programs("seq1f1b", 2, 2, 2)
    sim = simulate(progs, spec, _SlowLinks(k=2))
    written = write_timeline(sim.timeline, tmp_path, title="test")
    trace = json.loads((tmp_path / "timeline.json").read_text())
    spans = [e for e in trace["traceEvents"] if e["ph"] == "X"]
    assert {e["pid"] for e in spans} == {0, 1}
    assert all(e["dur"] >= 0 and {"name", "ts", "tid"} <= set(e) for e in spans)
    assert {e["tid"] for e in spans if e["name"].startswith(("sF", "sB"))} == {1}
    assert written[0].name == "timeline.json"


def test_measured_runtime_timeline_converts_to_the_same_format():
    measured = {
        0: [("F0.0", 100.0, 100.5), ("send", 100.5, 100.6)],
        1: [("recv", 100.2, 100.6), ("F0.0", 100.6, 101.0)],
    }
    events = from_measured(measured)
    assert min(e[2] for e in events) == 0.0
    assert (1, "F0.0", pytest.approx(0.6), pytest.approx(1.0)) in [tuple(e) for e in events]
    spans = [e for e in trace_events(events)["traceEvents"] if e["ph"] == "X"]
    assert sorted((e["pid"], e["tid"]) for e in spans) == [(0, 0), (0, 1), (1, 0), (1, 1)]


# --- lcgraph-plan end to end -------------------------------------------------------------------------------


def test_lcgraph_plan_writes_plan_json_and_programs(tmp_path):
    args = [
        "model.num_hidden_layers=4",
        "model.hidden_size=64",
        "model.intermediate_size=128",
        "model.num_attention_heads=4",
        "model.num_key_value_heads=2",
        "model.vocab_size=512",
        "parallel=seq1f1b",
        "data.seq_len=2048",
        "train.dtype=bf16",
        "+plan.device=a100",
        "+plan.chunks=[2,4]",
        f"hydra.run.dir={tmp_path}",
    ]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    done = subprocess.run(
        [sys.executable, "-m", "lcgraph.app.plan_cli", *args], capture_output=True, text=True, env=env, timeout=120
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "alternatives" in done.stdout and "seq1f1b k=4" in done.stdout
    plan = json.loads((tmp_path / "plan.json").read_text())
    assert plan["device"]["name"] == "a100"
    assert plan["layer_counts"] == [2, 2] and len(plan["stages"]) == 2
    assert len(plan["chunk_lengths"]) == 4 and sum(plan["chunk_lengths"]) == 2048
    assert [a["label"] for a in plan["alternatives"]][1:] == ["gpipe", "1f1b", "seq1f1b k=2", "seq1f1b k=4"]
    alt = {a["label"]: a for a in plan["alternatives"]}
    # behaviour, not read-back: GPipe and 1F1B idle equally ((p-1)/(m+p-1) for both), 1F1B holds fewer
    # micro-batches' activations, and more sequence chunks shrink the bubble
    assert alt["gpipe"]["bubble"] == pytest.approx(alt["1f1b"]["bubble"], rel=1e-6)
    assert alt["1f1b"]["peak_bytes"] <= alt["gpipe"]["peak_bytes"]
    assert alt["seq1f1b k=4"]["bubble"] < alt["seq1f1b k=2"]["bubble"] < alt["1f1b"]["bubble"]
    spec = ScheduleSpec("seq1f1b", 2, 2, 4)
    text = (tmp_path / "programs.txt").read_text()
    assert "[sF" in text  # p2p groups in brackets
    validate(parse_programs(text), spec)
    nccl.check(parse_programs(text), spec)
    json.loads((tmp_path / "timeline.json").read_text())
    pictures = {p.stem for p in (tmp_path / "graphs").glob("*.svg")}  # the graph after every pass, per stage
    assert {"02_partition_stage0", "02_partition_stage1"} <= pictures and any("kv_relay" in p for p in pictures)


def test_plan_fits_only_when_the_peak_is_within_the_devices_memory(tmp_path):
    """`fits` follows the device's memory: the same plan on a profile with room for exactly its peak fits,
    one byte less does not; the stage weights are the hand-counted parameters x 2 bytes (bf16)."""
    from lcgraph.app.testing import planned
    from lcgraph.planner.plan import build_plan

    def plan_on(memory):
        toy = {**load_profile("h100").to_dict(), "name": "toy", "memory_bytes": memory}
        (tmp_path / "toy.json").write_text(json.dumps(toy))
        return build_plan(
            planned(
                "parallel.pp=2",
                "data.seq_len=1024",
                "train.dtype=bf16",
                f"+plan.device={tmp_path / 'toy.json'}",
                "+plan.alternatives=false",
            )
        ).to_json()

    plan = plan_on(1e12)
    c = TINY_SHAPE
    h, f, V = c["hidden_size"], c["intermediate_size"], c["vocab_size"]
    kv_dim = h // c["num_attention_heads"] * c["num_key_value_heads"]
    layer = 2 * h * h + 2 * h * kv_dim + 3 * h * f + 2 * h
    assert [s["params"] for s in plan["stages"]] == [V * h + 2 * layer, 2 * layer + h + V * h]
    assert [s["weights_bytes"] for s in plan["stages"]] == [2 * s["params"] for s in plan["stages"]]
    peak = max(s["total_bytes"] for s in plan["stages"])
    assert plan_on(peak)["summary"]["fits"] and not plan_on(peak - 1)["summary"]["fits"]


@pytest.mark.parametrize("mode", ["none", "full"])
def test_plan_table_shows_every_term_of_the_total_the_rerun_included(mode):
    """The stage table's columns add up to its total: what they left out was recompute's rerun transient."""
    from lcgraph.app.testing import planned
    from lcgraph.planner.plan import build_plan

    plan = build_plan(
        planned("parallel.pp=2", "data.seq_len=1024", f"train.recompute={mode}", "+plan.alternatives=false")
    )
    for row in plan.stage_rows():
        transient = plan.main.cost.recompute_transient(row["stage"])
        assert row["rerun_bytes"] == pytest.approx(transient, rel=1e-9, abs=1.0)
        assert (transient > 0) == (mode == "full")


def test_plan_refuses_a_bad_layout_before_capturing():
    from lcgraph.app.plan_cli import checked_plan
    from lcgraph.app.testing import compose
    from lcgraph.errors import PlanError

    with pytest.raises(PlanError, match="layers"):
        checked_plan(compose("parallel.pp=8"))
    with pytest.raises(ValueError, match="plan.device"):
        checked_plan(compose("+plan.devcie=h100"))


def test_llama70b_1m_recipe_plans_on_a_cpu_machine_without_weights(tmp_path):
    """The flagship recipe: captured on meta, planned for 64 H200s, fits with recompute. (Its 80 layers of
    8192 in real fp32 would take 280 GB: on a 24 GB CI machine this passes only if the capture stays on meta.)"""
    import json
    import subprocess
    import sys

    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "lcgraph.app.plan_cli",
            "+recipe=llama70b_1m",
            "+plan.device=h200",
            f"hydra.run.dir={tmp_path}",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    plan = json.loads((tmp_path / "plan.json").read_text())
    assert plan["layout"]["gpus"] == 64 and plan["model"]["layers"] == 80 and plan["summary"]["fits"]
    assert (tmp_path / "programs.txt").read_text().count("rank ") == 8
    print(f"70B 1M plan: {plan['plan_seconds']:.1f}s")


# --- the kernels the runtime calls: closed forms on a hand-made profile -------------------------------------


def _toy_profile(**extra):
    base = {
        "name": "toy",
        "memory_bytes": 1e12,
        "matmul_flops": 100.0,
        "attention_flops": {"64": [[1024, 1.0]]},
        "memory_bandwidth": 1000.0,
        "intra_node_bw": 10.0,
        "inter_node_bw": 1.0,
        "gpus_per_node": 2,
        "matmul_shapes": [[64, 64, 50.0, 40.0], [64, 512, 60.0, 30.0]],
        "attention_blocks": {"16": {"diag": [[64, 2.0, 1.0]], "prefix": [[64, 64, 4.0, 3.0], [64, 256, 8.0, 5.0]]}},
        "fused_loss_flops": 7.0,
        "fused_loss_nograd_flops": 9.0,
        "adamw_params_per_s": 11.0,
    }
    return DeviceProfile.from_dict({**base, **extra})


def _toy_cost(graph, chunks, **layout):
    return CostModel(graph, _toy_profile(), Layout(**layout), [4], chunks)


def test_attention_is_a_prefix_block_plus_a_diagonal_block_at_their_own_rates(tiny_graph):
    prof = _toy_profile()
    assert prof.block_rate("prefix", 64, 128, 16, False) == pytest.approx(6.0)  # halfway in log2(sk)
    cost = _toy_cost(tiny_graph, [256, 64])
    per_pair = sum(c.attention_per_pair for c in tiny_graph.layers)
    f, b = cost.compute_parts(0, 64, 256), cost.backward_parts(0, 1)
    assert f["attention_diag"] == pytest.approx(per_pair * 64 * 65 / 2 / 2.0)
    assert f["attention_prefix"] == pytest.approx(per_pair * 64 * 256 / 8.0)
    assert b["attention_diag"] == pytest.approx(2.5 * per_pair * 64 * 65 / 2 / 1.0)
    assert b["attention_prefix"] == pytest.approx(2.5 * per_pair * 64 * 256 / 5.0)
    assert cost.compute_parts(0, 256, 0)["attention_prefix"] == 0.0  # the first chunk has no prefix


def test_recompute_modes_rerun_what_they_did_not_keep(tiny_graph):
    g = tiny_graph
    parts = {m: _toy_cost(g, [128, 64], recompute=m).backward_parts(0, 1) for m in ("none", "keep_attention", "full")}
    again = _toy_cost(g, [128, 64], recompute="full").compute_parts(0, 64, 128, grads=True)
    attention = again["attention_diag"] + again["attention_prefix"] + again["attention_merge"]
    assert parts["none"]["rerun"] == 0.0
    assert parts["full"]["rerun"] == pytest.approx(sum(again.values()))
    assert parts["keep_attention"]["rerun"] == pytest.approx(sum(again.values()) - attention)
    # keep_attention keeps each layer's attention output (bf16) and LSE (fp32) on top of full's input
    full, keep = (_toy_cost(g, [4096], recompute=m).unit_activations(0, 0)[0] for m in ("full", "keep_attention"))
    assert keep - full == pytest.approx(4 * g.heads * (g.head_dim * 2 + 4) * 4096)
    assert Layout(recompute=True).recompute == "full" and Layout(recompute=False).recompute == "none"


def test_fused_loss_matmuls_and_optimizer_follow_their_closed_forms(tiny_graph):
    g, tokens = tiny_graph, 4096
    hv = g.hidden_size * g.vocab_size * tokens
    none, full = (_toy_cost(g, [tokens], recompute=m) for m in ("none", "full"))
    assert none.compute_parts(0, tokens, 0)["loss"] == pytest.approx(6 * hv / 7.0)  # gradients in the forward
    assert full.compute_parts(0, tokens, 0)["loss"] == pytest.approx(2 * hv / 9.0)  # no_grad forward
    # every linear at its own shape's rate: q and o are [64 -> 64]
    q_o = sum(f for (k, n), f in g.layers[0].matmuls.items() if (k, n) == (64, 64))
    assert q_o == pytest.approx(2 * 2 * 64 * 64)
    params = full.stages[0].params  # bf16 + ZeRO: one pass (30 B/param) and the norm (2); else fused AdamW + casts
    assert full.optimizer_time(0) == pytest.approx(32 * params / 1000.0)
    replicated = _toy_cost(g, [tokens], recompute="full", zero=False)
    assert replicated.optimizer_time(0) == pytest.approx(params / 11.0 + 16 * params / 1000.0)


def test_plan_figures_name_measured_and_assumed_sources(tiny_graph):
    prof = _toy_profile(provenance={"matmul_shapes": "measured: on the toy", "inter_node_bw": "assumed: a paper"})
    one_node = CostModel(tiny_graph, prof, Layout(dp=2), [4], [1024]).figures_used()
    assert one_node["matmul_shapes"] == {"status": "measured", "source": "on the toy", "terms": ["matmul"]}
    assert "inter_node_bw" not in one_node and one_node["intra_node_bw"]["status"] == "assumed"
    across = CostModel(tiny_graph, prof, Layout(dp=4), [4], [1024]).figures_used()
    assert across["inter_node_bw"]["source"] == "a paper"


def test_a_tiny_plans_step_time_reads_in_its_own_unit():
    """A CPU-sized plan used to print "step 0.000 s"."""
    from lcgraph.planner.report import _duration

    assert [_duration(x) for x in (2.5, 0.0123, 0.0002)] == ["2.500 s", "12.300 ms", "200.0 us"]


@pytest.mark.parametrize("chunks,want", [(1, 1), (16, None)])
def test_auto_checkpoint_segments_take_the_lowest_replayed_peak(tiny_graph, chunks, want):
    """train.recompute_layers=0: the memory-only replay gives the simulator's own peaks, and the chosen segment size
    is the one whose full simulation peaks lowest. One unit in flight wants 1-layer segments (the smallest rerun);
    16 chunks in flight want longer ones (fewer inputs kept per chunk)."""
    from lcgraph.planner.evaluation import best_segments, evaluate
    from lcgraph.planner.simulator import memory_peaks

    def planned(group: int):
        layout = Layout(recompute="full", recompute_layers=group)
        return evaluate(tiny_graph, _toy_profile(), layout, [4], 4096, "seq1f1b", 1, chunks, "even")

    ev = planned(1)
    assert memory_peaks(ev.programs, ev.spec, ev.cost)[1] == ev.sim.rank_peak
    peaks = {g: max(planned(g).sim.rank_peak) for g in (1, 2, 3, 4)}
    chosen = best_segments(ev)
    group = chosen.cost.layout.recompute_layers
    assert max(chosen.sim.rank_peak) == pytest.approx(peaks[group])
    assert peaks[group] <= min(peaks.values()) * 1.005
    assert group == want if want else group > 1


def test_recompute_auto_keeps_as_many_attention_layers_as_fit_between_full_and_keep_attention(tmp_path):
    """train.recompute=auto on a device between full's peak and keep_attention's: neither none nor keep_attention
    with every layer fits, full does; auto then keeps attention in as many layers per stage as fit, which is
    faster than full and fits (train.keep_attention_layers)."""
    import dataclasses
    from pathlib import Path

    import lcgraph.planner as planner_pkg
    from lcgraph.app.testing import planned
    from lcgraph.planner.evaluation import evaluate_config, setup
    from lcgraph.planner.plan import AUTO_USABLE, choose_recompute

    base = json.loads((Path(planner_pkg.__file__).parent / "profiles" / "h200.json").read_text())
    profile = tmp_path / "tight.json"
    shape = [
        "parallel.schedule=seq1f1b",
        "parallel.seq_chunks=4",
        "data.seq_len=1024",
        "model.max_position_embeddings=1024",
    ]

    def config(memory: float):
        profile.write_text(json.dumps({**base, "name": "tight", "memory_bytes": memory}))
        return planned(*shape, "train.recompute=auto", f"+plan.device={profile}", "+plan.alternatives=false")

    cfg = config(1e15)
    st = setup(cfg)
    ev = {m: evaluate_config(cfg, st, dataclasses.replace(st.layout, recompute=m)) for m in ("keep_attention", "full")}
    peak = {m: max(e.sim.rank_peak) for m, e in ev.items()}
    usable = (peak["full"] + peak["keep_attention"]) / 2
    cfg = config(usable / AUTO_USABLE)
    mode, reason, chosen = choose_recompute(cfg, setup(cfg))

    kept = chosen.cost.layout.kept_attention_layers
    assert mode == "keep_attention" and 0 < kept < 4, reason
    assert max(chosen.sim.rank_peak) <= usable * 1.000001
    assert ev["keep_attention"].sim.step_time < chosen.sim.step_time < ev["full"].sim.step_time
    assert f"keep_attention({kept})" in reason


@pytest.mark.parametrize("fuse", ["off", "on"])
def test_planned_activations_are_what_a_bf16_step_keeps(fuse, tmp_path):
    """The planner's bytes kept by one unit against the runtime's activation meter, for a Llama-3.2-1B-shaped
    layer pair in bf16 on CPU, with the plain ops and with the fused RMSNorm, SwiGLU and rotary (train.fuse=on:
    the plan reads a fused copy of the graph; with the plain graph's bytes it was 40% high)."""
    from lcgraph.app.testing import job_of, planned, run_config
    from lcgraph.planner.plan import build_plan

    overrides = [
        "parallel=single",
        "model=llama3_1b",
        "model.num_hidden_layers=2",
        "model.vocab_size=4096",
        "data.seq_len=512",
        "train.dtype=bf16",
        "train.device=cpu",
        f"train.fuse={fuse}",
        "train.steps=1",
    ]
    job = job_of(run_config(*overrides, tiny=False), tmp_path)
    job.run_step(0)
    kept, _ = build_plan(planned(*overrides, "+plan.alternatives=false", tiny=False)).main.cost.unit_activations(0, 0)
    assert kept == pytest.approx(job.activation_peaks()[0], rel=0.05)
