"""Autograd-aware collectives that graph passes insert as nodes (Ulysses all-to-all).

The sequence-parallel process group is this rank's op context (ops/context.py), set once by the runtime.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from lcgraph.ops.context import current

stats = {"all_to_all": 0, "all_to_all_bytes": 0}


def _all_to_all(x: torch.Tensor) -> torch.Tensor:
    """Exchange dim-0 blocks: block i goes to rank i of the sp group."""
    x = x.contiguous()
    out = torch.empty_like(x)  # contiguous like x: all_to_all_single reads and writes flat memory
    dist.all_to_all_single(out, x, group=current().sp_group)
    stats["all_to_all"] += 1
    stats["all_to_all_bytes"] += x.numel() * x.element_size()
    return out


def _seq_to_heads(x_bhsd: torch.Tensor) -> torch.Tensor:
    p = current().sp
    b, h, s, d = x_bhsd.shape
    blocks = x_bhsd.reshape(b, p, h // p, s, d).permute(1, 0, 2, 3, 4)  # [p, B, H/p, s, D]: block i -> rank i
    recv = _all_to_all(blocks)  # [p (sequence shard), B, H/p, s, D]
    return recv.permute(1, 2, 0, 3, 4).reshape(b, h // p, p * s, d)


def _heads_to_seq(x_bhsd: torch.Tensor) -> torch.Tensor:
    p = current().sp
    b, hp, full, d = x_bhsd.shape
    blocks = x_bhsd.reshape(b, hp, p, full // p, d).permute(2, 0, 1, 3, 4)  # [p, B, H/p, s, D]: shard i -> rank i
    recv = _all_to_all(blocks)  # [p (head group), B, H/p, s, D]
    return recv.permute(1, 0, 2, 3, 4).reshape(b, p * hp, full // p, d)


class _SeqToHeads(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return _seq_to_heads(x)

    @staticmethod
    def backward(ctx, grad):
        return _heads_to_seq(grad)


class _HeadsToSeq(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return _heads_to_seq(x)

    @staticmethod
    def backward(ctx, grad):
        return _seq_to_heads(grad)


def seq_to_heads(x_bhsd: torch.Tensor) -> torch.Tensor:
    """[B, H, S/sp, D] on each sp rank -> [B, H/sp, S, D] (this rank's heads, the whole sequence)."""
    return _SeqToHeads.apply(x_bhsd) if current().sp > 1 else x_bhsd


def heads_to_seq(x_bhsd: torch.Tensor) -> torch.Tensor:
    """Inverse of `seq_to_heads`: [B, H/sp, S, D] -> [B, H, S/sp, D]."""
    return _HeadsToSeq.apply(x_bhsd) if current().sp > 1 else x_bhsd
