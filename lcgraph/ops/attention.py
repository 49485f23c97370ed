"""lcgraph's attention op and the kernels behind it.

Every attention layer of a captured model becomes exactly one `lcgraph::attention` node, so graph
passes (sequence chunks, Ulysses) can find and rewrite attention without pattern matching, and the
kernel behind it is chosen at run time. Each kernel has a forward that returns the output and the
log-sum-exp (LSE) of each query's scores, and a backward that takes both back: the forward keeps what
the backward needs and never runs again under autograd.

- ``math``: explicit softmax(QK^T)V with fp32 (or fp64) accumulation on any device; the CPU reference. Its
  backward is the flash-style formula from the LSE (see `_math_backward`).
- ``cudnn``: PyTorch's cuDNN SDPA ops (`aten._scaled_dot_product_cudnn_attention` and its `_backward`).
- ``flash``: PyTorch's FlashAttention-2 ops (`aten._scaled_dot_product_flash_attention` and its `_backward`).
- ``efficient``: PyTorch's memory-efficient ops (fp32 on GPU too; needs equal heads, so K/V are expanded).

Causality is implicit and aligned bottom-right: with ``Sq`` queries and ``Sk >= Sq`` keys, query
``i`` sees keys ``0 .. Sk - Sq + i``. `attend` splits such a call into a prefix block (keys
``0 .. Sk - Sq``, no mask) and a diagonal block (square, causal), and merges the two through their LSE,
so every kernel call is either unmasked or square-causal, which every kernel supports (SDPA's own
``is_causal`` is top-left aligned when Sq != Sk). The backward runs once per block with the merged
output and LSE, which makes each block's probabilities the global ones: the gradients are exact.

Layouts: q [B, Hq, Sq, D], k and v [B, Hkv, Sk, D] with Hq % Hkv == 0 (GQA); out [B, Hq, Sq, D];
lse [B, Hq, Sq] float32 (float64 for float64 inputs).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch

from lcgraph.ops import masks
from lcgraph.ops.context import current
from lcgraph.ops.context import set_backend as set_backend  # the kernel switch, where callers look for it

# What `auto` picks on a GPU, per (compute capability major, inputs are fp16/bf16): the first backend whose
# head-dim limit admits the model's. On an H200 cuDNN was fastest in every case measured, head dims 64 and 128,
# full, prefix and diagonal blocks (tools/attention_kernels.py, docs/attention.md); flash elsewhere.
AUTO_TABLE: dict[tuple[int, bool], list[tuple[int, str]]] = {
    (9, True): [(128, "cudnn"), (256, "flash")],
    (8, True): [(256, "flash")],
}
AUTO_FALLBACK = "efficient"  # fp32 on GPU, head dims the table does not cover, GPUs it does not list
# Under a document mask `auto` runs flash where the table says cuDNN: cuDNN builds an execution plan for every new
# span length, and packed documents bring new lengths every step (one H200, 16k tokens of 8k-token documents:
# 20,464 tok/s on cuDNN, 41,773 on flash; docs/benchmarks.md).
DOCUMENT_AUTO = {"cudnn": "flash"}

# Kernel runs of this process, ("forward" | "backward") -> count, one per attention call (however many
# blocks it has); tests read it to prove each layer's forward runs once per unit and step.
KERNEL_CALLS: Counter[str] = Counter()


def attention_backend() -> str:
    """The backend this process was set to by `set_backend`: `auto` or a kernel's name."""
    return current().backend


def resolve_backend(q: torch.Tensor, documents: bool = False) -> str:
    """The kernel used for tensors like ``q``: ``auto`` picks math on CPU and reads `AUTO_TABLE` on GPU
    (`DOCUMENT_AUTO` under a document mask)."""
    if (chosen := current().backend) != "auto":
        return chosen
    if q.device.type != "cuda":
        return "math"
    major = torch.cuda.get_device_capability(q.device)[0]
    half = q.dtype in (torch.float16, torch.bfloat16)
    for max_dim, name in AUTO_TABLE.get((major, half), []):
        if q.shape[-1] <= max_dim:
            return DOCUMENT_AUTO.get(name, name) if documents else name
    return AUTO_FALLBACK


