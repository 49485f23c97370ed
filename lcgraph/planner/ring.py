"""Ring attention's cost (parallel.cp): each step's block compute against its K/V p2p, overlapped.

Per attention layer, one chunk of `length` tokens after `prefix` relayed ones, on one rank (c = length / 2cp
tokens per zigzag piece, P = prefix / cp relayed keys of its own; ops/ring.py says which blocks a step runs):

    step 0        the square causal block 2c x 2c, and 2c x P unmasked when P > 0
    steps 1..     2c * (c + P) pairs unmasked (priced as one 2c x (c + P) block)
    payload       K and V of P + 2c keys at this rank's K/V heads, sent to the next cp rank each step

Forward: the payload of step s + 1 travels while step s computes, so a step costs max(compute, send) and the
last one its compute. Backward: the payload travels again and the dK/dV accumulators (fp32) with it; the last
send (the accumulators going home) overlaps nothing. The ring's link is the one its cp neighbours share:
sp x cp ranks inside a node use NVLink, a ring beyond it the inter-node network.
"""

from __future__ import annotations

from dataclasses import dataclass

ACCUMULATOR_BYTES = 4  # the ring's dK/dV accumulators and output/LSE merge are fp32


@dataclass(frozen=True)
class RingShape:
    """One rank's share of a chunk's attention under the ring."""

    cp: int
    length: int  # the chunk's tokens (all cp ranks)
    prefix: int  # tokens of earlier chunks (all cp ranks)

    @property
    def piece(self) -> int:
        return self.length // (2 * self.cp)

    @property
    def own_prefix(self) -> int:
        return self.prefix // self.cp

    @property
    def payload_keys(self) -> int:
        return self.own_prefix + 2 * self.piece

    def diag_pairs(self) -> float:
        n = 2 * self.piece
        return n * (n + 1) / 2

    def prefix_pairs(self) -> float:
        """Unmasked pairs of step 0 (its queries against its own prefix)."""
        return 2 * self.piece * self.own_prefix

    def step_pairs(self) -> float:
        """Pairs of each later step (every rank's the same: the zigzag balance)."""
        return 2 * self.piece * (self.piece + self.own_prefix)


def ring_times(
    shape: RingShape, per_pair: float, payload_bytes: float, dtype_bytes: int, rate, link_bw: float, backward: bool
) -> dict[str, float]:
    """Seconds of one unit's ring attention on one rank, split into the terms the plan prints:
    attention_diag (step 0's causal block), attention_prefix (every unmasked block) and ring_p2p (the p2p
    left exposed). `per_pair`: FLOPs per (query, key) pair over the stage's layers and this rank's heads;
    `payload_bytes`: one step's K/V over the stage's layers; `rate(kind, sq, sk)`: FLOP/s of a block."""
    c, p, n = shape.piece, shape.own_prefix, 2 * shape.piece
    diag = per_pair * shape.diag_pairs() / rate("diag", n, n)
    first_prefix = per_pair * shape.prefix_pairs() / rate("prefix", n, p) if p else 0.0
    later = per_pair * shape.step_pairs() / rate("prefix", n, c + p)
    steps = [diag + first_prefix] + [later] * (shape.cp - 1)
    if backward:  # the payload, then payload and accumulators, then the accumulators, then them going home
        grads = payload_bytes * ACCUMULATOR_BYTES / dtype_bytes
        sends = [payload_bytes] + [payload_bytes + grads] * (shape.cp - 2) + [grads]
        total = sum(max(t, b / link_bw) for t, b in zip(steps, sends)) + grads / link_bw
    else:
        total = sum(max(t, payload_bytes / link_bw) for t in steps[:-1]) + steps[-1]
    compute = sum(steps)
    return {"attention_diag": diag, "attention_prefix": compute - diag, "ring_p2p": total - compute}


def ring_transient(payload_bytes: float, query_bytes: float, dtype_bytes: int) -> float:
    """What one layer's ring holds beyond its inputs at the backward's worst: the payload held and the one
    arriving, three dK/dV accumulators (its own step's, the one arriving, the one leaving) and fp32 dQ.
    `payload_bytes`, `query_bytes`: one layer's K/V payload and queries on this rank, in the model's dtype."""
    fp32 = ACCUMULATOR_BYTES / dtype_bytes
    return 2 * payload_bytes + 3 * payload_bytes * fp32 + query_bytes * fp32
