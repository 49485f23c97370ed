"""Ring attention's layout rules (parallel.cp); the `ring` pass itself is in passes.py, with the others.

Ring attention (context parallelism) has no head cap: Ulysses (parallel.sp) splits heads, so its degree stops at
the K/V heads; the ring splits the sequence again, cp ways, and passes K/V around. The two compose: sp x cp
ranks share a sequence, the Ulysses all-to-all gathers a cp rank's share for its heads, the ring covers the rest.
"""

from __future__ import annotations

from lcgraph.errors import PlanError


def ring_align(par) -> int:
    """Every Seq1F1B chunk (or the whole sequence) is a multiple of this many tokens: 2 * cp zigzag pieces,
    each split evenly over the sp ranks."""
    return 2 * par.cp * par.sp if par.cp > 1 else par.sp


def check_ring(par, seq: int, attention: str = "auto") -> None:
    """cp > 1: each Seq1F1B chunk cuts into 2 * cp balanced pieces that sp divides; not the efficient kernel
    (ops/ring.py: ring_backend)."""
    cp, sp = par.cp, par.sp
    if cp == 1:
        return
    k = par.seq_chunks if par.schedule == "seq1f1b" else 1
    align = ring_align(par)
    even = par.chunk_split == "even"
    need = align * k if even else align
    if seq % need or seq < align * k:
        per = f" per Seq1F1B chunk (parallel.seq_chunks={k}, parallel.chunk_split={par.chunk_split})" if k > 1 else ""
        ok = max(need, seq - seq % need)
        raise PlanError(
            f"data.seq_len={seq} does not split into 2 x parallel.cp={cp} balanced chunks{per}, each divisible "
            f"by parallel.sp={sp}: use data.seq_len a multiple of {need} (e.g. {ok})"
        )
    if attention == "efficient":
        raise PlanError(
            f"train.attention=efficient with parallel.cp={cp}: ring attention runs the cudnn, flash or math kernels; "
            "set train.attention=auto (or cudnn, flash)"
        )
