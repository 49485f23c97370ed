"""Ring attention's op on its own: which (query, key) pairs each ring step computes, and cp ranks (gloo) against
textbook softmax attention of the whole sequence in fp64, forward and backward, with and without a relayed prefix."""

import os
import tempfile

import pytest
import torch

from lcgraph.app.cli import launch_local
from lcgraph.ops import context, ring


def softmax_attention(q, k, v, scale):
    """Textbook attention, bottom-right causal, K/V heads repeated: what autograd differentiates."""
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1)
    sq, sk = q.shape[2], k.shape[2]
    visible = torch.arange(sk)[None, :] <= torch.arange(sq)[:, None] + (sk - sq)
    return (q @ k.transpose(-1, -2) * scale).masked_fill(~visible, float("-inf")).softmax(-1) @ v


def zigzag(cp: int, rank: int, length: int) -> torch.Tensor:
    """Positions of a `length`-token chunk that cp rank `rank` holds: pieces rank and 2cp-1-rank."""
    c = length // (2 * cp)
    return torch.cat(
        [torch.arange(rank * c, (rank + 1) * c), torch.arange((2 * cp - 1 - rank) * c, (2 * cp - rank) * c)]
    )


@pytest.mark.parametrize("cp", [1, 2, 3, 4])
@pytest.mark.parametrize("prefix", [0, 6])
def test_ring_steps_visit_each_causal_pair_once(cp, prefix):
    """Over a rank's cp steps its pieces cover every (query, key) pair the causal mask allows, each exactly once;
    prefix keys (earlier chunks) are seen by every query."""
    c, length = 3, 6 * cp
    for rank in range(cp):
        seen = torch.zeros(2 * c, cp * (prefix + 2 * c), dtype=torch.long)
        for source in range(cp):
            for p in ring.pieces(rank, source, c, prefix):
                if p.causal:
                    block = torch.ones(p.rows.stop - p.rows.start, p.keys.stop - p.keys.start).tril().long()
                else:
                    block = torch.ones(p.rows.stop - p.rows.start, p.keys.stop - p.keys.start, dtype=torch.long)
                base = source * (prefix + 2 * c)
                seen[p.rows, base + p.keys.start : base + p.keys.stop] += block
        queries = zigzag(cp, rank, length)
        want = torch.cat(
            [
                torch.cat([torch.ones(2 * c, prefix, dtype=torch.long), _causal(queries, zigzag(cp, s, length))], 1)
                for s in range(cp)
            ],
            1,
        )
        assert torch.equal(seen, want), f"cp={cp} rank={rank} prefix={prefix}"


