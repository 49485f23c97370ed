"""Several-GPU speed and memory, each run beside its baseline and the planner's prediction (correctness: lcgraph-check).

    python3 tools/multi_gpu.py --out runs/mg                                  # 2 GPUs: every experiment below
    python3 tools/multi_gpu.py --out runs/mg --only pipeline32k ulysses       # some of them
    python3 tools/multi_gpu.py --out runs/mg4 --gpus 4                        # 4 GPUs (8: also pp2 x sp2 x dp2)
    python3 tools/multi_gpu.py --list --gpus 8                                # the runs and overrides, no GPU

2 GPUs (Llama-3.2-1B, bf16):
- pipeline32k / pipeline64k: Seq1F1B k=4 against 1F1B at pp=2, 4 micro-batches of 32k / 64k tokens; target
  Seq1F1B >= 1.05x 1F1B's tokens/s at <= 0.8x its stage-0 peak memory;
- ulysses: sp=2 against one GPU at 128k tokens (recipes/llama1b_128k_1gpu.yaml: 16 equal-cost chunks,
  train.recompute=keep_attention in 2-layer segments on both sides); scaling efficiency = tokens/s(sp=2) / (2 x tokens/s(1 GPU)), target 0.9;
- cp: ring attention cp=2 against one GPU at 128k, when the schema has `parallel.cp` (else one line says so).
4 GPUs: pp=4 Seq1F1B k=4 against 1F1B (32k x 8 micro-batches); sp=4 and pp=2 x sp=2 against one GPU at 128k.
8 GPUs: the same, plus pp=2 x sp=2 x dp=2 against one GPU.

Each run is a real `python -m lcgraph` (its own launcher, NCCL, one rank per GPU, NCCL_NVLS_ENABLE=0);
tokens/s is the trainer's (second half of the steps), memory torch's peak allocation per rank. The planner
(`build_plan` with `+plan.device=<profile>`) predicts each config in a side process while the GPUs run; rows
carry pred/meas for tokens/s and for stage 0's (rank 0's) peak; a run already measured (the one-GPU 128k
baseline) is reused. Writes <out>/multi_gpu.json after every run, so an invocation cut short keeps what it measured.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from concurrent.futures import Future, ProcessPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

MODEL = [
    "model=llama3_1b",
    "data.synthetic=true",
    "train.dtype=bf16",
    "train.device=cuda",
    "logging.wandb.mode=disabled",
    "train.progress=false",
    "train.checkpoint_every=0",
]
LONG = "+recipe=llama1b_128k_1gpu"  # one GPU fits 128k: 16 equal-cost chunks and recompute
TARGETS = {"speed": 1.05, "memory": 0.8, "efficiency": 0.9}


def pipeline(seq: int, pp: int, microbatches: int, chunks: int) -> list[tuple[str, list[str]]]:
    base = [
        "parallel=single",
        f"data.seq_len={seq}",
        f"model.max_position_embeddings={max(seq, 131072)}",
        f"parallel.pp={pp}",
        f"parallel.microbatches={microbatches}",
    ]
    return [
        (f"1f1b pp={pp}", base + ["parallel.schedule=1f1b", "parallel.seq_chunks=1"]),
        (
            f"seq1f1b k={chunks} pp={pp}",
            base + ["parallel.schedule=seq1f1b", f"parallel.seq_chunks={chunks}", "parallel.chunk_split=uniform_comp"],
        ),
    ]


# the same recompute on every side of a scaling comparison (what the planner picks for one GPU at 128k), set
# rather than `auto`: no planning inside the run, and no layout gains by recomputing less
SAME_RECOMPUTE = ["train.recompute=keep_attention", "train.recompute_layers=2"]


def long_layout(label: str, *overrides: str) -> tuple[str, list[str]]:
    """A 128k run of the one-GPU recipe (16 equal-cost chunks) with `overrides`, keep_attention on every side."""
    return label, [LONG, *SAME_RECOMPUTE, *overrides]


def has_cp() -> bool:
    from lcgraph.app.config import ParallelConfig

    return "cp" in ParallelConfig.__dataclass_fields__


def experiments(gpus: int, cp: bool | None = None) -> dict[str, list[tuple[str, list[str]]]]:
    """name -> [(label, overrides)]; the first entry of each is the baseline."""
    one = long_layout("1 GPU 128k")
    if gpus == 2:
        out = {
            "pipeline32k": pipeline(32768, 2, 4, 4),
            "pipeline64k": pipeline(65536, 2, 4, 4),
            "ulysses": [one, long_layout("sp=2 128k", "parallel.sp=2")],
        }
        if cp if cp is not None else has_cp():
            out["cp"] = [one, long_layout("cp=2 128k", "parallel.cp=2")]
        return out
    out = {
        "pipeline_pp4": pipeline(32768, 4, 8, 4),
        "ulysses_sp4": [one, long_layout("sp=4 128k", "parallel.sp=4")],
        "pp2_sp2": [one, long_layout("pp=2 x sp=2 128k", "parallel.pp=2", "parallel.sp=2", "parallel.seq_chunks=8")],
    }
    if gpus >= 8:
        out["pp2_sp2_dp2"] = [
            one,
            long_layout(
                "pp=2 x sp=2 x dp=2 128k", "parallel.pp=2", "parallel.sp=2", "parallel.dp=2", "parallel.seq_chunks=8"
            ),
        ]
    return out


def measure(overrides: list[str], run_dir: Path, steps: int, timeout: int) -> dict:
    cmd = [sys.executable, "-m", "lcgraph", *MODEL, *overrides, f"train.steps={steps}", f"hydra.run.dir={run_dir}"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "NCCL_NVLS_ENABLE": "0"}
    start = time.perf_counter()
    try:
        done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired as exc:
        return {"error": f"no result within {timeout} s", "tail": str(exc.stdout or "")[-800:]}
    wall = time.perf_counter() - start
    shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)  # the final checkpoint: GiBs, unused here
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "output.log").write_text(done.stdout + done.stderr)
    if done.returncode != 0:
        text = done.stdout + done.stderr
        return {"error": "OOM" if "OutOfMemoryError" in text else "failed", "tail": text[-1500:], "wall_s": wall}
    s = json.loads((run_dir / "summary.json").read_text())
    peaks = s.get("cuda_peak_bytes_per_rank") or [s.get("cuda_peak_bytes", 0)]
    return {
        "tokens_per_s": s["tokens_per_s"],
        "peak_gib_per_gpu": [p / 2**30 for p in peaks],
        "final_loss": s["final_loss"],
        "wall_s": round(wall, 1),
    }


def predict(overrides: list[str], device: str) -> dict:
    """The planner's tokens/s (all GPUs) and peak per rank (rank 0 first) for the same config."""
    from lcgraph.app.testing import compose
    from lcgraph.planner.plan import build_plan

    cfg = compose(*MODEL, *overrides, f"+plan.device={device}", "+plan.alternatives=false", tiny=False)
    main = build_plan(cfg).main
    s = main.summary()
    gpus = cfg.parallel.pp * cfg.parallel.dp * cfg.parallel.sp * cfg.parallel.cp
    return {
        "tokens_per_s": s["tokens_per_s_per_gpu"] * gpus,
        "peak_gib_per_gpu": [p / 2**30 for p in main.sim.rank_peak],
        "step_time_s": s["step_time_s"],
    }


