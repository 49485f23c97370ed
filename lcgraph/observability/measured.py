"""The measured timeline of a training step, and what is read from it.

Timeline: `write_measured_timeline` gathers every rank's `Interpreter.timeline` of the last step to
rank 0 and writes timeline.json (Chrome/Perfetto trace, the format of the planner's prediction, plus a
ZeRO track) and timeline.png, and returns the measured bubble fraction.
"""

from __future__ import annotations

import socket
import time
from pathlib import Path
from typing import Protocol

import torch

from lcgraph.observability.timeline import from_measured, is_wire, trace_events, write_png
from lcgraph.runtime.interpreter import Interpreter, OptimizerHooks
from lcgraph.schedule.mesh import Coords


def comm_times(entries) -> dict:
    """Seconds of one rank's step (Interpreter.timeline entries) spent in communication actions.

    p2p_s: issuing p2p groups and waiting for received tensors (the wire entries: names not starting
    upper-case, as the runtime and the simulator write them); grad_sync_s: RS (waiting for a bucket's reduce-scatter)
    and AG (issuing all-gathers). Overlapped communication (an RS issued during backward) is not counted.
    """
    p2p = sum(end - start for name, start, end in entries if is_wire(name))
    sync = sum(end - start for name, start, end in entries if name.startswith(("RS", "AG")))
    return {"p2p_s": p2p, "grad_sync_s": sync, "comm_s": p2p + sync}


def measured_bubble(timeline) -> dict:
    """Bubble of a measured step, defined as the planner's (simulate.SimResult.bubble): the idle share of
    ranks x pipeline time, from the step's first action to its last forward/backward end, busy = F and B."""
    ranks = {e[0] for e in timeline}
    compute = [e for e in timeline if e[1][:1] in ("F", "B")]
    start = min((e[2] for e in timeline), default=0.0)
    end = max((e[3] for e in compute), default=start)
    span = end - start
    busy = sum(e[3] - e[2] for e in compute)
    bubble = 1.0 - busy / (len(ranks) * span) if span > 0 else 0.0
    step = max((e[3] for e in timeline), default=start) - start
    return {"bubble_fraction": bubble, "measured_pipeline_s": span, "measured_step_s": step}


class TimelineJob(Protocol):
    """What the measured timeline reads from the training job (app/job.py: Job satisfies it)."""

    @property
    def interpreter(self) -> Interpreter: ...  # its timeline of the last step
    @property
    def optimizer(self) -> OptimizerHooks: ...  # its bucket events
    @property
    def coords(self) -> Coords: ...
    @property
    def device(self) -> torch.device: ...


def _rank_record(job: TimelineJob, world: int) -> dict:
    import torch
    import torch.distributed as dist

    entries = list(job.interpreter.timeline)
    lo = min((s for _, s, _ in entries), default=0.0)
    hi = max((e for _, _, e in entries), default=0.0)
    events = [e for e in job.optimizer.events if lo <= e[3] <= hi]
    record = {"rank": job.coords.rank, "host": socket.gethostname(), "timeline": entries, "events": events}
    if torch.cuda.is_available() and job.device.type == "cuda":
        record["cuda_peak_bytes"] = int(torch.cuda.max_memory_allocated())
    if world > 1 and dist.is_initialized():
        dist.barrier()
    record["sync"] = time.perf_counter()  # right after the barrier: aligns hosts with different clocks
    return record


def _align(records: list[dict]) -> tuple[dict, list]:
    """Per-rank timelines and ZeRO events on rank 0's clock (perf_counter is shared by one host's ranks)."""
    leader: dict[str, float] = {}
    for r in sorted(records, key=lambda r: r["rank"]):
        leader.setdefault(r["host"], r["sync"])
    origin = leader[records[0]["host"]]
    timelines, events = {}, []
    for r in records:
        shift = leader[r["host"]] - origin
        timelines[r["rank"]] = [(name, s - shift, e - shift) for name, s, e in r["timeline"]]
        events += [(r["rank"], what, stage, bucket, t - shift) for what, stage, bucket, t in r["events"]]
    return timelines, events