# --- kernels: forward (q, k, v, scale, causal) -> Block; backward -> (dq, dk, dv) -------------------------


class Block(NamedTuple):
    """One kernel call's result: output, LSE [B, Hq, Sq], and what that kernel's backward needs besides."""

    out: torch.Tensor
    lse: torch.Tensor
    aux: tuple[Any, ...] = ()


def _accumulate_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.promote_types(t.dtype, torch.float32)  # low precision inputs accumulate in fp32


def _grouped(q: torch.Tensor, kv_heads: int) -> torch.Tensor:
    """[B, Hq, S, D] -> [B, Hkv, G, S, D]: GQA by broadcasting against [B, Hkv, 1, S, D], no K/V copies."""
    b, h, s, d = q.shape
    return q.reshape(b, kv_heads, h // kv_heads, s, d)


def _math_scores(q, k, scale, causal):
    acc = _accumulate_dtype(q)
    scores = torch.matmul(_grouped(q.to(acc), k.shape[1]), k.to(acc).unsqueeze(2).transpose(-1, -2)) * scale
    if causal:  # square block: query i sees keys 0..i
        scores = scores.masked_fill(torch.ones_like(scores[0, 0, 0], dtype=torch.bool).triu(1), float("-inf"))
    return scores  # [B, Hkv, G, Sq, Sk]


def _math_forward(q, k, v, scale: float, causal: bool) -> Block:
    scores = _math_scores(q, k, scale, causal)
    lse = scores.logsumexp(-1)
    out = torch.matmul(torch.exp(scores - lse.unsqueeze(-1)), v.to(scores.dtype).unsqueeze(2))
    b, h, s, _ = q.shape
    return Block(out.reshape(b, h, s, v.shape[-1]).to(q.dtype), lse.reshape(b, h, s))


def _math_backward(dout, q, k, v, out, lse, scale: float, causal: bool, aux=()):
    """P = exp(S*scale - lse), D = rowsum(dO*O), dV = P^T dO, dS = P*(dO V^T - D), dQ = scale*dS K,
    dK = scale*dS^T Q; GQA gradients of K/V sum over the query heads of their group."""
    hkv = k.shape[1]
    scores = _math_scores(q, k, scale, causal)
    acc = scores.dtype
    p = torch.exp(scores - _grouped(lse.to(acc).unsqueeze(-1), hkv))
    do, o = _grouped(dout.to(acc), hkv), _grouped(out.to(acc), hkv)
    delta = (do * o).sum(-1, keepdim=True)
    dv = torch.matmul(p.transpose(-1, -2), do).sum(2)
    ds = p * (torch.matmul(do, v.to(acc).unsqueeze(2).transpose(-1, -2)) - delta)
    dq = torch.matmul(ds, k.to(acc).unsqueeze(2)) * scale
    dk = (torch.matmul(ds.transpose(-1, -2), _grouped(q.to(acc), hkv)) * scale).sum(2)
    return dq.reshape(q.shape).to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


_aten = torch.ops.aten


def _flash_forward(q, k, v, scale: float, causal: bool) -> Block:
    # FlashAttention-2 takes GQA natively (Hkv < Hq, no copies) in both directions; lse is [B, Hq, Sq] fp32
    r = _aten._scaled_dot_product_flash_attention(q, k, v, 0.0, causal, False, scale=scale)
    return Block(r[0], r[1], (r[2], r[3], r[4], r[5], r[6], r[7]))


def _flash_backward(dout, q, k, v, out, lse, scale: float, causal: bool, aux=()):
    cum_q, cum_k, max_q, max_k, seed, offset = aux
    r = _aten._scaled_dot_product_flash_attention_backward(
        dout, q, k, v, out, lse, cum_q, cum_k, max_q, max_k, 0.0, causal, seed, offset, scale=scale
    )
    return r[0], r[1], r[2]


def _cudnn_forward(q, k, v, scale: float, causal: bool) -> Block:
    r = _aten._scaled_dot_product_cudnn_attention(q, k, v, None, True, 0.0, causal, False, scale=scale)
    lse = r[1].reshape(q.shape[:3])  # cuDNN's is [B, Hq, Sq, 1]
    return Block(r[0], lse, (r[2], r[3], r[4], r[5], r[6], r[7]))


def _cudnn_backward(dout, q, k, v, out, lse, scale: float, causal: bool, aux=()):
    cum_q, cum_k, max_q, max_k, seed, offset = aux
    r = _aten._scaled_dot_product_cudnn_attention_backward(
        dout, q, k, v, out, lse.unsqueeze(-1), seed, offset, None, cum_q, cum_k, max_q, max_k, 0.0, causal, scale=scale
    )
    return r[0], r[1], r[2]


def _expand_heads(t: torch.Tensor, heads: int) -> torch.Tensor:
    """K/V repeated up to the query heads: only for kernels that need equal heads (`efficient`)."""
    groups = heads // t.shape[1]
    return t if groups == 1 else t.repeat_interleave(groups, dim=1)


def _efficient_forward(q, k, v, scale: float, causal: bool) -> Block:
    h = q.shape[1]
    r = _aten._scaled_dot_product_efficient_attention(
        q, _expand_heads(k, h), _expand_heads(v, h), None, True, 0.0, causal, scale=scale
    )
    sq = q.shape[2]
    return Block(r[0], r[1][..., :sq], (r[1].shape[-1], r[2], r[3]))  # its LSE rows are padded to a multiple of 32


def _efficient_backward(dout, q, k, v, out, lse, scale: float, causal: bool, aux=()):
    padded, seed, offset = aux
    h, groups = q.shape[1], q.shape[1] // k.shape[1]
    lse = torch.nn.functional.pad(lse, (0, padded - lse.shape[-1]))
    r = _aten._scaled_dot_product_efficient_attention_backward(
        dout, q, _expand_heads(k, h), _expand_heads(v, h), None, out, lse, seed, offset, 0.0, [True, True, True, False],
        causal, scale=scale,
    )  # fmt: skip
    dk, dv = r[1], r[2]
    if groups > 1:  # gradients of the repeated heads sum onto their K/V head
        dk, dv = (t.unflatten(1, (k.shape[1], groups)).sum(2) for t in (dk, dv))
    return r[0], dk, dv


@dataclass(frozen=True)
class Kernel:
    forward: Any  # (q, k, v, scale, causal) -> Block
    backward: Any  # (dout, q, k, v, out, lse, scale, causal, aux) -> (dq, dk, dv)


KERNELS = {
    "math": Kernel(_math_forward, _math_backward),
    "flash": Kernel(_flash_forward, _flash_backward),
    "cudnn": Kernel(_cudnn_forward, _cudnn_backward),
    "efficient": Kernel(_efficient_forward, _efficient_backward),
}


DOCUMENTS = "+documents"  # appended to the backend name `attend` records for a document-masked call

# --- causal attention over [prefix || own keys] as two blocks merged through the LSE ---------------------


@dataclass
class Saved:
    """What `attend` returns and its backward takes: merged output and LSE, and each block's kernel aux."""

    out: torch.Tensor
    lse: torch.Tensor
    backend: str
    aux_diagonal: tuple = ()
    aux_prefix: tuple = ()
    spans: tuple = ()  # a document-masked call: its masks.Span, and aux_diagonal holds each one's (diagonal, prefix) aux

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.out, self.lse))


