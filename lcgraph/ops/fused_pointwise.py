"""Fused RMSNorm, SwiGLU and rotary embedding: ops that keep only what their backward needs.

A decoder layer's glue, captured as plain aten ops, keeps more for backward than its gradients need:
HF's RMSNorm keeps its fp32 upcast of the input and the normalised tensor (6 bytes per element in bf16),
SwiGLU keeps SiLU's output besides its two inputs. The `fuse_pointwise` pass (graph/fusion.py) puts these
custom ops in their place; each op's autograd saves only:

    rms_norm(x, weight, eps)   x, weight and rstd (fp32, one per row); backward recomputes x * rstd
    swiglu(gate, up)           gate and up; backward recomputes SiLU(gate)
    rotary(q, k, cos, sin)     cos and sin (shared by every layer); backward is the inverse rotation

Forward and backward are custom ops too (`lcgraph::*_backward`), so torch.compile treats them as opaque
calls: inductor never sees inside and cannot decide to keep anything else. The numerics are HF's: RMSNorm
upcasts to fp32, normalises, casts back to the input dtype and then multiplies by the weight; SiLU in
fp32, cast back, times `up`; the rotation `x * cos + rotate_half(x) * sin` in the input dtype.

Kernels (`set_kernels`, or LCGRAPH_FUSED_KERNELS): ``torch`` is the ops above in eager PyTorch (the CPU
path, exact in fp32); ``compiled`` is the same functions under torch.compile (inductor writes one Triton
kernel per function); ``liger`` calls Liger's Triton kernels (liger-kernel, the `gpu` extra). ``auto``
picks torch on CPU and, on GPU, what `AUTO_GPU` says per op (liger when it imports, else compiled), from
tools/fused_kernels.py's measurement of the three.
"""

from __future__ import annotations

import functools
import os
from collections import Counter
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

KERNELS = ("auto", "liger", "compiled", "torch")
_kernels = os.environ.get("LCGRAPH_FUSED_KERNELS", "auto")

# Calls of this process, (op, kernels) -> count; GPU tests read it to prove which kernels ran.
KERNEL_CALLS: Counter[tuple[str, str]] = Counter()


def set_kernels(name: str) -> None:
    """Select the kernels behind the fused ops for this process (see module docstring)."""
    global _kernels
    if name not in KERNELS:
        raise ValueError(f"fused kernels {name!r} unknown; choose one of {KERNELS}")
    _kernels = name


# What `auto` picks on a GPU for each op when liger-kernel imports (else `compiled`): the fastest kernels that
# agree with the plain ops in tools/fused_kernels.py at a training step's shape (16k tokens, Llama-3.2-1B).
AUTO_GPU: dict[str, str] = {"rms_norm": "liger", "swiglu": "liger", "rotary": "liger"}


@functools.cache
def liger_available() -> bool:
    try:
        import liger_kernel.ops.rms_norm  # noqa: F401
    except Exception:  # not installed, or no Triton / no GPU build
        return False
    return True


def resolve_kernels(t: torch.Tensor, op: str = "rms_norm") -> str:
    """The kernels `op` (or its backward) runs for tensors like `t`: torch on CPU; on GPU `auto` reads AUTO_GPU
    when liger-kernel imports, else compiled."""
    if t.device.type != "cuda":
        return "torch"
    if _kernels != "auto":
        return _kernels
    pick = AUTO_GPU.get(op.removesuffix("_backward"), "compiled")
    return pick if pick != "liger" or liger_available() else "compiled"


# --- reference math (HF's numerics); the torch kernels, compiled for the `compiled` ones -------------------


