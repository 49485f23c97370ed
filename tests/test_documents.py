"""Packed documents (`data.cross_document_attention=false`) against an independent reference in every layout that
has them: HF eager LlamaForCausalLM run on each document of each window alone, the summed token cross-entropy
over the step's global count of target tokens, torch AdamW with clip_grad_norm_ and the warm-up/cosine schedule
(tests/test_reference.py's conventions and constants), from the same initial weights on the same windows.

The corpus is short documents (3 to 30 words), so a 64-token window holds several and Seq1F1B chunks and Ulysses
shards cut through them."""

from __future__ import annotations

import json
import random

import pytest
import torch
import torch.nn.functional as F
from test_reference import ACTIVE, CLIP, STEPS, WD, reference_lr  # the reference's schedule, clipping, decay

from lcgraph.app.testing import assert_close_run, compose, planned, train_local, train_spawned
from lcgraph.graph.capture import IGNORE_INDEX
from lcgraph.graph.ring import balanced_pairs, piece_work
from lcgraph.ops import attention, masks
from lcgraph.runtime import data
from lcgraph.runtime.model import build_config, init_parameter

WORDS = "alpha beta gamma delta river stone cloud seven green quick lamp table north".split()
FP32 = 1e-5
UNEVEN = ["parallel.chunk_split=uniform_comp", "parallel.microbatches=2"]
# 61 tokens in 2 even chunks of 2 x cp=2 zigzag pieces: the programs run 64, three padding tokens the loss ignores
PADDED = ["data.seq_len=61", "parallel.schedule=seq1f1b", "parallel.seq_chunks=2", "parallel.chunk_split=even"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("docs")
    rng = random.Random(3)
    lines = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 30))) + "." for _ in range(400)]
    (root / "docs.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in lines))
    return [
        f"data.path={root / 'docs.jsonl'}",
        "data.num_workers=1",
        "data.cross_document_attention=false",
        *ACTIVE,
    ]


def hf_per_document(cfg, batch: int):
    """HF eager in fp32, each document of each window alone; (losses, params) after STEPS steps of `batch`
    windows (sequence i of step s is window s * batch + i, what lcgraph's sampler promises)."""
    from transformers import LlamaForCausalLM

    config = build_config(cfg.model)
    config._attn_implementation = "eager"
    model = LlamaForCausalLM(config).float()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(init_parameter(name, p.shape, config, cfg.train.seed))
    named = dict(model.named_parameters())
    no_decay = [n for n in named if "norm" in n]
    optimizer = torch.optim.AdamW(
        [
            {"params": [p for n, p in named.items() if n not in no_decay], "weight_decay": WD},
            {"params": [named[n] for n in no_decay], "weight_decay": 0.0},
        ],
        betas=(cfg.optim.beta1, cfg.optim.beta2),
        eps=cfg.optim.eps,
        foreach=False,
    )
    tokens, _ = data.prepare_corpus(cfg.data, None, config.vocab_size)
    sampler = data.PackedSampler(tokens, cfg.data.seq_len, cfg.train.seed, cross_document=False)
    losses = []
    for step in range(STEPS):
        windows = [sampler.window(step * batch + i) for i in range(batch)]
        total = sum(int((w.labels != IGNORE_INDEX).sum()) for w in windows)
        loss = torch.zeros(())
        for w in windows:
            for d in w.document_ids.unique():
                s = w.document_ids == d
                logits = model(input_ids=w.input_ids[s][None], position_ids=w.position_ids[s][None]).logits[0]
                loss = loss + F.cross_entropy(logits.float(), w.labels[s], ignore_index=IGNORE_INDEX, reduction="sum")
        (loss / total).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)
        for group in optimizer.param_groups:
            group["lr"] = reference_lr(step)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()) / total)
    return losses, {n: p.detach().clone() for n, p in named.items()}


def zigzag(cp: int) -> tuple[tuple[int, int], ...]:
    return tuple((r, 2 * cp - 1 - r) for r in range(cp))


def balanced_pairs_of(cfg, cp: int) -> list[tuple[tuple[int, int], ...]]:
    """The ring's piece pairs of each window the test's steps read (one chunk, batch 1): the exactness tests cover
    pairs other than the zigzag only if some window has them."""
    tokens, _ = data.prepare_corpus(cfg.data, None, build_config(cfg.model).vocab_size)
    sampler = data.PackedSampler(tokens, cfg.data.seq_len, cfg.train.seed, cross_document=False)
    windows = [sampler.window(step) for step in range(STEPS)]
    return [balanced_pairs(piece_work(w.document_ids[None], 0, cfg.data.seq_len, cp)) for w in windows]


