"""The held-out eval loss (`train.eval_every`) in every layout, against an independent forward: HF eager
LlamaForCausalLM in fp32 with the run's final weights, over the same held-out windows (the corpus's last
`data.eval_fraction` of windows), summed token cross-entropy over their global count of target tokens."""

from __future__ import annotations

import math
import re

import pytest
import torch
import torch.nn.functional as F

from lcgraph.app.testing import compose, train_local, train_spawned
from lcgraph.errors import DataError, PlanError
from lcgraph.graph.capture import IGNORE_INDEX
from lcgraph.runtime import data
from lcgraph.runtime.model import build_config

STEPS = 3
EVAL = ["data.eval_fraction=0.1", f"train.eval_every={STEPS}", f"train.steps={STEPS}", "train.eval_windows=4"]
SEQ1F1B = ["parallel.schedule=seq1f1b", "parallel.seq_chunks=2", "parallel.chunk_split=uniform_comp"]
TWO_RANKS = {
    "pp=2 seq1f1b 2 chunks": ["parallel.pp=2", *SEQ1F1B, "parallel.microbatches=2"],
    "sp=2": ["parallel.sp=2"],
    "cp=2 ring": ["parallel.cp=2"],
    "dp=2 zero": ["parallel.dp=2", "parallel.zero=true"],
}


def hf_held_out_loss(cfg, params: dict[str, torch.Tensor]) -> float:
    """HF eager with `params` over the first held-out windows an evaluation reads (whole global batches)."""
    config = build_config(cfg.model)
    corpus, _ = data.prepare_corpus(cfg.data, None, config.vocab_size)
    sampler = data.PackedSampler(corpus, cfg.data.seq_len, cfg.train.seed, eval_fraction=cfg.data.eval_fraction)
    held = sampler.held_out_windows()
    per_batch = cfg.parallel.dp * cfg.parallel.microbatches * cfg.data.micro_batch_size
    count = math.ceil(cfg.train.eval_windows / per_batch) * per_batch
    return hf_loss(cfg, params, [held.window(i) for i in range(count)])


def hf_loss(cfg, params: dict[str, torch.Tensor], windows: list) -> float:
    from transformers import LlamaForCausalLM

    config = build_config(cfg.model)
    config._attn_implementation = "eager"
    model = LlamaForCausalLM(config).float()
    model.load_state_dict({n: p.float() for n, p in params.items()}, strict=False)
    if config.tie_word_embeddings:
        model.tie_weights()
    loss, tokens = 0.0, 0
    with torch.no_grad():
        for w in windows:
            logits = model(input_ids=w.input_ids[None], position_ids=w.position_ids[None]).logits[0]
            loss += float(F.cross_entropy(logits.float(), w.labels, ignore_index=IGNORE_INDEX, reduction="sum"))
            tokens += int((w.labels != IGNORE_INDEX).sum())
    return loss / tokens


def test_one_process_eval_matches_hf_and_leaves_training_as_it_was():
    """The eval loss equals HF's forward with the final weights; training with evaluations gives the losses and
    weights of the same run without them (the eval program touches no training state), and keeps nothing."""
    cfg = compose(*EVAL)
    losses, params, extra = train_local(cfg)
    (got,) = extra["eval_losses"]
    assert got == pytest.approx(hf_held_out_loss(cfg, params), rel=1e-5)
    plain_losses, plain_params, _ = train_local(compose(*EVAL[:1], f"train.steps={STEPS}"))
    assert losses == plain_losses
    assert all(torch.equal(params[n], plain_params[n]) for n in params)
    held_out = extra["job"].held_out
    assert held_out.interpreter.saved == {} and all(not st.relay.kept for st in held_out.stages.values())


def test_eval_in_every_layout_matches_hf():
    """Pipeline stages with Seq1F1B chunks (the KV relay), Ulysses, ring attention and ZeRO data parallelism run
    the forward-only programs of their layout; each equals HF's forward with that run's final weights."""
    cfgs = [compose(*EVAL, *overrides) for overrides in TWO_RANKS.values()]
    results = train_spawned(cfgs, world=2)
    failed = []
    for label, cfg, r in zip(TWO_RANKS, cfgs, results):
        (got,) = r["eval_losses"]
        want = hf_held_out_loss(cfg, r["params"])
        if abs(got - want) > 1e-5 * want:
            failed.append(f"{label}: eval loss {got} vs HF {want}")
    assert not failed, "\n".join(failed)


def test_eval_path_is_a_corpus_of_its_own_tokenized_as_the_training_one(tmp_path):
    """data.eval_path: its windows in order, tokenized with the training corpus's tokenizer (a BPE trained on
    data.path alone), the loss HF's over them."""
    (tmp_path / "train.txt").write_text("".join(f"the river {i} runs north past stone {i % 7}.\n" for i in range(300)))
    (tmp_path / "eval.txt").write_text("".join(f"a green lamp {i} on the table {i % 5}.\n" for i in range(120)))
    given = [f"data.path={tmp_path / 'train.txt'}", f"data.eval_path={tmp_path / 'eval.txt'}", *EVAL[1:]]
    cfg = compose(*given)
    _, params, extra = train_local(cfg)
    (got,) = extra["eval_losses"]
    config = build_config(cfg.model)
    _, tokenizer = data.prepare_corpus(cfg.data, None, config.vocab_size)
    windows = extra["job"].held_out.windows
    assert windows.corpus.key == data.prepare_eval_corpus(cfg.data, tokenizer, build=False).key
    assert windows.corpus.key != extra["job"].sampler.corpus.key and windows.first == 0
    assert got == pytest.approx(hf_loss(cfg, params, [windows.window(i) for i in range(4)]), rel=1e-5)


def test_held_out_windows_are_the_corpus_last_and_training_never_reads_them():
    cfg = compose(*EVAL)
    corpus, _ = data.prepare_corpus(cfg.data, None, build_config(cfg.model).vocab_size)
    sampler = data.PackedSampler(corpus, 64, 0, eval_fraction=0.1)
    windows = (len(corpus.tokens) - 1) // 64
    assert sampler.held_out == math.ceil(0.1 * windows) and sampler.num_windows + sampler.held_out == windows
    starts = {sampler._window_start(i) for i in range(sampler.num_windows)}
    assert max(starts) < sampler.num_windows * 64 <= sampler.held_out_windows().first * 64


@pytest.mark.parametrize(
    "overrides,line",
    [
        (["train.eval_every=5"], "train.eval_every=5 needs a held-out split: set data.eval_fraction"),
        (["data.eval_fraction=1.0"], "data.eval_fraction=1.0 must be in [0, 1)"),
        (["data.eval_fraction=0.1", "data.eval_path=/x"], "both name the held-out split"),
    ],
)
def test_an_eval_without_a_split_is_refused_in_one_line(overrides, line):
    from lcgraph.app.validate import check_eval

    with pytest.raises(PlanError, match=re.escape(line)):
        check_eval(compose(*overrides))


def test_a_split_smaller_than_one_global_batch_is_refused():
    with pytest.raises(DataError, match="fewer than one global batch of 4"):
        train_local(compose("data.eval_fraction=0.001", "train.eval_every=1", "parallel.microbatches=4"))
