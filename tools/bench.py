"""Single-GPU benchmark: HF eager + SDPA against lcgraph, same random-init model, same tokens.

    python3 tools/bench.py --seq 8192 16384 --steps 6            # table + bench.json
    python3 tools/bench.py --seq 16384 --variant default compile  # lcgraph variants side by side
    python3 tools/bench.py --max-seq                              # longest trainable sequence, each side

MFU = model FLOPs per token x tokens/s / peak, with model FLOPs per token = 6*N + 6*L*h*S
(N: non-embedding parameters plus the LM head, L layers, h hidden size, S sequence length) and the peak
given by --peak-tflops (default 798: the dense bf16 matmul rate measured on the H100 here).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")  # both sides: less fragmentation

VARIANTS = {  # lcgraph variants: config overrides
    "default": [],
    "compile": ["train.compile=true"],
    "chunked": [
        "parallel.schedule=seq1f1b",
        "parallel.seq_chunks={chunks}",
        "train.recompute=true",
        "parallel.chunk_split=even",
    ],  # one stage: memory follows the longest chunk
}


def model_flops_per_token(config, seq: int) -> float:
    h, L = config.hidden_size, config.num_hidden_layers
    kv = config.num_key_value_heads * (h // config.num_attention_heads)
    per_layer = h * (2 * h + 2 * kv) + 3 * h * config.intermediate_size
    n = L * per_layer + h * config.vocab_size
    return 6 * n + 6 * L * h * seq


def _free():
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()


def _tokens(vocab: int, seq: int, steps: int):
    g = torch.Generator().manual_seed(0)
    return [torch.randint(0, vocab, (1, seq + 1), generator=g) for _ in range(steps)]


def bench_hf(config, seq: int, steps: int, warmup: int) -> dict:
    from transformers import LlamaForCausalLM

    _free()
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.config._attn_implementation = "sdpa"
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    data = _tokens(config.vocab_size, seq, warmup + steps)
    losses, start = [], None
    for i, window in enumerate(data):
        if i == warmup:
            torch.cuda.synchronize()
            start = time.perf_counter()
        window = window.cuda()
        out = model(input_ids=window[:, :-1], labels=window[:, :-1])
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(out.loss))
    torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    result = {
        "tokens_per_s": seq * steps / elapsed,
        "peak_gib": torch.cuda.max_memory_allocated() / 2**30,
        "loss_first": losses[0],
    }
    del model, opt
    return result


def bench_lcgraph(seq: int, steps: int, warmup: int, variant: str, chunks: int, model_name: str) -> dict:
    from lcgraph.app.job import Job
    from lcgraph.app.testing import compose

    _free()
    overrides = [o.format(chunks=chunks) for o in VARIANTS[variant]]
    cfg = compose(
        "parallel=single",
        f"model={model_name}",
        f"data.seq_len={seq}",
        "data.synthetic=true",
        "train.dtype=bf16",
        "train.device=cuda",
        f"train.steps={warmup + steps}",
        "logging.wandb.mode=disabled",
        "train.progress=false",
        "optim.warmup_steps=1",
        *overrides,
        tiny=False,
    )
    job = Job(cfg, Path("/tmp/lcgraph-bench"), 0, 1)
    losses, start, times = [], None, []
    for step in range(warmup + steps):
        if step == warmup:
            torch.cuda.synchronize()
            start = time.perf_counter()
        metrics = job.run_step(step)
        losses.append(metrics["loss"])
        times.append(round(metrics["step_time_s"], 3))
    torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    if PROFILE_DIR:  # after the timed steps: the profiled step must not count in tokens/s
        _profile(lambda: job.run_step(warmup + steps), Path(PROFILE_DIR) / f"profile_lcgraph_{variant}_{seq}.txt")
    stats = torch.cuda.memory_stats()
    result = {
        "tokens_per_s": seq * steps / elapsed,
        "peak_gib": torch.cuda.max_memory_allocated() / 2**30,
        "loss_first": losses[0],
        "step_times": times,
        "alloc_retries": stats.get("num_alloc_retries"),
        "reserved_gib": stats.get("reserved_bytes.all.peak", 0) / 2**30,
    }
    del job
    return result


PROFILE_DIR = None


def _profile(step_fn, path: Path) -> None:
    """One more step under torch.profiler; the kernels by GPU time go to `path`."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        step_fn()
        torch.cuda.synchronize()
    path.write_text(prof.key_averages().table(sort_by="cuda_time_total", row_limit=40))


def _safe(fn, *args) -> dict:
    try:
        return fn(*args)
    except torch.OutOfMemoryError:
        _free()
        return {"oom": True}


