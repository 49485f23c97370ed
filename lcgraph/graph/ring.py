"""Ring attention's layout rules (parallel.cp); the `ring` pass itself is in passes.py, with the others.

Ring attention (context parallelism) has no head cap: Ulysses (parallel.sp) splits heads, so its degree stops at
the K/V heads; the ring splits the sequence again, cp ways, and passes K/V around. The two compose: sp x cp
ranks share a sequence, the Ulysses all-to-all gathers a cp rank's share for its heads, the ring covers the rest.
"""

from __future__ import annotations

from typing import Protocol

import torch

from lcgraph.errors import PlanError
from lcgraph.ops import masks


class Shards(Protocol):
    """What the ring's rules read of a layout: the parallel config section, or the planner's Layout."""

    @property
    def cp(self) -> int: ...
    @property
    def sp(self) -> int: ...


class ChunkedShards(Shards, Protocol):
    """A layout with its schedule's chunks: the parallel config section."""

    @property
    def schedule(self) -> str: ...
    @property
    def seq_chunks(self) -> int: ...
    @property
    def chunk_split(self) -> str: ...


def ring_align(par: Shards) -> int:
    """Every Seq1F1B chunk (or the whole sequence) is a multiple of this many tokens: 2 * cp zigzag pieces,
    each split evenly over the sp ranks."""
    return 2 * par.cp * par.sp if par.cp > 1 else par.sp


def padded_length(seq_len: int, k: int, chunk_split: str, align: int) -> int:
    """The length the programs run for a window of `seq_len` tokens: rounded up to what the k Seq1F1B chunks
    (`chunk_split`) and the shards (`align`, ring_align) divide. The data pads the window with labels the loss
    ignores, so the loss and its token count stay those of the real tokens (runtime/data.py: pad_window)."""
    quantum = align * k if chunk_split == "even" else align
    return -(-seq_len // quantum) * quantum


def run_length(par: ChunkedShards, seq_len: int) -> int:
    """`padded_length` for a parallel config section."""
    k = par.seq_chunks if par.schedule == "seq1f1b" else 1
    return padded_length(seq_len, k, par.chunk_split, ring_align(par))


def check_ring(par: ChunkedShards, seq: int, attention: str = "auto") -> None:
    """cp > 1: each Seq1F1B chunk is long enough for 2 * cp balanced pieces that sp divides; not the efficient
    kernel (ops/ring.py: ring_backend)."""
    cp, sp = par.cp, par.sp
    if cp == 1:
        return
    k = par.seq_chunks if par.schedule == "seq1f1b" else 1
    align = ring_align(par)
    if seq < align * k:  # a length the pieces do not divide is padded (padded_length); one too short is not
        per = f" per Seq1F1B chunk (parallel.seq_chunks={k})" if k > 1 else ""
        raise PlanError(
            f"data.seq_len={seq} is too short for 2 x parallel.cp={cp} zigzag pieces{per} of parallel.sp={sp} "
            f"tokens each: use data.seq_len >= {align * k} or fewer chunks"
        )
    if attention == "efficient":
        raise PlanError(
            f"train.attention=efficient with parallel.cp={cp}: ring attention runs the cudnn, flash or math kernels; "
            "set train.attention=auto (or cudnn, flash)"
        )


class RankShards(Shards, Protocol):
    """A rank's place among the ranks that share a sequence: schedule.mesh.Coords."""

    @property
    def cp_rank(self) -> int: ...
    @property
    def sp_rank(self) -> int: ...


def shard_positions(length: int, c: RankShards, pair: tuple[int, int] | None = None) -> torch.Tensor:
    """Positions of a `length`-token chunk rank `c` holds: with cp > 1 the chunk is cut into 2 * cp pieces and
    cp rank r keeps two of them, `pair` (under a document mask: as balanced by the work it leaves) or pieces r and
    2cp-1-r (the zigzag: equal causal work on every rank); then sp rank s its s-th part."""
    if c.cp == 1:
        mine = torch.arange(length)
    else:
        n = length // (2 * c.cp)
        early, late = pair or masks.zigzag_pair(c.cp_rank, c.cp)
        mine = torch.cat([torch.arange(early * n, (early + 1) * n), torch.arange(late * n, (late + 1) * n)])
    shard = len(mine) // c.sp
    return mine[c.sp_rank * shard : (c.sp_rank + 1) * shard]


def piece_work(document_ids: torch.Tensor, offset: int, length: int, cp: int) -> list[int]:
    """The attended pairs of each of the 2 * cp equal pieces of the chunk at window positions offset .. offset +
    length, summed over the batch rows: a query attends its own document's keys up to itself (earlier chunks'
    included)."""
    n = length // (2 * cp)
    work = [0] * (2 * cp)
    for bounds in masks.document_bounds(document_ids):
        for first, end in zip(bounds, bounds[1:]):
            for i in range(2 * cp):
                a, b = max(first, offset + i * n), min(end, offset + (i + 1) * n)
                if a < b:  # queries a .. b-1 see (a - first + 1) .. (b - first) keys
                    work[i] += (b - a) * (a + b - 2 * first + 1) // 2
    return work


def balanced_pairs(work: list[int]) -> tuple[tuple[int, int], ...]:
    """The 2 * cp pieces paired so the heaviest pair is lightest (heaviest with lightest, and so on, which is
    optimal for pairs), pair r to cp rank r in order of its earlier piece. Causal work growing along the chunk
    gives the zigzag pairs; a document mask leaves each piece its own work."""
    order = sorted(range(len(work)), key=lambda i: (-work[i], -i))
    pairs = [(min(order[j], order[-1 - j]), max(order[j], order[-1 - j])) for j in range(len(work) // 2)]
    return tuple(sorted(pairs))


def ring_pairs(docs: torch.Tensor | None, offsets: list[int], lengths: list[int], cp: int) -> masks.RingPairs:
    """Under a document mask (`docs`, the window's document ids) with ring attention, each chunk's 2 * cp pieces
    paired by the work the mask leaves (every rank computes the same pairs from the same window); chunk c starts
    at `offsets[c]` and is `lengths[c]` long. () keeps the zigzag."""
    if docs is None or cp == 1:
        return ()
    return tuple(balanced_pairs(piece_work(docs, offsets[c], length, cp)) for c, length in enumerate(lengths))
