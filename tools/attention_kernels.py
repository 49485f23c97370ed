"""Raw attention kernels on one GPU: forward and backward TFLOP/s of every candidate PyTorch offers, per case.

    python3 tools/attention_kernels.py --json out/attention_kernels.json            # the default sweep, < 3 min
    python3 tools/attention_kernels.py --configs 64:32/8 --candidates cudnn flex    # one head shape, two kernels
    python3 tools/attention_kernels.py --device cpu --configs 16:4/2 --causal-seq 256 --prefix 128:256 --diagonal 128
    python3 tools/attention_kernels.py --ring-steps --json out/ring_steps.json   # head shape 128:8/1, 32k..128k, cp 2..8
    python3 tools/attention_kernels.py --ring-steps --device cpu --ring-seq 1024 --cp 2 --configs 16:4/2 --json x.json

Candidates (each keeps its output and log-sum-exp and runs its own backward, as lcgraph's attention does):
  cudnn, flash, efficient  the SDPA aten ops that return the LSE (`torch.ops.aten._scaled_dot_product_*_attention`
                           and their `_backward` ops); GQA native where the kernel takes fewer K/V heads, otherwise
                           K/V expanded with repeat_interleave (and dK/dV summed back), timed with the kernel
  flex                     FlexAttention under torch.compile, enable_gqa, the LSE through return_aux (return_lse
                           on an older torch), causal as a block mask built directly (no S x S mask on the way)
  cpu                      (--device cpu) `_scaled_dot_product_flash_attention_for_cpu` and its backward
  math                     the exact fp32 reference under autograd (S x S scores: small shapes; the CPU default)
Cases: full causal (Sq = Sk), prefix blocks (a chunk's queries against its cached prefix, no mask) and diagonal
blocks (a chunk against itself, causal) for each head shape `head_dim:q_heads/kv_heads`. With `--documents MEAN ..`
also packed documents: lcgraph's own attention (`attention_fn`, one causal span per document) on each of its GPU
backends (math on CPU), documents of log-normal lengths (sigma 1) with that mean in windows of `--document-seq`
tokens; TFLOP/s count only the pairs the mask keeps. `auto`'s choice under a mask (ops/attention.py:
DOCUMENT_AUTO) is the backend this case measures fastest.

FLOPs follow lcgraph's cost model: forward = 4 * heads * head_dim * pairs (pairs = Sq*(Sq+1)/2 causal, Sq*Sk
otherwise), backward = 2.5 x forward. Each row also gives every candidate's largest difference from the first
candidate that ran (output, LSE in natural-log units, gradients): a candidate that disagrees is not a choice.
Times: CUDA events, one warm-up call (compiles, cuDNN plans), then enough calls to fill --min-time; cases past
--budget-s are listed as skipped, so the sweep's length is bounded whatever the kernels do.

`--ring-steps` times ring attention's block steps instead (docs/ring.md), per head shape, whole sequence
(`--ring-seq`, all cp ranks) and cp: forward + backward of `ring.simulate` (every cp rank's steps in one process,
payloads read, not sent: the same step functions a ring rank runs) divided by cp, against `attention.attend` +
`attend_backward` of the whole sequence divided by cp (the ideal split). `overhead` is their ratio: smaller
blocks, the LSE merges and the row copies. Each row also gives one step's K/V payload and its transfer time at
the NVLink and InfiniBand bandwidths of the shipped H200 profile, and a step's forward + backward (averaged) against
its sends (the payload twice and the fp32 dK/dV once): the ring hides its p2p while the compute is the longer.
Times: `--repeats` calls after one warm-up call.
"""

from __future__ import annotations

import argparse
import inspect
import itertools
import json
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch.nn.attention import flex_attention as flex_mod

from lcgraph.ops import attention, masks, ring
from lcgraph.planner.profile import load_profile
from lcgraph.runtime.data import lognormal_offsets

aten = torch.ops.aten
CANDIDATES = ("cudnn", "flash", "efficient", "flex", "cpu", "math")
GPU_CANDIDATES = ("cudnn", "flash", "efficient", "flex")
K = 1024


