"""Ring attention (context parallelism, `parallel.cp`): causal attention whose keys are spread over cp ranks.

Layout (zigzag). A sequence, or each Seq1F1B chunk of it, is cut into 2 * cp equal pieces; cp rank r holds
pieces r and 2cp-1-r, in that order, with their absolute position ids. Every rank then does the same causal
work: the early piece sees few keys, its mirror many. Under Ulysses (parallel.sp) the all-to-all first gathers
a cp rank's two pieces whole for its heads, so the ring sees [B, H/sp, 2c, D] queries per rank.

Keys a rank's queries attend are the `payload` of every cp rank: [prefix (P keys) || own pieces (2c keys)],
where the prefix is the rank's share of earlier Seq1F1B chunks (the KV relay's buffer; P = 0 without chunks).
The payload travels around the ring in cp - 1 steps; at the step holding source rank j's payload
(`pieces(rank, j, c, P)`):

    j == rank   prefix: every query, unmasked; own pieces: the square causal block (piece r before 2cp-1-r)
    j <  rank   every query sees j's prefix and j's early piece, unmasked (j's late piece lies after both)
    j >  rank   the late query piece sees all of j's payload; the early one only j's prefix

Packed documents (masks.py): every query row and payload key has a window position (`_segments`), so each
step's blocks are cut by document (`document_pieces`): a block whose keys are all earlier than its queries becomes
one unmasked block per document present in both, a diagonal one causal square per document, and pairs the mask
empties are never computed. The zigzag pairs balance causal work, not what a mask leaves, so under a mask the
runtime pairs each chunk's pieces by the work left (`graph.ring.balanced_pairs`: heaviest with lightest), per
micro-batch; the pieces keep their size, so shapes and messages do not change.

Each call to a kernel returns its output and log-sum-exp (LSE); partial results merge exactly through the
LSE, as `attention.attend` merges its prefix and diagonal blocks. The send of the next step's payload is
posted (one `batch_isend_irecv` to the ring neighbours on the cp group) before the current step's kernels
run, so the transfer overlaps them. The backward passes the payload around again with its dK/dV
accumulator (fp32): after cp steps every accumulator has met every rank's queries and the last send
returns it to its owner. Gradients are exact: each block's backward takes the merged output and LSE.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from lcgraph.ops import masks
from lcgraph.ops.attention import KERNEL_CALLS, KERNELS, Block, Grads, Saved, attention_backend, resolve_backend
from lcgraph.ops.context import current
from lcgraph.ops.relay import RelayContext, StageAttention

RING = "ring"  # Saved.backend prefix of a ring call: "ring:<kernel>"


stats = {"p2p": 0, "p2p_bytes": 0, "steps": 0}  # sends posted and their bytes, ring steps run (tests, planner)


@dataclass(frozen=True)
class Piece:
    """One kernel call of a ring step: query rows of this rank against key columns of the payload held (of batch
    rows `batch`: under a document mask each row has its own documents)."""

    rows: slice
    keys: slice
    causal: bool
    batch: slice = field(default_factory=lambda: slice(None))


def pieces(rank: int, source: int, chunk: int, prefix: int) -> list[Piece]:
    """The kernel calls when `rank`'s queries (2 * chunk rows) meet `source`'s payload (prefix + 2 * chunk keys)."""
    c, p = chunk, prefix
    every, late = slice(0, 2 * c), slice(c, 2 * c)
    out: list[Piece] = []
    if source == rank:
        out.append(Piece(every, slice(p, p + 2 * c), True))
    elif source < rank:
        out.append(Piece(every, slice(0, p + c), False))
    else:
        out.append(Piece(late, slice(0, p + 2 * c), False))
    if p and (source == rank or source > rank):
        out.append(Piece(slice(0, 2 * c) if source == rank else slice(0, c), slice(0, p), False))
    return out


@dataclass(frozen=True)
class Segment:
    """Contiguous positions of the window held at contiguous rows (queries) or columns (payload keys)."""

    at: int  # first row or column
    start: int  # its window position
    length: int


def _segments(rank: int, chunk: int, prefix: int, cp: int) -> tuple[list[Segment], list[Segment]]:
    """(query segments of `rank`, key segments of its payload) in window positions. The payload's prefix holds
    the rank's two pieces of each earlier Seq1F1B chunk (the relay's chunk lengths say which; `masks.ring_pair`
    which pieces), then its two pieces of this chunk; the queries are those two pieces."""
    frames = [chunk * 2]
    relay = RelayContext.current
    if prefix:
        if relay is None:
            raise RuntimeError("ring attention with a prefix runs under a RelayContext")
        frames = _chunk_frames(relay.chunk_lengths, 2 * chunk, prefix)
    keys, col, offset = [], 0, 0
    for i, frame in enumerate(frames):
        n = frame // 2
        for piece in masks.ring_pair(i, rank, cp):  # zigzag, or as the runtime balanced this chunk's pieces
            keys.append(Segment(col, offset + piece * n, n))
            col += n
        offset += cp * frame
    early, late = keys[-2:]
    return [Segment(0, early.start, early.length), Segment(early.length, late.start, late.length)], keys


def _chunk_frames(lengths: list[int], frame: int, prefix: int) -> list[int]:
    """Attention-frame lengths of the chunks up to the one running: the relay's per-rank chunk lengths times
    what Ulysses gathers, the running one being `frame` long after `prefix` keys (found by both: a backward
    runs outside its unit)."""
    for i, n in enumerate(lengths):
        ratio, rest = divmod(frame, n)
        if not rest and ratio * sum(lengths[:i]) == prefix:
            return [ratio * m for m in lengths[: i + 1]]
    raise RuntimeError(f"ring attention: no chunk of {lengths} is {frame} long after a prefix of {prefix}")


def document_pieces(rank: int, source: int, chunk: int, prefix: int, cp: int) -> list[Piece]:
    """`pieces` cut by document: per batch row, per (query segment, source key segment) with keys not after the
    queries, one block per document present in both (causal on the diagonal segment)."""
    queries, _ = _segments(rank, chunk, prefix, cp)
    _, keys = _segments(source, chunk, prefix, cp)
    out: list[Piece] = []
    for row, bounds in enumerate(masks.row_bounds()):
        batch = slice(row, row + 1)
        for q in queries:
            for k in keys:
                if k.start >= q.start + q.length:
                    continue  # keys after every query of the segment
                diagonal = k.start == q.start
                for first, end in zip(bounds, bounds[1:]):
                    qa, qb = max(first, q.start), min(end, q.start + q.length)
                    ka, kb = max(first, k.start), min(end, k.start + k.length)
                    if qa < qb and ka < kb:
                        rows = slice(q.at + qa - q.start, q.at + qb - q.start)
                        out.append(Piece(rows, slice(k.at + ka - k.start, k.at + kb - k.start), diagonal, batch))
    return out


def step_pieces(rank: int, source: int, chunk: int, prefix: int, cp: int) -> list[Piece]:
    """The kernel calls of one ring step: whole zigzag blocks, or cut by document under a document mask."""
    if masks.documents_set():
        return document_pieces(rank, source, chunk, prefix, cp)
    return pieces(rank, source, chunk, prefix)


class _Shift:
    """Tensors posted to the next cp rank while the same number arrive from the previous one."""

    def __init__(self, tensors: list[torch.Tensor]):
        self.received = [torch.empty_like(t) for t in tensors]
        place = current().ring
        ops = [dist.P2POp(dist.isend, t, place.send_to, place.group) for t in tensors]
        ops += [dist.P2POp(dist.irecv, t, place.recv_from, place.group) for t in self.received]
        self.works = dist.batch_isend_irecv(ops) if ops else []
        stats["p2p"] += len(tensors)
        stats["p2p_bytes"] += sum(t.numel() * t.element_size() for t in tensors)

    def wait(self) -> list[torch.Tensor]:
        for w in self.works:
            w.wait()
        return self.received


def _rows(t: torch.Tensor, rows: slice, batch: slice = slice(None)) -> torch.Tensor:
    """Query rows of a [B, H, S, ...] tensor; a contiguous copy when it is not all of them (kernels read
    their LSE and output rows as dense tensors)."""
    if rows.start == 0 and rows.stop == t.shape[2] and batch == slice(None):
        return t
    return t[batch, :, rows].contiguous()


def ring_backend(q: torch.Tensor) -> str:
    """The kernel the ring runs for tensors like `q`: auto's choice, except `efficient`. Its backward, called
    from the ring's merged output and LSE, gave NaN gradients and illegal memory accesses on an H200
    (tests/test_gpu_ring.py), so where auto would fall back to it (fp32 on a GPU, a head dim or GPU the table
    does not cover) the ring runs `math`; asked for by name it is refused (validation says so up front)."""
    name = resolve_backend(q, documents=masks.documents_set())
    if name != "efficient":
        return name
    if attention_backend() == "efficient":
        raise RuntimeError(
            "ring attention does not run the efficient kernel: set train.attention to auto, cudnn or flash"
        )
    return "math"


def _check(q: torch.Tensor, k: torch.Tensor) -> tuple[int, int]:
    sq = q.shape[2]
    if sq % 2 or k.shape[2] < sq:
        raise RuntimeError(f"ring attention: {sq} queries (two equal pieces) against {k.shape[2]} keys")
    return sq // 2, k.shape[2] - sq


def _lse_dtype(q: torch.Tensor) -> torch.dtype:
    return torch.float64 if q.dtype == torch.float64 else torch.float32


def _merge_into(out: torch.Tensor, lse: torch.Tensor, piece: Piece, block: Block) -> None:
    """Fold one block's output and LSE into the running ones of its rows (exact log-sum-exp merge)."""
    b, rows = piece.batch, piece.rows
    old = lse[b, :, rows]
    new = torch.logaddexp(old, block.lse.to(lse.dtype))
    kept = torch.exp(old - new).unsqueeze(-1)
    out[b, :, rows] = out[b, :, rows] * kept + block.out.to(out.dtype) * torch.exp(block.lse - new).unsqueeze(-1)
    lse[b, :, rows] = new


