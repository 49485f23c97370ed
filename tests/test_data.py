"""Real data: every input format through HF datasets, the token cache, packing, the document mask, the sampler,
and each bad input's one-line error. All files are created here, small; the cache goes to a fresh directory."""

from __future__ import annotations

import json
import random

import datasets
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from transformers import LlamaConfig, LlamaForCausalLM

from lcgraph.app.config import DataConfig, typed
from lcgraph.app.job import prepare_data
from lcgraph.app.testing import compose, train_local
from lcgraph.app.validate import validate_plan
from lcgraph.errors import DataError, DataPathError, PlanError
from lcgraph.ops import masks
from lcgraph.ops.attention import attention_fn as attention_reference
from lcgraph.ops.relay import RelayContext, relay_attention
from lcgraph.runtime import data

WORDS = "alpha beta gamma delta river stone cloud seven green quick lamp table north".split()


def documents(n: int = 6, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 30))) + "." for _ in range(n)]


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LCGRAPH_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    """A real HF tokenizer directory (the stdlib demo's BPE, saved as a model's tokenizer would be)."""
    path = tmp_path_factory.mktemp("tok")
    data.build_tokenizer(None, 512, data.corpus_files(None, int(0.3 * 2**20))).save_pretrained(path)
    return str(path)


def cfg_of(path, **kw) -> DataConfig:
    return OmegaConf.structured(DataConfig(path=str(path), num_workers=kw.pop("num_workers", 1), **kw))


def decoded(corpus: data.TokenCorpus, tokenizer) -> list[str]:
    out = []
    for d in range(corpus.num_documents):
        ids = corpus.tokens[corpus.offsets[d] : corpus.offsets[d + 1]].tolist()
        out.append(tokenizer.decode(ids, skip_special_tokens=True))
    return out


def test_text_jsonl_parquet_and_save_to_disk_load_the_same_documents(tmp_path, cache, tokenizer_dir):
    docs = documents()
    (tmp_path / "txt").mkdir()
    for i, d in enumerate(docs):
        (tmp_path / "txt" / f"{i:02d}.txt").write_text(d)
    (tmp_path / "d.jsonl").write_text("".join(json.dumps({"body": d, "id": i}) + "\n" for i, d in enumerate(docs)))
    ds = datasets.Dataset.from_dict({"body": docs})
    ds.to_parquet(str(tmp_path / "d.parquet"))
    ds.save_to_disk(str(tmp_path / "disk"))
    streams = {}
    for name, kw in {"txt": {}, "d.jsonl": {"text_key": "body"}, "d.parquet": {"text_key": "body"}, "disk": {}}.items():
        kw.setdefault("text_key", "body" if name == "disk" else "text")
        corpus, tok = data.prepare_corpus(cfg_of(tmp_path / name, **kw), tokenizer_dir, 512)
        assert decoded(corpus, tok) == docs, name
        streams[name] = corpus.tokens.tolist()
    assert all(s == streams["txt"] for s in streams.values())
    one, _ = data.prepare_corpus(cfg_of(tmp_path / "txt" / "00.txt"), tokenizer_dir, 512)
    assert one.num_documents == 1