def _predicted(future: Future) -> dict:
    try:
        return future.result()
    except Exception as exc:  # noqa: BLE001 - a planner failure is reported beside the measurement
        return {"error": f"{type(exc).__name__}: {exc}"}


def compare(name: str, rows: list[dict]) -> dict:
    """Ratios against the baseline (first row) and pred/meas per row; targets where the experiment has them."""
    base = rows[0]["measured"]
    out: dict = {}
    for r in rows:
        m, p = r["measured"], r["predicted"]
        if "error" in m:
            continue
        if "error" not in p:
            r["pred_over_meas"] = {
                "tokens_per_s": p["tokens_per_s"] / m["tokens_per_s"],
                "stage0_peak": p["peak_gib_per_gpu"][0] / m["peak_gib_per_gpu"][0],
            }
        if "error" not in base:
            r["vs_baseline"] = {
                "tokens_per_s": m["tokens_per_s"] / base["tokens_per_s"],
                "stage0_peak": m["peak_gib_per_gpu"][0] / base["peak_gib_per_gpu"][0],
            }
    last = rows[-1]
    if "vs_baseline" in last:
        if name.startswith("pipeline"):
            v = last["vs_baseline"]
            out["target_met"] = v["tokens_per_s"] >= TARGETS["speed"] and v["stage0_peak"] <= TARGETS["memory"]
        else:
            gpus = len(last["measured"]["peak_gib_per_gpu"])
            out["scaling_efficiency"] = last["vs_baseline"]["tokens_per_s"] / gpus
            out["target_met"] = out["scaling_efficiency"] >= TARGETS["efficiency"]
    return out