def forward_step(kernel, q, payload, steps: list[Piece], out, lse, scale: float) -> list:
    """One ring step's kernel calls (queries against the payload held), merged into `out` and `lse`; their aux."""
    auxes = []
    for piece in steps:
        kk, vv = payload[0][piece.batch, :, piece.keys], payload[1][piece.batch, :, piece.keys]
        block = kernel.forward(_rows(q, piece.rows, piece.batch), kk, vv, scale, piece.causal)
        _merge_into(out, lse, piece, block)
        auxes.append(block.aux)
    return auxes


def backward_step(kernel, dout, q, payload, steps: list[Piece], saved: Saved, scale: float, auxes, dq):
    """One ring step's kernel backwards from the merged output and LSE: adds into `dq`, returns the payload's
    dK and dV from this rank's queries (fp32 accumulators)."""
    mine = [torch.zeros(t.shape, dtype=dq.dtype, device=t.device) for t in payload]
    for piece in steps:
        b = piece.batch
        kk, vv = payload[0][b, :, piece.keys], payload[1][b, :, piece.keys]
        rows = [_rows(t, piece.rows, b) for t in (dout, q, saved.out)]
        lse = saved.lse[b, :, piece.rows].contiguous()
        dq_p, dk_p, dv_p = kernel.backward(*rows[:2], kk, vv, rows[2], lse, scale, piece.causal, next(auxes))
        dq[b, :, piece.rows] += dq_p
        mine[0][b, :, piece.keys] += dk_p
        mine[1][b, :, piece.keys] += dv_p
    return mine


