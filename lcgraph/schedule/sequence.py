"""Sequence chunk lengths: how Seq1F1B cuts one sequence into k chunks, evenly or at equal cost."""

from __future__ import annotations

from collections.abc import Callable

from lcgraph.schedule.actions import SPLIT_MODES

PairsBefore = Callable[[float], float]  # attended pairs of the queries before a position (a document mask's)


def split_sequence(
    seq_len: int,
    k: int,
    mode: str,
    flops_per_token: float = 1.0,
    flops_per_pair: float = 0.0,
    align: int = 1,
    pairs_before: PairsBefore | None = None,
) -> list[int]:
    """Lengths of the k chunks of one sequence, in order.

    "even": equal lengths. "uniform_comp": equal cost, where a chunk of length s ending at position P
    costs flops_per_token*s + flops_per_pair*(s*(P - s) + s*(s + 1)/2) (its causal attention pairs),
    so later chunks are shorter. Lengths are multiples of `align`. `pairs_before(P)`: the attended pairs of the
    queries before P when a document mask leaves fewer than the causal P*(P+1)/2 (planner/documents.py).
    """
    if k < 1 or align < 1:
        raise ValueError(f"k and align must be >= 1, got k={k}, align={align}")
    if mode == "even":
        if seq_len % (k * align) != 0:
            raise ValueError(
                f"even split needs seq_len divisible by k*align = {k}*{align} = {k * align}, "
                f"got seq_len={seq_len}; pad the sequence to a multiple of {k * align} "
                "or change k/align"
            )
        return [seq_len // k] * k
    if mode == "uniform_comp":
        return _equal_cost_split(seq_len, k, flops_per_token, flops_per_pair, align, pairs_before)
    raise ValueError(f"unknown split mode {mode!r}; valid modes: {', '.join(SPLIT_MODES)}")


def _equal_cost_split(
    seq_len: int, k: int, per_token: float, per_pair: float, align: int, pairs_before: PairsBefore | None = None
) -> list[int]:
    """Cut where the prefix cost reaches i/k of the total, from the last chunk backwards.

    Cutting at absolute boundaries (not chunk by chunk) keeps rounding errors from accumulating.
    """
    if seq_len % align != 0 or seq_len < k * align:
        raise ValueError(
            f"uniform_comp needs seq_len a multiple of align={align} and at least "
            f"k*align={k * align}, got seq_len={seq_len}; pad the sequence or lower k/align"
        )
    if per_token < 0 or per_pair < 0 or per_token + per_pair == 0:
        raise ValueError(
            f"costs must be >= 0 and not both zero, got flops_per_token={per_token}, flops_per_pair={per_pair}"
        )
    if pairs_before is None:
        cost, position = (
            (lambda p: _prefix_cost(p, per_token, per_pair)),
            (lambda c: _prefix_position(c, per_token, per_pair)),
        )
    else:
        cost = lambda p: per_token * p + per_pair * pairs_before(p)  # noqa: E731
        position = lambda c: _bisect(cost, c, seq_len)  # noqa: E731
    target = cost(seq_len) / k
    lengths = []
    end = seq_len
    for i in range(k - 1, 0, -1):  # the boundary where chunk i starts
        start = round(position(i * target) / align) * align
        start = min(max(start, i * align), end - align)  # leave >= align for this chunk and each earlier one
        lengths.append(end - start)
        end = start
    lengths.append(end)  # the first chunk takes the remainder
    return lengths[::-1]


def _prefix_cost(position: float, per_token: float, per_pair: float) -> float:
    """Cost of tokens [0, position): linear work plus the causal pairs position*(position+1)/2."""
    return per_token * position + per_pair * position * (position + 1) / 2


def _prefix_position(cost: float, per_token: float, per_pair: float) -> float:
    """Inverse of _prefix_cost (positive root, written to stay exact when per_pair is 0)."""
    linear = per_token + per_pair / 2
    return 2 * cost / (linear + (linear * linear + 2 * per_pair * cost) ** 0.5)


def _bisect(cost: Callable[[float], float], target: float, hi: float) -> float:
    """The position where the (increasing) prefix cost reaches `target`."""
    lo = 0.0
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if cost(mid) < target else (lo, mid)
    return (lo + hi) / 2
