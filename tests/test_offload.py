"""train.offload: activations kept for the backward go to a host pool and come back before their backward.

On CPU the offloader runs its real path with an ordinary host pool and synchronous copies: offloaded runs must
match HF eager + AdamW in fp32, the device must hold fewer saved bytes, and the pool must be allocated once."""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytest
import torch
from test_reference import SEQ1F1B, check, hf_reference, run_cfg

from lcgraph.app.job import Job
from lcgraph.app.links import fitted_profile, host_link
from lcgraph.app.testing import compose, job_of, train_local, train_spawned
from lcgraph.app.validate import check_offload
from lcgraph.errors import PlanError
from lcgraph.planner.profile import load_profile
from lcgraph.runtime.offload import HostPool, offload_mode

KEEP = ["train.recompute=keep_attention"]


@pytest.fixture(scope="module")
def hf_two_sequences():
    return hf_reference(run_cfg(), batch=2)


@pytest.mark.parametrize("mode", ["attention", "all"])
def test_offloaded_seq1f1b_keep_attention_matches_hf_eager(mode, hf_two_sequences):
    """Two uneven chunks, two micro-batches on one process: the chunks whose backward does not come next go to
    the host and back; losses, gradient norms and parameters stay HF eager's."""
    cfg = run_cfg("parallel.microbatches=2", *SEQ1F1B, *KEEP, f"train.offload={mode}")
    losses, params, extra = train_local(cfg)
    stats = extra["job"].interpreter.offloader.stats
    assert stats.to_host > 0 and stats.to_device == stats.to_host, stats
    check(losses, params, hf_two_sequences, label=f"offload={mode}", grad_norms=extra["grad_norms"])


def test_pp2_seq1f1b_with_offload_matches_hf_eager(hf_two_sequences):
    """pp=2 seq1f1b, keep_attention, offload=attention: stage 0 parks its chunks on the host while stage 1 runs."""
    cfg = run_cfg("parallel.pp=2", "parallel.microbatches=2", *SEQ1F1B, *KEEP, "train.offload=attention")
    (result,) = train_spawned([cfg], world=2)
    check(result["losses"], result["params"], hf_two_sequences, label="pp=2 offload", grad_norms=result["grad_norms"])


def _job(*overrides: str) -> Job:
    cfg = compose("parallel.microbatches=2", *SEQ1F1B, *KEEP, *overrides)
    return job_of(cfg, tempfile.mkdtemp(prefix="lcgraph-test-"))


def test_offload_takes_saved_bytes_off_the_device_and_allocates_the_pool_once():
    """What the relay keeps (attention outputs, LSE) and what the activation meter sees stay on the device only
    for the units whose backward is next; the rest sits in a host pool whose arenas are allocated in the first
    step and reused by every later one."""
    plain, moved = _job(), _job("train.offload=all")
    arenas, sent = [], 0
    for step in range(3):
        plain.run_step(step)
        moved.run_step(step)
        off = moved.interpreter.offloader
        arenas.append(off.pool.arenas_allocated)
        sent += off.stats.to_host
        assert off.pool.in_use == 0, "every slot goes back to the pool after its unit's backward"
        assert off.stats.prefetched == off.stats.to_device == off.stats.to_host > 0, "brought back ahead, once"
    assert arenas[0] >= 1 and arenas == [arenas[0]] * 3, f"pool arenas per step {arenas}"
    assert off.pool.capacity < sent, "later steps reuse the first step's slots"
    m = plain.config
    kept_per_token = m.num_hidden_layers * (m.hidden_size + m.num_attention_heads) * 4  # fp32 output and LSE
    one_chunk = kept_per_token * min(plain.chunk_lengths)
    relay_plain, relay_moved = plain.stages[0].relay.peak_bytes, moved.stages[0].relay.peak_bytes
    assert relay_plain - relay_moved >= one_chunk, f"kept attention on the device: {relay_plain} -> {relay_moved}"
    held_plain, held_moved = plain.activation_peaks()[0], moved.activation_peaks()[0]
    assert held_moved < held_plain, "offload=all: the segments' inputs leave the device"