def ring_attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> Saved:
    """Causal attention of this rank's zigzag queries over every cp rank's payload, no autograd.

    q [B, Hq, 2c, D]; k, v [B, Hkv, P + 2c, D] (prefix, then this rank's own pieces). Returns the merged
    output and LSE; `aux_diagonal` keeps each kernel call's aux for the backward, in call order."""
    c, p = _check(q, k)
    name = ring_backend(q)
    kernel = KERNELS[name]
    KERNEL_CALLS["forward"] += 1
    acc = _lse_dtype(q)
    out = torch.zeros(q.shape, dtype=acc, device=q.device)
    lse = torch.full(q.shape[:3], float("-inf"), dtype=acc, device=q.device)
    payload = [k.contiguous(), v.contiguous()]
    auxes = []
    place = current().ring
    for step in range(place.size):
        source = (place.rank - step) % place.size
        shift = _Shift(payload) if step < place.size - 1 else None  # the next payload travels during this step
        auxes += forward_step(kernel, q, payload, step_pieces(place.rank, source, c, p, place.size), out, lse, scale)
        stats["steps"] += 1
        if shift is not None:
            payload = shift.wait()
    return Saved(out.to(q.dtype), lse, f"{RING}:{name}", tuple(auxes))


def ring_attend_backward(dout: torch.Tensor, q, k, v, saved: Saved, scale: float) -> Grads:
    """Gradients of `ring_attend`: the payload goes around again with its dK/dV accumulator, which the
    last send hands back to its owner. Grads splits them into own keys and prefix (None when P = 0)."""
    c, p = _check(q, k)
    kernel = KERNELS[saved.backend.split(":", 1)[1]]
    KERNEL_CALLS["backward"] += 1
    dout = dout.contiguous()
    dq = torch.zeros(q.shape, dtype=_lse_dtype(q), device=q.device)
    payload = [k.contiguous(), v.contiguous()]
    grads: list[torch.Tensor] = []  # the dK/dV accumulator of the payload held
    auxes = iter(saved.aux_diagonal)
    place = current().ring
    for step in range(place.size):
        source = (place.rank - step) % place.size
        sends = (payload if step < place.size - 1 else []) + grads  # grads: the previous source's, passed on
        shift = _Shift(sends) if sends else None
        steps = step_pieces(place.rank, source, c, p, place.size)
        mine = backward_step(kernel, dout, q, payload, steps, saved, scale, auxes, dq)
        if shift is not None:
            received = shift.wait()
            if step < place.size - 1:
                payload, received = received[:2], received[2:]
            mine = [a + b for a, b in zip(mine, received)] if received else mine
        grads = mine
    if place.size > 1:
        grads = _Shift(grads).wait()  # each accumulator has met every rank's queries: home to its owner
    dk, dv = grads
    prefix = (dk[:, :, :p].to(k.dtype), dv[:, :, :p].to(v.dtype)) if p else (None, None)
    return Grads(dq.to(q.dtype), dk[:, :, p:].to(k.dtype), dv[:, :, p:].to(v.dtype), *prefix)