class Grads(NamedTuple):
    dq: torch.Tensor
    dk: torch.Tensor  # own keys (the last Sq)
    dv: torch.Tensor
    dk_prefix: torch.Tensor | None  # keys 0 .. Sk - Sq, None without a prefix
    dv_prefix: torch.Tensor | None


def _merge(a: Block, b: Block, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    lse = torch.logaddexp(a.lse, b.lse)
    acc = lse.dtype
    out = a.out.to(acc) * torch.exp(a.lse - lse).unsqueeze(-1) + b.out.to(acc) * torch.exp(b.lse - lse).unsqueeze(-1)
    return out.to(dtype), lse


def seq_major(t: torch.Tensor) -> torch.Tensor:
    """A [B, H, S, D] tensor laid out [B, S, H, D] in memory: what o_proj reads after HF's transpose(1, 2) and
    what the flash and cuDNN kernels write. No copy when `t` is laid out so already, so the output that
    attention's backward keeps and o_proj's input are one tensor (HF's `.contiguous()` is then a no-op)."""
    return t.transpose(1, 2).contiguous().transpose(1, 2)


def _causal(kernel: Kernel, q, k, v, scale: float) -> tuple[torch.Tensor, torch.Tensor, tuple, tuple]:
    """Bottom-right causal attention as a diagonal block (square, causal) and, with Sk > Sq, a prefix block (no
    mask) merged through their LSE: (out, lse, diagonal aux, prefix aux)."""
    start = k.shape[2] - q.shape[2]
    diagonal = kernel.forward(q, k[:, :, start:], v[:, :, start:], scale, True)
    if not start:
        return diagonal.out, diagonal.lse, diagonal.aux, ()
    prefix = kernel.forward(q, k[:, :, :start], v[:, :, :start], scale, False)
    out, lse = _merge(prefix, diagonal, q.dtype)
    return out, lse, diagonal.aux, prefix.aux


def _causal_backward(kernel: Kernel, dout, q, k, v, out, lse, scale: float, aux_diagonal, aux_prefix) -> Grads:
    """Gradients of `_causal` from its (merged) output and LSE: one kernel backward per block."""
    start = k.shape[2] - q.shape[2]
    dq, dk, dv = kernel.backward(dout, q, k[:, :, start:], v[:, :, start:], out, lse, scale, True, aux_diagonal)
    if not start:
        return Grads(dq, dk, dv, None, None)
    dq_p, dk_p, dv_p = kernel.backward(dout, q, k[:, :, :start], v[:, :, :start], out, lse, scale, False, aux_prefix)
    return Grads(dq + dq_p, dk, dv, dk_p, dv_p)


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> Saved:
    """Bottom-right causal attention of q over k/v (Sk >= Sq), with no autograd: output, LSE, kernel aux; with
    document ids set (masks.py), each document's queries over its own keys only."""
    KERNEL_CALLS["forward"] += 1
    spans = masks.document_spans(q.shape[2], k.shape[2])
    name = resolve_backend(q, documents=spans is not None)
    if spans is not None:
        return _attend_documents(name, q, k, v, scale, spans)
    out, lse, aux_diagonal, aux_prefix = _causal(KERNELS[name], q, k, v, scale)
    return Saved(seq_major(out), lse, name, aux_diagonal, aux_prefix)


def _attend_documents(name: str, q, k, v, scale: float, spans: list[masks.Span]) -> Saved:
    """One `_causal` call per document span, written into one output and LSE: memory O(S), and the key blocks of
    other documents (a finished document's part of a relayed prefix) are never read."""
    b, h, sq, _ = q.shape
    start = k.shape[2] - sq
    out = q.new_empty(b, sq, h, v.shape[-1]).transpose(1, 2)  # seq_major
    lse = q.new_empty(b, h, sq, dtype=_accumulate_dtype(q))
    aux = []
    for s in spans:
        rows, queries, keys = slice(s.row, s.row + 1), slice(s.q0 - start, s.q1 - start), slice(s.k0, s.q1)
        kernel = _span_kernel(name, s)
        o, lse_s, aux_diagonal, aux_prefix = _causal(
            KERNELS[kernel], q[rows, :, queries], k[rows, :, keys], v[rows, :, keys], scale
        )
        out[rows, :, queries], lse[rows, :, queries] = o, lse_s
        aux.append((aux_diagonal, aux_prefix, kernel))
    return Saved(out, lse, name + DOCUMENTS, tuple(aux), (), tuple(spans))


def _span_kernel(name: str, span: masks.Span) -> str:
    """The kernel of one document span: the call's, except that cuDNN refuses a 1 x 1 causal block (s_q = s_kv = 1,
    a span of one query), which math computes exactly at no cost worth a kernel."""
    return "math" if name == "cudnn" and span.q1 - span.q0 == 1 else name


def _documents_backward(dout, q, k, v, saved: Saved, scale: float) -> Grads:
    """Gradients of `_attend_documents`: each span's blocks from its own rows of the output and LSE."""
    start = k.shape[2] - q.shape[2]
    dq, dk, dv = torch.empty_like(q), torch.zeros_like(k), torch.zeros_like(v)  # keys of no span get no gradient
    for s, (aux_diagonal, aux_prefix, kernel) in zip(saved.spans, saved.aux_diagonal):
        rows, queries, keys = slice(s.row, s.row + 1), slice(s.q0 - start, s.q1 - start), slice(s.k0, s.q1)
        g = _causal_backward(
            KERNELS[kernel], dout[rows, :, queries], q[rows, :, queries], k[rows, :, keys], v[rows, :, keys],
            saved.out[rows, :, queries], saved.lse[rows, :, queries].contiguous(), scale, aux_diagonal, aux_prefix,
        )  # fmt: skip
        dq[rows, :, queries] = g.dq
        dk[rows, :, keys], dv[rows, :, keys] = _full_key_grads(g)
    prefix = (dk[:, :, :start], dv[:, :, :start]) if start else (None, None)
    return Grads(dq, dk[:, :, start:], dv[:, :, start:], *prefix)


def attend_backward(dout: torch.Tensor, q, k, v, saved: Saved, scale: float) -> Grads:
    """Gradients of `attend` from its saved output and LSE: one kernel backward per block, no forward."""
    KERNEL_CALLS["backward"] += 1
    dout = seq_major(dout)  # o_proj's gradient, transposed: no copy
    if saved.backend.endswith(DOCUMENTS):
        return _documents_backward(dout, q, k, v, saved, scale)
    kernel = KERNELS[saved.backend]
    return _causal_backward(kernel, dout, q, k, v, saved.out, saved.lse, scale, saved.aux_diagonal, saved.aux_prefix)


def _full_key_grads(g: Grads) -> tuple[torch.Tensor, torch.Tensor]:
    if g.dk_prefix is None or g.dv_prefix is None:
        return g.dk, g.dv
    return torch.cat([g.dk_prefix, g.dk], 2), torch.cat([g.dv_prefix, g.dv], 2)


class _Attention(torch.autograd.Function):
    """`attend` under autograd: saves q, k, v, out and LSE; the backward calls the kernel's backward."""

    @staticmethod
    def forward(ctx, q, k, v, scale: float):
        saved = attend(q, k, v, scale)
        ctx.save_for_backward(q, k, v, saved.out, saved.lse)
        ctx.scale, ctx.backend, ctx.aux = scale, saved.backend, (saved.aux_diagonal, saved.aux_prefix, saved.spans)
        return saved.out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, out, lse = ctx.saved_tensors
        saved = Saved(out, lse, ctx.backend, *ctx.aux)
        g = attend_backward(grad_out, q, k, v, saved, ctx.scale)
        dk, dv = _full_key_grads(g)  # a prefix only outside the KV relay (which keeps its own buffers)
        return g.dq, dk, dv, None


def attention_fn(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """Differentiable causal attention with the selected kernel; what the graph passes put in place of the op."""
    return _Attention.apply(q, k, v, scale)


@torch.library.custom_op("lcgraph::attention", mutates_args=())
def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """Causal (bottom-right) attention; one graph node per attention layer (the passes lower it to `attention_fn`)."""
    return attend(q, k, v, scale).out


@attention.register_fake
def _(q, k, v, scale):
    b, h, s, d = q.shape
    return q.new_empty(b, s, h, d).transpose(1, 2)  # seq_major, as `attend` returns it


def _setup_context(ctx, inputs, output):
    q, k, v, scale = inputs
    ctx.save_for_backward(q, k, v)
    ctx.scale = scale


def _backward(ctx, grad_out):
    """Eager use of the op outside lcgraph's graphs (an HF model called directly): a custom op's autograd
    sees only its output, so the LSE comes from one more forward; lcgraph's own graphs use `attention_fn`."""
    q, k, v = ctx.saved_tensors
    g = attend_backward(grad_out, q, k, v, attend(q, k, v, ctx.scale), ctx.scale)
    return (g.dq, *_full_key_grads(g), None)


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
