"""train.offload in the planner: device bytes parked on the host, the host pool against host memory, copy time
against the compute that hides it, and `auto` choosing with the recompute mode."""

import dataclasses
import json
from pathlib import Path

import pytest

import lcgraph.planner as planner_pkg
from lcgraph.app.testing import planned
from lcgraph.errors import PlanError
from lcgraph.planner.evaluation import evaluate_config, setup
from lcgraph.planner.plan import AUTO_USABLE, build_plan, choose_recompute, resolve_recompute

CHUNKS = 4
SHAPE = [
    "parallel.schedule=seq1f1b",
    f"parallel.seq_chunks={CHUNKS}",
    "data.seq_len=1024",
    "model.max_position_embeddings=1024",
    "train.recompute_layers=1",
    "+plan.alternatives=false",
]


def _profile(tmp_path, **figures) -> str:
    base = json.loads((Path(planner_pkg.__file__).parent / "profiles" / "h200.json").read_text())
    path = tmp_path / "device.json"
    path.write_text(json.dumps({**base, "name": "device", **figures}))
    return str(path)


def _evaluations(tmp_path, recompute="keep_attention", **figures):
    cfg = planned(*SHAPE, f"train.recompute={recompute}", f"+plan.device={_profile(tmp_path, **figures)}")
    st = setup(cfg)
    return (
        cfg,
        st,
        {m: evaluate_config(cfg, st, dataclasses.replace(st.layout, offload=m)) for m in ("none", "attention")},
    )


def test_offloaded_attention_leaves_the_device_and_costs_no_time_when_hidden(tmp_path):
    """One stage, 4 even chunks: at the peak the plan keeps two or three units' attention on the device (the one
    computed, the one coming back, and at a backward the unit it frees) instead of every unit still waiting;
    the last chunk, whose backward comes next, never leaves."""
    cfg, _, ev = _evaluations(tmp_path)
    m = cfg.model
    unit = m.num_hidden_layers * m.num_attention_heads * (m.hidden_size // m.num_attention_heads * 4 + 4)
    unit *= cfg.data.seq_len // CHUNKS  # fp32 output and LSE of every layer, one chunk's tokens
    drop = max(ev["none"].sim.rank_peak) - max(ev["attention"].sim.rank_peak)
    assert (CHUNKS - 3) * unit <= drop <= (CHUNKS - 2) * unit, drop / unit
    off = ev["attention"].offload
    assert off.to_host_bytes == pytest.approx((CHUNKS - 1) * unit)
    assert off.exposed_s == 0 and ev["attention"].sim.step_time == ev["none"].sim.step_time


def test_a_slow_host_link_adds_what_compute_does_not_hide(tmp_path):
    """At 1 MB/s the copies dwarf the compute: the last backward waits for nearly every copy of the step."""
    _, _, ev = _evaluations(tmp_path, host_bandwidth=1e6)
    off = ev["attention"].offload
    assert off.exposed_s > 0.9 * off.copy_s
    assert ev["attention"].sim.step_time == pytest.approx(ev["none"].sim.step_time + off.exposed_s)


def test_an_offload_the_host_cannot_hold_is_refused_in_one_line(tmp_path):
    cfg = planned(*SHAPE, "train.recompute=keep_attention", "train.offload=attention", "+plan.host_memory_gb=1e-6")
    with pytest.raises(PlanError, match=r"train.offload=attention needs .* GiB of host memory per rank"):
        build_plan(cfg)


def test_offload_auto_moves_attention_only_when_the_device_needs_it(tmp_path):
    """keep_attention with offload=auto: nothing moves on a roomy device; on one between the two peaks the
    attention goes to the host. recompute=auto with it: keep_attention + offload beats full there."""
    _, _, ev = _evaluations(tmp_path)
    peak = {m: max(e.sim.rank_peak) for m, e in ev.items()}
    tight = _profile(tmp_path, memory_bytes=(peak["none"] + peak["attention"]) / 2 / AUTO_USABLE)
    roomy = planned(*SHAPE, "train.recompute=keep_attention", "train.offload=auto")
    assert resolve_recompute(roomy).offload == "none"
    cfg = planned(*SHAPE, "train.recompute=keep_attention", "train.offload=auto", f"+plan.device={tight}")
    resolved = resolve_recompute(cfg)
    assert resolved.offload == "attention", resolved.reason
    cfg = planned(*SHAPE, "train.recompute=auto", "train.offload=auto", f"+plan.device={tight}")
    mode, reason, chosen = choose_recompute(cfg, setup(cfg))
    assert (mode, chosen.cost.layout.offload) == ("keep_attention", "attention"), reason
