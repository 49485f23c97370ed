"""KV relay for Seq1F1B: attention of one sequence chunk over the K/V of the chunks before it.

Forward of chunk c attends [K/V of chunks 0..c-1 (cached, detached) || its own K/V] with the causal
mask aligned bottom-right. Backward of chunk c produces dK/dV for the whole prefix: the prefix part is
parked in the relay (a side channel, not an autograd edge) and added to chunk c' < c's own dK/dV when
chunk c' runs its backward. That is why chunk backwards run last-to-first within a micro-batch.
The runtime sets `RelayContext.current` to the (micro-batch, chunk) about to run on this stage.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from lcgraph.ops.attention import attention_backward, attention_reference


@dataclass
class _LayerCache:
    keys: list[torch.Tensor] = field(default_factory=list)  # per chunk, detached
    values: list[torch.Tensor] = field(default_factory=list)
    grad_k: torch.Tensor | None = None  # accumulated dK for prefix positions, from later chunks
    grad_v: torch.Tensor | None = None

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.keys + self.values)


class RelayContext:
    """Per-stage KV caches keyed by (micro-batch, layer); `current` = (micro-batch, chunk) running now."""

    current: RelayContext | None = None

    def __init__(self):
        self.caches: dict[tuple[int, int], _LayerCache] = {}
        self.unit: tuple[int, int] = (0, 0)
        self.recompute = False  # True while a backward reruns a chunk's forward (cache already holds it)
        self.peak_bytes = 0

    def cache(self, layer: int) -> _LayerCache:
        return self.caches.setdefault((self.unit[0], layer), _LayerCache())

    def live_bytes(self) -> int:
        return sum(c.nbytes() for c in self.caches.values())

    def release(self, mb: int, layer: int) -> None:
        self.caches.pop((mb, layer), None)


class _RelayAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, scale, relay: RelayContext, layer: int):
        cache = relay.cache(layer)
        chunk = relay.unit[1]
        expected = chunk + 1 if relay.recompute else chunk
        if len(cache.keys) != expected:
            raise RuntimeError(f"KV relay: layer {layer} chunk {chunk} runs with {len(cache.keys)} cached chunks")
        prefix_k, prefix_v = cache.keys[:chunk], cache.values[:chunk]
        k_all = torch.cat(prefix_k + [k], dim=2) if prefix_k else k
        v_all = torch.cat(prefix_v + [v], dim=2) if prefix_v else v
        # The backward reruns the kernel (attention_backward) rather than keeping its graph: a kept graph
        # holds every layer's [prefix || chunk] K/V at once, which ran out of memory at 256k on an H100.
        out = attention_reference(q, k_all, v_all, scale)
        if not relay.recompute:
            cache.keys.append(k.detach())
            cache.values.append(v.detach())
        relay.peak_bytes = max(relay.peak_bytes, relay.live_bytes())
        ctx.save_for_backward(q, k, v)
        ctx.prefix = (prefix_k, prefix_v)  # references to the cache, no copy
        ctx.scale, ctx.relay, ctx.layer, ctx.mb = scale, relay, layer, relay.unit[0]
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v = ctx.saved_tensors
        prefix_k, prefix_v = ctx.prefix
        k_all = torch.cat(prefix_k + [k], dim=2) if prefix_k else k
        v_all = torch.cat(prefix_v + [v], dim=2) if prefix_v else v
        dq, dk_all, dv_all = attention_backward(grad_out.contiguous(), q, k_all, v_all, ctx.scale)
        cache = ctx.relay.caches[(ctx.mb, ctx.layer)]
        start, length = dk_all.shape[2] - k.shape[2], k.shape[2]
        dk, dv = dk_all[:, :, start:], dv_all[:, :, start:]
        if cache.grad_k is not None:  # what later chunks relayed for this chunk's positions
            dk = dk + cache.grad_k[:, :, start : start + length]
            dv = dv + cache.grad_v[:, :, start : start + length]
        if start:
            _park_prefix_grad(cache, dk_all[:, :, :start], dv_all[:, :, :start])
        else:
            ctx.relay.release(ctx.mb, ctx.layer)  # chunk 0 done: this micro-batch's cache is no longer needed
        return dq, dk, dv, None, None, None


def _park_prefix_grad(cache: _LayerCache, dk: torch.Tensor, dv: torch.Tensor) -> None:
    if cache.grad_k is None or cache.grad_v is None:
        cache.grad_k, cache.grad_v = dk.clone(), dv.clone()
    else:
        n = dk.shape[2]
        cache.grad_k = cache.grad_k[:, :, :n] + dk  # positions beyond n belonged to chunks already done
        cache.grad_v = cache.grad_v[:, :, :n] + dv
    cache.keys.pop()
    cache.values.pop()


def relay_attention(q, k, v, scale: float, layer: int):
    """Graph target that replaces `lcgraph::attention` on stages that run sequence chunks."""
    relay = RelayContext.current
    if relay is None:
        raise RuntimeError("relay_attention ran with no RelayContext: the runtime must set RelayContext.current")
    return _RelayAttention.apply(q, k, v, scale, relay, layer)