def test_one_process_whole_and_seq1f1b_uneven_chunks_match_hf_per_document(corpus):
    """parallel=single, then Seq1F1B with 3 uneven chunks (uniform_comp) keeping attention outputs, eager and
    compiled: each equals HF run document by document; the windows do hold several documents, so a mask that let one see another fails."""
    ref = hf_per_document(compose(*corpus), batch=1)
    losses, params, extra = train_local(compose(*corpus))
    assert_close_run(losses, params, *ref, rtol=FP32, label="single")
    units, _ = extra["job"].step_units(0)
    assert len(units[(0, 0)].document_ids.unique()) >= 3
    seq1f1b = ["parallel.schedule=seq1f1b", "parallel.seq_chunks=3", "parallel.chunk_split=uniform_comp"]
    seq1f1b += ["train.recompute=keep_attention"]
    losses, params, extra = train_local(compose(*corpus, *seq1f1b))
    assert len(set(extra["job"].chunk_lengths)) > 1, extra["job"].chunk_lengths
    assert_close_run(losses, params, *ref, rtol=FP32, label="seq1f1b uneven keep_attention")
    losses, params, _ = train_local(compose(*corpus, *seq1f1b, "train.compile=true"))
    assert_close_run(losses, params, *ref, rtol=FP32, label="seq1f1b uneven keep_attention compiled")


def test_two_rank_layouts_match_hf_per_document(corpus):
    """On 2 gloo ranks: Ulysses sp=2 (GQA, 2 KV heads); ring attention cp=2 (zigzag pieces cut by document); pp=2
    Seq1F1B with uneven chunks; dp=2 with ZeRO (two windows a step, as the reference's batch of 2); cp=2 with
    Seq1F1B at a length its chunks and pieces do not divide (padded, the reference on the 61 real tokens)."""
    cfgs = [
        compose(*corpus, "parallel.sp=2"),
        compose(*corpus, "parallel.cp=2"),
        compose(*corpus, "parallel.pp=2", "parallel.schedule=seq1f1b", "parallel.seq_chunks=3", *UNEVEN),
        compose(*corpus, "parallel.dp=2", "parallel.zero=true"),
        compose(*corpus, *PADDED, "parallel.cp=2"),
    ]
    results = train_spawned(cfgs, world=2)
    one, two = hf_per_document(cfgs[0], batch=1), hf_per_document(cfgs[0], batch=2)
    padded = hf_per_document(cfgs[-1], batch=1)
    labels = ("sp=2", "cp=2", "pp=2 seq1f1b", "dp=2 zero", "cp=2 seq1f1b 2 even chunks, 61 tokens padded to 64")
    for label, r, ref in zip(labels, results, (one, one, two, two, padded)):
        assert_close_run(r["losses"], r["params"], *ref, rtol=FP32, label=label)


def test_four_rank_layouts_match_hf_per_document(corpus):
    """On 4 gloo ranks: Ulysses sp=4 over 2 KV heads; ring cp=4 (its pieces paired by the work the mask leaves, not
    the zigzag, in some windows); sp=2 x cp=2; pp=2 x cp=2 with Seq1F1B chunks (the ring's payload carries each
    rank's share of the earlier chunks: a document crossing chunks is seen whole)."""
    seq1f1b = ["parallel.schedule=seq1f1b", "parallel.seq_chunks=2", *UNEVEN]
    cfgs = [
        compose(*corpus, "parallel.sp=4"),
        compose(*corpus, "parallel.cp=4"),
        compose(*corpus, "parallel.sp=2", "parallel.cp=2"),
        compose(*corpus, "parallel.pp=2", "parallel.cp=2", *seq1f1b),
    ]
    assert any(pairs != zigzag(4) for pairs in balanced_pairs_of(cfgs[1], cp=4)), "no window leaves the zigzag"
    results = train_spawned(cfgs, world=4)
    one, two = hf_per_document(cfgs[0], batch=1), hf_per_document(cfgs[0], batch=2)
    for label, r, ref in zip(("sp=4", "cp=4", "sp=2 x cp=2", "pp=2 x cp=2 seq1f1b"), results, (one, one, one, two)):
        assert_close_run(r["losses"], r["params"], *ref, rtol=FP32, label=label)


def test_a_window_of_one_document_is_the_unmasked_attention_bit_for_bit():
    torch.manual_seed(0)
    q, k, v = torch.randn(1, 4, 24, 8), torch.randn(1, 2, 40, 8), torch.randn(1, 2, 40, 8)
    plain = attention.attend(q, k, v, 0.3)
    try:
        masks.set_documents(torch.zeros(1, 40, dtype=torch.long))
        one = attention.attend(q, k, v, 0.3)
    finally:
        masks.set_documents(None)
    assert torch.equal(one.out, plain.out) and torch.equal(one.lse, plain.lse)


def test_document_spans_skip_finished_documents_of_the_prefix():
    """Queries 10..16 of a window with documents starting at 0, 4, 9 and 12: the first document has no query
    there, so no span reads its keys; the third reads from its own start, not the call's first query."""
    try:
        masks.set_documents(torch.tensor([[0] * 4 + [1] * 5 + [2] * 3 + [3] * 6]))
        spans = masks.document_spans(6, 16)
    finally:
        masks.set_documents(None)
    assert spans == [masks.Span(0, 10, 12, 9), masks.Span(0, 12, 16, 12)]


