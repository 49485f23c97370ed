"""lcgraph's attention op.

Every attention layer of a captured model becomes exactly one `lcgraph::attention` node, so graph
passes (sequence chunks, Ulysses) can find and rewrite attention without pattern matching, and the
kernel behind it is chosen at run time:

- ``math``: explicit softmax(QK^T)V in fp32 on any device; the CPU reference.
- ``sdpa``: PyTorch's scaled_dot_product_attention (cuDNN / flash / efficient backends on GPU).
- ``flash_attn``: the flash-attn package (``flash_attn_func``), when installed.

Causality is implicit and aligned bottom-right: with ``Sq`` queries and ``Sk >= Sq`` keys, query
``i`` sees keys ``0 .. Sk - Sq + i``. For a full sequence (Sq == Sk) that is ordinary causal
attention; for a Seq1F1B chunk that attends a cached prefix it is exactly what the chunk needs.

Layouts: q [B, Hq, Sq, D], k and v [B, Hkv, Sk, D] with Hq % Hkv == 0 (GQA); out [B, Hq, Sq, D].
"""

from __future__ import annotations

import importlib.util
import os

import torch
import torch.nn.functional as F

from lcgraph.ops import masks

BACKENDS = ("auto", "math", "sdpa", "flash_attn")
_backend = os.environ.get("LCGRAPH_ATTENTION", "auto")


def set_backend(name: str) -> None:
    """Select the attention kernel for this process (see module docstring)."""
    global _backend
    if name not in BACKENDS:
        raise ValueError(f"attention backend {name!r} unknown; choose one of {BACKENDS}")
    if name == "flash_attn" and not flash_attn_available():
        raise ValueError("attention backend 'flash_attn' needs the flash-attn package: pip install flash-attn")
    _backend = name


def flash_attn_available() -> bool:
    return importlib.util.find_spec("flash_attn") is not None


def resolve_backend(q: torch.Tensor) -> str:
    """The kernel used for tensors like ``q``: ``auto`` picks math on CPU, flash-attn or SDPA on GPU."""
    if _backend != "auto":
        return _backend
    if q.device.type != "cuda":
        return "math"
    if q.dtype in (torch.float16, torch.bfloat16) and flash_attn_available():
        return "flash_attn"
    return "sdpa"


def _expand_kv(k: torch.Tensor, groups: int) -> torch.Tensor:
    return k if groups == 1 else k.repeat_interleave(groups, dim=1)


def _causal_mask(sq: int, sk: int, device) -> torch.Tensor:
    """Boolean [Sq, Sk] mask, True where query i may see key j (bottom-right aligned)."""
    qi = torch.arange(sq, device=device).unsqueeze(1) + (sk - sq)
    return torch.arange(sk, device=device).unsqueeze(0) <= qi


def _math(q, k, v, scale):
    groups = q.shape[1] // k.shape[1]
    k, v = _expand_kv(k, groups), _expand_kv(v, groups)
    acc = torch.promote_types(q.dtype, torch.float32)  # low precision inputs accumulate in fp32
    scores = torch.matmul(q.to(acc), k.to(acc).transpose(-1, -2)) * scale
    scores = scores.masked_fill(~_causal_mask(q.shape[2], k.shape[2], q.device), float("-inf"))
    return torch.matmul(scores.softmax(-1), v.to(acc)).to(q.dtype)


def _sdpa(q, k, v, scale):
    sq, sk = q.shape[2], k.shape[2]
    groups = q.shape[1] // k.shape[1]
    k, v = _expand_kv(k, groups), _expand_kv(v, groups)
    if sq == sk:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)
    from torch.nn.attention.bias import causal_lower_right

    return F.scaled_dot_product_attention(q, k, v, attn_mask=causal_lower_right(sq, sk), scale=scale)


def _flash_attn(q, k, v, scale):
    from flash_attn import flash_attn_func  # documented API: (b, s, h, d) layout, causal bottom-right

    out = flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), softmax_scale=scale, causal=True)
    return out.transpose(1, 2)


_KERNELS = {"math": _math, "sdpa": _sdpa, "flash_attn": _flash_attn}


def attention_reference(q, k, v, scale: float) -> torch.Tensor:
    """Differentiable attention with the selected kernel (autograd through the kernel itself)."""
    mask = masks.document_mask(q.shape[2], k.shape[2], q.device)  # packed documents kept apart (masks.py)
    if mask is not None:
        return masks.masked_attention(q, k, v, scale, mask, resolve_backend(q))
    return _KERNELS[resolve_backend(q)](q, k, v, scale)


@torch.library.custom_op("lcgraph::attention", mutates_args=())
def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """Causal (bottom-right) attention; one graph node per attention layer."""
    with torch.no_grad():
        return attention_reference(q, k, v, scale).contiguous()


@attention.register_fake
def _(q, k, v, scale):
    return q.new_empty(q.shape)  # contiguous, as the kernel returns it (q is often a transposed view)


def attention_backward(grad_out, q, k, v, scale: float):
    """Gradients of `attention` w.r.t. q, k, v: recompute the kernel's forward under autograd.

    A plain function, not an op: it runs in autograd's backward, where grad mode can be re-enabled.
    """
    with torch.enable_grad():
        q_, k_, v_ = (t.detach().requires_grad_(True) for t in (q, k, v))
        out = attention_reference(q_, k_, v_, scale)
        return torch.autograd.grad(out, (q_, k_, v_), grad_out)


def _setup_context(ctx, inputs, output):
    q, k, v, scale = inputs
    ctx.save_for_backward(q, k, v)
    ctx.scale = scale


def _backward(ctx, grad_out):
    q, k, v = ctx.saved_tensors
    dq, dk, dv = attention_backward(grad_out.contiguous(), q, k, v, ctx.scale)
    return dq, dk, dv, None


attention.register_autograd(_backward, setup_context=_setup_context)


# --- HuggingFace integration -------------------------------------------------------------------------------

ATTN_IMPLEMENTATION = "lcgraph"


def _hf_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """transformers' AttentionInterface entry: HF hands over [B, H, S, D], expects [B, S, H, D] back."""
    if dropout:
        raise ValueError("lcgraph attention has no dropout; set attention_dropout=0 in the model config")
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    out = torch.ops.lcgraph.attention(query, key, value, float(scale))
    return out.transpose(1, 2).contiguous(), None


def _no_mask(*args, **kwargs):
    """Causality is implicit in the op: HF builds no mask at all."""
    return None


def register_with_transformers() -> str:
    """Make ``config._attn_implementation = "lcgraph"`` route HF attention through `attention`."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(ATTN_IMPLEMENTATION, _hf_attention)
    AttentionMaskInterface.register(ATTN_IMPLEMENTATION, _no_mask)
    return ATTN_IMPLEMENTATION
