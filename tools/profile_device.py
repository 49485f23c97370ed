"""Measure a GPU's rates at the shapes lcgraph runs and write a device profile (lcgraph/planner/profiles/ format).

    python tools/profile_device.py --base h200 --name h200 --out h200.json      # about 2-3 minutes on an H200
    lcgraph-plan +plan.device=h200.json ...
    python tools/profile_device.py --matmul-only --base h200 --out h200.json    # re-measure matmul_flops only (~1 min)
    python tools/profile_device.py --fp8-only --base h200 --out h200.json       # re-measure fp8_speedup only (~20 s)

Measured (bf16 unless said; CUDA events, median of a few runs after warm-up):
- matmul: `matmul_flops`, the best dense bf16 rate over square cubes (4096-16384) and the largest LLaMA
  projections, timed after a warm-up that lets the clocks settle, many calls back to back per timing, best of
  several timings (the planner's rate for shapes it has no row for; MFU divides by the datasheet peak instead,
  `peak_bf16_flops`, kept from the shipped profile the GPU's name matches); fp32 (TF32 off); and
  [16384, k] x [k, n] forward and backward (dX + dW) for the projection shapes of 1B-70B LLaMA models
  (`matmul_shapes`); on GPUs with FP8 tensor cores, `fp8_speedup`: torch._scaled_mm's rate (e4m3 operands, one
  scale each, bf16 out; forward with fast accumulation, dX + dW without, as lcgraph.ops.fp8 calls it) over bf16's at
  the 8B and 70B projection shapes, flop-weighted (the casts are priced apart, as HBM traffic);
- attention blocks as the runtime calls them, for head dims 64 and 128 with 32 heads: the diagonal block
  (square, causal) and prefix blocks (sq queries over sk earlier keys, no mask), forward under no_grad and
  backward as (forward + backward) - forward; every SDPA backend that runs (cuDNN, flash), the faster one
  per shape kept (all of them go to --backends-out);
- HBM copy bandwidth; lcgraph's fused LM head + cross-entropy with and without gradients; torch's fused
  AdamW over fp32 masters; with two GPUs, the GPU0 -> GPU1 copy bandwidth.
Everything else (inter-node bandwidth, NCCL efficiency, the traffic and saved factors) is kept from --base
with its provenance; each figure of the written profile says "measured: ..." or "assumed: ...".
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from lcgraph.planner.devices import match_profile  # noqa: E402
from lcgraph.planner.profile import ATTENTION_BACKWARD, load_profile, profile_json  # noqa: E402

HEADS = 32
TOKENS = 16384  # rows of the projection matmuls (a chunk or a short sequence)
MATMUL_SHAPES = [  # (k, n): q/o, k/v, MLP up and down, of LLaMA 1B, 8B, 70B
    (2048, 2048), (2048, 512), (2048, 8192), (8192, 2048),
    (4096, 4096), (4096, 1024), (4096, 14336), (14336, 4096),
    (8192, 8192), (8192, 1024), (8192, 28672), (28672, 8192),
]  # fmt: skip
DIAG = (1024, 2048, 4096, 8192, 16384, 32768)
PREFIX_Q = (1024, 4096, 8192, 16384)
PREFIX_K = (4096, 16384, 65536, 262144)
QUICK = {"diag": (2048, 8192, 32768), "prefix_q": (2048, 8192), "prefix_k": (8192, 65536, 262144)}


def timed(fn, repeats: int, warmup: int = 1) -> float:
    """Median seconds of fn() over `repeats` runs, timed with CUDA events."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return statistics.median(times)


def warm_up(seconds: float) -> None:
    """Keep the GPU busy until its clocks have ramped up: the first timings would read low otherwise."""
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    end = time.time() + seconds
    while time.time() < end:
        for _ in range(20):
            a @ a
        torch.cuda.synchronize()


PEAK_CUBES = (4096, 8192, 16384)
PEAK_SHAPES = ((8192, 28672), (28672, 8192), (4096, 14336))  # [16384, k] x [k, n]: LLaMA's largest projections
FP8_SHAPES = ((4096, 4096), (4096, 14336), (8192, 8192), (8192, 28672), (28672, 8192))
BURST_S = 0.05  # seconds of back-to-back matmuls per timing: launch gaps and event overhead vanish


def sm_clock() -> str:
    """', SM clock N MHz, P W' read through NVML right after a timing, or '' without pynvml."""
    try:
        return f", SM clock {torch.cuda.clock_rate()} MHz, {torch.cuda.power_draw() / 1000:.0f} W"
    except Exception:  # noqa: BLE001 - NVML is optional: the rate stands without it
        return ""