def test_the_second_run_reuses_the_cache_without_tokenizing(tmp_path, cache, tokenizer_dir):
    (tmp_path / "d.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in documents(40)))
    first, tok = data.prepare_corpus(cfg_of(tmp_path / "d.jsonl", num_workers=2), tokenizer_dir, 512)
    assert first.built and decoded(first, tok) == documents(40)  # two tokenizer processes, order kept
    again, _ = data.prepare_corpus(cfg_of(tmp_path / "d.jsonl", num_workers=2), tokenizer_dir, 512)
    assert not again.built and isinstance(again.tokens, np.memmap)
    assert again.tokens.tolist() == first.tokens.tolist()
    (tmp_path / "d.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in documents(40, seed=1)))
    changed, _ = data.prepare_corpus(cfg_of(tmp_path / "d.jsonl"), tokenizer_dir, 512)
    assert changed.built  # another file content: another cache entry


def test_packing_restarts_positions_at_each_document_and_drops_cross_document_labels():
    offsets = [0, 3, 10, 12, 20]  # documents [0,3) [3,10) [10,12) [12,20)
    corpus = data.TokenCorpus(np.arange(20, dtype="uint32"), np.array(offsets))
    w = data.pack_window(corpus, start=2, seq_len=12, cross_document=False)  # tokens 2..13, labels 3..14
    assert w.input_ids.tolist() == list(range(2, 14))
    assert w.position_ids.tolist() == [0, 0, 1, 2, 3, 4, 5, 6, 0, 1, 0, 1]
    assert w.document_ids.tolist() == [0, 1, 1, 1, 1, 1, 1, 1, 2, 2, 3, 3]
    ignored = [i for i, v in enumerate(w.labels.tolist()) if v == data.IGNORE_INDEX]
    assert ignored == [0, 7, 9]  # inputs 2, 9, 11: the last token of a document
    crossing = data.pack_window(corpus, start=2, seq_len=12, cross_document=True)
    assert crossing.labels.tolist() == list(range(3, 15))


def _qkv(seq: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(2, 4, seq, 8, generator=g, dtype=torch.float64)
    k, v = (torch.randn(2, 2, seq, 8, generator=g, dtype=torch.float64) for _ in range(2))
    return q, k, v


DOCS = torch.tensor([[0] * 5 + [1] * 7 + [2] * 4, [0] * 9 + [1] * 7])  # [B=2, S=16]


def per_document(q, k, v):
    """Each document of each row run alone through plain causal attention."""
    out = torch.empty_like(q)
    for b in range(q.shape[0]):
        for d in DOCS[b].unique():
            idx = (DOCS[b] == d).nonzero().flatten()
            s = slice(int(idx[0]), int(idx[-1]) + 1)
            out[b : b + 1, :, s] = attention_reference(q[b : b + 1, :, s], k[b : b + 1, :, s], v[b : b + 1, :, s], 0.3)
    return out


def test_document_mask_equals_each_document_run_alone_also_through_relay_chunks():
    q, k, v = (t.requires_grad_(True) for t in _qkv(16))
    ref = per_document(q, k, v)
    ref_grads = torch.autograd.grad(ref.square().sum(), (q, k, v))
    masks.set_documents(DOCS)
    try:
        whole = attention_reference(q, k, v, 0.3)
        torch.testing.assert_close(whole, ref, rtol=1e-12, atol=1e-12)
        relay, outs = RelayContext([3, 7, 6]), []
        RelayContext.current = relay
        bounds = [0, 3, 10, 16]  # Seq1F1B chunks that cut through documents
        chunks = [
            tuple(t[:, :, a:b].detach().requires_grad_(True) for t in (q, k, v)) for a, b in zip(bounds, bounds[1:])
        ]
        for c, (cq, ck, cv) in enumerate(chunks):
            relay.unit = (0, c)
            outs.append(relay_attention(cq, ck, cv, 0.3, layer=0))
        torch.testing.assert_close(torch.cat(outs, dim=2), ref, rtol=1e-12, atol=1e-12)
        for c in reversed(range(len(chunks))):  # chunk backwards last to first, as the schedule runs them
            relay.unit = (0, c)
            outs[c].square().sum().backward()
        for i, name in enumerate("qkv"):
            got = torch.cat([ch[i].grad for ch in chunks], dim=2)
            torch.testing.assert_close(got, ref_grads[i], rtol=1e-10, atol=1e-12, msg=f"d{name}")
    finally:
        masks.set_documents(None)
        RelayContext.current = None
    assert not torch.allclose(attention_reference(q, k, v, 0.3), ref)  # without documents: causal across them


def _short_docs_jsonl(tmp_path) -> str:
    path = tmp_path / "short.jsonl"
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in documents(300, seed=2)))
    return str(path)


def test_masked_training_matches_hf_per_document_and_seq1f1b_chunks(tmp_path, cache):
    base = [f"data.path={_short_docs_jsonl(tmp_path)}", "data.num_workers=1", "train.steps=1", "optim.lr=0"]
    base += ["data.micro_batch_size=2", "data.cross_document_attention=false"]
    losses, params, extra = train_local(compose(*base))  # lr 0: the parameters stay the initial ones
    job = extra["job"]
    assert job.sampler.consumed == 2  # the cursor a checkpoint saves: one step of two sequences
    job.sampler.consumed = 0
    units, total = job.step_units(0)
    m = job.cfg.model
    hf = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=m.vocab_size,
            hidden_size=m.hidden_size,
            intermediate_size=m.intermediate_size,
            num_hidden_layers=m.num_hidden_layers,
            num_attention_heads=m.num_attention_heads,
            num_key_value_heads=m.num_key_value_heads,
            rms_norm_eps=m.rms_norm_eps,
            rope_theta=m.rope_theta,
        )
    )
    missing, _ = hf.load_state_dict(params, strict=False)
    assert not [n for n in missing if "rotary" not in n]
    unit = units[(0, 0)]
    assert len(unit.document_ids.unique()) > 2  # the windows do hold several documents
    per_doc = whole = 0.0
    with torch.no_grad():
        for b in range(unit.input_ids.shape[0]):
            ids, pos, labels = unit.input_ids[b : b + 1], unit.position_ids[b : b + 1], unit.labels[b]
            whole += float(F.cross_entropy(hf(input_ids=ids, position_ids=pos).logits[0], labels, reduction="sum"))
            for d in unit.document_ids[b].unique():
                s = unit.document_ids[b] == d
                logits = hf(input_ids=ids[:, s], position_ids=pos[:, s]).logits[0]
                per_doc += float(F.cross_entropy(logits, labels[s], reduction="sum"))
    assert abs(losses[0] - per_doc / total) < 1e-5 * losses[0]
    assert abs(losses[0] - whole / total) > 1e-3  # attending across documents would give another loss

    chunked, _, _ = train_local(compose(*base, "parallel.schedule=seq1f1b", "parallel.seq_chunks=4"))
    torch.testing.assert_close(torch.tensor(chunked), torch.tensor(losses), rtol=1e-5, atol=0)


