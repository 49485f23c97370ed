"""Document masks: attention that stays inside each packed document (`data.cross_document_attention=false`).

The runtime sets the running micro-batch's document ids (`set_documents`: [B, S] on the host, the whole window,
before any chunking or sharding) around each forward and backward. A document is a run of equal ids, as packing
makes them. No [S, S] mask is ever built: `document_spans` cuts an attention call into one causal span per
document that holds some of its queries, and attention runs its kernel on each span alone (ops/attention.py), so
memory stays O(S) and the key blocks of other documents are never touched. One rule serves every layout: the keys
an attention call sees start at the window's first token (a whole sequence; a Seq1F1B chunk after its relayed
prefix; a Ulysses rank after the all-to-all, which gathers the chunk whole), so keys are positions 0 .. Sk and
queries the last Sq of them.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

_documents: torch.Tensor | None = None  # [B, S] document id of each position of the running micro-batch
_bounds: list[list[int]] = []  # per row: where each document starts, then S
RingPairs = tuple[tuple[tuple[int, int], ...], ...]  # per Seq1F1B chunk, per cp rank: its two pieces (ring.py)
_pairs: RingPairs = ()


class Span(NamedTuple):
    """One document's part of an attention call, in window positions: queries q0 .. q1 attend keys k0 .. q1
    (the document's first token up to each query: causal, aligned bottom-right)."""

    row: int
    q0: int
    q1: int
    k0: int


def set_documents(document_ids: torch.Tensor | None, ring_pairs: RingPairs = ()) -> None:
    """Mask attention by these document ids from now on (None: no document mask); `ring_pairs`: the pieces each cp
    rank holds of each chunk, when ring attention balances them by the work the mask leaves
    (`graph.ring.balanced_pairs`)."""
    global _documents, _bounds, _pairs
    _pairs = ring_pairs
    if document_ids is _documents:
        return
    _documents = document_ids
    _bounds = [] if document_ids is None else document_bounds(document_ids)


def documents_set() -> bool:
    return _documents is not None


def row_bounds() -> list[list[int]]:
    """Per batch row of the running micro-batch: where each document starts, then S ([] without documents)."""
    return _bounds


def document_bounds(document_ids: torch.Tensor) -> list[list[int]]:
    """Per row of [B, S] ids: the first position of each document, then S."""
    ids = document_ids.cpu()  # the runtime keeps them on the host: no device sync here
    change = ids[:, 1:] != ids[:, :-1]
    return [[0, *(torch.nonzero(change[b]).flatten() + 1).tolist(), ids.shape[1]] for b in range(ids.shape[0])]


def document_spans(sq: int, sk: int) -> list[Span] | None:
    """The spans of a call whose queries are positions sk - sq .. sk and keys 0 .. sk: per row, per document
    holding some of those queries; None when no document ids are set (plain causal attention)."""
    if _documents is None:
        return None
    start, spans = sk - sq, []
    for row, bounds in enumerate(_bounds):
        if bounds[-1] < sk:
            raise RuntimeError(f"document mask: {sk} keys but the window holds {bounds[-1]} positions")
        for first, end in zip(bounds, bounds[1:]):
            q0, q1 = max(first, start), min(end, sk)
            if q0 < q1:
                spans.append(Span(row, q0, q1, first))
    return spans


# --- ring attention's pieces under a mask ---------------------------------------------------------------------
def ring_pair(chunk: int, rank: int, cp: int) -> tuple[int, int]:
    """The two of a chunk's 2 * cp pieces that cp rank `rank` holds, earlier first: as the runtime balanced them
    for the running micro-batch, else the zigzag pair."""
    if chunk < len(_pairs):
        return _pairs[chunk][rank]
    return zigzag_pair(rank, cp)


def zigzag_pair(rank: int, cp: int) -> tuple[int, int]:
    """Pieces rank and 2cp - 1 - rank of 2 * cp: an early and a late piece, equal causal work on every cp rank."""
    return rank, 2 * cp - 1 - rank