def zero_trace_events(events, t0: float) -> list[dict]:
    """ZeRO bucket events as a third thread per rank: instants, plus RS/AG in-flight spans (issue -> wait)."""
    out, open_at = [], {}
    for rank in sorted({e[0] for e in events}):
        out.append({"ph": "M", "name": "thread_name", "pid": rank, "tid": 2, "args": {"name": "ZeRO buckets"}})
    for i, (rank, what, stage, bucket, t) in enumerate(sorted(events, key=lambda e: e[4])):
        ts = (t - t0) * 1e6
        label = f"{what} b{bucket}" if bucket >= 0 else what  # bucket -1: a stage event (backward_end)
        out.append(
            {
                "ph": "i",
                "s": "t",
                "name": label,
                "cat": "zero",
                "pid": rank,
                "tid": 2,
                "ts": ts,
                "args": {"stage": stage, "bucket": bucket},
            }
        )
        op, _, phase = what.partition("_")
        key = (rank, op, stage, bucket)
        if phase == "issue":
            open_at[key] = (ts, i)
        elif key in open_at:
            start, ident = open_at.pop(key)
            common = {
                "name": f"{op.upper()} b{bucket} in flight",
                "cat": "zero",
                "id": f"{rank}-{ident}",
                "pid": rank,
                "tid": 2,
            }
            out += [{**common, "ph": "b", "ts": start}, {**common, "ph": "e", "ts": ts}]
    return out


def write_measured_timeline(job: TimelineJob, run_dir: Path, world: int) -> dict:
    """Gather the last step's timeline of every rank to rank 0; rank 0 writes timeline.json (+ .png).

    `job.interpreter.timeline` holds the last step; ZeRO events outside it are dropped. Collective: every
    rank calls it. Returns on every rank: bubble_fraction, measured_pipeline_s, measured_step_s, comm_s_per_rank and,
    on CUDA, cuda_peak_bytes_per_rank. A timeline.json from `lcgraph-plan` in the same directory is kept
    as timeline_predicted.json (and .png).
    """
    import json

    import torch.distributed as dist

    mine = _rank_record(job, world)
    records: list = [mine]
    if world > 1 and dist.is_initialized():
        records = [None] * world
        dist.all_gather_object(records, mine)
    timelines, events = _align(records)
    t0 = min((s for entries in timelines.values() for _, s, _ in entries), default=0.0)
    timeline = from_measured(timelines)
    stats = measured_bubble(timeline)
    stats["comm_s_per_rank"] = [comm_times(timelines[r])["comm_s"] for r in sorted(timelines)]
    if all("cuda_peak_bytes" in r for r in records):
        stats["cuda_peak_bytes_per_rank"] = [r["cuda_peak_bytes"] for r in sorted(records, key=lambda r: r["rank"])]
    if job.coords.rank != 0:
        return stats
    out = Path(run_dir)
    out.mkdir(parents=True, exist_ok=True)
    _keep_predicted(out)
    trace = trace_events(timeline)
    trace["traceEvents"] += zero_trace_events(events, t0)
    trace["otherData"] = {
        "source": "measured",
        "step": "last",
        **{k: v for k, v in stats.items() if not isinstance(v, list)},
    }
    (out / "timeline.json").write_text(json.dumps(trace))
    if timeline:
        write_png(timeline, out / "timeline.png", title=f"measured: last step, bubble {stats['bubble_fraction']:.1%}")
    return stats


def _keep_predicted(out: Path) -> None:
    import json

    old = out / "timeline.json"
    if not old.is_file():
        return
    try:
        measured = json.loads(old.read_text()).get("otherData", {}).get("source") == "measured"
    except (ValueError, AttributeError):
        measured = False
    if not measured:
        old.replace(out / "timeline_predicted.json")
        if (out / "timeline.png").is_file():
            (out / "timeline.png").replace(out / "timeline_predicted.png")