@dataclass(frozen=True)
class Case:
    head_dim: int
    hq: int
    hkv: int
    shape: str  # causal | prefix | diagonal
    sq: int
    sk: int

    @property
    def causal(self) -> bool:
        return self.shape != "prefix"

    @property
    def fwd_flops(self) -> float:
        pairs = self.sq * (self.sq + 1) / 2 if self.causal else self.sq * self.sk
        return 4 * self.hq * self.head_dim * pairs

    @property
    def name(self) -> str:
        return f"d{self.head_dim} {self.hq}/{self.hkv} {self.shape} {_k(self.sq)}x{_k(self.sk)}"


def _k(n: int) -> str:
    return f"{n // K}k" if n % K == 0 else str(n)


# ---------------------------------------------------------------- candidates
# Each: (q, k, v, causal) -> (out, lse, backward), backward(dout) -> (dq, dk, dv); q/k/v are [B, H, S, D] views
# of [B, S, H, D] storage, as a model's projections give them.

Run = tuple[torch.Tensor, torch.Tensor, Callable[[torch.Tensor], tuple[torch.Tensor, ...]]]


def _cudnn(q, k, v, causal) -> Run:
    r = aten._scaled_dot_product_cudnn_attention(q, k, v, None, True, 0.0, causal, False)
    out, lse = r[0], r[1]
    return (
        out,
        lse,
        lambda do: aten._scaled_dot_product_cudnn_attention_backward(
            do, q, k, v, out, lse, r[6], r[7], None, r[2], r[3], r[4], r[5], 0.0, causal
        ),
    )


def _flash(q, k, v, causal) -> Run:
    r = aten._scaled_dot_product_flash_attention(q, k, v, 0.0, causal, False)
    out, lse = r[0], r[1]
    return (
        out,
        lse,
        lambda do: aten._scaled_dot_product_flash_attention_backward(
            do, q, k, v, out, lse, r[2], r[3], r[4], r[5], 0.0, causal, r[6], r[7]
        ),
    )


def _efficient(q, k, v, causal) -> Run:
    out, lse, seed, offset = aten._scaled_dot_product_efficient_attention(q, k, v, None, True, 0.0, causal)

    def backward(do):
        return aten._scaled_dot_product_efficient_attention_backward(
            do, q, k, v, None, out, lse, seed, offset, 0.0, [True, True, True, False], causal
        )[:3]

    return out, lse, backward


def _cpu(q, k, v, causal) -> Run:
    out, lse = aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, causal)
    return (
        out,
        lse,
        lambda do: aten._scaled_dot_product_flash_attention_for_cpu_backward(do, q, k, v, out, lse, 0.0, causal),
    )


def _math(q, k, v, causal) -> Run:
    """The exact reference, fp32 under autograd, equal head counts (GQA through `expanded`): small shapes only."""
    q, k, v = (t.detach().float().requires_grad_() for t in (q, k, v))
    scores = q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5
    if causal:
        scores = scores.masked_fill(torch.ones_like(scores, dtype=torch.bool).triu(1), float("-inf"))
    lse = scores.logsumexp(-1)
    out = (scores - lse[..., None]).exp() @ v
    return out, lse, lambda do: torch.autograd.grad(out, (q, k, v), do.float(), retain_graph=True)