def table(name: str, rows: list[dict], verdict: dict) -> str:
    lines = [
        f"\n{name}: label | tokens/s | vs {rows[0]['label']} | peak GiB per GPU | stage-0 peak vs base | "
        "planner tokens/s (pred/meas) | planner stage-0 GiB (pred/meas)"
    ]
    for r in rows:
        m, p = r["measured"], r["predicted"]
        if "error" in m:
            lines.append(f"  {r['label']}: {m['error']} {m.get('tail', '')[-300:]}")
            continue
        v = r.get("vs_baseline", {})
        line = (
            f"  {r['label']} | {m['tokens_per_s']:,.0f} | {v.get('tokens_per_s', float('nan')):.2f}x | "
            f"{', '.join(f'{g:.1f}' for g in m['peak_gib_per_gpu'])} | {v.get('stage0_peak', float('nan')):.2f}"
        )
        if "pred_over_meas" in r:
            q = r["pred_over_meas"]
            line += (
                f" | {p['tokens_per_s']:,.0f} ({q['tokens_per_s']:.2f}) | {p['peak_gib_per_gpu'][0]:.1f} "
                f"({q['stage0_peak']:.2f})"
            )
        elif "error" in p:
            line += f" | planner: {p['error'][:200]}"
        lines.append(line)
    if verdict:
        lines.append(
            "  " + ", ".join(f"{k}: {v:.2f}" if isinstance(v, float) else f"{k}: {v}" for k, v in verdict.items())
        )
    return "\n".join(lines)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("runs/multi_gpu"))
    ap.add_argument("--gpus", type=int, choices=[2, 4, 8], default=2)
    ap.add_argument("--only", nargs="*", help="experiment names (see --list)")
    ap.add_argument("--steps", type=int, default=4, help="steps per run (tokens/s: the second half)")
    ap.add_argument("--device", default="h200", help="planner profile")
    ap.add_argument("--timeout", type=int, default=240, help="seconds per run")
    ap.add_argument("--list", action="store_true", help="print the runs and their overrides, run nothing")
    args = ap.parse_args(argv)
    chosen = {n: rows for n, rows in experiments(args.gpus).items() if not args.only or n in args.only}
    if args.gpus == 2 and not has_cp():
        print("cp: skipped, parallel.cp is not in this lcgraph's config schema (no ring attention)")
    if args.list:
        for name, runs in chosen.items():
            for label, overrides in runs:
                print(f"{name} | {label} | {' '.join(overrides)}")
        return
    args.out.mkdir(parents=True, exist_ok=True)
    results: dict = {"gpus": args.gpus, "date": time.strftime("%Y-%m-%d"), "experiments": {}}
    measured: dict[str, dict] = {}
    with ProcessPoolExecutor(max_workers=4) as pool:
        futures = {tuple(o): pool.submit(predict, o, args.device) for runs in chosen.values() for _, o in runs}
        for name, runs in chosen.items():
            rows = []
            for label, overrides in runs:
                key = " ".join(overrides)
                if key not in measured:
                    run_dir = args.out / f"{name}-{label.replace(' ', '').replace('=', '')}"
                    measured[key] = measure(overrides, run_dir, args.steps, args.timeout)
                rows.append({"label": label, "overrides": overrides, "measured": measured[key]})
                print(json.dumps({"experiment": name, **rows[-1]}), flush=True)
                results["experiments"][name] = {"rows": rows}  # predictions and ratios follow at its end
                (args.out / "multi_gpu.json").write_text(json.dumps(results, indent=1) + "\n")
            for r in rows:
                r["predicted"] = _predicted(futures[tuple(r["overrides"])])
            verdict = compare(name, rows)
            results["experiments"][name] = {"rows": rows, **verdict}
            print(table(name, rows, verdict), flush=True)
            (args.out / "multi_gpu.json").write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