def burst_rate(m: int, k: int, n: int, repeats: int) -> float:
    """Best FLOP/s of [m, k] x [k, n] bf16 over `repeats` timings of a burst of back-to-back calls."""
    a = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(k, n, device="cuda", dtype=torch.bfloat16)
    flops = 2.0 * m * k * n
    calls = max(3, round(BURST_S * 8e14 / flops))

    def burst():
        for _ in range(calls):
            a @ b

    burst()  # the first call picks the kernel
    best = min(timed(burst, 1, warmup=0) for _ in range(repeats))
    return calls * flops / best


def matmul_peak(repeats: int, warm_s: float, datasheet: float) -> tuple[float, str]:
    """The best dense bf16 matmul rate over PEAK_CUBES and PEAK_SHAPES after `warm_s` seconds of warm-up,
    and its provenance: how it was timed, and why it reads below the datasheet peak."""
    warm_up(warm_s)
    shapes = [(c, c, c) for c in PEAK_CUBES] + [(TOKENS, k, n) for k, n in PEAK_SHAPES]
    rates = {}
    for m, k, n in shapes:
        rates[(m, k, n)] = burst_rate(m, k, n, repeats)
        print(f"  matmul peak [{m}, {k}] x [{k}, {n}]: {rates[(m, k, n)] / 1e12:.0f} TFLOP/s", flush=True)
    clock = sm_clock()
    (m, k, n), best = max(rates.items(), key=lambda kv: kv[1])
    how = (
        f"best dense bf16 rate of {', '.join(f'{c}^3' for c in PEAK_CUBES)} and [{TOKENS}, k] x [k, n] for "
        f"(k, n) in {list(PEAK_SHAPES)}, after {warm_s:.0f} s of warm-up, {BURST_S * 1e3:.0f} ms bursts, best of "
        f"{repeats}: [{m}, {k}] x [{k}, {n}] at {best / 1e12:.0f} TFLOP/s{clock}"
    )
    if datasheet:
        how += (
            f"; {best / datasheet:.0%} of the {datasheet / 1e12:.1f} TFLOP/s datasheet peak, which counts every "
            "tensor core busy at the boost clock: a sustained matmul runs at the clock the power limit allows "
            "and loses some time to loads and tile edges"
        )
    return best, how


def datasheet_peaks(device_name: str) -> dict:
    """peak_bf16_flops, peak_fp32_flops and peak_source of the shipped profile this GPU's name matches (0: unknown)."""
    name = match_profile(device_name)
    if name is None:
        return {"peak_bf16_flops": 0.0, "peak_fp32_flops": 0.0, "peak_source": f"unknown for {device_name}: no MFU"}
    p = load_profile(name)
    return {"peak_bf16_flops": p.peak_bf16_flops, "peak_fp32_flops": p.peak_fp32_flops, "peak_source": p.peak_source}


def square_rate(dtype: torch.dtype, n: int, repeats: int) -> float:
    a, b = (torch.randn(n, n, device="cuda", dtype=dtype) for _ in range(2))
    return 2 * n**3 / timed(lambda: a @ b, repeats)


def shape_rates(k: int, n: int, repeats: int) -> tuple[float, float]:
    """(forward, backward) FLOP/s of x[T, k] @ w[n, k].T: forward 2Tkn, backward dX and dW 4Tkn."""
    x = torch.randn(TOKENS, k, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16)
    dy = torch.randn(TOKENS, n, device="cuda", dtype=torch.bfloat16)
    fwd = timed(lambda: x @ w.t(), repeats)
    bwd = timed(lambda: (dy @ w, dy.t() @ x), repeats)
    flops = 2.0 * TOKENS * k * n
    return flops / fwd, 2 * flops / bwd