def causal_block_mask(seq: int, device: str, block: int = 128) -> flex_mod.BlockMask:
    """Causal BlockMask from its block lists: query block i sees blocks 0..i-1 whole and block i masked."""
    n = -(-seq // block)
    ar = torch.arange(n, device=device, dtype=torch.int32)
    kwargs = (
        {"seq_lengths": (seq, seq)}
        if "seq_lengths" in inspect.signature(flex_mod.BlockMask.from_kv_blocks).parameters
        else {}
    )
    return flex_mod.BlockMask.from_kv_blocks(
        torch.ones(1, 1, n, device=device, dtype=torch.int32),
        ar.view(n, 1).expand(n, n).contiguous().view(1, 1, n, n),  # block i's one masked block is i itself
        ar.view(1, 1, n),  # block i has i whole blocks ...
        ar.view(1, n).expand(n, n).contiguous().view(1, 1, n, n),  # ... namely 0..i-1
        block,
        lambda b, h, qi, ki: qi >= ki,
        **kwargs,
    )


class Flex:
    """flex_attention compiled once per process (dynamo recompiles per shape; the limit is raised for the sweep)."""

    def __init__(self, device: str):
        self.device = device
        self.fn = flex_mod.flex_attention
        if device != "cpu":  # eager flex on CPU is the math path: fine for a smoke run, not a kernel
            torch._dynamo.config.cache_size_limit = 256
            self.fn = torch.compile(flex_mod.flex_attention, dynamic=False)
        self.masks: dict[int, flex_mod.BlockMask] = {}
        self.aux = "return_aux" in inspect.signature(flex_mod.flex_attention).parameters

    def __call__(self, q, k, v, causal) -> Run:
        mask = None
        if causal:
            if q.shape[2] not in self.masks:
                self.masks[q.shape[2]] = causal_block_mask(q.shape[2], self.device)
            mask = self.masks[q.shape[2]]
        q, k, v = (t.detach().requires_grad_(torch.is_grad_enabled()) for t in (q, k, v))
        if self.aux:
            out, aux = self.fn(q, k, v, block_mask=mask, enable_gqa=True, return_aux=flex_mod.AuxRequest(lse=True))
            lse = aux.lse
        else:
            out, lse = self.fn(q, k, v, block_mask=mask, enable_gqa=True, return_lse=True)
        return out, lse, lambda do: torch.autograd.grad(out, (q, k, v), do, retain_graph=True)


def expanded(kernel) -> Callable:
    """GQA by copies: K/V repeated to the query heads, dK/dV summed back over each group."""

    def run(q, k, v, causal) -> Run:
        g = q.shape[1] // k.shape[1]
        out, lse, backward = kernel(q, k.repeat_interleave(g, 1), v.repeat_interleave(g, 1), causal)

        def grads(do):
            dq, dk, dv = backward(do)
            b, h, s, d = dk.shape
            return dq, dk.view(b, h // g, g, s, d).sum(2), dv.view(b, h // g, g, s, d).sum(2)

        return out, lse, grads

    return run


# ---------------------------------------------------------------- timing


class Clock:
    def __init__(self, device: str):
        self.cuda = device != "cpu"

    def seconds(self, fn: Callable[[], object], calls: int) -> float:
        if not self.cuda:
            t0 = time.perf_counter()
            for _ in range(calls):
                fn()
            return (time.perf_counter() - t0) / calls
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(calls):
            fn()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end) / 1e3 / calls


def repeated(clock: Clock, fn: Callable[[], object], calls: int) -> float:
    """Seconds per call over `calls` calls after one warm-up call (cuDNN plans, allocator)."""
    fn()
    return clock.seconds(fn, calls)


def timed(clock: Clock, fn: Callable[[], object], min_time: float, max_calls: int = 20) -> float:
    """Seconds per call: one timed call after the caller's warm-up, more if it was short."""
    first = clock.seconds(fn, 1)
    calls = min(max_calls, int(min_time / max(first, 1e-6)))
    return first if calls < 2 else clock.seconds(fn, calls)


def _inputs(case: Case, device: str, seed: int = 0):
    """q, k, v, dout: the same values for every candidate of a case (bf16 on GPU, fp32 on CPU)."""
    g = torch.Generator(device=device).manual_seed(seed)
    dt = torch.bfloat16 if device != "cpu" else torch.float32

    def make(s, h):
        return torch.randn(1, s, h, case.head_dim, device=device, dtype=dt, generator=g).transpose(1, 2)

    return make(case.sq, case.hq), make(case.sk, case.hkv), make(case.sk, case.hkv), make(case.sq, case.hq)


def _lse(lse: torch.Tensor, sq: int) -> torch.Tensor:
    """[B, H, Sq] in natural-log units, whatever padding or trailing dim the kernel adds."""
    lse = lse.float()
    if lse.dim() == 4:
        lse = lse.squeeze(-1)
    return lse[..., :sq]


def _diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().max().item()


def measure(case: Case, kernel, clock: Clock, min_time: float, ref: dict | None) -> dict:
    """One candidate on one case: forward/backward seconds and TFLOP/s, and its distance from `ref`."""
    q, k, v, dout = _inputs(case, "cuda" if clock.cuda else "cpu")
    out, lse, backward = kernel(q, k, v, case.causal)  # warm-up: compiles, cuDNN plans
    do = torch.empty_like(out).copy_(dout)  # the kernel's own output strides
    grads = backward(do)
    if grads[1].shape != k.shape:
        raise RuntimeError(f"dK shape {tuple(grads[1].shape)} for K {tuple(k.shape)}")
    fwd = timed(clock, lambda: kernel(q, k, v, case.causal)[:2], min_time)
    bwd = timed(clock, lambda: backward(do), min_time)
    got = {"out": out, "lse": _lse(lse, case.sq), "dq": grads[0], "dk": grads[1], "dv": grads[2]}
    row = {
        "fwd_ms": fwd * 1e3,
        "bwd_ms": bwd * 1e3,
        "fwd_tflops": case.fwd_flops / fwd / 1e12,
        "bwd_tflops": 2.5 * case.fwd_flops / bwd / 1e12,
    }
    if ref is None:
        return row | {"ref": got}
    return row | {f"diff_{name}": _diff(t, ref[name]) for name, t in got.items()}


def candidate(name: str, flex: Flex | None, gqa: str):
    base = {"cudnn": _cudnn, "flash": _flash, "efficient": _efficient, "cpu": _cpu, "math": _math}.get(name) or flex
    return expanded(base) if gqa == "expanded" else base


def _first_line(e: Exception) -> str:
    text = str(e).strip()
    return text.splitlines()[0][:160] if text else repr(e)


def _gqa_modes(name: str, case: Case) -> tuple[str, ...]:
    if case.hq == case.hkv or name == "flex":  # flex: enable_gqa
        return ("native",)
    return ("expanded",) if name == "math" else ("native", "expanded")


def run_case(case: Case, names: list[str], flex: Flex | None, clock: Clock, min_time: float) -> list[dict]:
    """Every candidate on one case; GQA native first, K/V expanded if the kernel refuses fewer K/V heads."""
    rows, ref = [], None
    for name in names:
        row, errors = {"candidate": name, **asdict(case)}, []
        for gqa in _gqa_modes(name, case):
            try:
                res = measure(case, candidate(name, flex, gqa), clock, min_time, ref)
            except (RuntimeError, ValueError, NotImplementedError, AssertionError) as e:  # kernel refuses shape
                errors.append(f"{gqa}: {_first_line(e)}")
                continue
            ref = res.pop("ref", ref)
            row.update(res, gqa=gqa)
            break
        rows.append(row | ({"errors": errors} if errors else {}))
        if clock.cuda:
            torch.cuda.empty_cache()
    return rows


# ---------------------------------------------------------------- packed documents (lcgraph's own attention)

DOCUMENT_BACKENDS = ("cudnn", "flash", "efficient")  # lcgraph's GPU kernels; `math` on CPU


def document_ids(seq: int, mean: int, seed: int = 0) -> torch.Tensor:
    """[1, seq] ids of documents with log-normal lengths (sigma 1) of this mean, as `data.mean_document_tokens`."""
    offsets = torch.from_numpy(lognormal_offsets(seq, mean, seed))
    return torch.repeat_interleave(torch.arange(len(offsets) - 1), offsets.diff())[None]


def kept_pairs(ids: torch.Tensor) -> int:
    lengths = masks.document_bounds(ids)[0]
    return sum(n * (n + 1) // 2 for n in (b - a for a, b in zip(lengths, lengths[1:])))


def document_case(config: tuple[int, int, int], seq: int, mean: int, names: list[str], clock: Clock, min_time: float):
    """lcgraph's `attention_fn` under a document mask (one causal span per document, ops/attention.py) on each
    backend: forward and backward (autograd) seconds, TFLOP/s of the pairs the mask keeps, distance from the
    first backend that ran."""
    d, hq, hkv = config
    ids = document_ids(seq, mean)
    flops = 4 * hq * d * kept_pairs(ids)
    case = Case(d, hq, hkv, "causal", seq, seq)
    q, k, v, dout = _inputs(case, "cuda" if clock.cuda else "cpu")
    rows, ref = [], None
    base = {"candidate": None, "head_dim": d, "hq": hq, "hkv": hkv, "shape": "documents", "mean": mean, "sq": seq}
    base |= {"sk": seq, "documents": int(ids.max()) + 1, "kept": kept_pairs(ids) / (seq * (seq + 1) / 2)}
    base |= {"gqa": "native"}  # lcgraph's attention: fewer K/V heads as the kernel takes them
    before = attention.attention_backend()
    try:
        masks.set_documents(ids)
        for name in names:
            attention.set_backend(name)
            row = base | {"candidate": name}
            try:
                row |= _document_run(q, k, v, dout, flops, clock, min_time, ref)
            except (RuntimeError, ValueError, NotImplementedError) as e:
                rows.append(row | {"errors": [_first_line(e)]})
                continue
            ref = row.pop("ref", ref)
            rows.append(row)
    finally:
        masks.set_documents(None)
        attention.set_backend(before)
    return rows


def _document_run(q, k, v, dout, flops: float, clock: Clock, min_time: float, ref: dict | None) -> dict:
    leaves = [t.detach().requires_grad_() for t in (q, k, v)]
    out = attention.attention_fn(*leaves, q.shape[-1] ** -0.5)  # warm-up
    grads = torch.autograd.grad(out, leaves, dout, retain_graph=True)
    with torch.no_grad():
        fwd = timed(clock, lambda: attention.attention_fn(*leaves, q.shape[-1] ** -0.5), min_time)
    bwd = timed(clock, lambda: torch.autograd.grad(out, leaves, dout, retain_graph=True), min_time)
    row = {"fwd_ms": fwd * 1e3, "bwd_ms": bwd * 1e3, "fwd_tflops": flops / fwd / 1e12}
    row["bwd_tflops"] = 2.5 * flops / bwd / 1e12
    got = {"out": out, "dq": grads[0], "dk": grads[1], "dv": grads[2]}
    if ref is None:
        return row | {"ref": got}
    return row | {f"diff_{name}": _diff(t, ref[name]) for name, t in got.items()}


def _case_key(r: dict) -> str:
    if "mean" in r:
        return f"d{r['head_dim']} {r['hq']}/{r['hkv']} documents of {r['mean']} in {_k(r['sq'])}"
    return Case(*(r[k] for k in ("head_dim", "hq", "hkv", "shape", "sq", "sk"))).name


def best(rows: list[dict]) -> dict:
    """Per case (a document case: per head shape, mean and length): the candidate with the least forward +
    backward time among those that ran."""
    out: dict[str, dict] = {}
    for r in rows:
        key = _case_key(r)
        if "fwd_ms" in r and (key not in out or r["fwd_ms"] + r["bwd_ms"] < out[key]["fwd_ms"] + out[key]["bwd_ms"]):
            out[key] = {k: r[k] for k in ("candidate", "fwd_ms", "bwd_ms", "fwd_tflops", "bwd_tflops")}
    return out


# ---------------------------------------------------------------- ring steps (--ring-steps)


def ring_row(config: tuple[int, int, int], seq: int, cp: int, clock: Clock, repeats: int) -> dict:
    """A rank's ring steps, forward + backward, against its share of one Ulysses-only call (the module doc)."""
    d, heads, kv = config
    device, dtype = ("cuda", torch.bfloat16) if clock.cuda else ("cpu", torch.float32)
    torch.manual_seed(0)
    q = torch.randn(1, heads, seq, d, device=device, dtype=dtype)
    k, v = (torch.randn(1, kv, seq, d, device=device, dtype=dtype) for _ in range(2))
    grad, scale, c = torch.randn_like(q), d**-0.5, seq // (2 * cp)
    # zigzag: rank r holds pieces r and 2cp-1-r of the 2cp equal pieces
    owns = [torch.arange(2 * cp * c).view(2 * cp, c)[[r, 2 * cp - 1 - r]].flatten().to(device) for r in range(cp)]
    qs, ks, vs, gs = ([t[:, :, o] for o in owns] for t in (q, k, v, grad))
    whole = lambda: attention.attend_backward(grad, q, k, v, attention.attend(q, k, v, scale), scale)
    full_s, ring_s = (repeated(clock, fn, repeats) / cp for fn in (whole, lambda: ring.simulate(qs, ks, vs, gs, scale)))
    profile = load_profile("h200")
    nvlink, ib = profile.intra_node_bw, profile.inter_node_bw
    payload = 2 * kv * (seq // cp) * d * q.element_size()  # one step's K and V of one layer
    sends = 4 * payload  # per step: the payload forward, again backward with its fp32 dK/dV accumulators
    row = {"head_dim": d, "hq": heads, "hkv": kv, "seq": seq, "cp": cp, "queries_per_rank": seq // cp}
    row |= {"ulysses_only_s": full_s, "ring_s": ring_s, "overhead": ring_s / full_s, "payload_bytes": payload}
    row |= {"send_nvlink_s": payload / nvlink, "send_ib_s": payload / ib}
    row |= {"mean_step_s": ring_s / cp}  # one step's forward + backward, averaged over the cp steps
    return row | {"step_sends_nvlink_s": sends / nvlink, "step_sends_ib_s": sends / ib}


def ring_steps(args) -> dict:
    clock, rows = Clock(args.device), []
    for config, seq, cp in itertools.product(map(parse_config, args.configs), args.ring_seq, args.cp):
        rows.append(row := ring_row(config, seq, cp, clock, args.repeats))
        print(
            f"d{config[0]} {config[1]}/{config[2]} seq {seq:>7} cp {cp}: ring {row['ring_s'] * 1e3:8.2f} ms/rank, "
            f"Ulysses-only share {row['ulysses_only_s'] * 1e3:8.2f} ms ({row['overhead']:.2f}x); payload "
            f"{row['payload_bytes'] / 2**20:.1f} MiB; a step {row['mean_step_s'] * 1e3:.2f} ms against its sends "
            f"{row['step_sends_nvlink_s'] * 1e3:.2f} ms NVLink, {row['step_sends_ib_s'] * 1e3:.2f} ms IB",
            flush=True,
        )
    device = torch.cuda.get_device_name() if clock.cuda else "cpu"
    out = {"meta": {"device": device, "torch": torch.__version__}, "rows": rows}
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(out, indent=1))
    return out


# ---------------------------------------------------------------- the sweep


def parse_config(text: str) -> tuple[int, int, int]:
    d, heads = text.split(":")
    hq, hkv = heads.split("/")
    return int(d), int(hq), int(hkv)


def cases_from_args(args) -> list[Case]:
    """First head shape with every length (the Llama-3.2-1B shape by default); the rest up to --short-max."""
    out = []
    for i, (d, hq, hkv) in enumerate(parse_config(c) for c in args.configs):
        keep = (lambda n: True) if i == 0 else (lambda n: n <= args.short_max)
        out += [Case(d, hq, hkv, "causal", s, s) for s in args.causal_seq if keep(s)]
        for p in args.prefix:
            sq, sk = (int(x) for x in p.split(":"))
            if keep(sk):
                out.append(Case(d, hq, hkv, "prefix", sq, sk))
        out += [Case(d, hq, hkv, "diagonal", s, s) for s in args.diagonal if keep(s)]
    return out


def render(rows: list[dict], names: list[str], title: str):
    from rich.table import Table

    table = Table(title=title)
    table.add_column("case")
    names = [*names, *sorted({r["candidate"] for r in rows} - set(names))]  # math: the CPU's document rows
    for n in names:
        table.add_column(f"{n} fwd/bwd", justify="right")
    table.add_column("best")
    winners = best(rows)
    by_case: dict[str, dict[str, dict]] = {}
    for r in rows:
        by_case.setdefault(_case_key(r), {})[r["candidate"]] = r
    for case, cands in by_case.items():
        cells = [_cell(cands.get(n)) for n in names]
        table.add_row(case, *cells, winners.get(case, {}).get("candidate", "-"))
    return table


def _cell(r: dict | None) -> str:
    if r is None:
        return "-"
    if "skipped" in r:
        return "skipped"
    if "fwd_tflops" not in r:
        return "error"
    bad = max((v for k, v in r.items() if k.startswith("diff_")), default=0.0)
    mark = "" if r.get("gqa") == "native" else " x"  # x: K/V expanded
    return f"{_rate(r['fwd_tflops'])}/{_rate(r['bwd_tflops'])}{mark}" + (f" (diff {bad:.2g})" if bad > 0.1 else "")


def _rate(tflops: float) -> str:
    return f"{tflops:.0f}" if tflops >= 10 else f"{tflops:.2g}"


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--configs", nargs="+", help="head_dim:hq/hkv (default 64:32/8 128:32/8 128:64/8; ring: 128:8/1)")
    ap.add_argument("--candidates", nargs="+", choices=CANDIDATES, help="default: every one the device has")
    ap.add_argument("--causal-seq", type=int, nargs="*", default=[8 * K, 16 * K, 32 * K, 64 * K, 128 * K, 256 * K])
    ap.add_argument("--prefix", nargs="*", default=["8192:8192", "8192:32768", "8192:131072", "8192:253952"])
    ap.add_argument("--diagonal", type=int, nargs="*", default=[4 * K, 8 * K, 16 * K])
    ap.add_argument("--short-max", type=int, default=64 * K, help="longest S for head shapes after the first")
    ap.add_argument("--min-time", type=float, default=0.05, help="seconds of timed calls per measurement")
    ap.add_argument("--budget-s", type=float, default=160.0, help="cases starting later are skipped")
    ap.add_argument(
        "--documents",
        type=int,
        nargs="*",
        default=[],
        help="mean document lengths: lcgraph's attention under a document mask on each backend (--document-seq)",
    )
    ap.add_argument("--document-seq", type=int, nargs="+", default=[16 * K, 32 * K, 128 * K])
    ap.add_argument("--ring-steps", action="store_true", help="ring attention's steps instead of the kernel table")
    ap.add_argument("--ring-seq", type=int, nargs="+", default=[32 * K, 64 * K, 128 * K], help="ring: all cp ranks'")
    ap.add_argument("--cp", type=int, nargs="+", default=[2, 4, 8], help="ring: ring sizes")
    ap.add_argument("--repeats", type=int, default=3, help="ring: timed calls per measurement")
    ap.add_argument("--json", help="default: attention_kernels.json (ring: ring_steps.json)")
    return ap


def main(argv: list[str] | None = None) -> dict:
    args = parser().parse_args(argv)
    args.configs = args.configs or (["128:8/1"] if args.ring_steps else ["64:32/8", "128:32/8", "128:64/8"])
    args.json = args.json or ("ring_steps.json" if args.ring_steps else "attention_kernels.json")
    if args.ring_steps:
        return ring_steps(args)
    names = args.candidates or (list(GPU_CANDIDATES) if args.device == "cuda" else ["math", "cpu"])
    clock, flex = Clock(args.device), Flex(args.device) if "flex" in names else None
    if args.device == "cuda":
        warm_up(2.0)
    start, rows = time.perf_counter(), []
    for case in cases_from_args(args):
        if time.perf_counter() - start > args.budget_s:
            rows += [{"candidate": n, **asdict(case), "skipped": "budget"} for n in names]
            continue
        rows += run_case(case, names, flex, clock, args.min_time)
        rates = [
            f"{r['candidate']} {_rate(r['fwd_tflops'])}/{_rate(r['bwd_tflops'])}"
            for r in rows[-len(names) :]
            if "fwd_tflops" in r
        ]
        print(f"{time.perf_counter() - start:6.1f}s {case.name}: {', '.join(rates) or 'none ran'}", flush=True)
    doc_names = [n for n in names if n in DOCUMENT_BACKENDS] if args.device == "cuda" else ["math"]
    for config, mean, seq in itertools.product(map(parse_config, args.configs), args.documents, args.document_seq):
        if time.perf_counter() - start > args.budget_s:
            break
        rows += document_case(config, seq, mean, doc_names, clock, args.min_time)
        rates = [f"{r['candidate']} {_rate(r['fwd_tflops'])}/{_rate(r['bwd_tflops'])}" for r in rows if "mean" in r]
        print(f"{time.perf_counter() - start:6.1f}s documents {mean} in {seq}: {', '.join(rates[-len(doc_names) :])}")
    device = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    out = {"device": device, "torch": torch.__version__, "seconds": time.perf_counter() - start, "rows": rows}
    out["best"] = best(rows)
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(out, indent=2))
    from rich.console import Console

    title = f"attention kernels on {device}, torch {torch.__version__}: TFLOP/s forward/backward (x: K/V expanded)"
    Console(width=220).print(render(rows, names, title))
    return out


def warm_up(seconds: float) -> None:
    """Keep the GPU busy until its clocks have ramped up: the first timings would read low otherwise."""
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    end = time.time() + seconds
    while time.time() < end:
        for _ in range(20):
            a @ a
        torch.cuda.synchronize()


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
