"""The fused RMSNorm, SwiGLU and rotary ops against the plain ops they replace: time and memory kept for backward.

    python3 tools/fused_kernels.py --out out/fused_kernels.json     # one H200: 16k tokens, Llama-3.2-1B shapes, bf16, < 2 min
    python3 tools/fused_kernels.py --device cpu --tokens 64 --hidden 64 --ffn 128 --heads 4/2 --head-dim 16 --dtype fp32 \\
        --candidates plain torch --out /tmp/fused_kernels.json

Candidates, per op (each run forward then backward under autograd, as a training step runs them):
  plain           HF's modules in eager PyTorch (LlamaRMSNorm, SiLU(gate) * up, apply_rotary_pos_emb)
  plain_compiled  the same under torch.compile: what a compiled stage graph without `fuse_pointwise` runs
  torch           the fused op (lcgraph::rms_norm, ...) with its eager PyTorch kernels (the CPU path)
  compiled        the fused op with its kernels under torch.compile (lcgraph's own Triton, written by inductor)
  liger           the fused op with Liger's Triton kernels (liger-kernel)
Per row: forward and backward milliseconds (CUDA events; median of --repeats after one warm-up), `kept_bytes`
(what autograd holds after the forward besides the output: CUDA memory on GPU, saved-tensor hooks on CPU),
and the relative difference (in norm) of output and every gradient from the `plain` row. `best` names, per op,
the fastest fused candidate that agrees with plain: what `auto` should pick (lcgraph.ops.fused_pointwise).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from transformers import LlamaConfig  # noqa: E402
from transformers.models.llama import modeling_llama as hf  # noqa: E402

from lcgraph.ops import fused_pointwise as fp  # noqa: E402
from lcgraph.runtime.interpreter import ActivationMeter  # noqa: E402

CANDIDATES = ("plain", "plain_compiled", "torch", "compiled", "liger")
FUSED = ("torch", "compiled", "liger")
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
AGREE = {torch.bfloat16: 2e-2, torch.float32: 1e-5}  # relative difference in norm from plain


def _plain_fns(a) -> dict[str, Callable]:
    def rms_norm(x, w):
        x32 = x.to(torch.float32)
        return w * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + a.eps)).to(x.dtype)

    return {
        "rms_norm": rms_norm,
        "swiglu": lambda gate, up: F.silu(gate) * up,
        "rotary": lambda q, k, cos, sin: hf.apply_rotary_pos_emb(q, k, cos.squeeze(1), sin.squeeze(1)),
    }


def _fused_fns(a) -> dict[str, Callable]:
    return {
        "rms_norm": lambda x, w: fp.rms_norm(x, w, a.eps),
        "swiglu": lambda gate, up: fp.swiglu(gate, up),
        "rotary": lambda q, k, cos, sin: fp.rotary(q, k, cos, sin),
    }


def inputs(op: str, a, device: str, dtype: torch.dtype) -> tuple[list[torch.Tensor], Callable]:
    """The op's leaf tensors (those that take gradients require them) and the function that makes its arguments
    from them: q/k [B, H, S, D] as HF hands them over, transposed views of [B, S, H, D] projections."""
    g = torch.Generator(device="cpu").manual_seed(0)

    def rand(*shape, scale=1.0, base=0.0, grad=True):
        t = (base + scale * torch.randn(*shape, generator=g)).to(device=device, dtype=dtype)
        return t.requires_grad_(grad)

    s = a.tokens
    if op == "rms_norm":
        return [rand(1, s, a.hidden), rand(a.hidden, scale=0.1, base=1.0)], list
    if op == "swiglu":
        return [rand(1, s, a.ffn), rand(1, s, a.ffn)], list
    hq, hk = (int(h) for h in a.heads.split("/"))
    config = LlamaConfig(hidden_size=hq * a.head_dim, num_attention_heads=hq, head_dim=a.head_dim)
    q, k = rand(1, s, hq, a.head_dim), rand(1, s, hk, a.head_dim)
    cos, sin = hf.LlamaRotaryEmbedding(config).to(device)(q, torch.arange(s, device=device)[None])
    cos, sin = cos.to(dtype).unsqueeze(1), sin.to(dtype).unsqueeze(1)
    return [q, k], lambda leaves: [leaves[0].transpose(1, 2), leaves[1].transpose(1, 2), cos, sin]


def _kept_bytes_hooks(fn, args) -> tuple[object, int]:
    """fn's output and the bytes autograd keeps for its backward (each storage once): the runtime's meter."""
    meter = ActivationMeter(param_ptrs=set())
    with meter.hooks(()):
        out = fn(*args)
    return out, meter.unit_bytes[()]


def _outputs(out) -> tuple[torch.Tensor, ...]:
    return tuple(out) if isinstance(out, (tuple, list)) else (out,)


def _forward(fn, args, device: str) -> tuple[tuple[torch.Tensor, ...], int]:
    if device != "cuda":
        out, kept = _kept_bytes_hooks(fn, args)
        return _outputs(out), kept
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    outs = _outputs(fn(*args))
    torch.cuda.synchronize()
    return outs, torch.cuda.memory_allocated() - before - sum(o.untyped_storage().nbytes() for o in outs)


class Clock:
    def __init__(self, device: str):
        self.cuda = device == "cuda"

    def __call__(self, fn: Callable[[], object]) -> float:
        if not self.cuda:
            start = time.perf_counter()
            fn()
            return (time.perf_counter() - start) * 1e3
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        begin.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        return begin.elapsed_time(end)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.float(), b.float()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def measure(op: str, name: str, fn: Callable, a, device: str, dtype: torch.dtype) -> dict:
    """One candidate on one op: times, kept bytes, outputs and gradients (for the comparison with plain)."""
    clock = Clock(device)
    leaves, make_args = inputs(op, a, device, dtype)
    args = make_args(leaves)
    outs = _outputs(fn(*args))  # warm-up (compiles, autotunes)
    g = torch.Generator(device="cpu").manual_seed(1)  # the same output gradients for every candidate
    dys = [torch.randn(o.shape, generator=g).to(o) for o in outs]
    torch.autograd.backward(outs, dys)
    for x in leaves:
        x.grad = None
    outs, kept = _forward(fn, args, device)
    torch.autograd.backward(outs, dys)
    result = {"outputs": [o.detach() for o in outs], "grads": [x.grad for x in leaves]}
    fwd, bwd = [], []
    for _ in range(a.repeats):
        for x in leaves:
            x.grad = None
        holder: dict = {}
        fwd.append(clock(lambda: holder.update(outs=_outputs(fn(*args)))))
        bwd.append(clock(lambda: torch.autograd.backward(holder["outs"], dys)))
    row = {"op": op, "candidate": name, "fwd_ms": statistics.median(fwd), "bwd_ms": statistics.median(bwd)}
    row["fwd_bwd_ms"] = row["fwd_ms"] + row["bwd_ms"]
    row["kept_bytes"] = int(kept)
    return {"row": row, **result}


def run(a) -> dict:
    device, dtype = a.device, DTYPES[a.dtype]
    plain_fns, fused_fns = _plain_fns(a), _fused_fns(a)
    rows, best = [], {}
    for op in a.ops:
        ref = None
        for name in a.candidates:
            if name == "liger" and not (device == "cuda" and fp.liger_available()):
                rows.append({"op": op, "candidate": name, "skipped": "liger-kernel does not import (or no GPU)"})
                continue
            if name == "compiled" and device != "cuda":
                rows.append({"op": op, "candidate": name, "skipped": "on CPU the fused ops run their torch kernels"})
                continue
            if name in FUSED:
                fp.set_kernels(name)
                fn = fused_fns[op]
            else:
                fn = plain_fns[op] if name == "plain" else torch.compile(plain_fns[op], dynamic=False)
            try:
                got = measure(op, name, fn, a, device, dtype)
            except Exception as exc:  # a candidate that fails is reported, the others still run
                rows.append({"op": op, "candidate": name, "error": f"{type(exc).__name__}: {str(exc).splitlines()[0]}"})
                continue
            finally:
                fp.set_kernels("auto")
            row = got["row"]
            if ref is None:
                ref = got
            pairs = list(zip(got["outputs"], ref["outputs"])) + list(zip(got["grads"], ref["grads"]))
            row["max_rel_diff"] = max(_rel(x, y) for x, y in pairs)
            row["agrees"] = row["max_rel_diff"] <= AGREE[dtype]
            rows.append(row)
            print(
                f"{op:9s} {name:15s} fwd {row['fwd_ms']:8.3f} ms  bwd {row['bwd_ms']:8.3f} ms  "
                f"kept {row['kept_bytes'] / 2**20:9.1f} MiB  diff {row['max_rel_diff']:.1e}"
            )
        fused = [r for r in rows if r["op"] == op and r.get("candidate") in FUSED and r.get("agrees")]
        if fused:
            best[op] = min(fused, key=lambda r: r["fwd_bwd_ms"])["candidate"]
    shape = {k: getattr(a, k) for k in ("tokens", "hidden", "ffn", "heads", "head_dim", "dtype", "device")}
    return {"shape": shape, "torch": torch.__version__, "rows": rows, "best": best}


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--dtype", default="bf16", choices=sorted(DTYPES))
    ap.add_argument("--tokens", type=int, default=16384)
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--ffn", type=int, default=8192)
    ap.add_argument("--heads", default="32/8", help="query heads / key-value heads")
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--eps", type=float, default=1e-5)
    ap.add_argument(
        "--ops", nargs="+", default=["rms_norm", "swiglu", "rotary"], choices=["rms_norm", "swiglu", "rotary"]
    )
    ap.add_argument("--candidates", nargs="+", default=list(CANDIDATES), choices=CANDIDATES)
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--out", default="fused_kernels.json")
    return ap


def main(argv: list[str] | None = None) -> dict:
    a = parser().parse_args(argv)
    if "plain" in a.candidates:  # the reference every other row is compared with: first
        a.candidates = ["plain"] + [c for c in a.candidates if c != "plain"]
    out = run(a)
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(out, indent=1))
    print(f"best per op: {out['best']} -> {a.out}")
    return out


if __name__ == "__main__":
    main()
