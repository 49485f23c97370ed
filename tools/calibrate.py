"""Planner against the GPU: run single-GPU configurations, plan the same ones, print predicted / measured.

    python tools/calibrate.py --profile h200.json                 # the full list (over 30 minutes on an H200)
    python tools/calibrate.py --profile h200.json --quick         # 5 configurations, about 5 minutes
    python tools/calibrate.py --profile h200.json --fit --write-profile h200.json   # also fit the factors
    python tools/calibrate.py --profile h200.json --only "32k full" "64k full" --out part.json    # some of it
    python tools/calibrate.py --measured docs/results/calibration_h200.json --fit   # no GPU: replan, refit

Each run is a fresh subprocess through lcgraph's own trainer (`Job.run_step`, Llama-3.2-1B shape, bf16,
synthetic tokens): step time = median of the timed steps, peak memory = torch.cuda.max_memory_allocated.
The planner runs the same config on the given profile. Rows are printed with the worst ratio last and
written as JSON after each run (default docs/results/calibration_<date>.json, the GPU's name inside), so a
run cut short keeps its rows. `--measured` reuses the measurements of earlier runs' JSON, one file or several
joined into one table (no GPU needed), and plans them again on the given profile. `--fit` fits the profile's
two assumed factors by least squares (elementwise traffic per eager/compiled, saved activations) and prints
the table again with them; `--write-profile` stores them, marked "fitted".
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")

from lcgraph.planner.profile import load_profile, profile_json  # noqa: E402

TIME_BAND, MEMORY_BAND = 0.15, 0.10
# name -> (seq_len, seq_chunks, recompute, compile)
FULL = {
    f"{seq // 1024}k {mode}{' compiled' if c else ''}": (seq, 1, mode, c)
    for seq in (16384, 32768, 65536)
    for mode in ("none", "keep_attention", "full")
    for c in (False, True)
} | {
    f"256k k=32 {mode}{' compiled' if c else ''}": (262144, 32, mode, c)
    for mode in ("keep_attention", "full")
    for c in (False, True)
}
QUICK = {
    "16k none": (16384, 1, "none", False),
    "16k none compiled": (16384, 1, "none", True),
    "32k keep_attention": (32768, 1, "keep_attention", False),
    "32k full": (32768, 1, "full", False),
    "64k k=8 keep_attention": (65536, 8, "keep_attention", False),
}


def overrides(seq: int, chunks: int, mode: str, compiled: bool) -> list[str]:
    out = [
        "parallel=single",
        "model=llama3_1b",
        f"model.max_position_embeddings={max(seq, 131072)}",
        f"data.seq_len={seq}",
        "data.synthetic=true",
        "train.dtype=bf16",
        "train.device=cuda",
        f"train.recompute={mode}",
        f"train.compile={str(compiled).lower()}",
        "train.fuse=off",  # the planner costs the plain graph's ops (docs/kernels.md)
        "logging.wandb.mode=disabled",
        "train.progress=false",
        "optim.warmup_steps=1",
    ]
    if chunks > 1:
        out += ["parallel.schedule=seq1f1b", f"parallel.seq_chunks={chunks}", "parallel.chunk_split=even"]
    return out


def compose_cfg(args: list[str]):
    """The config as the trainer composes and types it; a boolean-only `train.recompute` schema gets true/false."""
    from lcgraph.app.testing import run_config

    try:
        return run_config(*args, tiny=False)
    except Exception:  # older schema: recompute is a boolean
        legacy = {"train.recompute=none": "train.recompute=false", "train.recompute=full": "train.recompute=true"}
        return run_config(*[legacy.get(a, a) for a in args], tiny=False)


def measure(args: list[str], steps: int, warmup: int) -> dict:
    """In this process: train warmup + steps steps, return median step seconds and peak bytes."""
    import statistics

    import torch

    from lcgraph.app.job import Job, resolve_plan

    cfg = compose_cfg(args + [f"train.steps={warmup + steps}"])
    job = Job(cfg, Path("/tmp/lcgraph-calibrate"), 0, 1, plan=resolve_plan(cfg))
    times = []
    for step in range(warmup + steps):
        torch.cuda.synchronize()
        start = time.perf_counter()
        job.run_step(step)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return {"step_s": statistics.median(times[warmup:]), "peak_bytes": torch.cuda.max_memory_allocated()}


def measure_isolated(args: list[str], steps: int, warmup: int, timeout: float) -> dict:
    cmd = [sys.executable, __file__, "--one", json.dumps(args), "--steps", str(steps), "--warmup", str(warmup)]
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    lines = [ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")]
    if not lines:
        tail = (out.stderr or out.stdout).strip().splitlines()[-1:] or ["no output"]
        return {"error": "OOM" if "OutOfMemory" in out.stderr else tail[0][:160]}
    return json.loads(lines[-1][len("RESULT ") :])


def predict(args: list[str], profile_path: str, profile=None) -> dict:
    """The planner's step time and peak for the config (with `profile` replacing the file's, if given)."""
    from lcgraph.planner import evaluation

    cfg = compose_cfg(args + [f"+plan.device={profile_path}", "+plan.alternatives=false", "+plan.timeline=false"])
    st = evaluation.setup(cfg.planned(), _captured(cfg.model))
    if profile is not None:
        st.profile = profile
    ev = evaluation.evaluate_config(cfg.planned(), st)
    return {"step_s": ev.sim.step_time, "peak_bytes": max(ev.sim.rank_peak)}


def _captured(model_cfg):
    """The model's meta-device capture, one per process (capture() keeps it): `overrides` raises the position
    limit with the sequence, which changes no node of the graph, so it is left out of the cache key."""
    import dataclasses

    from lcgraph.graph.capture import capture
    from lcgraph.runtime.model import build_config

    return capture(build_config(dataclasses.replace(model_cfg, max_position_embeddings=131072)))


def table(rows: list[dict]) -> list[dict]:
    """Rows with ratios, the worst (largest |log ratio| of time or memory) last."""
    import math

    done = [r for r in rows if "measured" in r and "error" not in r["measured"]]
    for r in done:
        r["time_ratio"] = r["predicted"]["step_s"] / r["measured"]["step_s"]
        r["memory_ratio"] = r["predicted"]["peak_bytes"] / r["measured"]["peak_bytes"]
        r["in_band"] = abs(r["time_ratio"] - 1) <= TIME_BAND and abs(r["memory_ratio"] - 1) <= MEMORY_BAND
    done.sort(key=lambda r: max(abs(math.log(r["time_ratio"])), abs(math.log(r["memory_ratio"]))))
    return [r for r in rows if r not in done] + done


def print_table(rows: list[dict], title: str) -> None:
    print(f"\n{title}")
    print(f"{'config':28s} {'pred s':>8s} {'meas s':>8s} {'ratio':>6s} {'pred GiB':>9s} {'meas GiB':>9s} {'ratio':>6s}")
    for r in rows:
        p, m = r["predicted"], r.get("measured", {})
        if "time_ratio" not in r:
            print(
                f"{r['name']:28s} {p['step_s']:8.3f} {'-':>8s} {'':6s} {p['peak_bytes'] / 2**30:9.1f}  {m.get('error')}"
            )
            continue
        flag = "" if r["in_band"] else "  OUT OF BAND"
        print(
            f"{r['name']:28s} {p['step_s']:8.3f} {m['step_s']:8.3f} {r['time_ratio']:6.2f} "
            f"{p['peak_bytes'] / 2**30:9.1f} {m['peak_bytes'] / 2**30:9.1f} {r['memory_ratio']:6.2f}{flag}"
        )


def fit(rows: list[dict], profile_path: str):
    """Least-squares traffic factor per compile mode and one saved factor: predictions are linear in each."""
    prof = load_profile(profile_path)
    fitted_traffic, fitted_saved = dict(prof.traffic_factor), dict(prof.saved_factor)
    done = [r for r in rows if "time_ratio" in r]
    for mode in ("eager", "compiled"):
        sel = [r for r in done if r["compiled"] == (mode == "compiled")]
        if not sel:
            continue
        num = den = 0.0
        mem_num = mem_den = 0.0
        for r in sel:
            # two points above zero: at a saved factor near 0 the peak becomes OPT's (the fp32 gradients), not
            # the activations, so the line is drawn through factors 1 and 2 and extended to 0
            one, two = (
                dataclasses.replace(
                    prof, traffic_factor={**fitted_traffic, mode: f}, saved_factor={**fitted_saved, mode: f}
                )
                for f in (1.0, 2.0)
            )
            p1, p2 = predict(r["args"], profile_path, one), predict(r["args"], profile_path, two)
            slope_t, slope_m = p2["step_s"] - p1["step_s"], p2["peak_bytes"] - p1["peak_bytes"]
            p0 = {k: p1[k] - (p2[k] - p1[k]) for k in ("step_s", "peak_bytes")}
            num += slope_t * (r["measured"]["step_s"] - p0["step_s"])
            den += slope_t**2
            mem_num += slope_m * (r["measured"]["peak_bytes"] - p0["peak_bytes"])
            mem_den += slope_m**2
        fitted_traffic[mode] = round(max(num / den, 0.0), 3) if den else fitted_traffic[mode]
        fitted_saved[mode] = round(max(mem_num / mem_den, 0.0), 3) if mem_den else fitted_saved[mode]
    return dataclasses.replace(prof, traffic_factor=fitted_traffic, saved_factor=fitted_saved)


def measure_rows(args, out: Path) -> tuple[str, list[dict]]:
    """Run each configuration on this machine's GPU and plan it; `out` gets the rows so far after each one,
    so a run cut short (a device time limit) keeps what it measured."""
    import torch

    configs = QUICK if args.quick else FULL
    if args.only:
        configs = {n: c for n, c in {**FULL, **QUICK}.items() if n in args.only}
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    rows = []
    for name, (seq, chunks, mode, compiled) in configs.items():
        cfg_args = overrides(seq, chunks, mode, compiled)
        row = {"name": name, "args": cfg_args, "compiled": compiled, "predicted": predict(cfg_args, args.profile)}
        row["measured"] = measure_isolated(cfg_args, args.steps, args.warmup, args.timeout)
        print(f"{name}: predicted {row['predicted']} measured {row['measured']}", flush=True)
        rows.append(row)
        write_json(out, record(gpu, args.profile, rows))
    return gpu, rows


def record(gpu: str, profile: str, rows: list[dict]) -> dict:
    """What a calibration JSON holds (measured_rows reads it back)."""
    return {"gpu": gpu, "profile": profile, "date": time.strftime("%Y-%m-%d"), "rows": rows}


def write_json(out: Path, result: dict) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")


def measured_rows(paths: list[str], profile: str) -> tuple[str, list[dict]]:
    """The measurements of earlier runs (their JSON), planned again on `profile`; each row names the file and
    day it was measured (`source`), kept through later joins."""
    gpus, rows = set(), []
    for path in paths:
        saved = json.loads(Path(path).read_text())
        gpus.add(saved["gpu"])
        for r in saved["rows"]:
            if "measured" in r and "error" not in r["measured"]:
                keep = ("name", "args", "compiled", "measured")
                source = {"source": r.get("source", f"{Path(path).name}, {saved.get('date', 'undated')}")}
                rows.append({k: r[k] for k in keep} | source | {"predicted": predict(r["args"], profile)})
    if len(gpus) != 1:
        raise SystemExit(f"--measured: the files come from {len(gpus)} GPU kinds ({sorted(gpus)}); give one kind")
    return gpus.pop(), rows


def _fit_note(rows: list[dict], before: str, gpu: str) -> str:
    """Provenance of a fitted factor: which modes the fit saw, on how many runs; the rest keeps its old note."""
    runs = {mode: sum(r["compiled"] == (mode == "compiled") for r in rows if "time_ratio" in r) for mode in MODES}
    day = time.strftime("%Y-%m-%d")
    fitted = [f"{m} fitted to {n} {gpu} run(s) (tools/calibrate.py {day})" for m, n in runs.items() if n]
    kept = before.removeprefix("assumed:").strip()
    return "assumed: " + "; ".join(fitted + ([f"otherwise as before: {kept}"] if len(fitted) < len(runs) else []))


MODES = ("eager", "compiled")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--profile", default="h200", help="device profile (name or path) the planner uses")
    ap.add_argument("--quick", action="store_true", help=f"{len(QUICK)} configurations (about 5 minutes)")
    ap.add_argument("--only", nargs="+", default=None, help="configuration names to run")
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--timeout", type=float, default=300.0, help="seconds per configuration")
    ap.add_argument("--out", default=None, help="JSON path (default docs/results/calibration_<date>.json)")
    ap.add_argument("--fit", action="store_true", help="fit traffic and saved factors to the measurements")
    ap.add_argument("--write-profile", default=None, help="with --fit: write the profile with the fitted factors")
    ap.add_argument("--measured", nargs="+", default=None, help="earlier runs' JSON: replan their measurements")
    ap.add_argument("--one", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.one:
        print("RESULT " + json.dumps(measure(json.loads(args.one), args.steps, args.warmup)), flush=True)
        return 0
    out = Path(args.out or REPO / "docs" / "results" / f"calibration_{time.strftime('%Y-%m-%d')}.json")
    gpu, rows = measured_rows(args.measured, args.profile) if args.measured else measure_rows(args, out)
    rows = table(rows)
    print_table(rows, f"predicted / measured on {gpu}, profile {args.profile} (worst last)")
    result = record(gpu, args.profile, rows)
    if args.fit:
        fitted = fit(rows, args.profile)
        for r in rows:
            if "time_ratio" in r:
                r["predicted_fitted"] = predict(r["args"], args.profile, fitted)
        refit = table([{**r, "predicted": r.get("predicted_fitted", r["predicted"])} for r in rows])
        print_table(refit, f"with fitted traffic {fitted.traffic_factor}, saved {fitted.saved_factor} (worst last)")
        result.update(
            fitted={"traffic_factor": fitted.traffic_factor, "saved_factor": fitted.saved_factor}, rows_fitted=refit
        )
        if args.write_profile:
            fitted.provenance.update(
                {
                    key: _fit_note(rows, fitted.provenance.get(key, ""), gpu)
                    for key in ("traffic_factor", "saved_factor")
                }
            )
            Path(args.write_profile).write_text(profile_json(fitted.to_dict()))
    write_json(out, result)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