def fp8_speedup(repeats: int) -> tuple[float, str]:
    """FP8 over bf16 matmul time at the large projections (forward + dX + dW), and how it was measured."""
    e4m3 = torch.float8_e4m3fn
    one = torch.ones((), device="cuda")
    fp8_s = bf16_s = 0.0
    rows = []
    for k, n in FP8_SHAPES:
        x, w, dy = (
            torch.randn(r, c, device="cuda", dtype=torch.bfloat16) for r, c in ((TOKENS, k), (n, k), (TOKENS, n))
        )
        xq, wq, dyq = (t.to(e4m3) for t in (x, w, dy))
        wq_col, dyt, xq_col = wq.t(), dyq.t().contiguous(), xq.t().contiguous().t()  # row-major a, column-major b
        w_col = wq.t().contiguous().t()

        def fp8_step():
            torch._scaled_mm(xq, wq_col, scale_a=one, scale_b=one, out_dtype=torch.bfloat16, use_fast_accum=True)
            torch._scaled_mm(dyq, w_col, scale_a=one, scale_b=one, out_dtype=torch.bfloat16)
            torch._scaled_mm(dyt, xq_col, scale_a=one, scale_b=one, out_dtype=torch.bfloat16)

        bf16 = timed(lambda: (x @ w.t(), dy @ w, dy.t() @ x), repeats)
        fp8 = timed(fp8_step, repeats)
        fp8_s, bf16_s = fp8_s + fp8, bf16_s + bf16
        rows.append(f"({k}, {n}) {bf16 / fp8:.2f}x")
        print(f"  fp8 [{TOKENS}, {k}] x [{k}, {n}] fwd + bwd: {bf16 / fp8:.2f}x bf16", flush=True)
    how = (
        f"torch._scaled_mm e4m3, one scale per operand (row-wise scales run other kernels), against bf16 at "
        f"[{TOKENS}, k] x [k, n], forward + dX + dW: {', '.join(rows)}"
    )
    return bf16_s / fp8_s, how


def sdpa_backends():
    from torch.nn.attention import SDPBackend

    return [(n, getattr(SDPBackend, n)) for n in ("CUDNN_ATTENTION", "FLASH_ATTENTION") if hasattr(SDPBackend, n)]


