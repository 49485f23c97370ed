"""Distributed-optimizer overlap evidence from profiler traces: the span arithmetic, the CUDA kernel rule, and
tools/overlap.py end to end on 2 gloo ranks (sp=2), whose reduce-scatters run beside backward."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from lcgraph.app.testing import TINY
from lcgraph.observability.overlap import analyze, intersect, length, union

ROOT = Path(__file__).resolve().parents[1]


def test_span_union_and_intersection():
    assert union([(3, 4), (0, 2), (1, 2.5)]) == [(0, 2.5), (3, 4)]
    assert intersect([(0, 2), (3, 5)], [(1, 4)]) == [(1, 2), (3, 4)]
    assert length([(0, 1), (0.5, 2), (5, 6)]) == 3


def _event(name, cat, ts, dur, tid=1, ext=None):
    return {
        "ph": "X",
        "name": name,
        "cat": cat,
        "ts": ts,
        "dur": dur,
        "pid": 0,
        "tid": tid,
        "args": {} if ext is None else {"External id": ext},
    }


def test_on_cuda_collective_work_is_found_by_its_c10d_call_and_measured_against_compute_kernels():
    trace = {
        "traceEvents": [
            _event("B0.0", "user_annotation", 0, 1000),
            _event("aten::mm", "cpu_op", 10, 5, ext=1),
            _event("c10d::_reduce_scatter_base_", "cpu_op", 20, 10, ext=2),
            _event("record_param_comms", "cpu_op", 21, 8, ext=3),  # the innermost op at the NCCL launch
            _event("c10d::alltoall_base_", "cpu_op", 40, 10, ext=4),
            _event("ampere_sgemm_128x64_nn", "kernel", 100, 400, tid=7, ext=1),  # compute
            _event("elementwise_kernel", "kernel", 600, 100, tid=7),
            # NCCL's kernel name need not name the collective: the c10d call that launched it does
            _event("ncclDevKernel_SendRecv(ncclDevKernelArgsStorage<4096ul>)", "kernel", 400, 400, tid=20, ext=3),
            _event("ncclDevKernel_AllToAll(ncclDevKernelArgsStorage<4096ul>)", "kernel", 0, 100, tid=21, ext=4),
            _event("ncclDevKernel_AllGather_RING_LL(ncclDevKernelArgsStorage<4096ul>)", "kernel", 900, 100, tid=20),
        ]
    }
    found = analyze(trace)
    rs, ag = found["reduce_scatter"], found["all_gather"]
    assert (rs.device, rs.count, ag.count) == ("cuda", 1, 1)  # the all-gather by its kernel name (no External id)
    assert rs.comm_s == pytest.approx(400e-6) and rs.overlapped_s == pytest.approx(200e-6)  # 400..500, 600..700
    assert rs.fraction == pytest.approx(0.5) and rs.compute_s == pytest.approx(500e-6)  # the all-to-all is not compute
    assert ag.comm_s == pytest.approx(100e-6) and ag.overlapped_s == 0


def test_overlap_tool_finds_every_bucket_reduce_scatter_running_beside_backward(tmp_path):
    overrides = [o for o in TINY if not o.startswith("train.steps")]
    overrides += ["parallel.sp=2", "parallel.microbatches=2", "parallel.bucket_mb=0.05"]
    subprocess.run(
        [
            sys.executable,
            str(ROOT / "tools" / "overlap.py"),
            "--out",
            str(tmp_path),
            "--warmup",
            "1",
            "--steps",
            "2",
            *overrides,
        ],
        check=True,
        cwd=tmp_path,
        capture_output=True,
        timeout=300,
    )
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
    run = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "overlap.py"), "--out", str(tmp_path), *TINY, "parallel.sp=3"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 2
    assert "sp=3" in run.stderr and "Traceback" not in run.stderr
    assert not (tmp_path / "overlap.json").exists()
