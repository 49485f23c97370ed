"""Link bandwidths of `lcgraph-check`: measured on the user's GPUs, fitted into a device profile the planner reads.

- p2p: rank 0 sends one message of each size to rank 1 (one batch_isend_irecv, as a pipeline stage sends its hidden
  state); all_to_all: every rank exchanges `size` bytes with the others (all_to_all_single, as Ulysses moves Q, K, V
  and the output). Each size: `warmup` untimed, then the mean of `iters` timed repeats. A row's `moved_bytes` is
  what the planner divides by the link's figure (p2p: the message; all-to-all: the share a rank sends to the others,
  size x (n-1)/n).
- host: pinned host <-> GPU copies on a side stream, each direction alone and both at once (what train.offload
  moves); `host_bandwidth` is the slower single direction.
- fit: per link kind, seconds = latency + moved_bytes / bandwidth by least squares weighted toward the large
  messages the planner costs; `fitted_profile` writes `p2p_bw`, `all_to_all_bw` and `host_bandwidth` into a copy of
  the GPU's profile, each marked measured (how, when, where). `lcgraph-plan +plan.profile=PATH` plans with it.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist

from lcgraph.planner.profile import LINK_KINDS, DeviceProfile


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn: Callable[[], None], device: torch.device, warmup: int, iters: int) -> float:
    for _ in range(warmup):
        fn()
    _sync(device)
    dist.barrier()
    start = time.perf_counter()
    for _ in range(iters):
        fn()
    _sync(device)
    return (time.perf_counter() - start) / iters


def bench_links(device: torch.device, sizes_mib: list[float], warmup: int, iters: int) -> list[dict]:
    """p2p (ranks 0 -> 1) and all-to-all (every rank) times of each message size, on this launch's ranks."""
    rank, world = dist.get_rank(), dist.get_world_size()
    rows = []
    for mib in sizes_mib:
        numel = max(world, int(mib * 2**20) // 2 // world * world)
        buf = torch.ones(numel, dtype=torch.bfloat16, device=device)
        recv = torch.empty_like(buf)

        def p2p() -> None:
            if rank in (0, 1):
                op = dist.P2POp(dist.isend, buf, 1) if rank == 0 else dist.P2POp(dist.irecv, recv, 0)
                for w in dist.batch_isend_irecv([op]):
                    w.wait()

        def a2a() -> None:
            dist.all_to_all_single(recv, buf)

        nbytes = numel * 2
        t = _timed(p2p, device, warmup, iters)
        rows.append({"kind": "p2p", "ranks": 2, "bytes": nbytes, "moved_bytes": nbytes, "seconds": t})
        t = _timed(a2a, device, warmup, iters)
        moved = nbytes * (world - 1) / world
        rows.append({"kind": "all_to_all", "ranks": world, "bytes": nbytes, "moved_bytes": moved, "seconds": t})
    return rows


def host_link(device: torch.device, mib: int, repeat: int = 5) -> dict:
    """Bytes/s of device -> host, host -> device and both at once (each direction's rate while both run); on CPU
    plain host copies (the mechanics only)."""
    nbytes = mib * 2**20
    cuda = device.type == "cuda"
    host_out = torch.empty(nbytes, dtype=torch.uint8, pin_memory=cuda)
    host_in = torch.empty(nbytes, dtype=torch.uint8, pin_memory=cuda).fill_(1)
    dev_out = torch.ones(nbytes, dtype=torch.uint8, device=device)
    dev_in = torch.empty(nbytes, dtype=torch.uint8, device=device)

    def d2h() -> None:
        host_out.copy_(dev_out, non_blocking=cuda)

    def h2d() -> None:
        dev_in.copy_(host_in, non_blocking=cuda)

    def rate(copies: list[Callable[[], None]]) -> float:
        if cuda:
            streams = [torch.cuda.Stream(device) for _ in copies]
            _timed_streams(copies, streams)  # warm-up
            best = min(_timed_streams(copies, streams) for _ in range(repeat))
        else:
            best = float("inf")
            for _ in range(repeat + 1):
                start = time.perf_counter()
                for copy in copies:
                    copy()
                best = min(best, time.perf_counter() - start)
        return nbytes / best

    result: dict[str, Any] = {
        "device": torch.cuda.get_device_name(device) if cuda else "cpu",
        "mib": mib,
        "pinned": cuda,
        "d2h_bytes_per_s": rate([d2h]),
        "h2d_bytes_per_s": rate([h2d]),
        "duplex_bytes_per_s": rate([d2h, h2d]),  # per direction, both running
    }
    result["host_bandwidth"] = min(result["d2h_bytes_per_s"], result["h2d_bytes_per_s"])
    return result


def _timed_streams(copies: list[Callable[[], None]], streams: list) -> float:
    """Seconds for `copies` (one per stream), all issued at once, timed by events on each stream."""
    starts = [torch.cuda.Event(enable_timing=True) for _ in streams]
    ends = [torch.cuda.Event(enable_timing=True) for _ in streams]
    torch.cuda.synchronize()
    for stream, copy, start, end in zip(streams, copies, starts, ends):
        with torch.cuda.stream(stream):
            start.record(stream)
            copy()
            end.record(stream)
    torch.cuda.synchronize()
    return max(s.elapsed_time(e) for s, e in zip(starts, ends)) / 1e3


# --- the fit ---------------------------------------------------------------------------------------------------
def fit_line(points: list[tuple[float, float]]) -> tuple[float, float]:
    """(latency s, bandwidth bytes/s) of seconds = latency + bytes / bandwidth, least squares weighted by size.

    Times that do not grow with size (noise swamps a fast link at small sizes) give the largest message's rate; a
    fit whose latency would be negative is refitted through the origin."""
    largest = max(points)
    if len({b for b, _ in points}) < 2:
        return 0.0, largest[0] / largest[1]
    w = [b for b, _ in points]
    sw = sum(w)
    mb = sum(wi * b for wi, (b, _) in zip(w, points)) / sw
    mt = sum(wi * t for wi, (_, t) in zip(w, points)) / sw
    cov = sum(wi * (b - mb) * (t - mt) for wi, (b, t) in zip(w, points))
    var = sum(wi * (b - mb) ** 2 for wi, (b, _) in zip(w, points))
    slope = cov / var
    if slope <= 0:
        return 0.0, largest[0] / largest[1]
    if mt - slope * mb < 0:  # no negative latency: the line through the origin, weighted the same
        slope = sum(wi * b * t for wi, (b, t) in zip(w, points)) / sum(wi * b * b for wi, (b, _) in zip(w, points))
        return 0.0, 1.0 / slope
    return mt - slope * mb, 1.0 / slope


def fit(rows: list[dict]) -> dict[str, dict]:
    """kind -> {bandwidth, latency_s, points} for every link kind the rows hold."""
    out = {}
    for kind in LINK_KINDS:
        points = [(r["moved_bytes"], r["seconds"]) for r in rows if r["kind"] == kind]
        if points:
            latency, bw = fit_line(points)
            out[kind] = {"bandwidth": bw, "latency_s": latency, "points": len(points)}
    return out


def fitted_profile(base: DeviceProfile, fits: dict[str, dict], host: dict | None, meta: dict) -> DeviceProfile:
    """`base` with each fitted link figure and the host bandwidth set and marked measured."""
    where = f"{meta.get('date')}, {meta.get('ranks')} x {meta.get('device')}, {meta.get('backend')}"
    where += f", torch {meta.get('torch')}" + (f", NCCL {meta['nccl']}" if meta.get("nccl") else "")
    figures: dict[str, Any] = {}
    provenance = dict(base.provenance)
    for kind, f in fits.items():
        figures[f"{kind}_bw"] = float(f"{f['bandwidth']:.4g}")
        provenance[f"{kind}_bw"] = (
            f"measured: lcgraph-check {where}: fit of {f['points']} sizes, latency {f['latency_s'] * 1e6:.0f} us"
        )
    if host:
        figures["host_bandwidth"] = float(f"{host['host_bandwidth']:.4g}")
        provenance["host_bandwidth"] = (
            f"measured: lcgraph-check {where}, pinned {host['mib']} MiB copies on a side stream: "
            f"d2h {host['d2h_bytes_per_s'] / 1e9:.1f} GB/s, h2d {host['h2d_bytes_per_s'] / 1e9:.1f} GB/s, "
            f"both at once {host['duplex_bytes_per_s'] / 1e9:.1f} each"
        )
    name = base.name if base.name.endswith("-checked") else f"{base.name}-checked"
    return dataclasses.replace(base, name=name, provenance=provenance, **figures)


def links_table(fits: dict[str, dict], host: dict | None, base: DeviceProfile) -> str:
    """One line per figure: measured, and the base profile's figure beside it."""
    lines = []
    for kind, f in fits.items():
        was = base.link_bw(2, kind)
        lines.append(
            f"{kind:10s} {f['bandwidth'] / 1e9:9.2f} GB/s (latency {f['latency_s'] * 1e6:.0f} us, {f['points']} "
            f"sizes); profile {base.name}: {was / 1e9:.1f} GB/s"
        )
    if host:
        lines.append(
            f"{'host':10s} {host['host_bandwidth'] / 1e9:9.2f} GB/s (d2h {host['d2h_bytes_per_s'] / 1e9:.1f}, h2d "
            f"{host['h2d_bytes_per_s'] / 1e9:.1f}, both at once {host['duplex_bytes_per_s'] / 1e9:.1f} each); "
            f"profile {base.name}: {base.host_bandwidth / 1e9:.1f} GB/s"
        )
    return "\n".join(lines)
