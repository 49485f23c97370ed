"""lcgraph against an independent reference: HF eager LLaMA + torch AdamW + clip_grad_norm_ + a hand-written
warm-up/cosine schedule, trained on the same token windows from the same initial weights.

The parallel exactness tests compare lcgraph with lcgraph; a bug both share (loss scaling, clipping, the LR
schedule, weight decay groups, tied embeddings) is invisible there. Here nothing of lcgraph's forward,
backward, loss, optimizer or schedule is used for the reference: only the corpus tokens, the window sampler
(which windows a step consumes is what lcgraph promises, so the test picks them by global sequence index) and
the per-name initial values.

Conventions checked (what a Megatron or HF Trainer user expects):
- a step's loss is the mean token cross-entropy over its whole global batch (dp x microbatches x
  micro_batch_size sequences; sequence i of step s is window s * batch + i);
- gradients clipped to `optim.grad_clip` by their global L2 norm (torch's clip_grad_norm_);
- AdamW, weight decay on matrices (embeddings, projections, LM head) and none on the RMSNorm weights: the
  HF Trainer's groups (no decay for biases and norm weights) and Megatron's (none for 1-D tensors);
- LR of step s (0-based): linear warm-up lr * (s + 1) / W for s < W, then cosine from lr down to
  lr * min_lr_ratio, reached at the last step (Megatron's schedule with iterations counted from 1).

Clipping and warm-up are active (clip well below the gradient norm, W = 2 of 4 steps), weight decay is large
enough to move the parameters beyond the tolerance.
"""

from __future__ import annotations

import math
from functools import cache

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from lcgraph.app.config import DataConfig
from lcgraph.app.testing import assert_close_run, compose, run_losses, train_local, train_spawned
from lcgraph.runtime import data
from lcgraph.runtime.model import init_parameter

STEPS, WARMUP, LR, MIN_RATIO, CLIP, WD = 4, 2, 1e-3, 0.1, 0.05, 0.1
ACTIVE = [
    f"train.steps={STEPS}",
    f"optim.warmup_steps={WARMUP}",
    f"optim.lr={LR}",
    f"optim.min_lr_ratio={MIN_RATIO}",
    f"optim.grad_clip={CLIP}",
    f"optim.weight_decay={WD}",
    "parallel.bucket_mb=0.05",
]
FP32 = 1e-5  # fp32, different summation order: losses relative, parameters relative in norm per tensor
BF16 = 1e-2  # bf16 weights and activations against the fp32 reference (a bf16 weight alone is off by ~2e-3)


def run_cfg(*overrides, tied=False, steps=STEPS):
    return compose(*ACTIVE, f"model.tie_word_embeddings={str(tied).lower()}", f"train.steps={steps}", *overrides)


# --- the reference ----------------------------------------------------------------------------------------
def reference_lr(step: int, steps: int = STEPS) -> float:
    if step < WARMUP:
        return LR * (step + 1) / WARMUP
    done = (step + 1 - WARMUP) / (steps - WARMUP)  # 1 at the last step
    return LR * (MIN_RATIO + (1 - MIN_RATIO) * (1 + math.cos(math.pi * done)) / 2)


@cache
def _sampler(seq_len: int, vocab: int, max_mb: float, seed: int):
    corpus, _ = data.prepare_corpus(OmegaConf.structured(DataConfig(max_corpus_mb=max_mb)), None, vocab)
    return data.PackedSampler(corpus, seq_len, seed)


