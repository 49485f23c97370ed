"""Per-stage attention state: the KV relay of Seq1F1B and the attention outputs kept for recompute.

KV relay. Each (micro-batch, layer) has one K and one V buffer sized to the stage's whole sequence
(allocated by chunk 0). Chunk c writes its K/V at its offset and attends keys 0..end as a view of the
buffer: no prefix concatenation. `attend` splits that call into the prefix block and the square causal
diagonal block and merges them through the LSE. The backward of chunk c produces dK/dV for the whole
prefix; the prefix part is added in place into a gradient buffer (a side channel, not an autograd
edge) and read back when chunk c' < c runs its backward. That is why chunk backwards run last-to-first
within a micro-batch; chunk 0's backward frees the micro-batch's buffers.

Kept attention (train.recompute=keep_attention). Attention keeps its output and LSE per (micro-batch, chunk,
layer) for the layers in `keep` (all of a stage's, or the first train.keep_attention_layers). The backward's
rerun recomputes everything else and gets the kept output back instead of running the kernel again: the
kernel's forward runs once per kept layer and unit (twice for the others, and under recompute=full).

The runtime sets `RelayContext.current` to the stage about to run, and on it `unit` (micro-batch,
chunk), `chunk_lengths` (this rank's tokens per chunk), `keep` (layers) and `rerun`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from lcgraph.ops.attention import Saved, attend, attend_backward, attention_fn

DEFAULT = (attend, attend_backward)  # what StageAttention runs unless told otherwise


def _nbytes(*tensors: torch.Tensor | None) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


@dataclass
class _LayerCache:
    keys: torch.Tensor  # [B, Hkv, S, D]: the whole sequence, filled chunk by chunk
    values: torch.Tensor
    filled: int = 0  # positions written so far
    grad_k: torch.Tensor | None = None  # dK of positions 0..n relayed by later chunks (n: the first prefix seen)
    grad_v: torch.Tensor | None = None

    def nbytes(self) -> int:
        return _nbytes(self.keys, self.values, self.grad_k, self.grad_v)


class RelayContext:
    """Per-stage attention state keyed by (micro-batch, layer); `unit` = (micro-batch, chunk) running now."""

    current: ClassVar[RelayContext | None] = None

    def __init__(self, chunk_lengths: list[int] | None = None):
        self.caches: dict[tuple[int, int], _LayerCache] = {}
        self.kept: dict[tuple[int, int, int], Saved] = {}  # (mb, chunk, layer) -> output and LSE
        self.unit: tuple[int, int] = (0, 0)
        self.chunk_lengths = list(chunk_lengths or [])  # this rank's tokens per chunk (the runtime sets them)
        self.keep: set[int] = set()  # keep_attention: these layers keep attention's output, the rerun reuses it
        self.rerun = False  # True while a backward reruns a unit's forward
        self.peak_bytes = 0
        self.copied_bytes = 0  # K/V written into the relay buffers (the only copies the relay makes)
        self.accumulated_bytes = 0  # prefix dK/dV added into the gradient buffers

    def live_bytes(self) -> int:
        return sum(c.nbytes() for c in self.caches.values()) + sum(s.nbytes() for s in self.kept.values())

    def release(self, mb: int, layer: int) -> None:
        self.caches.pop((mb, layer), None)

    def span(self, chunk: int, length: int) -> tuple[int, int]:
        """[start, end) of `chunk` in attention's frame, whose chunks are `length / chunk_lengths[chunk]`
        times this rank's (Ulysses gathers the sequence: sp times)."""
        if chunk >= len(self.chunk_lengths):
            raise RuntimeError(f"KV relay: chunk {chunk} runs but the runtime set chunk_lengths={self.chunk_lengths}")
        ratio = length // self.chunk_lengths[chunk]
        start = ratio * sum(self.chunk_lengths[:chunk])
        return start, start + length

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[_LayerCache, int, int]:
        """Put this chunk's K/V into the layer's buffers (already there when a rerun asks again)."""
        mb, chunk = self.unit
        start, end = self.span(chunk, k.shape[2])
        if chunk == 0 and not self.rerun:
            total = end * sum(self.chunk_lengths) // self.chunk_lengths[0]
            shape = (*k.shape[:2], total, k.shape[3])
            self.caches[(mb, layer)] = _LayerCache(k.new_empty(shape), v.new_empty(shape))
        cache = self.caches[(mb, layer)]
        if self.rerun:
            if cache.filled < end:
                raise RuntimeError(f"KV relay: rerun of layer {layer} chunk {chunk} finds {cache.filled} < {end} keys")
            return cache, start, end
        if cache.filled != start:
            raise RuntimeError(
                f"KV relay: layer {layer} chunk {chunk} starts at {start} but {cache.filled} are written"
            )
        cache.keys[:, :, start:end] = k.detach()
        cache.values[:, :, start:end] = v.detach()
        cache.filled = end
        self.copied_bytes += _nbytes(k, v)
        return cache, start, end

    def accumulate(self, cache: _LayerCache, dk: torch.Tensor, dv: torch.Tensor) -> None:
        """Add the dK/dV a chunk produced for its prefix into the gradient buffers, in place."""
        n = dk.shape[2]
        if cache.grad_k is None or cache.grad_v is None:  # the micro-batch's last chunk: the longest prefix
            cache.grad_k, cache.grad_v = torch.zeros_like(dk), torch.zeros_like(dv)
        cache.grad_k[:, :, :n] += dk
        cache.grad_v[:, :, :n] += dv
        self.accumulated_bytes += _nbytes(dk, dv)