# --- the planner under a document mask ------------------------------------------------------------------------
def test_planned_pairs_per_chunk_are_the_dense_mask_counts():
    """chunk_blocks' pair counts per chunk, diagonal and prefix, against a dense [S, S] document mask counted
    element by element on the same packed windows."""
    from lcgraph.planner.documents import WINDOWS, DocumentMix, _window_starts, chunk_blocks

    mix = DocumentMix((7, 1, 30, 12, 3, 50, 2), "hand-made")
    seq, chunks = 64, (24, 24, 16)
    blocks = chunk_blocks(mix, seq, chunks)
    want = torch.zeros(len(chunks), 2, dtype=torch.float64)
    for w in range(WINDOWS):
        starts = _window_starts(mix, seq, w)
        docs = torch.zeros(seq, dtype=torch.long)
        for s in starts[1:]:
            docs[s:] += 1
        pos = torch.arange(seq)
        visible = (docs[:, None] == docs[None, :]) & (pos[None, :] <= pos[:, None])
        first = 0
        for c, n in enumerate(chunks):
            rows = visible[first : first + n]
            want[c, 0] += rows[:, first : first + n].sum()
            want[c, 1] += rows[:, :first].sum()
            first += n
    got = torch.tensor(
        [[sum(b.pairs for b in bl if b.kind == k) for k in ("diag", "prefix")] for bl in blocks], dtype=torch.float64
    )
    torch.testing.assert_close(got * WINDOWS, want, rtol=0, atol=1e-9)


def test_a_masked_plan_prices_the_pairs_the_mask_leaves():
    """The 128k one-GPU recipe: under a document mask (log-normal documents of mean 8,192 tokens) attention keeps
    about a seventh of its causal pairs, so the planned step is shorter, the memory about the same (no [S, S]
    mask), and one endless synthetic document plans exactly as no mask."""
    from lcgraph.planner import evaluation

    base = ["+recipe=llama1b_128k_1gpu", "+plan.device=h100", "train.recompute=keep_attention"]
    plans = {}
    for name, extra in {
        "plain": [],
        "masked": ["data.cross_document_attention=false", "data.mean_document_tokens=8192"],
        "one document": ["data.cross_document_attention=false", "data.synthetic=true"],
    }.items():
        cfg = planned(*base, *extra, tiny=False)
        ev = evaluation.evaluate_config(cfg, evaluation.setup(cfg))
        plans[name] = (ev.sim.step_time, max(ev.sim.rank_peak), ev.model_flops_per_token, ev.cost)
    elsewhere = planned(*base, "data.cross_document_attention=false", "data.path=/not/on/this/machine", tiny=False)
    assert "assumed" in evaluation.document_mix(elsewhere).source  # a corpus this machine lacks: no error
    plain, masked, one = plans["plain"], plans["masked"], plans["one document"]

    assert one[:3] == plain[:3]
    assert abs(masked[1] / plain[1] - 1) < 0.1  # the chunks move, the memory per token does not
    assert masked[0] < 0.6 * plain[0] and masked[2] < 0.6 * plain[2], plans
    # uniform_comp balances what the mask leaves: the masked chunks' forward times are closer than those of the
    # causal split would be under the same mask
    times = lambda cost: [cost.forward_time(0, c) for c in range(len(cost.chunk_lengths))]
    spread = lambda cost: max(times(cost)) / min(times(cost))
    causal_split = masked[3].__class__(
        masked[3].graph, masked[3].profile, masked[3].layout, masked[3].layer_counts, plain[3].chunk_lengths
    )
    assert masked[3].chunk_lengths != plain[3].chunk_lengths
    assert spread(masked[3]) < spread(causal_split), (spread(masked[3]), spread(causal_split))


def test_mfu_under_a_mask_counts_the_pairs_the_mask_leaves():
    """The share a step reports (`attention_kept`) is the dense mask's count over the causal count, and the run's
    TFLOP/s counts 6*L*h*S times it."""
    from lcgraph.app.job import kept_pairs
    from lcgraph.planner.mfu import RunPerf

    docs = torch.tensor([[0] * 5 + [1] * 1 + [2] * 10, [0] * 16])
    pos = torch.arange(16)
    visible = (docs[:, :, None] == docs[:, None, :]) & (pos[None, None, :] <= pos[None, :, None])
    assert kept_pairs(docs) == pytest.approx(float(visible.sum()) / (2 * 16 * 17 / 2), rel=1e-12)
    perf = RunPerf(100.0, 1, "bf16", None, attention_flops_per_token=40.0)
    assert perf.at(1e12, 0.25)["tflops_per_gpu"] == pytest.approx(70.0)
