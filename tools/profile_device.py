"""Measure a GPU's rates and write a device profile for lcgraph-plan (same JSON as lcgraph/planner/profiles/*.json).

    python tools/profile_device.py --base h100 --name h100-measured --out h100-measured.json
    lcgraph-plan +plan.device=h100-measured.json ...

Measured (torch only, bf16 unless said): dense matmul FLOP/s (best of a few large square shapes), causal
attention forward+backward FLOP/s through scaled_dot_product_attention (cuDNN backend first, flash if
cuDNN is unavailable) for head dims 64 and 128 over a range of sequence lengths, fp32 matmul FLOP/s
(TF32 off), HBM bandwidth (device-to-device copy), total memory, and with two or more GPUs the
GPU-to-GPU copy bandwidth. The inter-node bandwidth cannot be measured on one node: it is kept from
--base. Attention FLOPs follow the cost model's convention: forward = 4 * batch * heads * head_dim *
causal pairs (S*(S+1)/2), forward+backward = 3.5 x forward.
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
SEQ_LENS = (1024, 4096, 16384, 32768)
QUICK_SEQ_LENS = (4096, 32768)
HEAD_DIMS = (64, 128)
TOKENS_X_HEADS = 32768 * 16  # batch*heads*seq per attention call: enough work at every length


def timed(fn, repeats: int, warmup: int = 2) -> float:
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


def matmul_rate(dtype: torch.dtype, sizes, repeats: int) -> float:
    best = 0.0
    for n in sizes:
        a = torch.randn(n, n, device="cuda", dtype=dtype)
        b = torch.randn(n, n, device="cuda", dtype=dtype)
        seconds = timed(lambda: a @ b, repeats)
        best = max(best, 2 * n**3 / seconds)
        print(f"  matmul {str(dtype):15s} {n:6d}^3: {2 * n**3 / seconds / 1e12:7.1f} TFLOP/s", flush=True)
        del a, b
    return best


def _attention_backend():
    from torch.nn.attention import SDPBackend

    for name in ("CUDNN_ATTENTION", "FLASH_ATTENTION"):
        backend = getattr(SDPBackend, name, None)
        if backend is not None:
            yield name, backend


def attention_rate(seq_len: int, head_dim: int, repeats: int) -> tuple[float, str]:
    """Causal fwd+bwd FLOP/s at `seq_len`, and the SDPA backend that ran."""
    from torch.nn.attention import sdpa_kernel

    heads = max(1, TOKENS_X_HEADS // seq_len)
    shape = (1, heads, seq_len, head_dim)
    q, k, v = (torch.randn(shape, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    grad = torch.randn(shape, device="cuda", dtype=torch.bfloat16)
    forward = 4.0 * heads * head_dim * seq_len * (seq_len + 1) / 2
    for name, backend in _attention_backend():

        def step():
            with sdpa_kernel([backend]):
                out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            torch.autograd.grad(out, (q, k, v), grad)

        try:
            seconds = timed(step, repeats)
        except RuntimeError as exc:  # backend not available for this shape / build
            print(f"  attention {name} unavailable at S={seq_len} d={head_dim}: {str(exc).splitlines()[0][:80]}")
            continue
        return 3.5 * forward / seconds, name
    raise RuntimeError("no SDPA backend (cuDNN, flash) ran; update PyTorch or the driver")


def copy_bandwidth(nbytes: int, repeats: int, dst: str = "cuda:0") -> float:
    """Bytes/s of a device copy: read+write within one GPU, or one direction between two GPUs."""
    src = torch.empty(nbytes, dtype=torch.uint8, device="cuda:0")
    out = torch.empty(nbytes, dtype=torch.uint8, device=dst)
    seconds = timed(lambda: out.copy_(src, non_blocking=True), repeats)
    return (2 if dst == "cuda:0" else 1) * nbytes / seconds


def _round(x: float) -> float:
    return float(f"{x:.3g}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", default="h100", help="profile whose unmeasured fields are kept (name or path)")
    parser.add_argument("--name", default=None, help="name of the new profile (default: GPU name)")
    parser.add_argument("--out", default="profile.json", help="where to write the profile JSON")
    parser.add_argument("--quick", action="store_true", help="fewer shapes and repeats (about a minute)")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("profile_device: no CUDA GPU visible", file=sys.stderr)
        return 2
    sys.path.insert(0, str(REPO))
    from lcgraph.planner.costs import load_profile

    base = load_profile(args.base).to_dict()
    props = torch.cuda.get_device_properties(0)
    repeats = 5 if args.quick else 30
    started = time.time()
    print(f"profiling {props.name} ({props.total_memory / 2**30:.1f} GiB), torch {torch.__version__}", flush=True)
    warm_up(0.5)
    matmul = matmul_rate(torch.bfloat16, (8192,) if args.quick else (4096, 8192, 16384), repeats)
    torch.backends.cuda.matmul.allow_tf32 = False
    fp32 = matmul_rate(torch.float32, (8192,), max(3, repeats // 4))
    attention, backends = {}, set()
    for head_dim in HEAD_DIMS:
        table = []
        for seq in QUICK_SEQ_LENS if args.quick else SEQ_LENS:
            rate, backend = attention_rate(seq, head_dim, repeats)
            backends.add(backend)
            table.append([seq, _round(rate)])
            print(f"  attention d={head_dim:3d} S={seq:6d}: {rate / 1e12:7.1f} TFLOP/s ({backend})", flush=True)
        attention[str(head_dim)] = table
    hbm = copy_bandwidth(2**30, repeats)
    print(f"  HBM copy: {hbm / 1e12:.2f} TB/s", flush=True)
    gpus = torch.cuda.device_count()
    intra = base["intra_node_bw"]
    if gpus > 1:
        intra = copy_bandwidth(2**30, repeats, dst="cuda:1")
        print(f"  GPU0 -> GPU1 copy: {intra / 1e9:.0f} GB/s", flush=True)
    profile = {
        **base,
        "name": args.name or props.name.replace(" ", "_").lower(),
        "description": f"{props.name}, measured by tools/profile_device.py",
        "memory_bytes": props.total_memory,
        "matmul_flops": _round(matmul),
        "fp32_flops": _round(fp32),
        "attention_flops": attention,
        "memory_bandwidth": _round(hbm),
        "intra_node_bw": _round(intra),
        "gpus_per_node": gpus if gpus > 1 else base["gpus_per_node"],
        "source": (
            f"Measured {time.strftime('%Y-%m-%d')} on {props.name} with torch {torch.__version__} "
            f"(CUDA {torch.version.cuda}): bf16 matmul, fp32 matmul (TF32 off), causal SDPA fwd+bwd "
            f"({', '.join(sorted(backends))}), HBM copy"
            + (", GPU-to-GPU copy" if gpus > 1 else "")
            + f". Kept from profile {base['name']!r}: inter_node_bw"
            + ("" if gpus > 1 else ", intra_node_bw, gpus_per_node")
            + "."
        ),
    }
    Path(args.out).write_text(json.dumps(profile, indent=2) + "\n")
    print(
        f"wrote {args.out} in {time.time() - started:.0f} s: matmul {matmul / 1e12:.0f} TFLOP/s, "
        f"attention d=128 at S={attention['128'][-1][0]}: {attention['128'][-1][1] / 1e12:.0f} TFLOP/s"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
