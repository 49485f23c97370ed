"""How much ZeRO communication is hidden behind compute, read from a torch.profiler trace.

`tools/overlap.py` profiles training steps on every rank and hands each rank's Chrome trace here.
The interpreter wraps every action in `record_function(<action token>)`, so "F..." and "B..." ranges
mark forward and backward. Two collectives are measured:

- reduce_scatter of gradient buckets, issued during the last backward: should run beside backward;
- all_gather of updated parameters, issued after OPT and waited by graph nodes in the next forward:
  should run beside that forward (only the steps after the first profiled one show it).

CUDA (the trace has kernels): a collective = the GPU work (kernels, copies) launched inside its c10d
call on the CPU (found through the profiler's External id, since an NCCL kernel's name need not say
which collective it runs; the kernel name is the fallback); compute = every other kernel. The
compute stream waits for a bucket's collective only where the program or graph waits for it, so what
runs beside a reduce-scatter is the backward still in flight, and beside an all-gather the forward of
the layers already gathered.
CPU (gloo): the collective runs on a gloo worker thread ("gloo:*" ranges, a reduce-scatter run as an
all-reduce); the first such range after each `c10d::` call on the main thread is that call's work
(gloo runs a process group's work in issue order). Compute: the autograd engine's `evaluate_function`
ranges for backward, the `aten::` ops inside "F" ranges for forward (CPU ops run on the calling thread).

`fraction` = time a collective and compute ran at once / time the collective ran.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass

# name: (NCCL kernel, c10d call on the main thread, gloo worker range)
COLLECTIVES = {
    "reduce_scatter": (r"nccl.*reduce_?scatter", r"^c10d::.*reduce_scatter", r"^gloo:(reduce_scatter|all_?reduce)"),
    "all_gather": (r"nccl.*all_?gather", r"^c10d::.*all_?gather", r"^gloo:all_?gather"),
}
GPU_WORK = ("kernel", "gpu_memcpy", "gpu_memset")


@dataclass
class Overlap:
    device: str  # "cuda" or "cpu": which rule found the spans
    count: int  # kernels (CUDA) or gloo runs (CPU) of the collective
    comm_s: float  # time the collective ran (union of its spans)
    overlapped_s: float  # of that, time compute ran too
    compute_s: float  # time the compute it is measured against ran

    @property
    def fraction(self) -> float:
        return self.overlapped_s / self.comm_s if self.comm_s > 0 else 0.0

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


def _measure(device: str, comm: list, compute: list) -> Overlap:
    return Overlap(device, len(comm), length(comm), length(intersect(comm, compute)), length(compute))


def analyze(trace: dict) -> dict[str, Overlap]:
    """Per collective, its overlap with compute in one rank's profiled steps (a Chrome trace dict)."""
    spans = [e for e in trace.get("traceEvents", []) if e.get("ph") == "X" and "ts" in e]
    if any(e.get("cat") == "kernel" for e in spans):
        return _analyze_cuda(spans)
    backward = [_span(e) for e in spans if e["name"].startswith("autograd::engine::evaluate_function")]
    forward = intersect(
        [_span(e) for e in spans if e.get("cat") == "cpu_op" and e["name"].startswith("aten::")],
        [_span(e) for e in spans if e.get("cat") == "user_annotation" and e["name"].startswith("F")],
    )
    compute = {"reduce_scatter": backward, "all_gather": forward}
    return {
        name: _measure("cpu", _gloo_runs(spans, call, work), compute[name])
        for name, (_, call, work) in COLLECTIVES.items()
    }


def _analyze_cuda(spans: list[dict]) -> dict[str, Overlap]:
    work = [e for e in spans if e.get("cat") in GPU_WORK]
    owner = _collective_of(spans, work)
    found: dict[str, list] = {name: [] for name in COLLECTIVES}
    compute = []
    for e in work:
        name = owner.get(id(e)) or _named(e["name"], column=0)
        if name in found:
            found[name].append(_span(e))
        elif name is None and e.get("cat") == "kernel" and "nccl" not in e["name"].lower():
            compute.append(_span(e))
    return {name: _measure("cuda", found[name], compute) for name in COLLECTIVES}


def _collective_of(spans: list[dict], work: list[dict]) -> dict[int, str]:
    """id(GPU event) -> the collective whose c10d call (on the CPU) launched it, or "other" for any other
    c10d call (p2p, all-to-all, all-reduce): the CPU op it carries the External id of lies inside that call."""
    ops = [e for e in spans if e.get("cat") in ("cpu_op", "user_annotation")]
    by_id = {e["args"]["External id"]: e for e in ops if "External id" in e.get("args", {})}
    calls = [e for e in ops if e["name"].startswith(("c10d::", "nccl:"))]
    out = {}
    for e in work:
        op = by_id.get(e.get("args", {}).get("External id"))
        if op is None:
            continue
        call = next(
            (
                c
                for c in calls
                if c.get("tid") == op.get("tid")
                and c["ts"] <= op["ts"]
                and op["ts"] + op.get("dur", 0) <= c["ts"] + c.get("dur", 0)
            ),
            None,
        )
        if call is not None:
            out[id(e)] = _named(call["name"].replace("nccl:", "c10d::"), column=1) or "other"
    return out


def _named(text: str, column: int) -> str | None:
    """The collective whose pattern in COLLECTIVES column `column` (0 kernel, 1 c10d call) matches `text`."""
    return next((n for n, patterns in COLLECTIVES.items() if re.search(patterns[column], text, re.IGNORECASE)), None)


def _gloo_runs(spans: list[dict], call: str, work: str) -> list[tuple[float, float]]:
    """The gloo worker range that ran each matching c10d call (the first unclaimed one after it)."""
    calls = sorted(e["ts"] for e in spans if e.get("cat") == "cpu_op" and re.search(call, e["name"]))
    runs = sorted((e for e in spans if re.search(work, e["name"])), key=lambda e: e["ts"])
    out, used = [], set()
    for issued in calls:
        run = next((i for i, e in enumerate(runs) if e["ts"] >= issued and i not in used), None)
        if run is not None:
            used.add(run)
            out.append(_span(runs[run]))
    return out
