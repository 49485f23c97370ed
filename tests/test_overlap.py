"""ZeRO-2 overlap evidence from profiler traces: the span arithmetic, the CUDA kernel rule, and
tools/overlap.py end to end on 2 gloo ranks (sp=2), whose reduce-scatters run beside backward."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from lcgraph.overlap import analyze, intersect, length, union
from lcgraph.testing import TINY

ROOT = Path(__file__).resolve().parents[1]


def test_span_union_and_intersection():
    assert union([(3, 4), (0, 2), (1, 2.5)]) == [(0, 2.5), (3, 4)]
    assert intersect([(0, 2), (3, 5)], [(1, 4)]) == [(1, 2), (3, 4)]
    assert length([(0, 1), (0.5, 2), (5, 6)]) == 3


def _event(name, cat, ts, dur, tid=1):
    return {"ph": "X", "name": name, "cat": cat, "ts": ts, "dur": dur, "pid": 0, "tid": tid}


def test_on_cuda_collective_kernels_are_measured_against_compute_kernels():
    trace = {"traceEvents": [
        _event("B0.0", "user_annotation", 0, 1000),
        _event("ampere_sgemm_128x64_nn", "kernel", 100, 400, tid=7),  # compute
        _event("elementwise_kernel", "kernel", 600, 100, tid=7),
        _event("ncclDevKernel_ReduceScatter_Sum_bf16_RING_LL(ncclDevKernelArgsStorage<4096ul>)", "kernel", 400, 400,
               tid=20),  # beside compute 400..500 and 600..700
        _event("ncclDevKernel_AllGather_RING_LL(ncclDevKernelArgsStorage<4096ul>)", "kernel", 900, 100, tid=20),
        _event("ncclDevKernel_SendRecv(ncclDevKernelArgsStorage<4096ul>)", "kernel", 0, 900, tid=21),  # neither
    ]}
    found = analyze(trace)
    rs, ag = found["reduce_scatter"], found["all_gather"]
    assert (rs.device, rs.count, ag.count) == ("cuda", 1, 1)
    assert rs.comm_s == pytest.approx(400e-6) and rs.overlapped_s == pytest.approx(200e-6)
    assert rs.fraction == pytest.approx(0.5) and rs.compute_s == pytest.approx(500e-6)
    assert ag.comm_s == pytest.approx(100e-6) and ag.overlapped_s == 0


def test_overlap_tool_finds_every_bucket_reduce_scatter_running_beside_backward(tmp_path):
    overrides = [o for o in TINY if not o.startswith("train.steps")]
    overrides += ["parallel.sp=2", "parallel.microbatches=2", "parallel.bucket_mb=0.05"]
    subprocess.run([sys.executable, str(ROOT / "tools" / "overlap.py"), "--out", str(tmp_path), "--warmup", "1",
                    "--steps", "2", *overrides], check=True, cwd=tmp_path, capture_output=True, timeout=300)
    ranks = json.loads((tmp_path / "overlap.json").read_text())["ranks"]
    assert [r["rank"] for r in ranks] == [0, 1]
    for r in ranks:
        rs, ag = r["reduce_scatter"], r["all_gather"]
        assert rs["device"] == "cpu" and r["rs_actions"] > 1
        assert rs["count"] == 2 * r["rs_actions"]  # one gloo run per bucket and step, each found in the trace
        assert r["issued_before_last_backward"] is True
        assert 0 < rs["overlapped_s"] <= rs["comm_s"]  # part of the reduce-scatter ran while autograd computed
        assert r["ag_actions"] <= ag["count"] <= 2 * r["ag_actions"]  # the last step's may outlive the profiler
        assert (tmp_path / f"trace_rank{r['rank']}.json").is_file()


def test_overlap_tool_refuses_a_bad_layout_before_spawning(tmp_path):
    run = subprocess.run([sys.executable, str(ROOT / "tools" / "overlap.py"), "--out", str(tmp_path), *TINY,
                          "parallel.sp=3"], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert run.returncode == 2
    assert "sp=3" in run.stderr and "Traceback" not in run.stderr
    assert not (tmp_path / "overlap.json").exists()
