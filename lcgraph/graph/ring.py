"""Ring attention's layout rules (parallel.cp); the `ring` pass itself is in passes.py, with the others.

Ring attention (context parallelism) has no head cap: Ulysses (parallel.sp) splits heads, so its degree stops at
the K/V heads; the ring splits the sequence again, cp ways, and passes K/V around. The two compose: sp x cp
ranks share a sequence, the Ulysses all-to-all gathers a cp rank's share for its heads, the ring covers the rest.
"""

from __future__ import annotations

from typing import Protocol

import torch

from lcgraph.errors import PlanError


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
        early, late = pair or (c.cp_rank, 2 * c.cp - 1 - c.cp_rank)
        mine = torch.cat([torch.arange(early * n, (early + 1) * n), torch.arange(late * n, (late + 1) * n)])
    shard = len(mine) // c.sp
    return mine[c.sp_rank * shard : (c.sp_rank + 1) * shard]