def block_seconds(sq: int, sk: int, d: int, causal: bool, backend, repeats: int) -> tuple[float, float]:
    """(forward, backward) seconds of one attention block through SDPA with one backend."""
    from torch.nn.attention import sdpa_kernel

    q = torch.randn(1, HEADS, sq, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    k, v = (torch.randn(1, HEADS, sk, d, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(2))
    grad = torch.randn_like(q)

    def fwd():
        with sdpa_kernel([backend]), torch.no_grad():
            F.scaled_dot_product_attention(q, k, v, is_causal=causal)

    def both():
        with sdpa_kernel([backend]):
            out = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
        torch.autograd.grad(out, (q, k, v), grad)

    f = timed(fwd, repeats)
    return f, max(timed(both, repeats) - f, 1e-9)


def attention_tables(d: int, shapes: dict, repeats: int, raw: dict) -> dict:
    """{"diag": [[s, fwd, bwd]], "prefix": [[sq, sk, fwd, bwd]]} at the fastest backend per shape."""
    out: dict[str, list] = {"diag": [], "prefix": []}
    blocks = [("diag", s, s) for s in shapes["diag"]]
    blocks += [("prefix", q, k) for q in shapes["prefix_q"] for k in shapes["prefix_k"]]
    for kind, sq, sk in blocks:
        fwd_flops = 4.0 * HEADS * d * (sq * (sq + 1) / 2 if kind == "diag" else sq * sk)
        best = None
        for name, backend in sdpa_backends():
            try:
                f, b = block_seconds(sq, sk, d, kind == "diag", backend, repeats)
            except RuntimeError as exc:  # backend not available for this shape / build
                raw.setdefault("unavailable", []).append(f"{name} {kind} {sq}x{sk} d={d}: {str(exc)[:80]}")
                continue
            rates = (fwd_flops / f, ATTENTION_BACKWARD * fwd_flops / b)
            raw.setdefault(name, []).append([d, kind, sq, sk, *rates])
            if best is None or f + b < best[0]:
                best = (f + b, rates, name)
        if best is None:
            raise RuntimeError("no SDPA backend (cuDNN, flash) ran; update PyTorch or the driver")
        row = [sq] if kind == "diag" else [sq, sk]
        out[kind].append([*row, _round(best[1][0]), _round(best[1][1])])
        print(f"  attention d={d} {kind:6s} {sq:6d} x {sk:6d}: fwd {best[1][0] / 1e12:5.0f} "
              f"bwd {best[1][1] / 1e12:5.0f} TFLOP/s ({best[2]})", flush=True)  # fmt: skip
    return out


def fused_loss_rates(hidden: int, vocab: int, repeats: int) -> tuple[float, float]:
    """lcgraph's fused LM head + CE: (with gradients at 6hV, under no_grad at 2hV) FLOP/s per token."""
    from lcgraph.ops.fused import linear_cross_entropy

    h = torch.randn(TOKENS, hidden, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    w = (torch.randn(vocab, hidden, device="cuda", dtype=torch.bfloat16) * 0.02).requires_grad_(True)
    y = torch.randint(0, vocab, (TOKENS,), device="cuda")
    with_grad = timed(lambda: linear_cross_entropy(h, w, y), repeats, warmup=2)  # first call compiles
    with torch.no_grad():
        no_grad = timed(lambda: linear_cross_entropy(h, w, y), repeats, warmup=2)
    hv = hidden * vocab * TOKENS
    return 6 * hv / with_grad, 2 * hv / no_grad


def adamw_rate(params: int, repeats: int) -> float:
    """Parameters per second of torch's fused AdamW over fp32 masters (as runtime/optimizer.py steps)."""
    p = torch.nn.Parameter(torch.zeros(params, device="cuda"))
    p.grad = torch.randn_like(p)
    opt = torch.optim.AdamW([p], lr=1e-4, fused=True)
    return params / timed(opt.step, repeats)


def copy_bandwidth(nbytes: int, repeats: int, dst: str = "cuda:0") -> float:
    """Bytes/s of a device copy: read+write within one GPU, or one direction between two GPUs."""
    src = torch.empty(nbytes, dtype=torch.uint8, device="cuda:0")
    out = torch.empty(nbytes, dtype=torch.uint8, device=dst)
    return (2 if dst == "cuda:0" else 1) * nbytes / timed(lambda: out.copy_(src, non_blocking=True), repeats)


def _round(x: float) -> float:
    return float(f"{x:.3g}")


def legacy_table(blocks: dict) -> list[list[float]]:
    """The causal fwd+bwd table older plans read: 3.5 x forward FLOPs over forward + backward seconds."""
    return [[s, _round((1 + ATTENTION_BACKWARD) / (1 / f + ATTENTION_BACKWARD / b))] for s, f, b in blocks["diag"]]


def write_one(base: dict, key: str, value, how: str, out: str) -> None:
    """`base`'s profile with one figure re-measured, `key`, and its provenance `how`, written to `out`."""
    provenance = {**base.get("provenance", {}), key: how}
    Path(out).write_text(profile_json({**base, key: value, "provenance": provenance}))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", default="h200", help="profile whose unmeasured figures are kept (name or path)")
    parser.add_argument("--name", default=None, help="name of the new profile (default: GPU name)")
    parser.add_argument("--out", default="profile.json", help="where to write the profile JSON")
    parser.add_argument("--backends-out", default=None, help="every backend's attention rates (JSON)")
    parser.add_argument("--quick", action="store_true", help="fewer shapes and repeats (under a minute)")
    parser.add_argument(
        "--matmul-only", action="store_true", help="re-measure matmul_flops alone into --base's figures"
    )
    parser.add_argument("--fp8-only", action="store_true", help="re-measure fp8_speedup alone into --base's figures")
    parser.add_argument("--warmup-s", type=float, default=10.0, help="seconds of matmuls before the first timing")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("profile_device: no CUDA GPU visible", file=sys.stderr)
        return 2
    base = load_profile(args.base).to_dict()
    props = torch.cuda.get_device_properties(0)
    repeats = 3 if args.quick else 5
    started, day = time.time(), time.strftime("%Y-%m-%d")
    how = f"measured: tools/profile_device.py {day}, {props.name}, torch {torch.__version__}, CUDA {torch.version.cuda}"
    print(f"profiling {props.name} ({props.total_memory / 2**30:.1f} GiB), torch {torch.__version__}", flush=True)
    peaks = datasheet_peaks(props.name)
    has_fp8 = torch.cuda.get_device_capability() >= (8, 9)
    if args.fp8_only:
        if not has_fp8:
            print(f"profile_device: {props.name} has no FP8 tensor cores (compute capability 8.9+)", file=sys.stderr)
            return 2
        warm_up(args.warmup_s)
        speedup, fp8_how = fp8_speedup(repeats)
        write_one(base, "fp8_speedup", round(speedup, 3), f"{how}: {fp8_how}", args.out)
        print(f"  fp8 {speedup:.2f}x bf16\nwrote {args.out} in {time.time() - started:.0f} s")
        return 0
    matmul, matmul_how = matmul_peak(10 if args.matmul_only else repeats, args.warmup_s, peaks["peak_bf16_flops"])
    if args.matmul_only:
        write_one(base, "matmul_flops", _round(matmul), f"{how}: {matmul_how}", args.out)
        print(f"  matmul bf16 {matmul / 1e12:.0f} TFLOP/s\nwrote {args.out} in {time.time() - started:.0f} s")
        return 0
    torch.backends.cuda.matmul.allow_tf32 = False
    fp32 = square_rate(torch.float32, 8192, 2)
    print(f"  matmul bf16 {matmul / 1e12:.0f} TFLOP/s, fp32 {fp32 / 1e12:.0f}", flush=True)
    shapes = []
    for k, n in MATMUL_SHAPES[:4] if args.quick else MATMUL_SHAPES:
        fwd, bwd = shape_rates(k, n, repeats)
        shapes.append([k, n, _round(fwd), _round(bwd)])
        print(f"  matmul [{TOKENS}, {k}] x [{k}, {n}]: fwd {fwd / 1e12:.0f} bwd {bwd / 1e12:.0f} TFLOP/s", flush=True)
    speedup, fp8_how = fp8_speedup(repeats) if has_fp8 else (0.0, "no FP8 tensor cores (compute capability < 8.9)")
    grid = QUICK if args.quick else {"diag": DIAG, "prefix_q": PREFIX_Q, "prefix_k": PREFIX_K}
    raw: dict = {}
    blocks = {d: attention_tables(d, grid, repeats, raw) for d in (64, 128)}
    torch.cuda.empty_cache()
    hbm = copy_bandwidth(2**30, repeats)
    loss, loss_nograd = fused_loss_rates(2048, 128256, repeats)
    adamw = adamw_rate(2**28, repeats)
    print(f"  HBM copy {hbm / 1e12:.2f} TB/s | fused loss {loss / 1e12:.0f} (no grad {loss_nograd / 1e12:.0f}) "
          f"TFLOP/s | AdamW {adamw / 1e9:.1f} G params/s", flush=True)  # fmt: skip
    gpus = torch.cuda.device_count()
    provenance = dict(base.get("provenance", {}))
    measured = {
        "matmul_flops": matmul_how,
        "fp32_flops": "8192^3 fp32, TF32 off",
        "matmul_shapes": f"[{TOKENS}, k] x [k, n] bf16, forward and dX + dW",
        "attention_blocks": f"SDPA {HEADS} heads, fastest of {', '.join(sorted(set(raw) - {'unavailable'}))}",
        "attention_flops": "derived from the measured diagonal blocks",
        "memory_bandwidth": "1 GiB device copy (read + write)",
        "fused_loss_flops": "lcgraph.ops.fused.linear_cross_entropy, 16384 tokens, h 2048, V 128256",
        "fused_loss_nograd_flops": "the same under no_grad",
        "adamw_params_per_s": "torch.optim.AdamW(fused=True), 2^28 fp32 parameters",
        "memory_bytes": "torch.cuda.get_device_properties",
    }
    if has_fp8:
        measured["fp8_speedup"] = fp8_how
    intra = base["intra_node_bw"]
    if gpus > 1:
        intra = copy_bandwidth(2**30, repeats, dst="cuda:1")
        measured["intra_node_bw"] = "GPU0 -> GPU1 copy (p2p; NCCL collectives reach less)"
        print(f"  GPU0 -> GPU1 copy: {intra / 1e9:.0f} GB/s", flush=True)
    provenance.update({k: f"{how}: {v}" for k, v in measured.items()})
    if not has_fp8:
        provenance["fp8_speedup"] = f"assumed: 0, {props.name} {fp8_how}"
    profile = {
        **base,
        "name": args.name or props.name.replace(" ", "_").lower(),
        "description": f"{props.name}, measured by tools/profile_device.py",
        "memory_bytes": props.total_memory,
        "matmul_flops": _round(matmul),
        "fp32_flops": _round(fp32),
        "attention_flops": {str(d): legacy_table(b) for d, b in blocks.items()},
        "attention_blocks": {str(d): b for d, b in blocks.items()},
        "matmul_shapes": shapes,
        "memory_bandwidth": _round(hbm),
        "fused_loss_flops": _round(loss),
        "fused_loss_nograd_flops": _round(loss_nograd),
        "adamw_params_per_s": _round(adamw),
        "fp8_speedup": round(speedup, 3),
        **peaks,
        "intra_node_bw": _round(intra),
        "provenance": provenance,
        "source": f"{how}; figures not measured kept from profile {base['name']!r} (see provenance).",
    }
    Path(args.out).write_text(profile_json(profile))
    if args.backends_out:
        Path(args.backends_out).write_text(json.dumps(raw, indent=1) + "\n")
    print(f"wrote {args.out} in {time.time() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