def _causal(queries: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    return (keys[None, :] <= queries[:, None]).long()


# --- cp ranks on gloo against the whole sequence --------------------------------------------------------------

B, H, KV, D, SCALE = 2, 4, 2, 8, 0.35


def _tensors(length: int, prefix: int):
    g = torch.Generator().manual_seed(7)
    q = torch.randn(B, H, length, D, dtype=torch.float64, generator=g)
    k, v = (torch.randn(B, KV, prefix + length, D, dtype=torch.float64, generator=g) for _ in range(2))
    grad = torch.randn(B, H, length, D, dtype=torch.float64, generator=g)
    return q, k, v, grad


def _worker(out_dir: str, length: int, prefix: int) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo")
    rank, cp = dist.get_rank(), dist.get_world_size()
    try:
        context.configure(cp_group=dist.new_group(list(range(cp))), cp=cp, cp_rank=rank)
        q, k, v, grad = _tensors(length, prefix)
        own = zigzag(cp, rank, length)
        mine = zigzag(cp, rank, prefix) if prefix else torch.arange(0)  # this rank's share of the earlier chunk
        keys = torch.cat([mine, prefix + own])
        ql, kl, vl = (t[:, :, idx].clone().requires_grad_() for t, idx in ((q, own), (k, keys), (v, keys)))
        ring.stats.update(p2p=0, p2p_bytes=0, steps=0)
        out = ring.ring_attention_fn(ql, kl, vl, SCALE)
        dq, dk, dv = torch.autograd.grad(out, (ql, kl, vl), grad[:, :, own])
        record = {
            "own": own,
            "keys": keys,
            "out": out.detach(),
            "dq": dq,
            "dk": dk,
            "dv": dv,
            "stats": dict(ring.stats),
        }
        torch.save(record, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("cp,prefix", [(2, 0), (4, 8), (3, 12)], ids=["cp2", "cp4-prefix", "cp3-prefix"])
def test_ring_ranks_match_softmax_attention_of_the_whole_sequence(cp, prefix):
    """Queries of the current chunk (zigzag over cp ranks) against the earlier chunk's keys (each rank holds its
    zigzag share, as the KV relay does) and the chunk's own keys: output and dQ/dK/dV in fp64 to 1e-12, the
    prefix's gradient (what the relay accumulates) included. GQA: 4 query heads, 2 K/V heads."""
    length = 8 * cp
    out_dir = tempfile.mkdtemp(prefix="lcgraph-ring-")
    launch_local(cp, _worker, out_dir, length, prefix, run_id="ring-op")
    q, k, v, grad = (t.requires_grad_() for t in _tensors(length, prefix))
    ref = softmax_attention(q, k, v, SCALE)
    dq, dk, dv = torch.autograd.grad(ref, (q, k, v), grad)
    for rank in range(cp):
        got = torch.load(os.path.join(out_dir, f"rank{rank}.pt"))
        own, keys = got["own"], got["keys"]
        tol = {"rtol": 1e-12, "atol": 1e-12}
        torch.testing.assert_close(got["out"], ref.detach()[:, :, own], **tol)
        torch.testing.assert_close(got["dq"], dq[:, :, own], **tol)
        torch.testing.assert_close(got["dk"], dk[:, :, keys], **tol)
        torch.testing.assert_close(got["dv"], dv[:, :, keys], **tol)
        # cp - 1 payload shifts forward (K and V), cp - 1 backward plus cp dK/dV accumulator shifts
        assert got["stats"]["p2p"] == 2 * (cp - 1) + 2 * (cp - 1) + 2 * cp
        assert got["stats"]["steps"] == cp


@pytest.mark.parametrize("cp,prefix", [(1, 0), (4, 0), (4, 16)])
def test_one_process_simulation_of_the_ring_matches_softmax_attention(cp, prefix):
    """`ring.simulate` (the steps of every cp rank in one process; what the one-GPU kernel checks run) in fp64."""
    length = 8 * cp
    q, k, v, grad = (t.requires_grad_() for t in _tensors(length, prefix))
    ref = softmax_attention(q, k, v, SCALE)
    dq, dk, dv = torch.autograd.grad(ref, (q, k, v), grad)
    owns = [zigzag(cp, r, length) for r in range(cp)]
    keys = [torch.cat([zigzag(cp, r, prefix) if prefix else torch.arange(0), prefix + owns[r]]) for r in range(cp)]
    d = q.detach()
    got = ring.simulate(
        [d[:, :, o] for o in owns],
        [k.detach()[:, :, kk] for kk in keys],
        [v.detach()[:, :, kk] for kk in keys],
        [grad[:, :, o] for o in owns],
        SCALE,
    )
    tol = {"rtol": 1e-12, "atol": 1e-12}
    for r, (out, dq_r, dk_r, dv_r) in enumerate(got):
        torch.testing.assert_close(out, ref.detach()[:, :, owns[r]], **tol)
        torch.testing.assert_close(dq_r, dq[:, :, owns[r]], **tol)
        torch.testing.assert_close(dk_r, dk[:, :, keys[r]], **tol)
        torch.testing.assert_close(dv_r, dv[:, :, keys[r]], **tol)


@pytest.mark.parametrize("cp", [2, 3])
@pytest.mark.parametrize("prefix", [0, 6])
def test_ring_steps_under_documents_visit_each_pair_inside_a_document_once(cp, prefix):
    """Packed documents (one-token ones, one crossing the earlier chunk and this one): over a rank's cp steps the
    document pieces cover exactly the (query, key) pairs that are causal and inside one document, each once.
    Positions come from `_segments`, itself checked against the zigzag layout the runtime shards by."""
    from lcgraph.ops import masks
    from lcgraph.ops.relay import RelayContext

    c = 3
    chunk, earlier = 2 * c * cp, prefix * cp  # window tokens of this chunk and of the earlier one
    window = earlier + chunk
    cuts = sorted({1, 2, window // 3, window // 3 + 1, window - 2} - {0})
    docs = torch.zeros(1, window, dtype=torch.long)
    for cut in cuts:
        docs[0, cut:] += 1
    masks.set_documents(docs)
    RelayContext.current = RelayContext([prefix, 2 * c]) if prefix else None  # the relay's per-rank chunk lengths
    try:
        for rank in range(cp):
            queries = _positions(ring._segments(rank, c, prefix, cp)[0])
            earlier_keys = zigzag(cp, rank, earlier) if prefix else torch.arange(0)
            assert torch.equal(
                _positions(ring._segments(rank, c, prefix, cp)[1]),
                torch.cat([earlier_keys, earlier + zigzag(cp, rank, chunk)]),
            )
            for source in range(cp):
                keys = _positions(ring._segments(source, c, prefix, cp)[1])
                seen = torch.zeros(2 * c, len(keys), dtype=torch.long)
                for p in ring.document_pieces(rank, source, c, prefix, cp):
                    n, m = p.rows.stop - p.rows.start, p.keys.stop - p.keys.start
                    seen[p.rows, p.keys] += torch.ones(n, m, dtype=torch.long).tril() if p.causal else 1
                d = docs[0]
                want = (keys[None, :] <= queries[:, None]) & (d[keys][None, :] == d[queries][:, None])
                assert torch.equal(seen, want.long()), f"cp={cp} rank={rank} source={source} prefix={prefix}"
    finally:
        masks.set_documents(None)
        RelayContext.current = None


def _positions(segments) -> torch.Tensor:
    return torch.cat([torch.arange(s.start, s.start + s.length) for s in segments])