def hf_reference(cfg, batch: int, steps: int = STEPS, prepare=None, one_by_one: bool = False):
    """Train HF eager LlamaForCausalLM in fp32 on `batch` sequences per step; (losses, grad norms, params).
    `prepare(model)` changes the model in place before training (e.g. torchao's float8 linears); `one_by_one`
    runs each sequence's forward alone (what depends on the batch's contents, an FP8 scale, sees one)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    m = cfg.model
    config = LlamaConfig(
        vocab_size=m.vocab_size,
        hidden_size=m.hidden_size,
        intermediate_size=m.intermediate_size,
        num_hidden_layers=m.num_hidden_layers,
        num_attention_heads=m.num_attention_heads,
        num_key_value_heads=m.num_key_value_heads,
        rms_norm_eps=m.rms_norm_eps,
        rope_theta=m.rope_theta,
        max_position_embeddings=m.max_position_embeddings,
        tie_word_embeddings=m.tie_word_embeddings,
        attention_dropout=0.0,
        use_cache=False,
    )
    config._attn_implementation = "eager"
    model = LlamaForCausalLM(config).float()
    with torch.no_grad():
        for name, p in model.named_parameters():  # a tied LM head is the embedding: one parameter
            p.copy_(init_parameter(name, p.shape, config, cfg.train.seed))
    if prepare is not None:
        prepare(model)
    named = dict(model.named_parameters())
    no_decay = [n for n in named if "norm" in n or n.endswith(".bias")]  # the HF Trainer's groups
    optimizer = torch.optim.AdamW(
        [
            {"params": [p for n, p in named.items() if n not in no_decay], "weight_decay": WD},
            {"params": [named[n] for n in no_decay], "weight_decay": 0.0},
        ],
        lr=LR,
        betas=(cfg.optim.beta1, cfg.optim.beta2),
        eps=cfg.optim.eps,
        foreach=False,
    )
    sampler = _sampler(cfg.data.seq_len, m.vocab_size, cfg.data.max_corpus_mb, cfg.train.seed)
    losses, norms = [], []
    for step in range(steps):
        windows = [sampler.window(step * batch + i) for i in range(batch)]
        ids, labels = torch.stack([w.input_ids for w in windows]), torch.stack([w.labels for w in windows])
        positions = torch.stack([w.position_ids for w in windows])  # restart at each packed document
        if one_by_one:
            logits = torch.cat([model(input_ids=i[None], position_ids=p[None]).logits for i, p in zip(ids, positions)])
        else:
            logits = model(input_ids=ids, position_ids=positions).logits
        loss = F.cross_entropy(logits.float().flatten(0, 1), labels.flatten())
        loss.backward()
        norms.append(float(torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)))
        for group in optimizer.param_groups:
            group["lr"] = reference_lr(step, steps)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
    return losses, norms, {n: p.detach().clone() for n, p in named.items()}


@pytest.fixture(scope="module")
def reference():
    cache = {}

    def get(batch: int, tied: bool, steps: int = STEPS, *model: str):
        key = (batch, tied, steps, *model)
        if key not in cache:
            cache[key] = hf_reference(run_cfg(*model, tied=tied, steps=steps), batch, steps)
        return cache[key]

    return get


def check(result_losses, result_params, ref, rtol=FP32, label="", grad_norms=None):
    """Losses, parameters and (clipping hides a wrong gradient scale from both) the pre-clip gradient norms."""
    losses, norms, params = ref
    assert min(norms) > 2 * CLIP, f"clipping must be active (grad norms {norms})"
    assert_close_run(result_losses, result_params, losses, params, rtol=rtol, label=label)
    torch.testing.assert_close(
        torch.tensor(grad_norms),
        torch.tensor(norms),
        rtol=max(rtol, 1e-4),
        atol=0,
        msg=lambda m: f"{label}: gradient norms differ\n{m}",
    )


# --- single process ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_single_process_matches_hf_eager_adamw_with_clipping_and_warmup(tied, reference):
    losses, params, extra = train_local(run_cfg("parallel.microbatches=2", tied=tied))
    check(losses, params, reference(2, tied), label=f"single tied={tied}", grad_norms=extra["grad_norms"])


def test_compiled_stage_graphs_match_hf_eager_and_the_activation_budget_keeps_less(reference):
    """train.compile=true (inductor on CPU); one decoder layer and 3 steps keep the compile short. Under
    train.activation_budget=0.9 the partitioner reruns pointwise ops (SwiGLU's product, a norm's output, casts)
    in the backward: the same numbers, and over a tenth less kept for the backward."""
    one_layer = "model.num_hidden_layers=1"
    kept = {}
    for budget in (1.0, 0.9):
        cfg = run_cfg("train.compile=true", f"train.activation_budget={budget}", one_layer, tied=True, steps=3)
        losses, params, extra = train_local(cfg)
        check(
            losses, params, reference(1, True, 3, one_layer), label=f"budget {budget}", grad_norms=extra["grad_norms"]
        )
        kept[budget] = extra["activation_peaks"][0]
    assert kept[0.9] < 0.9 * kept[1.0], kept


COMPILED_CHUNKS = ["train.compile=true", "parallel.schedule=seq1f1b", "parallel.chunk_split=uniform_comp"]


@pytest.mark.parametrize("mode", ["none", "keep_attention"])
def test_compiled_uneven_chunks_with_the_kv_relay_match_hf_eager(mode, reference):
    """train.compile=true with uneven Seq1F1B chunks (dynamic shapes): the whole stage compiled (none), or each
    checkpoint segment (keep_attention), whose backward rerun must run the graph its forward ran (fp32
    parameters reach it as nn.Parameter, the rerun gets plain tensors)."""
    one_layer = "model.num_hidden_layers=1"
    chunked = [*COMPILED_CHUNKS, "parallel.seq_chunks=2", f"train.recompute={mode}"]
    losses, params, extra = train_local(run_cfg(one_layer, *chunked, tied=True, steps=3))
    assert len(set(extra["job"].chunk_lengths)) == 2
    check(losses, params, reference(1, True, 3, one_layer), label="compile", grad_norms=extra["grad_norms"])


def test_a_length_the_chunks_do_not_divide_is_padded_and_matches_hf_eager(reference):
    """data.seq_len=61 in 3 even Seq1F1B chunks runs 63 tokens: two padding tokens whose labels the loss ignores,
    so losses, weights and gradient norms stay HF eager's on the 61 real tokens (a padded label counted, or the
    padding seen by a real token, moves them)."""
    length = "data.seq_len=61"
    even = ["parallel.schedule=seq1f1b", "parallel.seq_chunks=3", "parallel.chunk_split=even"]
    losses, params, extra = train_local(run_cfg(length, *even))
    assert extra["job"].chunk_lengths == [21, 21, 21]
    check(losses, params, reference(1, False, STEPS, length), label="padded 61 -> 63", grad_norms=extra["grad_norms"])


def _graphs_compiled(chunks: int) -> int:
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    chunked = [*COMPILED_CHUNKS, f"parallel.seq_chunks={chunks}", "train.recompute=keep_attention"]
    _, _, extra = train_local(run_cfg("model.num_hidden_layers=1", "data.seq_len=1024", *chunked, steps=1))
    assert len(set(extra["job"].chunk_lengths)) == chunks, "the test wants chunks of distinct lengths"
    return counters["stats"]["unique_graphs"]


def test_uneven_chunks_share_compiled_graphs():
    """Compiled static, every chunk length compiled its own graphs until dynamo's recompile limit (8) sent the
    rest to eager: twice the lengths, twice the graphs. Dynamic shapes: as many graphs for 6 lengths as for 3."""
    assert _graphs_compiled(6) == _graphs_compiled(3)


# --- two ranks --------------------------------------------------------------------------------------------
PP2 = ["parallel.pp=2", "parallel.microbatches=2"]
SEQ1F1B = ["parallel.schedule=seq1f1b", "parallel.seq_chunks=2", "parallel.chunk_split=uniform_comp"]
TWO_RANKS = {  # label -> (overrides, tied, sequences per step)
    "pp=2 1f1b fused_loss=false": ([*PP2, "parallel.schedule=1f1b", "train.fused_loss=false"], False, 2),
    "pp=2 seq1f1b 2 uneven chunks, tied across ranks": ([*PP2, *SEQ1F1B], True, 2),
    "sp=2 ulysses": (["parallel.sp=2", "parallel.microbatches=2"], False, 2),
    "dp=2 distributed optimizer": (["parallel.dp=2", "parallel.microbatches=1"], True, 2),
    "dp=2 zero=false": (["parallel.dp=2", "parallel.microbatches=2", "parallel.zero=false"], False, 4),
    "dp=2 micro_batch_size=2": (["parallel.dp=2", "parallel.microbatches=1", "data.micro_batch_size=2"], False, 4),
    "pp=2 interleaved v=2 tied": ([*PP2, "parallel.schedule=interleaved_1f1b", "parallel.virtual_stages=2"], True, 2),
}


def test_two_rank_layouts_match_hf_eager(reference):
    labels = list(TWO_RANKS)
    results = train_spawned([run_cfg(*TWO_RANKS[k][0], tied=TWO_RANKS[k][1]) for k in labels], world=2)
    failed = []
    for label, result in zip(labels, results):
        _, tied, batch = TWO_RANKS[label]
        try:
            check(
                result["losses"], result["params"], reference(batch, tied), label=label, grad_norms=result["grad_norms"]
            )
        except AssertionError as exc:
            failed.append(str(exc).splitlines()[0])
    assert not failed, "\n".join(failed)


FOUR_RANKS = {  # label -> (overrides, tied, sequences per step, tolerance)
    "interleaved v=2 x dp=2 distributed optimizer, tied": (
        [
            "parallel.pp=2",
            "parallel.dp=2",
            "parallel.microbatches=2",
            "parallel.schedule=interleaved_1f1b",
            "parallel.virtual_stages=2",
        ],
        True,
        4,
        FP32,
    ),
    "pp=2 x sp=2 seq1f1b, keep_attention in checkpoint segments the planner picks, distributed optimizer": (
        ["parallel.pp=2", "parallel.sp=2", "parallel.microbatches=2", *SEQ1F1B, "train.recompute=keep_attention"],
        False,
        2,
        FP32,
    ),
    "bf16 pp=2 x sp=2 seq1f1b (the default layout)": (
        ["parallel.pp=2", "parallel.sp=2", "parallel.microbatches=2", *SEQ1F1B, "train.dtype=bf16"],
        False,
        2,
        BF16,
    ),
}


def test_four_rank_layouts_match_hf_eager(reference):
    labels = list(FOUR_RANKS)
    results = train_spawned([run_cfg(*FOUR_RANKS[k][0], tied=FOUR_RANKS[k][1]) for k in labels], world=4)
    failed = []
    for label, result in zip(labels, results):
        _, tied, batch, rtol = FOUR_RANKS[label]
        params = {n: p.float() for n, p in result["params"].items()}
        try:
            check(
                result["losses"],
                params,
                reference(batch, tied),
                rtol=rtol,
                label=label,
                grad_norms=result["grad_norms"],
            )
        except AssertionError as exc:
            failed.append(str(exc).splitlines()[0])
    assert not failed, "\n".join(failed)


def test_two_rank_checkpoint_round_trips_through_model_path_and_from_pretrained(tmp_path, reference):
    """pp=2 with tied embeddings, saved by the trainer at step 2 and exported to HF (lcgraph-export), loads
    into lcgraph (model.path) and into HF (from_pretrained) as the reference's parameters after 2 steps."""

    from safetensors import safe_open
    from transformers import LlamaForCausalLM

    from lcgraph.app.cli import spawn
    from lcgraph.app.config import typed
    from lcgraph.app.job import resolve_plan
    from lcgraph.runtime.checkpoint import export_hf

    cfg = typed(run_cfg(*PP2, *SEQ1F1B, tied=True, steps=2))
    spawn(cfg, str(tmp_path), world=2, plan=resolve_plan(cfg))
    ckpt = tmp_path / "hf"
    assert export_hf(tmp_path, ckpt).name == "step-00000002"
    with safe_open(str(ckpt / "model.safetensors"), "pt") as f:
        assert "lm_head.weight" not in f.keys()  # tied: saved once
    ref_losses, _, ref_params = reference(2, True, 2)
    losses = run_losses(tmp_path)
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(ref_losses), rtol=FP32, atol=0)
    _, loaded, _ = train_local(compose("model=hf", f"model.path={ckpt}", "train.steps=0"))
    assert_close_run([], loaded, [], ref_params, label="model.path")
    hf = LlamaForCausalLM.from_pretrained(ckpt)
    assert hf.lm_head.weight.data_ptr() == hf.model.embed_tokens.weight.data_ptr()
    assert_close_run([], dict(hf.named_parameters()), [], ref_params, label="from_pretrained")