def test_host_pool_reuses_a_freed_slot_of_the_same_size():
    pool = HostPool(pin=False, arena_bytes=0)
    a = pool.take(1000)
    pool.give(a)
    assert pool.take(1000) == a and pool.arenas_allocated == 1
    pool.take(3000)
    assert pool.arenas_allocated == 2 and pool.in_use == 1024 + 3072


def test_offload_attention_without_keep_attention_is_refused_in_one_line():
    with pytest.raises(PlanError, match="train.offload=attention .* train.recompute=full"):
        check_offload(compose("train.recompute=full", "train.offload=attention"))
    check_offload(compose("train.recompute=full", "train.offload=all"))
    with pytest.raises(PlanError, match="train.offload=disk is unknown"):
        offload_mode("disk")


def test_a_unit_whose_backward_comes_next_stays_on_the_device():
    """On one stage the last chunk of a micro-batch runs its backward right after its forward: nothing to hide
    a round trip behind, so it is never offloaded; the others are."""
    job = _job("train.offload=attention")
    job.run_step(0)
    stats = job.interpreter.offloader.stats
    program = [a.token(False) for a in job.interpreter.program if a.kind in ("F", "B")]
    follows = sum(1 for f, b in zip(program, program[1:]) if f.startswith("F") and b == "B" + f[1:])
    forwards = sum(t.startswith("F") for t in program)
    assert follows > 0 and stats.kept_units == follows
    assert len(stats.by_unit) == forwards - follows


def _tool(name: str):
    import importlib.util
    import sys

    spec = importlib.util.spec_from_file_location(name, Path(__file__).resolve().parents[1] / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses resolve their annotations through sys.modules
    spec.loader.exec_module(module)
    return module


def test_host_link_rates_go_into_a_profile_marked_measured():
    """lcgraph-check's host link on CPU copies (its GPU run differs only in pinned memory and event timing)."""
    base = load_profile("h100")  # its host link is still the assumed nominal figure (h200's is measured)
    assert base.status("host_bandwidth")[0] == "assumed"
    result = host_link(torch.device("cpu"), mib=4, repeat=1)
    assert result["host_bandwidth"] == min(result["d2h_bytes_per_s"], result["h2d_bytes_per_s"]) > 0
    measured = fitted_profile(base, {}, result, {"date": "2026-12-07", "ranks": 1, "device": "cpu"})
    assert measured.host_bandwidth == pytest.approx(result["host_bandwidth"], rel=1e-3)  # 4 digits
    assert measured.status("host_bandwidth")[0] == "measured"


def test_bench_passes_train_offload_to_the_lcgraph_side():
    bench = _tool("bench")
    args = ["--peers", "--variant", "chunked", "--chunks", "16", "--recompute", "keep_attention"]
    sides = bench.sides_from_args(bench.parser().parse_args([*args, "--offload", "none", "attention"]))
    assert [s.offload for s in sides] == ["none", "attention"]
    assert "train.offload=attention" in sides[1].overrides([]) and "offload=attention" in sides[1].label


def test_a_permuted_tensor_comes_back_with_its_values_and_its_strides():
    """A [B, H, S, D] view of a [B, S, H, D] tensor (what attention kernels return) keeps its layout through the pool."""
    import torch

    from lcgraph.runtime.offload import Offloader

    off = Offloader("all", torch.device("cpu"), set())
    t = torch.randn(2, 7, 3, 5).transpose(1, 2)
    plain = torch.randn(4, 6)
    stashed = [off.stash((0, 0, 0), x) for x in (t, plain)]
    off.prefetch((0, 0, 0))
    for x, s in zip((t, plain), stashed):
        back = off.fetch(s)
        assert back.stride() == x.stride() and torch.equal(back, x)