def simulate(qs, ks, vs, douts, scale: float) -> list[tuple[torch.Tensor, ...]]:
    """Every cp rank's ring attention in one process, payloads read instead of sent: per rank (out, dq, dk, dv)
    with dk, dv over its whole payload. The step functions `ring_attend` runs, on one device: what the one-GPU
    kernel checks compare with full attention."""
    cp = len(qs)
    c, p = _check(qs[0], ks[0])
    kernel = KERNELS[ring_backend(qs[0])]
    acc = _lse_dtype(qs[0])
    forward = []
    for r in range(cp):
        out = torch.zeros(qs[r].shape, dtype=acc, device=qs[r].device)
        lse = torch.full(qs[r].shape[:3], float("-inf"), dtype=acc, device=qs[r].device)
        auxes = []
        for step in range(cp):
            j = (r - step) % cp
            auxes += forward_step(kernel, qs[r], [ks[j], vs[j]], step_pieces(r, j, c, p, cp), out, lse, scale)
        forward.append((Saved(out.to(qs[r].dtype), lse, RING), auxes))
    dkv = [[torch.zeros(t.shape, dtype=acc, device=t.device) for t in (ks[j], vs[j])] for j in range(cp)]
    dqs = []
    for r, (saved, auxes) in enumerate(forward):
        dq, it = torch.zeros(qs[r].shape, dtype=acc, device=qs[r].device), iter(auxes)
        for step in range(cp):
            j = (r - step) % cp
            steps = step_pieces(r, j, c, p, cp)
            mine = backward_step(kernel, douts[r].contiguous(), qs[r], [ks[j], vs[j]], steps, saved, scale, it, dq)
            dkv[j] = [a + b for a, b in zip(dkv[j], mine)]
        dqs.append(dq.to(qs[r].dtype))
    return [(forward[r][0].out, dqs[r], dkv[r][0].to(ks[r].dtype), dkv[r][1].to(vs[r].dtype)) for r in range(cp)]


RING_FUNCTIONS = (ring_attend, ring_attend_backward)


class _RingAttention(torch.autograd.Function):
    """`ring_attend` under autograd outside a runtime (no relay, no kept outputs)."""

    @staticmethod
    def forward(ctx, q, k, v, scale: float):
        saved = ring_attend(q, k, v, scale)
        ctx.save_for_backward(q, k, v, saved.out, saved.lse)
        ctx.scale, ctx.backend, ctx.aux = scale, saved.backend, saved.aux_diagonal
        return saved.out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, out, lse = ctx.saved_tensors
        g = ring_attend_backward(grad_out, q, k, v, Saved(out, lse, ctx.backend, ctx.aux), ctx.scale)
        if g.dk_prefix is None or g.dv_prefix is None:
            return g.dq, g.dk, g.dv, None
        return g.dq, torch.cat([g.dk_prefix, g.dk], 2), torch.cat([g.dv_prefix, g.dv], 2), None


def ring_attention_fn(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """Differentiable ring attention over whole (unchunked) sequences."""
    return _RingAttention.apply(q, k, v, scale)


# Graph targets the `ring` pass puts in place of the relay's and the lowering's (same arguments).


@torch.compiler.disable
def ring_layer_attention(q, k, v, scale: float, layer: int):
    """Ring attention on a stage that runs whole sequences (kept output under keep_attention)."""
    relay = RelayContext.current
    if relay is None:
        return ring_attention_fn(q, k, v, scale)
    return StageAttention.apply(q, k, v, scale, relay, layer, False, RING_FUNCTIONS)


@torch.compiler.disable
def ring_relay_attention(q, k, v, scale: float, layer: int):
    """Ring attention on a Seq1F1B stage: each rank's payload is its relay buffer up to this chunk (its
    shares of the earlier chunks, then its two pieces of this one), so the prefix travels the ring too."""
    relay = RelayContext.current
    if relay is None:
        raise RuntimeError("ring_relay_attention ran with no RelayContext: the runtime must set RelayContext.current")
    return StageAttention.apply(q, k, v, scale, relay, layer, True, RING_FUNCTIONS)