def test_sampler_is_deterministic_covers_each_epoch_and_resumes_mid_epoch():
    corpus = data.synthetic_corpus(vocab_size=100, seq_len=8, seed=3)
    corpus = data.TokenCorpus(corpus.tokens[:81], np.array([0, 30, 81]), key="k")
    a, b = data.PackedSampler(corpus, 8, seed=5), data.PackedSampler(corpus, 8, seed=5)
    assert a.num_windows == 10
    starts = [int(a.window(i).input_ids[0]) for i in range(10)]
    assert sorted(starts) == sorted(int(corpus.tokens[8 * w]) for w in range(10))  # each window once per epoch
    assert starts != [int(a.window(i).input_ids[0]) for i in range(10, 20)]  # a new order next epoch
    assert starts != [int(data.PackedSampler(corpus, 8, seed=6).window(i).input_ids[0]) for i in range(10)]
    a.advance(7)
    resumed = data.PackedSampler(corpus, 8, seed=5)
    resumed.load_state_dict(json.loads(json.dumps(a.state_dict())))  # survives a plain-JSON round trip
    for i in range(8):  # across the epoch boundary
        assert torch.equal(resumed.window(resumed.consumed + i).input_ids, b.window(7 + i).input_ids)
    with pytest.raises(DataError, match="seq_len=8 but this run has seq_len=4"):
        data.PackedSampler(corpus, 4, seed=5).load_state_dict(a.state_dict())


# --- bad input ----------------------------------------------------------------------------------------------
def test_each_bad_input_is_one_clear_error(tmp_path, cache, tokenizer_dir):
    def refused(path, match, error=DataError, vocab=512, **kw):
        with pytest.raises(error, match=match) as info:
            data.prepare_corpus(cfg_of(path, **kw), tokenizer_dir, vocab)
        assert "\n" not in str(info.value)

    refused(tmp_path / "nope", "does not exist", DataPathError)
    (tmp_path / "blob.txt").write_bytes(bytes(range(256)) * 8)
    refused(tmp_path / "blob.txt", "is binary, not UTF-8 text")
    (tmp_path / "k.jsonl").write_text(json.dumps({"body": "hello"}) + "\n")
    refused(tmp_path / "k.jsonl", "no column data.text_key='text'; its columns are body")
    (tmp_path / "empty.txt").write_text("")
    refused(tmp_path / "empty.txt", "only empty documents")
    (tmp_path / "empty").mkdir()
    refused(tmp_path / "empty", "holds no files", DataPathError)
    (tmp_path / "bad.jsonl").write_text("{not json\n")
    refused(tmp_path / "bad.jsonl", "could not be read as json")
    refused(tmp_path / "k.jsonl", "the tokenizer has 512 tokens but model.vocab_size=256", vocab=256, text_key="body")


def test_bad_data_is_refused_before_training_and_a_mask_plans_with_any_kernel_and_compile(tmp_path, cache):
    (tmp_path / "k.jsonl").write_text(json.dumps({"body": "hello"}) + "\n")
    with pytest.raises(DataError, match="text_key"):  # what lcgraph-train runs before it spawns ranks
        prepare_data(typed(compose(f"data.path={tmp_path / 'k.jsonl'}")))
    with pytest.raises(PlanError, match="data.mean_document_tokens=-1"):
        validate_plan(compose("data.mean_document_tokens=-1"), env={})
    validate_plan(compose("data.cross_document_attention=false", "train.compile=true"), env={})
    validate_plan(compose("data.cross_document_attention=false", "train.attention=cudnn"), env={})


def test_an_unwritable_cache_names_lcgraph_cache(tmp_path, monkeypatch):
    """A read-only HOME (root ignores file modes here, so a file stands in the way of the directory)."""
    blocker = tmp_path / "file"
    blocker.write_text("")
    monkeypatch.setenv("LCGRAPH_CACHE", str(blocker / "cache"))
    with pytest.raises(DataError, match="set LCGRAPH_CACHE to a writable one"):
        data.cache_dir()