def isolated(side: str, seq: int, args, variant: str = "default") -> dict:
    """One measurement in a fresh process, so neither side inherits the other's GPU memory."""
    import subprocess

    cmd = [
        sys.executable,
        __file__,
        "--one",
        side,
        "--seq",
        str(seq),
        "--variant",
        variant,
        "--steps",
        str(args.steps),
        "--warmup",
        str(args.warmup),
        "--chunks",
        str(args.chunks),
        "--model",
        args.model,
    ]
    if args.profile:
        cmd += ["--profile", args.profile]
    out = subprocess.run(cmd, capture_output=True, text=True)
    lines = [ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")]
    if not lines:
        return {"error": (out.stderr or out.stdout).strip().splitlines()[-1:]}
    return json.loads(lines[-1][len("RESULT ") :])


def longest(fn, start: int, limit: int) -> int:
    """Largest power-of-two multiple of `start` (then bisected to 4k granularity) that trains."""
    ok, seq = 0, start
    while seq <= limit and "oom" not in _safe(fn, seq):
        ok, seq = seq, seq * 2
    lo, hi = ok, min(seq, limit + 1)
    while hi - lo > 4096:
        mid = (lo + hi) // 2 // 4096 * 4096
        if "oom" in _safe(fn, mid):
            hi = mid
        else:
            lo = mid
    return lo


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seq", type=int, nargs="+", default=[8192, 16384])
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--variant", nargs="+", default=["default"], choices=sorted(VARIANTS))
    ap.add_argument("--chunks", type=int, default=8, help="sequence chunks of the 'chunked' variant")
    ap.add_argument("--model", default="llama3_1b", help="a conf/model group (default: Llama-3.2-1B shape)")
    ap.add_argument("--peak-tflops", type=float, default=798.0)
    ap.add_argument("--skip-hf", action="store_true")
    ap.add_argument("--max-seq", action="store_true", help="bisect the longest trainable sequence")
    ap.add_argument("--max-limit", type=int, default=1 << 19)
    ap.add_argument("--json", default="bench.json")
    ap.add_argument("--one", choices=["hf", "lcgraph"], help=argparse.SUPPRESS)  # internal: one isolated run
    ap.add_argument("--profile", default=None, help="directory for a torch.profiler kernel table per lcgraph run")
    args = ap.parse_args()
    global PROFILE_DIR
    PROFILE_DIR = args.profile
    if args.one:
        return _run_one(args)

    from rich.console import Console
    from rich.table import Table

    from lcgraph.app.testing import compose
    from lcgraph.runtime.model import build_config

    config = build_config(compose(f"model={args.model}", tiny=False).model)
    config._attn_implementation = "sdpa"
    rows = []
    for seq in args.seq:
        flops = model_flops_per_token(config, seq)
        hf = {"skipped": True} if args.skip_hf else isolated("hf", seq, args)
        for variant in args.variant:
            lc = isolated("lcgraph", seq, args, variant)
            rows.append({"seq": seq, "variant": variant, "hf": hf, "lcgraph": lc, "flops_per_token": flops})
            print(json.dumps(rows[-1]), flush=True)
    table = Table(title=f"{args.model}, bf16, batch 1, MFU = (6N + 6*L*h*S) * tokens/s / {args.peak_tflops} TFLOP/s")
    for col in (
        "seq",
        "variant",
        "HF tok/s",
        "HF MFU",
        "HF GiB",
        "lcgraph tok/s",
        "lcgraph MFU",
        "lcgraph GiB",
        "speed x",
        "loss HF/lcg",
    ):
        table.add_column(col, justify="right")

    def fmt(r, key, f="{:.0f}"):
        return "OOM" if r.get("oom") else ("-" if key not in r else f.format(r[key]))

    for r in rows:
        hf, lc, flops = r["hf"], r["lcgraph"], r["flops_per_token"]
        for side in (hf, lc):
            if "tokens_per_s" in side:
                side["tflops"] = side["tokens_per_s"] * flops / 1e12
                side["mfu"] = side["tflops"] / args.peak_tflops
        ratio = lc["tokens_per_s"] / hf["tokens_per_s"] if "tokens_per_s" in lc and "tokens_per_s" in hf else None
        r["ratio"] = ratio
        table.add_row(
            str(r["seq"]),
            r["variant"],
            fmt(hf, "tokens_per_s"),
            fmt(hf, "mfu", "{:.2f}"),
            fmt(hf, "peak_gib", "{:.1f}"),
            fmt(lc, "tokens_per_s"),
            fmt(lc, "mfu", "{:.2f}"),
            fmt(lc, "peak_gib", "{:.1f}"),
            "-" if ratio is None else f"{ratio:.2f}",
            f"{hf.get('loss_first', float('nan')):.3f}/{lc.get('loss_first', float('nan')):.3f}",
        )
    Console().print(table)
    out = {"rows": rows, "gpu": torch.cuda.get_device_name(), "torch": torch.__version__}
    if args.max_seq:
        out["max_seq_hf"] = longest(lambda s: bench_hf(config, s, 1, 1), 8192, args.max_limit)
        out["max_seq_lcgraph"] = longest(
            lambda s: bench_lcgraph(s, 1, 1, "chunked", max(args.chunks, s // 16384), args.model), 8192, args.max_limit
        )
        print(f"longest trainable sequence: HF {out['max_seq_hf']}, lcgraph {out['max_seq_lcgraph']}")
    Path(args.json).write_text(json.dumps(out, indent=2))


def _run_one(args) -> None:
    from lcgraph.app.testing import compose
    from lcgraph.runtime.model import build_config

    seq = args.seq[0]
    if args.one == "hf":
        config = build_config(compose(f"model={args.model}", tiny=False).model)
        result = _safe(bench_hf, config, seq, args.steps, args.warmup)
    else:
        result = _safe(bench_lcgraph, seq, args.steps, args.warmup, args.variant[0], args.chunks, args.model)
    print("RESULT " + json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
