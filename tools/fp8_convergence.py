"""FP8 convergence: one model trained twice from the same seed, bf16 matmuls and FP8 (`train.fp8`), losses compared.

    python3 tools/fp8_convergence.py --out runs/fp8_convergence --json runs/fp8_convergence/fp8_convergence.json
    python3 tools/fp8_convergence.py --fp8 rowwise --steps 1000 --tolerance 0.005
    python3 tools/fp8_convergence.py --set +recipe=gpu model=llama3_1b parallel.dp=1 data.seq_len=8192 \\
        data.max_corpus_mb=30 optim.lr=6e-4 train.compile=true

Each run is the real trainer (`python -m lcgraph.app.cli`) in its own process and run directory, <out>/bf16 and
<out>/fp8 (replaced on each call; the trainer's output in <out>/bf16.log and <out>/fp8.log), with the overrides of
`--set`, then `train.steps=--steps`, `train.fp8=false` or `train.fp8=--fp8`, and always `train.on_nonfinite=skip`
(a non-finite step is logged and counted, not the end of the run), no W&B, no progress bar, no checkpoint before
the final one (deleted after the run); `--parallel` runs the two at once, on one device with memory for both.
`--set` replaces the default, a GPU run: recipes/gpu.yaml (bf16 weights,
fp32 master weights and AdamW moments, 50 warm-up steps, cosine decay) on one GPU (`parallel.dp=1`), the
Llama-3.2-1B shape from random init, compiled (uncompiled FP8 casts are slower than bf16), 8,192-token windows of
the standard library's sources (30 MB of them), a pretraining learning rate of 3e-4.

`--baseline` reuses the bf16 run of an earlier result of this tool instead of training it again (refused unless
that run had the same overrides; recorded in the result's `meta.baseline`): one baseline for several recipes.
Compared: the mean loss of the last `--last` steps of each run and their relative difference (fp8 - bf16) / bf16;
`ok` when it is within `--tolerance` and neither run had a non-finite (skipped) step, else `MISSED`. Writes `--json`
({"bf16": {"losses"}, "fp8": {"losses"}, "meta"}: one loss per step, null where it was not finite) and a plot of
both curves beside it (the same name, .png). Exit 1 when a run fails (the end of its output printed), else 0,
whatever the verdict.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import shutil
import subprocess
import sys
import time
from importlib.metadata import version
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # this tree's lcgraph, as the runs get it
from lcgraph.ops.fp8 import RECIPES  # noqa: E402
from lcgraph.runtime.checkpoint import METRICS  # noqa: E402

GPU_RUN = [
    "+recipe=gpu",
    "model=llama3_1b",
    "parallel.dp=1",
    "data.seq_len=8192",
    "data.max_corpus_mb=30",
    "optim.lr=3e-4",
    "train.compile=true",
]
FIXED = ["train.on_nonfinite=skip", "train.checkpoint_every=0", "train.progress=false", "logging.wandb.mode=disabled"]


def start(name: str, overrides: list[str], out: Path) -> tuple[list[str], subprocess.Popen, Path]:
    """One trainer process in <out>/<name>, its output in <out>/<name>.log: command line, process, log."""
    run_dir = out / name
    shutil.rmtree(run_dir, ignore_errors=True)
    cmd = [sys.executable, "-m", "lcgraph.app.cli", *overrides, *FIXED, f"hydra.run.dir={run_dir}"]
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)  # this tree's lcgraph
    env = {**os.environ, "PYTHONPATH": path}
    log = out / f"{name}.log"
    print(f"{name}: {shlex.join(cmd)}\n  output: {log}", flush=True)
    with open(log, "w") as f:
        return cmd, subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env), log


def finish(name: str, cmd: list[str], proc: subprocess.Popen, log: Path, began: float) -> tuple[str, list[dict]]:
    """Waits for one trainer: its command line and metrics.jsonl rows. A run that fails ends the tool (exit 1)
    with the tail of its output."""
    code = proc.wait()
    run_dir = log.parent / name
    shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)  # the final checkpoint: GiBs, unused here
    if code != 0:
        tail = "\n".join(log.read_text().splitlines()[-30:])
        sys.exit(f"fp8_convergence: the {name} run failed (exit code {code}); the end of {log}:\n{tail}")
    rows = [json.loads(line) for line in (run_dir / METRICS).read_text().splitlines()]
    print(f"{name}: {len(rows)} steps in {time.perf_counter() - began:.0f} s", flush=True)
    return shlex.join(cmd), rows


def reuse_baseline(path: Path, overrides: list[str], gpu: str, torch_version: str) -> tuple[str, list[dict], dict]:
    """The bf16 run of an earlier result (`--baseline`) as this call's: its command line, rows, and where the curve
    came from (the result that trained it, its GPU, torch and date). Refused in one line unless it trained with these
    overrides (the same model, data, steps and schedule: the same curve); a curve from another GPU or torch is
    said in a line and recorded, since kernels differ in their rounding."""
    earlier = json.loads(path.read_text())
    meta = earlier["meta"]
    words = shlex.split(meta["commands"]["bf16"])
    if "lcgraph.app.cli" not in words:
        sys.exit(f"fp8_convergence: {path} records no trainer command for its bf16 run; leave out --baseline")
    theirs, ours = (
        [w for w in ws if not w.startswith("hydra.run.dir=")]
        for ws in (words[words.index("lcgraph.app.cli") + 1 :], [*overrides, *FIXED])
    )
    if theirs != ours:
        had, has = ([w for w in a if w not in b] or ["none"] for a, b in ((theirs, ours), (ours, theirs)))
        sys.exit(
            f"fp8_convergence: the bf16 run of {path} trained with other overrides (it had {', '.join(had)}; this "
            f"call has {', '.join(has)}); call with the overrides it had, or leave out --baseline"
        )
    source = meta.get("baseline") or {
        "json": str(path),
        "gpu": meta["gpu"],
        "torch": meta["torch"],
        "date": meta["date"],
    }
    skipped = set(meta["nonfinite_steps"].get("bf16", []))
    losses = earlier["bf16"]["losses"]
    rows = [{"step": i, "loss": math.nan if x is None else x, "skipped": i in skipped} for i, x in enumerate(losses, 1)]
    print(
        f"bf16: reused from {source['json']} ({source['gpu']}, torch {source['torch']}, {source['date']})", flush=True
    )
    if (source["gpu"], source["torch"]) != (gpu, torch_version):
        print(
            f"bf16: note: that curve is of {source['gpu']}, torch {source['torch']}; this run's: {gpu}, torch {torch_version}"
        )
    return meta["commands"]["bf16"], rows, source


def train_both(runs: dict[str, list[str]], out: Path, parallel: bool) -> dict[str, tuple[str, list[dict]]]:
    """Each run's command line and rows; with `parallel` all trainers run at once (one device shared: the
    compiles overlap, and where memory holds both, the wall time nearly halves), else one after the other."""
    began = time.perf_counter()
    if parallel:
        started = {name: start(name, overrides, out) for name, overrides in runs.items()}
        return {name: finish(name, *started[name], began) for name in runs}
    done = {}
    for name, overrides in runs.items():
        done[name] = finish(name, *start(name, overrides, out), time.perf_counter())
    return done


def nonfinite_steps(rows: list[dict]) -> list[int]:
    """Steps whose update was dropped (`skipped`: non-finite loss or gradients) or whose loss is not finite."""
    return [r["step"] for r in rows if r.get("skipped") or not math.isfinite(r["loss"])]


def compare(bf16: list[float], fp8: list[float], last: int, tolerance: float, nonfinite: bool) -> dict:
    """The mean loss of each run's last `last` steps, their relative difference and the verdict."""
    a, b = (sum(x[-last:]) / len(x[-last:]) for x in (bf16, fp8))
    rel = (b - a) / a
    ok = math.isfinite(rel) and abs(rel) <= tolerance and not nonfinite
    return {"mean_last_bf16": a, "mean_last_fp8": b, "rel_diff": rel, "verdict": "ok" if ok else "MISSED"}


