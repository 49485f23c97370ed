"""What a document mask leaves of attention, for the cost model (`data.cross_document_attention=false`).

The runtime runs one causal span per document (ops/masks.py): a chunk's queries of one document attend that
document's keys only, from its first token (prefix blocks of finished documents are never read). The work left
depends on how documents fall on windows and chunks, so it is measured, not assumed: `chunk_blocks` packs
documents drawn from the mix into windows of `seq_len` tokens, as the sampler packs the stream, and counts the
(query, key) pairs of every span of every chunk, in log2 bins of the span's shape (the kernel rate depends on
it). A `DocumentMix` is either the lengths of a prepared corpus (its offsets) or log-normal lengths (sigma 1)
around `data.mean_document_tokens`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from lcgraph.runtime.data import lognormal_offsets

WINDOWS = 64  # windows averaged per chunk layout
SAMPLE = 16384  # document lengths a mix keeps


@dataclass(frozen=True)
class DocumentMix:
    """Document lengths to pack (a sample, in corpus order) and where they come from."""

    lengths: tuple[int, ...]
    source: str

    @classmethod
    def lognormal(cls, mean: float, seed: int = 0, sigma: float = 1.0) -> DocumentMix:
        """SAMPLE lengths drawn as the synthetic corpus draws its documents (data.lognormal_offsets)."""
        offsets = lognormal_offsets(int(mean * SAMPLE), mean, seed, sigma)
        lengths = tuple(int(x) for x in np.diff(offsets)[:-1])  # the last one is cut at the stream's end
        return cls(lengths, f"log-normal lengths, mean {mean:,.0f} tokens, sigma {sigma:g}")

    @classmethod
    def from_offsets(cls, offsets: np.ndarray, source: str) -> DocumentMix:
        lengths = np.diff(np.asarray(offsets, dtype=np.int64))
        step = max(1, len(lengths) // SAMPLE)
        kept = lengths[::step][:SAMPLE]
        return cls(
            tuple(int(x) for x in kept), f"{source}: {len(lengths):,} documents, mean {lengths.mean():,.0f} tokens"
        )

    @property
    def mean(self) -> float:
        return sum(self.lengths) / len(self.lengths)


@dataclass(frozen=True)
class Block:
    """Pairs of one span shape, per window: `kind` diag (sq x sq causal) or prefix (sq queries over sk keys)."""

    kind: str
    sq: int
    sk: int
    pairs: float


def _window_starts(mix: DocumentMix, seq_len: int, index: int) -> list[int]:
    """Where documents start in the `index`-th window of the packed stream (0 first)."""
    lengths = mix.lengths
    total = sum(lengths)
    start = (index * seq_len * 7919) % total  # windows spread over the sample, as a seeded permutation would
    edges = np.cumsum((0, *lengths))
    first = int(np.searchsorted(edges, start, side="right")) - 1
    starts, pos, d = [0], int(edges[first + 1] - start), first + 1
    while pos < seq_len:
        starts.append(pos)
        pos += lengths[d % len(lengths)]
        d += 1
    return starts


@lru_cache(maxsize=64)
def chunk_blocks(mix: DocumentMix, seq_len: int, chunk_lengths: tuple[int, ...]) -> tuple[tuple[Block, ...], ...]:
    """Per chunk: the spans' pairs by kind and shape (log2 bins), averaged over WINDOWS windows."""
    bins: list[dict[tuple[str, int, int], list[float]]] = [{} for _ in chunk_lengths]
    prefixes = [sum(chunk_lengths[:c]) for c in range(len(chunk_lengths))]
    for w in range(WINDOWS):
        starts = _window_starts(mix, seq_len, w)
        ends = [*starts[1:], seq_len]
        for c, (length, p) in enumerate(zip(chunk_lengths, prefixes)):
            for a, e in zip(starts, ends):
                q0, q1 = max(a, p), min(e, p + length)
                if q0 >= q1:
                    continue
                n = q1 - q0
                _add(bins[c], "diag", n, n, n * (n + 1) / 2)
                if q0 > a:
                    _add(bins[c], "prefix", n, q0 - a, n * (q0 - a))
    return tuple(
        tuple(Block(kind, round(sq / cnt), round(sk / cnt), pairs / WINDOWS) for (kind, _, _), (pairs, sq, sk, cnt) in
              ((key, v) for key, v in b.items()))
        for b in bins
    )  # fmt: skip


def _add(bins: dict, kind: str, sq: int, sk: int, pairs: float) -> None:
    key = (kind, round(math.log2(sq)), round(math.log2(sk)))
    entry = bins.setdefault(key, [0.0, 0.0, 0.0, 0])
    entry[0] += pairs
    entry[1] += sq
    entry[2] += sk
    entry[3] += 1


@lru_cache(maxsize=16)
def pairs_before(mix: DocumentMix, seq_len: int, points: int = 512) -> Callable[[float], float]:
    """Expected attended pairs of a window's queries before position P under the mask (what uniform_comp
    balances), averaged over WINDOWS windows and interpolated between `points` positions."""
    grid = np.linspace(0, seq_len, points + 1)
    total = np.zeros_like(grid)
    for w in range(WINDOWS):
        starts = np.array(_window_starts(mix, seq_len, w), dtype=np.float64)
        ends = np.append(starts[1:], seq_len)
        m = np.clip(np.minimum(ends[None, :], grid[:, None]) - starts[None, :], 0, None)
        total += (m * (m + 1) / 2).sum(1)
    curve = total / WINDOWS
    return lambda p: float(np.interp(p, grid, curve))


def kept_fraction(mix: DocumentMix, seq_len: int) -> float:
    """The share of a window's causal attention pairs the mask leaves (what MFU counts under it)."""
    (blocks,) = chunk_blocks(mix, seq_len, (seq_len,))
    return sum(b.pairs for b in blocks) / (seq_len * (seq_len + 1) / 2)
