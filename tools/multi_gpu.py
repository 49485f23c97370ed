"""Several-GPU measurements, each beside its baseline in the same run, with the planner's prediction.

    python3 tools/multi_gpu.py --out runs/mg                       # both experiments, defaults below
    python3 tools/multi_gpu.py --out runs/mg --only pipeline --pipeline-seq 32768

- pipeline: Seq1F1B (k chunks) against 1F1B at pp=2, same micro-batches: tokens/s and peak memory per GPU.
- ulysses:  sp=2 against one GPU at the same sequence length: scaling efficiency = tokens/s(sp=2) / (2 x
            tokens/s(1 GPU)).
Each run is a real `python -m lcgraph` (its own launcher, NCCL, one rank per GPU); tokens/s is the trainer's
(second half of the steps), memory is torch's peak allocation per rank. The planner (`lcgraph.plan.build_plan`
with `+plan.device=<profile>`) predicts the same configs; the table prints predicted / measured.
Writes <out>/multi_gpu.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
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
]


def experiments(args) -> dict[str, list[tuple[str, list[str]]]]:
    """name -> [(label, overrides)], the first entry of each is the baseline."""
    pipe = [
        f"data.seq_len={args.pipeline_seq}",
        "parallel.pp=2",
        "parallel.sp=1",
        "parallel.dp=1",
        f"parallel.microbatches={args.microbatches}",
        f"model.max_position_embeddings={args.pipeline_seq}",
    ]
    uly = [
        f"data.seq_len={args.ulysses_seq}",
        "parallel.pp=1",
        "parallel.dp=1",
        "parallel.schedule=seq1f1b",
        f"parallel.seq_chunks={args.ulysses_chunks}",
        "parallel.microbatches=1",
        "train.recompute=true",
        f"model.max_position_embeddings={args.ulysses_seq}",
    ]
    return {
        "pipeline": [
            ("1f1b", pipe + ["parallel.schedule=1f1b", "parallel.seq_chunks=1"]),
            (f"seq1f1b k={args.chunks}", pipe + ["parallel.schedule=seq1f1b", f"parallel.seq_chunks={args.chunks}"]),
        ],
        "ulysses": [("1 GPU", uly + ["parallel.sp=1"]), ("sp=2", uly + ["parallel.sp=2"])],
    }


def measure(overrides: list[str], run_dir: Path, steps: int, timeout: int) -> dict:
    cmd = [sys.executable, "-m", "lcgraph", *MODEL, *overrides, f"train.steps={steps}", f"hydra.run.dir={run_dir}"]
    done = subprocess.run(
        cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout, env={**os.environ, "PYTHONUNBUFFERED": "1"}
    )
    if done.returncode != 0:
        return {"error": (done.stdout + done.stderr)[-1500:]}
    s = json.loads((run_dir / "summary.json").read_text())
    peaks = s.get("cuda_peak_bytes_per_rank") or [s.get("cuda_peak_bytes", 0)]
    return {
        "tokens_per_s": s["tokens_per_s"],
        "peak_gib_per_gpu": [p / 2**30 for p in peaks],
        "final_loss": s["final_loss"],
    }


def predict(overrides: list[str], device: str) -> dict:
    from lcgraph.app.testing import compose
    from lcgraph.planner.plan import build_plan

    cfg = compose(*MODEL, *overrides, f"+plan.device={device}", "+plan.alternatives=false", tiny=False)
    s = build_plan(cfg).main.summary()
    gpus = cfg.parallel.pp * cfg.parallel.dp * cfg.parallel.sp
    return {"tokens_per_s": s["tokens_per_s_per_gpu"] * gpus, "peak_gib_per_gpu": s["peak_bytes"] / 2**30}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--only", nargs="*", choices=["pipeline", "ulysses"])
    ap.add_argument("--pipeline-seq", type=int, default=32768)
    ap.add_argument("--microbatches", type=int, default=4)
    ap.add_argument("--chunks", type=int, default=4)
    ap.add_argument("--ulysses-seq", type=int, default=131072)
    ap.add_argument("--ulysses-chunks", type=int, default=16)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--device", default="h200", help="planner profile")
    ap.add_argument("--timeout", type=int, default=400)
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    results = {}
    for name, runs in experiments(args).items():
        if args.only and name not in args.only:
            continue
        rows = []
        for label, overrides in runs:
            measured = measure(
                overrides, args.out / f"{name}-{label.replace(' ', '').replace('=', '')}", args.steps, args.timeout
            )
            try:
                predicted = predict(overrides, args.device)
            except Exception as exc:  # noqa: BLE001 - a planner failure is reported beside the measurement
                predicted = {"error": f"{type(exc).__name__}: {exc}"}
            rows.append({"label": label, "overrides": overrides, "measured": measured, "predicted": predicted})
            print(json.dumps(rows[-1]), flush=True)
        results[name] = rows
        _print(name, rows)
    (args.out / "multi_gpu.json").write_text(json.dumps(results, indent=2))


def _print(name: str, rows: list[dict]) -> None:
    base = rows[0]["measured"].get("tokens_per_s")
    print(
        f"\n{name}: label | tokens/s | vs {rows[0]['label']} | peak GiB per GPU | predicted tokens/s (pred/meas) "
        "| predicted GiB (pred/meas)"
    )
    for r in rows:
        m, p = r["measured"], r["predicted"]
        if "error" in m:
            print(f"  {r['label']}: FAILED {m['error'][-300:]}")
            continue
        peak = max(m["peak_gib_per_gpu"])
        line = (
            f"  {r['label']} | {m['tokens_per_s']:,.0f} | {m['tokens_per_s'] / base:.2f}x | "
            f"{', '.join(f'{g:.1f}' for g in m['peak_gib_per_gpu'])}"
        )
        if "error" not in p:
            line += (
                f" | {p['tokens_per_s']:,.0f} ({p['tokens_per_s'] / m['tokens_per_s']:.2f}) | "
                f"{p['peak_gib_per_gpu']:.1f} ({p['peak_gib_per_gpu'] / peak:.2f})"
            )
        print(line)
    if name == "ulysses" and len(rows) == 2 and all("error" not in r["measured"] for r in rows):
        eff = rows[1]["measured"]["tokens_per_s"] / (2 * base)
        print(f"  scaling efficiency sp=2: {eff:.2f}")


if __name__ == "__main__":
    main()