def _finite(x):
    return x if not isinstance(x, float) or math.isfinite(x) else None  # JSON has no NaN


def plot(bf16: list[float], fp8: list[float], recipe: str, last: int, result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    steps = range(1, len(bf16) + 1)
    ax.plot(steps, bf16, lw=1, label="bf16")
    ax.plot(steps, fp8, lw=1, label=f"fp8 {recipe}")
    ax.axvspan(len(bf16) - last + 0.5, len(bf16) + 0.5, color="0.9", label=f"last {last} steps (compared)")
    means = f"mean of the last {last}: {result['mean_last_bf16']:.4f} and {result['mean_last_fp8']:.4f}"
    title = f"train.fp8=false against train.fp8={recipe}\n{means} ({result['rel_diff']:+.2%}): {result['verdict']}"
    ax.set(xlabel="step", ylabel="training loss", title=title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=300, help="train.steps of each run")
    ap.add_argument("--fp8", default="tensorwise", choices=list(RECIPES), help="the FP8 run's recipe")
    ap.add_argument("--last", type=int, default=20, help="steps at the end whose mean loss is compared")
    ap.add_argument("--tolerance", type=float, default=0.01, help="largest |relative difference| that is ok")
    ap.add_argument("--set", nargs="*", default=GPU_RUN, help=f"Hydra overrides of both runs (default: {GPU_RUN})")
    ap.add_argument("--parallel", action="store_true", help="run both at once on one device (memory for two)")
    ap.add_argument("--baseline", type=Path, help="reuse the bf16 run of this earlier --json (same overrides)")
    ap.add_argument("--out", type=Path, default=Path("runs/fp8_convergence"), help="folder of the two run dirs")
    ap.add_argument("--json", type=Path, default=Path("fp8_convergence.json"), help="results; the plot beside it")
    return ap


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    asked = {
        name: [*args.set, f"train.steps={args.steps}", f"train.fp8={fp8}"]
        for name, fp8 in (("bf16", "false"), ("fp8", args.fp8))
    }
    import torch

    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    reused = reuse_baseline(args.baseline, asked.pop("bf16"), gpu, torch.__version__) if args.baseline else None
    runs = train_both(asked, out, args.parallel)
    runs = {"bf16": reused[:2], **runs} if reused else runs
    (bf16_cmd, bf16_rows), (fp8_cmd, fp8_rows) = runs["bf16"], runs["fp8"]
    bf16, fp8 = ([r["loss"] for r in rows] for rows in (bf16_rows, fp8_rows))
    if len(bf16) != args.steps or len(fp8) != args.steps:  # e.g. stopped early by a signal
        sys.exit(f"fp8_convergence: {args.steps} steps asked, the runs logged {len(bf16)} and {len(fp8)}")
    last = min(args.last, len(bf16), len(fp8))
    skipped = {name: nonfinite_steps(rows) for name, (_, rows) in runs.items()}
    result = compare(bf16, fp8, last, args.tolerance, any(skipped.values()))
    meta = {
        "commands": {"bf16": bf16_cmd, "fp8": fp8_cmd},
        "gpu": gpu,
        "torch": torch.__version__,
        "transformers": version("transformers"),
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "steps": args.steps,
        "recipe": args.fp8,
        "last": last,
        "tolerance": args.tolerance,
        "parallel": args.parallel,
        "baseline": reused[2] if reused else None,  # where the reused bf16 curve was trained
        **{k: _finite(v) for k, v in result.items()},
        "nonfinite": any(skipped.values()),
        "nonfinite_steps": skipped,
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    doc = {"bf16": {"losses": [_finite(x) for x in bf16]}, "fp8": {"losses": [_finite(x) for x in fp8]}, "meta": meta}
    args.json.write_text(json.dumps(doc, indent=1) + "\n")
    plot(bf16, fp8, args.fp8, last, result, args.json.with_suffix(".png"))
    bad = ", ".join(f"{k} {v}" for k, v in skipped.items() if v) or "none"
    print(f"mean loss of the last {last} of {args.steps} steps ({meta['gpu']})")
    print(f"  bf16             {result['mean_last_bf16']:.4f}")
    print(f"  fp8 {args.fp8:<12} {result['mean_last_fp8']:.4f}")
    print(f"  difference       {result['rel_diff']:+.2%} (tolerance {args.tolerance:.2%}), non-finite steps: {bad}")
    print(f"verdict: {result['verdict']}  ({args.json}, {args.json.with_suffix('.png')})")


if __name__ == "__main__":
    main()