class StageAttention(torch.autograd.Function):
    """Attention of one stage layer with the relay's buffers and kept outputs; `functions` are the forward and
    backward it runs (`attend`, `attend_backward`; ring attention brings its own)."""

    @staticmethod
    def forward(ctx, q, k, v, scale: float, relay: RelayContext, layer: int, chunked: bool, functions=DEFAULT):
        key = (*relay.unit, layer)
        if chunked:
            cache, start, end = relay.write(layer, k, v)
            k_att, v_att = cache.keys[:, :, :end], cache.values[:, :, :end]
        else:
            k_att, v_att, start, end = k, v, 0, k.shape[2]
        kept = relay.kept.pop(key, None) if relay.rerun else None
        saved = kept if kept is not None else functions[0](q, k_att, v_att, scale)
        if layer in relay.keep and not relay.rerun:
            relay.kept[key] = saved
        relay.peak_bytes = max(relay.peak_bytes, relay.live_bytes())
        if chunked:  # views of buffers later chunks write into: autograd's version check would refuse them
            ctx.kv = (k_att, v_att)
            ctx.save_for_backward(q, saved.out, saved.lse)
        else:
            ctx.save_for_backward(q, saved.out, saved.lse, k, v)
        ctx.scale, ctx.relay, ctx.layer, ctx.mb, ctx.span = scale, relay, layer, relay.unit[0], (start, end)
        ctx.backend, ctx.functions = saved.backend, functions
        ctx.aux = (saved.aux_diagonal, saved.aux_prefix, saved.spans)
        return saved.out

    @staticmethod
    def backward(ctx, grad_out):
        q, out, lse, *kv = ctx.saved_tensors
        k, v = kv if kv else ctx.kv
        g = ctx.functions[1](grad_out, q, k, v, Saved(out, lse, ctx.backend, *ctx.aux), ctx.scale)
        if not hasattr(ctx, "kv"):
            return g.dq, g.dk, g.dv, None, None, None, None, None
        relay, (start, end) = ctx.relay, ctx.span
        cache = relay.caches[(ctx.mb, ctx.layer)]
        dk, dv = g.dk, g.dv
        if cache.grad_k is not None and cache.grad_v is not None:  # what later chunks relayed for these positions
            dk = dk + cache.grad_k[:, :, start:end]
            dv = dv + cache.grad_v[:, :, start:end]
        if g.dk_prefix is not None and g.dv_prefix is not None:
            relay.accumulate(cache, g.dk_prefix, g.dv_prefix)
        else:
            relay.release(ctx.mb, ctx.layer)  # chunk 0 done: this micro-batch's buffers are no longer needed
        return g.dq, dk, dv, None, None, None, None, None


def _context(name: str) -> RelayContext:
    relay = RelayContext.current
    if relay is None:
        raise RuntimeError(f"{name} ran with no RelayContext: the runtime must set RelayContext.current")
    return relay


# torch.compile (train.compile) breaks the graph around the two graph targets: the kernels are opaque to it
# anyway, and the relay's bookkeeping is Python state it need not trace.


@torch.compiler.disable
def relay_attention(q, k, v, scale: float, layer: int):
    """Graph target that replaces `lcgraph::attention` on stages that run sequence chunks."""
    return StageAttention.apply(q, k, v, scale, _context("relay_attention"), layer, True)


@torch.compiler.disable
def layer_attention(q, k, v, scale: float, layer: int):
    """Graph target that replaces `lcgraph::attention` on stages that run whole sequences: plain
    attention, with its output kept for the rerun under keep_attention (outside a runtime: `attention_fn`)."""
    relay = RelayContext.current
    if relay is None:
        return attention_fn(q, k, v, scale)
    return StageAttention.apply(q, k, v, scale, relay, layer, False)
