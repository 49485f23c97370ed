"""Measure the host link that train.offload uses: pinned host <-> GPU copies on a side stream.

    python3 tools/host_link.py --out host_link.json
    python3 tools/host_link.py --out host_link.json --update-profile lcgraph/planner/profiles/h200.json

Each direction is timed alone (device -> host, host -> device), then both at once on two streams (a full-duplex
link keeps most of each rate). Copies are `--mib` MiB, repeated `--repeat` times after one warm-up, timed with
CUDA events on the copy stream. `host_bandwidth` in the output is the slower single direction in bytes/s: what
the planner charges offloaded bytes at (docs/offload.md). `--update-profile` writes it into a device profile
JSON with its provenance marked measured. `--device cpu` times plain host copies (a check of the tool only).
"""

from __future__ import annotations

import argparse
import json
import time
from datetime import date
from pathlib import Path

import torch


def _timed_cuda(copies, streams) -> float:
    """Seconds for `copies` (callables, one per stream), all issued at once, timed by events on each stream."""
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


def measure(device: str = "cuda", mib: int = 1024, repeat: int = 5) -> dict:
    """Bytes/s of device -> host, host -> device and both at once (each direction's rate while both run)."""
    nbytes = mib * 2**20
    cuda = device == "cuda"
    host_out = torch.empty(nbytes, dtype=torch.uint8, pin_memory=cuda)
    host_in = torch.empty(nbytes, dtype=torch.uint8, pin_memory=cuda).fill_(1)
    dev_out = torch.ones(nbytes, dtype=torch.uint8, device=device)
    dev_in = torch.empty(nbytes, dtype=torch.uint8, device=device)

    def d2h():
        host_out.copy_(dev_out, non_blocking=cuda)

    def h2d():
        dev_in.copy_(host_in, non_blocking=cuda)

    def rate(copies) -> float:
        if cuda:
            streams = [torch.cuda.Stream() for _ in copies]
            _timed_cuda(copies, streams)  # warm-up
            best = min(_timed_cuda(copies, streams) for _ in range(repeat))
        else:
            best = float("inf")
            for _ in range(repeat + 1):
                start = time.perf_counter()
                for copy in copies:
                    copy()
                best = min(best, time.perf_counter() - start)
        return nbytes / best

    result = {
        "device": torch.cuda.get_device_name() if cuda else "cpu",
        "mib": mib,
        "pinned": cuda,
        "d2h_bytes_per_s": rate([d2h]),
        "h2d_bytes_per_s": rate([h2d]),
        "duplex_bytes_per_s": rate([d2h, h2d]),  # per direction, both running
    }
    result["host_bandwidth"] = min(result["d2h_bytes_per_s"], result["h2d_bytes_per_s"])
    return result


def update_profile(path: Path, result: dict) -> None:
    """Write the measured host bandwidth into a device profile JSON, marked measured."""
    from lcgraph.planner.profile import DeviceProfile, profile_json

    profile = DeviceProfile.from_dict(json.loads(path.read_text()))
    profile.host_bandwidth = result["host_bandwidth"]
    profile.provenance["host_bandwidth"] = (
        f"measured: tools/host_link.py, pinned {result['mib']} MiB copies on a side stream, {result['device']}, "
        f"{date.today().isoformat()}: d2h {result['d2h_bytes_per_s'] / 1e9:.1f} GB/s, "
        f"h2d {result['h2d_bytes_per_s'] / 1e9:.1f} GB/s, both at once {result['duplex_bytes_per_s'] / 1e9:.1f} each"
    )
    path.write_text(profile_json(profile.to_dict()))


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="host_link.json", help="JSON with the rates in bytes/s")
    ap.add_argument("--mib", type=int, default=1024, help="MiB per copy")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--update-profile", type=Path, help="a device profile JSON to write host_bandwidth into")
    return ap


def main(argv: list[str] | None = None) -> dict:
    args = parser().parse_args(argv)
    result = measure(args.device, args.mib, args.repeat)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    for key in ("d2h_bytes_per_s", "h2d_bytes_per_s", "duplex_bytes_per_s"):
        print(f"{key[: key.index('_bytes')]:>7}: {result[key] / 1e9:7.1f} GB/s")
    if args.update_profile:
        update_profile(args.update_profile, result)
        print(f"host_bandwidth {result['host_bandwidth'] / 1e9:.1f} GB/s written to {args.update_profile}")
    return result


if __name__ == "__main__":
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    main()
