"""Fit the planner's p2p and all-to-all figures to measured link times, and write them into a device profile.

    python3 tools/fit_links.py out/links.json --profile h200 --out lcgraph/planner/profiles/h200.json

Reads tools/link_bench.py's JSON (rows of kind, moved_bytes, seconds) and, per kind, fits
seconds = latency + moved_bytes / bandwidth by least squares (weighted toward the large messages the planner
costs: each row counts by its size). Prints each fit, the planner's current figure and their ratio; with --out
writes the profile with `p2p_bw` / `all_to_all_bw` set and their provenance marked measured (how, when, where).
The planner reads them for links inside a node (DeviceProfile.link_bw); `intra_node_bw` stays the
reduce-scatter / all-gather figure.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lcgraph.planner.profile import LINK_KINDS, DeviceProfile, load_profile, profile_json  # noqa: E402


def fit_line(points: list[tuple[float, float]]) -> tuple[float, float]:
    """(latency s, bandwidth bytes/s) of seconds = latency + bytes / bandwidth, least squares weighted by size."""
    if len({b for b, _ in points}) < 2:
        (b, t), *_ = points
        return 0.0, b / t
    w = [b for b, _ in points]
    sw = sum(w)
    mb = sum(wi * b for wi, (b, _) in zip(w, points)) / sw
    mt = sum(wi * t for wi, (_, t) in zip(w, points)) / sw
    cov = sum(wi * (b - mb) * (t - mt) for wi, (b, t) in zip(w, points))
    var = sum(wi * (b - mb) ** 2 for wi, (b, _) in zip(w, points))
    slope = cov / var
    if slope <= 0:
        raise ValueError(f"link times do not grow with size: {points}")
    return mt - slope * mb, 1.0 / slope


def fit(measured: dict) -> dict[str, dict]:
    """kind -> {bandwidth, latency_s, points} for every link kind in the JSON."""
    out = {}
    for kind in LINK_KINDS:
        points = [(r["moved_bytes"], r["seconds"]) for r in measured["rows"] if r["kind"] == kind]
        if points:
            latency, bw = fit_line(points)
            out[kind] = {"bandwidth": bw, "latency_s": latency, "points": len(points)}
    return out


def apply(profile: DeviceProfile, fits: dict[str, dict], meta: dict, source: str) -> DeviceProfile:
    """The profile with each fitted figure set and marked measured."""
    data = profile.to_dict()
    for kind, f in fits.items():
        data[f"{kind}_bw"] = float(f"{f['bandwidth']:.4g}")
        data["provenance"][f"{kind}_bw"] = (
            f"measured: tools/link_bench.py {meta.get('date')}, {meta.get('gpus')} x {meta.get('device')}, "
            f"torch {meta.get('torch')}, NCCL {meta.get('nccl')}: fit of {f['points']} sizes, latency "
            f"{f['latency_s'] * 1e6:.0f} us ({source})"
        )
    return DeviceProfile.from_dict(data)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("measured", type=Path, help="tools/link_bench.py --json output")
    ap.add_argument("--profile", default="h200", help="the device profile to update (name or JSON path)")
    ap.add_argument("--out", type=Path, help="write the updated profile here")
    args = ap.parse_args(argv)
    measured = json.loads(args.measured.read_text())
    profile = load_profile(args.profile)
    fits = fit(measured)
    for kind, f in fits.items():
        now = profile.link_bw(2, kind)
        print(
            f"{kind:10s} fitted {f['bandwidth'] / 1e9:7.1f} GB/s (latency {f['latency_s'] * 1e6:.0f} us, "
            f"{f['points']} sizes); profile {now / 1e9:.1f} GB/s: it was {now / f['bandwidth']:.2f}x the measured"
        )
    if args.out:
        updated = apply(profile, fits, measured.get("meta", {}), args.measured.name)
        args.out.write_text(profile_json(updated.to_dict()))
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
