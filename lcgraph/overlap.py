"""How much of the ZeRO reduce-scatter is hidden behind backward, read from a torch.profiler trace.

`tools/overlap.py` profiles one training step per rank and hands each rank's Chrome trace here.
The interpreter wraps every action in `record_function(<action token>)`, so "B..." ranges mark backward.

- CUDA (the trace has kernels): reduce-scatter = NCCL kernels named ReduceScatter; compute = every
  other kernel. After a bucket's RS action waits, the compute stream waits for the NCCL stream, so the
  only compute that can run beside a reduce-scatter is the backward still in flight: its overlap with
  compute kernels is its overlap with backward.
- CPU (gloo): the collective runs on a gloo worker thread ("gloo:*" ranges); the one that follows each
  `c10d::_reduce_scatter_base_` call on the main thread is that bucket's reduce-scatter (gloo runs a
  process group's work in issue order; gloo runs it as an all-reduce). Compute = the autograd engine's
  `evaluate_function` ranges (CPU backward runs on the calling thread).

`overlap` = total time where a reduce-scatter and compute run at once / total reduce-scatter time.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass

NCCL_RS = re.compile(r"nccl.*reduce_?scatter", re.IGNORECASE)
RS_CALL = re.compile(r"reduce_scatter", re.IGNORECASE)
GLOO_RS = re.compile(r"^gloo:(reduce_scatter|all_reduce|allreduce)")  # gloo runs _reduce_scatter_base_ as an all-reduce


@dataclass
class Overlap:
    device: str  # "cuda" or "cpu": which rule found the spans
    rs_count: int  # reduce-scatter kernels (CUDA) or gloo runs (CPU) in the step
    rs_s: float  # time some reduce-scatter ran (union of its spans)
    overlapped_s: float  # of that, time compute ran too
    compute_s: float  # time some compute ran (kernels on CUDA, autograd functions on CPU)
    backward_s: float  # union of backward action ranges (CPU wall time of the "B" actions)

    @property
    def fraction(self) -> float:
        return self.overlapped_s / self.rs_s if self.rs_s > 0 else 0.0

    def as_dict(self) -> dict:
        return {**asdict(self), "fraction": self.fraction}


def union(spans: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """Merge overlapping (start, end) spans into disjoint sorted ones."""
    out: list[list[float]] = []
    for start, end in sorted(spans):
        if out and start <= out[-1][1]:
            out[-1][1] = max(out[-1][1], end)
        else:
            out.append([start, end])
    return [(s, e) for s, e in out]


def length(spans) -> float:
    return sum(e - s for s, e in union(spans))


def intersect(a, b) -> list[tuple[float, float]]:
    """Intersection of two span sets (each merged first)."""
    a, b, out, i, j = union(a), union(b), [], 0, 0
    while i < len(a) and j < len(b):
        start, end = max(a[i][0], b[j][0]), min(a[i][1], b[j][1])
        if start < end:
            out.append((start, end))
        if a[i][1] < b[j][1]:
            i += 1
        else:
            j += 1
    return out


def _span(e: dict) -> tuple[float, float]:
    return e["ts"] * 1e-6, (e["ts"] + e.get("dur", 0.0)) * 1e-6


def analyze(trace: dict) -> Overlap:
    """The reduce-scatter / compute overlap of one rank's profiled step (a Chrome trace dict)."""
    spans = [e for e in trace.get("traceEvents", []) if e.get("ph") == "X" and "ts" in e]
    backward = [_span(e) for e in spans if e.get("cat") == "user_annotation" and e["name"].startswith("B")]
    kernels = [e for e in spans if e.get("cat") == "kernel"]
    if kernels:
        rs = [_span(k) for k in kernels if NCCL_RS.search(k["name"])]
        compute = [_span(k) for k in kernels if "nccl" not in k["name"].lower()]
        return Overlap("cuda", len(rs), length(rs), length(intersect(rs, compute)), length(compute), length(backward))
    rs = _gloo_reduce_scatters(spans)
    compute = [_span(e) for e in spans if e["name"].startswith("autograd::engine::evaluate_function")]
    return Overlap("cpu", len(rs), length(rs), length(intersect(rs, compute)), length(compute), length(backward))


def _gloo_reduce_scatters(spans: list[dict]) -> list[tuple[float, float]]:
    calls = sorted(e["ts"] for e in spans if e.get("cat") == "cpu_op" and e["name"].startswith("c10d::")
                   and RS_CALL.search(e["name"]))
    work = sorted((e for e in spans if GLOO_RS.match(e["name"])), key=lambda e: e["ts"])
    out, used = [], set()
    for issued in calls:
        run = next((i for i, e in enumerate(work) if e["ts"] >= issued and i not in used), None)
        if run is not None:
            used.add(run)
            out.append(_span(work[run]))
    return out