def rms_norm_math(x: torch.Tensor, weight: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """HF LlamaRMSNorm: y = weight * (x32 * rsqrt(mean(x32^2) + eps)).to(x.dtype); also rstd [rows] in fp32."""
    x32 = x.to(torch.float32)
    rstd = torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * (x32 * rstd).to(x.dtype), rstd.squeeze(-1)


def rms_norm_backward_math(dy, x, weight, rstd) -> tuple[torch.Tensor, torch.Tensor]:
    """dx = rstd * (dn - n * mean(dn * n)) with n = x * rstd, dn = dy * weight (fp32); dw = sum(dy * n)."""
    n = x.to(torch.float32) * rstd.unsqueeze(-1)
    dn = (dy * weight).to(torch.float32)
    dx = rstd.unsqueeze(-1) * (dn - n * (dn * n).mean(-1, keepdim=True))
    dw = (dy.to(torch.float32) * n.to(x.dtype).to(torch.float32)).reshape(-1, x.shape[-1]).sum(0)
    return dx.to(x.dtype), dw.to(weight.dtype)


def swiglu_math(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return F.silu(gate) * up


def swiglu_backward_math(dy, gate, up) -> tuple[torch.Tensor, torch.Tensor]:
    """SiLU recomputed from gate: d(up) = dy * silu(gate), d(gate) = dy * up * sig * (1 + gate * (1 - sig))."""
    g32 = gate.to(torch.float32)
    sig = torch.sigmoid(g32)
    dup = dy * F.silu(gate)
    dgate = (dy * up).to(torch.float32) * sig * (1 + g32 * (1 - sig))
    return dgate.to(gate.dtype), dup


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _unrotate_half(x: torch.Tensor) -> torch.Tensor:
    """The transpose of `_rotate_half` (its inverse too): [a, b] -> [b, -a]."""
    half = x.shape[-1] // 2
    return torch.cat((x[..., half:], -x[..., :half]), dim=-1)


def rotary_math(q, k, cos, sin) -> tuple[torch.Tensor, torch.Tensor]:
    """HF apply_rotary_pos_emb with cos/sin already broadcastable to q and k ([B, 1, S, D])."""
    return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin


def rotary_backward_math(dq, dk, cos, sin) -> tuple[torch.Tensor, torch.Tensor]:
    """The inverse rotation: d x = d y * cos + rotate_half^T(d y * sin)."""
    return dq * cos + _unrotate_half(dq * sin), dk * cos + _unrotate_half(dk * sin)


_compiled: dict[str, Callable[..., Any]] = {}


def _compiled_fn(fn: Callable[..., Any]) -> Callable[..., Any]:
    """`fn` under torch.compile (dynamic: sequence chunks of several lengths share one kernel), built once."""
    if fn.__name__ not in _compiled:
        _compiled[fn.__name__] = torch.compile(fn, dynamic=True)
    return _compiled[fn.__name__]


def _run(op: str, math_fn: Callable[..., Any], like: torch.Tensor, liger_fn: Callable[..., Any], *args):
    kernels = resolve_kernels(like, op)
    KERNEL_CALLS[(op, kernels)] += 1
    if kernels == "liger":
        return liger_fn(*args)
    if kernels == "compiled":
        return _compiled_fn(math_fn)(*args)
    return math_fn(*args)


def _bshd(t: torch.Tensor) -> torch.Tensor:
    """[B, H, S, D] stored as [B, S, H, D] (the layout of HF's q/k after projection and transpose)."""
    return t.transpose(1, 2).contiguous().transpose(1, 2)


def _empty_bshd(like: torch.Tensor) -> torch.Tensor:
    b, h, s, d = like.shape
    return like.new_empty((b, s, h, d)).transpose(1, 2)


# --- Liger kernels (liger-kernel 0.8.5); they write in place, so they get fresh copies ---------------------


def _liger_rms_norm(x, weight, eps):
    from liger_kernel.ops.rms_norm import rms_norm_forward

    if weight.dtype != x.dtype:  # Liger's output takes x's dtype; HF's promotes: keep HF's
        return rms_norm_math(x, weight, eps)
    y, _, rstd, *_ = rms_norm_forward(x, weight, eps, 0.0, "llama", None)
    return y, rstd


def _liger_rms_norm_backward(dy, x, weight, rstd):
    from liger_kernel.ops.rms_norm import rms_norm_backward
    from liger_kernel.ops.utils import calculate_settings

    if weight.dtype != x.dtype:
        return rms_norm_backward_math(dy, x, weight, rstd)
    block, warps = calculate_settings(x.shape[-1])
    x2 = x.reshape(-1, x.shape[-1])
    return rms_norm_backward(dy, x2, weight, rstd.reshape(-1), 0.0, 0, block, warps, False, None)  # 0: llama casting


def _liger_swiglu(gate, up):
    from liger_kernel.ops.swiglu import swiglu_forward

    return swiglu_forward(gate, up)[2]


def _liger_swiglu_backward(dy, gate, up):
    from liger_kernel.ops.swiglu import swiglu_backward

    return swiglu_backward(gate.clone(), up.clone(), dy)  # the kernel writes d(gate), d(up) over its inputs


def _liger_rotary(q, k, cos, sin):
    from liger_kernel.ops.rope import rope_forward

    q2, k2, _, _ = rope_forward(_bshd(q.clone()), _bshd(k.clone()), cos, sin)  # rotates in place
    return q2, k2


def _liger_rotary_backward(dq, dk, cos, sin):
    from liger_kernel.ops.rope import rope_backward

    return rope_backward(_bshd(dq.clone()), _bshd(dk.clone()), cos, sin)


# --- the custom ops --------------------------------------------------------------------------------------


@torch.library.custom_op("lcgraph::rms_norm", mutates_args=())
def rms_norm_op(x: torch.Tensor, weight: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """RMSNorm over the last dim: (y, rstd); `rms_norm` is the graph's call."""
    y, rstd = _run("rms_norm", rms_norm_math, x, _liger_rms_norm, x.contiguous(), weight, eps)
    return y.contiguous(), rstd.reshape(x.shape[:-1]).contiguous()  # Liger's rstd is flat: [rows]


@rms_norm_op.register_fake
def _(x, weight, eps):
    dtype = torch.promote_types(x.dtype, weight.dtype)
    return x.new_empty(x.shape, dtype=dtype), x.new_empty(x.shape[:-1], dtype=torch.float32)


@torch.library.custom_op("lcgraph::rms_norm_backward", mutates_args=())
def rms_norm_backward_op(
    dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, rstd: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    args = (dy.contiguous(), x.contiguous(), weight, rstd.contiguous())
    dx, dw = _run("rms_norm_backward", rms_norm_backward_math, x, _liger_rms_norm_backward, *args)
    return dx.contiguous(), dw.contiguous()


@rms_norm_backward_op.register_fake
def _(dy, x, weight, rstd):
    return x.new_empty(x.shape), weight.new_empty(weight.shape)


def _rms_norm_setup(ctx, inputs, output):
    x, weight, _ = inputs
    ctx.save_for_backward(x, weight, output[1])


def _rms_norm_backward(ctx, dy, _drstd):
    x, weight, rstd = ctx.saved_tensors
    dx, dw = torch.ops.lcgraph.rms_norm_backward(dy, x, weight, rstd)
    return dx, dw, None


rms_norm_op.register_autograd(_rms_norm_backward, setup_context=_rms_norm_setup)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Graph target of a fused RMSNorm: the op's output (its rstd is for the backward only)."""
    return torch.ops.lcgraph.rms_norm(x, weight, eps)[0]


@torch.library.custom_op("lcgraph::swiglu", mutates_args=())
def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up (LLaMA's MLP between its gate/up and down projections)."""
    return _run("swiglu", swiglu_math, gate, _liger_swiglu, gate.contiguous(), up.contiguous()).contiguous()


@swiglu.register_fake
def _(gate, up):
    return gate.new_empty(gate.shape, dtype=torch.promote_types(gate.dtype, up.dtype))


@torch.library.custom_op("lcgraph::swiglu_backward", mutates_args=())
def swiglu_backward_op(dy: torch.Tensor, gate: torch.Tensor, up: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    args = (dy.contiguous(), gate.contiguous(), up.contiguous())
    dgate, dup = _run("swiglu_backward", swiglu_backward_math, gate, _liger_swiglu_backward, *args)
    return dgate.contiguous(), dup.contiguous()


@swiglu_backward_op.register_fake
def _(dy, gate, up):
    return gate.new_empty(gate.shape), up.new_empty(up.shape)


def _swiglu_setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _swiglu_backward(ctx, dy):
    gate, up = ctx.saved_tensors
    return tuple(torch.ops.lcgraph.swiglu_backward(dy, gate, up))


swiglu.register_autograd(_swiglu_backward, setup_context=_swiglu_setup)


@torch.library.custom_op("lcgraph::rotary", mutates_args=())
def rotary(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotary embedding of q [B, Hq, S, D] and k [B, Hk, S, D] by cos/sin [B, 1, S, D]; outputs stored as
    [B, S, H, D] (the layout attention reads after HF's transpose)."""
    q2, k2 = _run("rotary", rotary_math, q, _liger_rotary, q, k, cos, sin)
    return _bshd(q2), _bshd(k2)


@rotary.register_fake
def _(q, k, cos, sin):
    return _empty_bshd(q), _empty_bshd(k)


@torch.library.custom_op("lcgraph::rotary_backward", mutates_args=())
def rotary_backward_op(
    dq: torch.Tensor, dk: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    dq2, dk2 = _run("rotary_backward", rotary_backward_math, dq, _liger_rotary_backward, dq, dk, cos, sin)
    return _bshd(dq2), _bshd(dk2)


@rotary_backward_op.register_fake
def _(dq, dk, cos, sin):
    return _empty_bshd(dq), _empty_bshd(dk)


def _rotary_setup(ctx, inputs, output):
    q, k, cos, sin = inputs
    ctx.save_for_backward(cos, sin)
    ctx.shapes = (q.shape, k.shape, q.dtype)


def _rotary_backward(ctx, dq, dk):
    cos, sin = ctx.saved_tensors
    q_shape, k_shape, dtype = ctx.shapes
    dq = dq if dq is not None else cos.new_zeros(q_shape, dtype=dtype)
    dk = dk if dk is not None else cos.new_zeros(k_shape, dtype=dtype)
    dq, dk = torch.ops.lcgraph.rotary_backward(dq, dk, cos, sin)
    return dq, dk, None, None


rotary.register_autograd(_rotary_backward, setup_context=_rotary_setup)
