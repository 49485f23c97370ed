"""Data: documents -> a token cache on disk -> packed windows -> a resumable, dp-sharded sampler.

`data.path` is a text file, a directory of text files, JSONL (`data.text_key`), Parquet, or a directory
written by `datasets.Dataset.save_to_disk`; without it the corpus is the Python standard library's own
source files (real text on every machine, no download). HF `datasets` loads it (local files only) and
tokenizes it with the model's tokenizer (`model.path`; without one, a byte-level BPE trained on the corpus)
in `data.num_workers` processes. The result is cached once under the lcgraph cache directory, keyed by the
files, the tokenizer and the settings: one flat uint32 token array (memory-mapped, never read whole) and
the document offsets. A second run opens it at once.

Windows are `data.seq_len` consecutive tokens of that stream (labels are the next tokens, shifted here
before any chunking or sharding). Boundaries are kept: position ids restart at each document, and each
position carries its document id for the attention mask of `data.cross_document_attention=false`.
"""

from __future__ import annotations

import codecs
import hashlib
import json
import math
import os
import shutil
import sysconfig
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lcgraph.errors import DataError, DataPathError, LcgraphError
from lcgraph.runtime.config import DataConfig

EOS = "<|endoftext|>"
IGNORE_INDEX = -100  # the label cross-entropy skips (as capture's loss)
FORMAT_VERSION = 1  # bump when the cache layout or the tokenization rule changes
_BINARY_PROBE = 8192  # bytes of each text file checked for being text


def cache_dir() -> Path:
    """Where tokenizers and token caches live: $LCGRAPH_CACHE, default ~/.cache/lcgraph."""
    root = Path(os.environ.get("LCGRAPH_CACHE", Path.home() / ".cache" / "lcgraph"))
    try:
        root.mkdir(parents=True, exist_ok=True)
        probe = root / f".write-test-{os.getpid()}"
        probe.touch()
        probe.unlink()
    except OSError as exc:
        raise DataError(
            f"lcgraph's cache directory {root} is not writable ({exc.strerror}); set LCGRAPH_CACHE to a writable one"
        ) from None
    return root


# --- sources ---------------------------------------------------------------------------------------------
def corpus_files(path: str | None, max_bytes: int) -> list[Path]:
    """The files of `path` (sorted), or the standard library's .py files up to `max_bytes` in total."""
    if not path:
        return _stdlib_files(max_bytes)
    root = Path(path)
    if not root.exists():
        raise DataPathError(
            f"data.path={path!r} does not exist; give a text, JSONL or Parquet file, a directory of them, "
            "or a save_to_disk directory"
        )
    files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file() and _visible(p, root))
    if not files:
        raise DataPathError(f"data.path={path!r} holds no files")
    for f in files:
        if not os.access(f, os.R_OK):
            raise DataPathError(f"data.path file {str(f)!r} is not readable; fix its permissions")
    return files


def _visible(p: Path, root: Path) -> bool:
    return not any(part.startswith(".") for part in p.relative_to(root).parts)


def _stdlib_files(max_bytes: int) -> list[Path]:
    root = Path(sysconfig.get_paths()["stdlib"])
    chosen: list[Path] = []
    total = 0
    for f in sorted(p for p in root.rglob("*.py") if p.is_file() and "site-packages" not in p.parts):
        size = f.stat().st_size
        if total + size > max_bytes and chosen:
            break
        chosen.append(f)
        total += size
    return chosen


def _format_of(path: str | None, files: list[Path]) -> str:
    """stdlib | disk (save_to_disk) | json | parquet | text."""
    if not path:
        return "stdlib"
    if Path(path).is_dir() and (Path(path) / "state.json").is_file():
        return "disk"
    kinds = {".jsonl": "json", ".json": "json", ".parquet": "parquet"}
    found = {kinds.get(f.suffix.lower(), "text") for f in files}
    if len(found) > 1:
        raise DataError(f"data.path={path!r} mixes {' and '.join(sorted(found))} files; point it at one kind of file")
    return found.pop()


def check_text(files: list[Path]) -> None:
    """Refuse files that are not UTF-8 text (checked on each file's first bytes)."""
    for f in files:
        head = f.read_bytes()[:_BINARY_PROBE] if f.stat().st_size <= _BINARY_PROBE else _head(f)
        try:
            codecs.getincrementaldecoder("utf-8")().decode(head, final=False)
            binary = b"\x00" in head
        except UnicodeDecodeError:
            binary = True
        if binary:
            raise DataError(
                f"data.path file {str(f)!r} is binary, not UTF-8 text; give text, JSONL (.jsonl) or Parquet "
                "(.parquet) files"
            )


def _head(f: Path) -> bytes:
    with f.open("rb") as fh:
        return fh.read(_BINARY_PROBE)


def load_documents(path: str | None, files: list[Path], text_key: str):
    """The corpus as a `datasets.Dataset` with one document per row in column `text_key` (local files only)."""
    import datasets

    kind = _format_of(path, files)
    hf_cache = str(cache_dir() / "hf-datasets")
    try:
        if kind == "stdlib":
            ds = datasets.Dataset.from_dict({text_key: [f.read_text("utf-8", errors="replace") for f in files]})
        elif kind == "disk":
            ds = datasets.load_from_disk(str(path))
            if isinstance(ds, datasets.DatasetDict):
                ds = ds["train"] if "train" in ds else ds[next(iter(ds))]
        elif kind == "text":
            check_text(files)
            ds = datasets.load_dataset(
                "text", data_files=[str(f) for f in files], sample_by="document", split="train", cache_dir=hf_cache
            )
            ds = ds.rename_column("text", text_key) if text_key != "text" else ds
        else:
            ds = datasets.load_dataset(kind, data_files=[str(f) for f in files], split="train", cache_dir=hf_cache)
    except (datasets.exceptions.DatasetGenerationError, ValueError, OSError) as exc:
        raise DataError(f"data.path={path!r} could not be read as {kind}: {_first_line(exc)}") from exc
    if text_key not in ds.column_names:
        raise DataError(
            f"data.path={path!r} has no column data.text_key={text_key!r}; its columns are "
            f"{', '.join(ds.column_names)}: set data.text_key to one of them"
        )
    if len(ds) == 0:
        raise DataError(f"data.path={path!r} holds no documents")
    return ds


def _first_line(exc: BaseException) -> str:
    cause = exc.__cause__ or exc
    return (str(cause).strip().splitlines() or [type(cause).__name__])[0]


# --- tokenizer -------------------------------------------------------------------------------------------
def build_tokenizer(model_path: str | None, vocab_size: int, files: list[Path], texts=None):
    """The model's own tokenizer, or a byte-level BPE trained on the corpus (cached by fingerprint).

    `texts()` (an iterable of strings, called only when the BPE is not cached yet) is what the BPE learns
    from; default: the files read as text.
    """
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    if model_path:
        return AutoTokenizer.from_pretrained(model_path, local_files_only=True)
    target = _bpe_dir(vocab_size, files)
    if not (target / "tokenizer.json").is_file():
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            special_tokens=[EOS],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        sample = texts() if texts is not None else (f.read_text("utf-8", errors="replace") for f in files)
        tok.train_from_iterator(sample, trainer=trainer)
        fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS)
        tmp = target.with_name(target.name + f".tmp{os.getpid()}")
        fast.save_pretrained(tmp)
        _publish(tmp, target)
    return PreTrainedTokenizerFast.from_pretrained(str(target))


def _bpe_dir(vocab_size: int, files: list[Path]) -> Path:
    """Where the BPE trained on these files is cached."""
    return cache_dir() / f"bpe-{vocab_size}-{_fingerprint(files, vocab_size)}"


def sample_texts(ds, text_key: str, max_bytes: int):
    """Documents of `ds` up to `max_bytes` of text: what a corpus-trained BPE learns from."""
    total = 0
    for row in ds.select_columns([text_key]).iter(batch_size=256):
        for text in row[text_key]:
            if total >= max_bytes:
                return
            total += len(text)
            yield text


def check_vocab(tokenizer, vocab_size: int) -> None:
    if len(tokenizer) > vocab_size:
        raise DataError(
            f"the tokenizer has {len(tokenizer)} tokens but model.vocab_size={vocab_size}; use the model's own "
            "tokenizer (model.path) or a model with a vocabulary at least that large"
        )


def _tokenizer_key(tokenizer) -> str:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    text = backend.to_str() if backend is not None else json.dumps(sorted(tokenizer.get_vocab().items()))
    return hashlib.sha256(f"{text}|{tokenizer.eos_token_id}|{tokenizer.bos_token_id}".encode()).hexdigest()[:16]


def _fingerprint(files: list[Path], *extra) -> str:
    h = hashlib.sha256(repr(extra).encode())
    for f in files:
        st = f.stat()
        h.update(f"{f.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode())
    return h.hexdigest()[:16]


def _publish(tmp: Path, target: Path) -> None:
    """Atomic: the first writer's directory becomes `target`; a later one is dropped."""
    try:
        os.rename(tmp, target)
    except OSError:  # another process published first
        shutil.rmtree(tmp, ignore_errors=True)


# --- the token cache -------------------------------------------------------------------------------------
@dataclass
class TokenCorpus:
    """A flat token stream (memory-mapped) and where each document starts in it."""

    tokens: np.ndarray  # [N] uint32 (a read-only np.memmap for a cached corpus)
    offsets: np.ndarray  # [D + 1] int64: document d is tokens[offsets[d] : offsets[d + 1]]
    key: str = ""  # the cache key (identifies the corpus in a sampler's state)
    built: bool = False  # True when this call tokenized (False: the cache was reused)

    @property
    def num_documents(self) -> int:
        return len(self.offsets) - 1


def corpus_key(files: list[Path], tokenizer, settings: dict[str, Any]) -> str:
    return _fingerprint(files, FORMAT_VERSION, _tokenizer_key(tokenizer), sorted(settings.items()))


def open_corpus(key: str) -> TokenCorpus | None:
    """The cached corpus `key`, or None when it is not built yet."""
    root = cache_dir() / "corpus" / key
    if not (root / "meta.json").is_file():
        return None
    return TokenCorpus(np.load(root / "tokens.npy", mmap_mode="r"), np.load(root / "offsets.npy"), key)


def build_corpus(ds, tokenizer, text_key: str, key: str, workers: int) -> TokenCorpus:
    """Tokenize `ds` in `workers` processes (a progress bar each) into the cache entry `key`."""
    eos, bos = tokenizer.eos_token_id, tokenizer.bos_token_id

    def encode(batch):
        ids = tokenizer(batch[text_key], add_special_tokens=False)["input_ids"]
        ids = [([bos] if bos is not None else []) + x + ([eos] if eos is not None else []) for x in ids if x]
        return {"input_ids": ids, "length": [len(x) for x in ids]}

    encoded = ds.map(
        encode,
        batched=True,
        num_proc=workers if workers > 1 and len(ds) > 1 else None,
        remove_columns=ds.column_names,
        desc="tokenizing data.path",
    )
    lengths = np.asarray(encoded["length"] if len(encoded) else [], dtype=np.int64)
    if lengths.sum() == 0:
        raise DataError("data.path holds only empty documents (0 tokens)")
    root = cache_dir() / "corpus"
    root.mkdir(exist_ok=True)
    tmp = root / f"{key}.tmp{os.getpid()}"
    tmp.mkdir(exist_ok=True)
    tokens = np.lib.format.open_memmap(tmp / "tokens.npy", mode="w+", dtype=np.uint32, shape=(int(lengths.sum()),))
    at = 0
    for chunk in encoded.data.column("input_ids").chunks:  # Arrow batches: never the whole corpus at once
        flat = chunk.flatten().to_numpy()
        tokens[at : at + len(flat)] = flat
        at += len(flat)
    tokens.flush()
    del tokens
    np.save(tmp / "offsets.npy", np.concatenate([[0], np.cumsum(lengths)]))
    (tmp / "meta.json").write_text(json.dumps({"documents": len(lengths), "tokens": at, "version": FORMAT_VERSION}))
    _publish(tmp, root / key)
    corpus = open_corpus(key)
    assert corpus is not None
    corpus.built = True
    return corpus


def synthetic_corpus(vocab_size: int, seq_len: int, seed: int, mean_document_tokens: int = 0) -> TokenCorpus:
    """Uniform random tokens (benchmarks and planning runs: no files, no tokenizer): one document, or documents
    of log-normal lengths (sigma 1) with mean `mean_document_tokens`."""
    g = torch.Generator().manual_seed(seed)
    n = synthetic_size(seq_len)
    tokens = torch.randint(0, vocab_size, (n,), generator=g).numpy().astype(np.uint32)
    offsets = np.array([0, n], dtype=np.int64)
    if mean_document_tokens > 0:
        offsets = lognormal_offsets(n, mean_document_tokens, seed)
    key = f"synthetic-{vocab_size}-{n}-{seed}" + (f"-docs{mean_document_tokens}" if mean_document_tokens else "")
    return TokenCorpus(tokens, offsets, key=key)


def synthetic_size(seq_len: int) -> int:
    """Tokens in the synthetic corpus of this window length."""
    return max(1 << 20, 4 * seq_len)


def lognormal_offsets(n: int, mean: float, seed: int, sigma: float = 1.0) -> np.ndarray:
    """Document starts (then n) of a stream of n tokens cut into documents of log-normal lengths with this mean
    (mu = ln(mean) - sigma^2 / 2), each at least one token."""
    rng = np.random.default_rng(seed)
    lengths: list[int] = []
    total = 0
    while total < n:
        chunk = np.maximum(1, np.rint(rng.lognormal(np.log(mean) - sigma**2 / 2, sigma, 1024))).astype(np.int64)
        lengths.extend(chunk.tolist())
        total += int(chunk.sum())
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    offsets = offsets[offsets < n]
    return np.append(offsets, n).astype(np.int64)


# --- packed windows and the sampler ------------------------------------------------------------------------
@dataclass
class Window:
    """One packed sequence: `seq_len` inputs, their next-token labels, positions and documents."""

    input_ids: torch.Tensor  # [S] int64
    labels: torch.Tensor  # [S] int64 (IGNORE_INDEX where the next token is another document's, masked runs)
    position_ids: torch.Tensor  # [S] int64, 0 at every document start and at the window start
    document_ids: torch.Tensor  # [S] int64, 0 for the window's first document, +1 at each boundary


def pack_window(corpus: TokenCorpus, start: int, seq_len: int, cross_document: bool) -> Window:
    """Tokens start .. start + seq_len (+1 for the last label) with their document boundaries."""
    t = torch.from_numpy(corpus.tokens[start : start + seq_len + 1].astype(np.int64))
    index = np.arange(start, start + seq_len + 1)
    doc = np.searchsorted(corpus.offsets, index, side="right") - 1
    seg_start = np.maximum(corpus.offsets[doc[:-1]], start)
    positions = torch.from_numpy(index[:-1] - seg_start)
    labels = t[1:].clone()
    if not cross_document:  # a masked document never sees the next one: predicting its first token is noise
        labels[torch.from_numpy(doc[1:] != doc[:-1])] = IGNORE_INDEX
    docs = torch.from_numpy(doc[:-1] - doc[0])
    return Window(t[:-1].clone(), labels, positions, docs)


def pad_window(w: Window, length: int) -> Window:
    """`w` padded to `length` tokens as one more document whose labels the loss ignores: a real token never attends
    to it (it comes last, and under a mask it is its own document), so loss and gradients are those of `w`."""
    n = length - len(w.input_ids)
    if n <= 0:
        return w
    last = int(w.document_ids[-1]) + 1
    return Window(
        torch.cat([w.input_ids, w.input_ids.new_zeros(n)]),
        torch.cat([w.labels, w.labels.new_full((n,), IGNORE_INDEX)]),
        torch.cat([w.position_ids, torch.arange(n, dtype=w.position_ids.dtype)]),
        torch.cat([w.document_ids, w.document_ids.new_full((n,), last)]),
    )


class PackedSampler:
    """Global sequence index -> packed window, reproducible from the seed alone; resumable mid-epoch.

    The stream is cut into `num_windows` windows of `seq_len` tokens; each epoch visits them in a fresh
    seeded permutation. A step takes the next `global_batch` indices; data-parallel replica r takes its own
    slice of them (Job.step_units), so replicas read different windows and the pp/sp ranks of one replica the
    same. The cursor `consumed` is the whole state: `state_dict`/`load_state_dict` carry it across a restart.
    """

    def __init__(
        self,
        corpus: TokenCorpus,
        seq_len: int,
        seed: int,
        cross_document: bool = True,
        length: int | None = None,
        eval_fraction: float = 0.0,
    ):
        self.length = length or seq_len  # what the programs run: seq_len, padded where the layout needs more
        windows = (len(corpus.tokens) - 1) // seq_len
        self.held_out = math.ceil(eval_fraction * windows) if eval_fraction > 0 else 0  # the last ones: eval only
        self.num_windows = windows - self.held_out
        if self.num_windows < 1:
            held = (
                f" ({self.held_out} of its {windows} windows held out by data.eval_fraction)" if self.held_out else ""
            )
            raise DataError(
                f"the corpus has {len(corpus.tokens)} tokens, too few for a training window of data.seq_len={seq_len}"
                f"+1{held}; lower data.seq_len or give a larger data.path"
            )
        self.corpus, self.seq_len, self.seed, self.cross_document = corpus, seq_len, seed, cross_document
        self.consumed = 0  # sequences taken by finished steps (all replicas)
        self._order: tuple[int, torch.Tensor] | None = None

    def _window_start(self, index: int) -> int:
        epoch, i = divmod(index, self.num_windows)
        if self._order is None or self._order[0] != epoch:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._order = (epoch, torch.randperm(self.num_windows, generator=g))
        return int(self._order[1][i]) * self.seq_len

    def window(self, index: int) -> Window:
        w = pack_window(self.corpus, self._window_start(index), self.seq_len, self.cross_document)
        return pad_window(w, self.length)

    def held_out_windows(self) -> HeldOutWindows:
        """The windows data.eval_fraction keeps from training: the corpus's last ones, in order."""
        return HeldOutWindows(
            self.corpus, self.num_windows, self.held_out, self.seq_len, self.length, self.cross_document
        )

    def sample(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        w = self.window(index)
        return w.input_ids, w.labels

    def advance(self, sequences: int) -> None:
        self.consumed += sequences

    def state_dict(self) -> dict:
        return {
            "consumed": self.consumed,
            "seed": self.seed,
            "seq_len": self.seq_len,
            "num_windows": self.num_windows,
            "corpus": self.corpus.key,
        }

    def load_state_dict(self, state: dict) -> None:
        mine = self.state_dict()
        for k in ("seed", "seq_len", "num_windows", "corpus"):
            if state.get(k) != mine[k]:
                raise DataError(
                    f"the checkpoint's data position is for {k}={state.get(k)!r} but this run has {k}={mine[k]!r}; "
                    "resume with the same data.path, data.seq_len, train.seed and tokenizer"
                )
        self.consumed = int(state["consumed"])


@dataclass
class HeldOutWindows:
    """Windows `first .. first + count` of a corpus, in order, packed and padded as training packs its own: what
    an evaluation reads (train.eval_every), the same windows every time."""

    corpus: TokenCorpus
    first: int
    count: int
    seq_len: int
    length: int
    cross_document: bool

    def window(self, index: int) -> Window:
        if not 0 <= index < self.count:
            raise IndexError(f"held-out window {index} of {self.count}")
        w = pack_window(self.corpus, (self.first + index) * self.seq_len, self.seq_len, self.cross_document)
        return pad_window(w, self.length)


# --- the whole pipeline --------------------------------------------------------------------------------------
def prepare_corpus(d: DataConfig, model_path: str | None, vocab_size: int, build: bool = True):
    """(corpus, tokenizer) for data config `d`: the cache when present, else built (when `build`).

    Every bad input is refused here, before training: missing, unreadable or binary files, an empty
    dataset, a JSONL without `d.text_key`, a tokenizer larger than the model's vocabulary.
    """
    max_bytes = int(d.max_corpus_mb * 2**20)
    files = corpus_files(d.path, max_bytes)
    loaded: list = []

    def documents():
        if not loaded:
            loaded.append(load_documents(d.path, files, d.text_key))
        return loaded[0]

    texts = (lambda: sample_texts(documents(), d.text_key, max_bytes)) if d.path else None
    tokenizer = build_tokenizer(model_path, vocab_size, files, texts)
    check_vocab(tokenizer, vocab_size)
    settings = {"text_key": d.text_key, "path": str(d.path), "max_mb": None if d.path else d.max_corpus_mb}
    key = corpus_key(files, tokenizer, settings)
    corpus = open_corpus(key)
    if corpus is None and build:
        corpus = build_corpus(documents(), tokenizer, d.text_key, key, workers(d.num_workers))
    return corpus, tokenizer


def prepare_eval_corpus(d: DataConfig, tokenizer, build: bool = True) -> TokenCorpus | None:
    """The corpus of data.eval_path, tokenized with the training corpus's tokenizer (its cache when present)."""
    max_bytes = int(d.max_corpus_mb * 2**20)
    files = corpus_files(d.eval_path, max_bytes)
    settings = {"text_key": d.text_key, "path": str(d.eval_path), "max_mb": None}
    key = corpus_key(files, tokenizer, settings)
    corpus = open_corpus(key)
    if corpus is None and build:
        corpus = build_corpus(
            load_documents(d.eval_path, files, d.text_key), tokenizer, d.text_key, key, workers(d.num_workers)
        )
    return corpus


@dataclass
class RunData:
    """What a rank trains and evaluates on; the tokenizer (None for synthetic data) goes into each checkpoint."""

    sampler: PackedSampler
    eval_windows: HeldOutWindows | None
    tokenizer: Any


def open_data(
    d: DataConfig,
    model_path: str | None,
    *,
    vocab_size: int,
    seed: int,
    length: int,
    builds: bool,
    barrier: Callable[[], object],
) -> RunData:
    """The run's data for data config `d`, windows padded to `length`. The rank that `builds` (one per machine)
    prepares each token cache while the others wait at `barrier()` and then open it."""
    tokenizer = None

    def prepare(eval_split: bool, build: bool) -> TokenCorpus | None:
        nonlocal tokenizer
        if eval_split:
            return prepare_eval_corpus(d, tokenizer, build)
        corpus, tokenizer = prepare_corpus(d, model_path, vocab_size, build)
        return corpus

    def prepared(eval_split: bool) -> TokenCorpus:
        corpus = prepare(eval_split, build=True) if builds else None
        barrier()
        if not builds:
            corpus = prepare(eval_split, build=False)
        if corpus is None:
            name = "eval_path" if eval_split else "path"
            raise DataError(f"the token cache of data.{name}={getattr(d, name)!r} was not built")
        return corpus

    corpus = synthetic_corpus(vocab_size, d.seq_len, seed, d.mean_document_tokens) if d.synthetic else prepared(False)
    sampler = PackedSampler(corpus, d.seq_len, seed, d.cross_document_attention, length, d.eval_fraction)
    windows = None
    if d.eval_path:
        windows = windows_of(prepared(eval_split=True), sampler)
    elif d.eval_fraction > 0:
        windows = sampler.held_out_windows()
    return RunData(sampler, windows, tokenizer)


def windows_of(corpus: TokenCorpus, sampler: PackedSampler) -> HeldOutWindows:
    """All windows of another corpus (data.eval_path), packed as the training sampler packs its own."""
    count = (len(corpus.tokens) - 1) // sampler.seq_len
    if count < 1:
        raise DataError(
            f"data.eval_path holds {len(corpus.tokens)} tokens, fewer than one window of data.seq_len="
            f"{sampler.seq_len}+1; give a larger held-out corpus"
        )
    return HeldOutWindows(corpus, 0, count, sampler.seq_len, sampler.length, sampler.cross_document)


def cached_offsets(d: DataConfig, model_path: str | None, vocab_size: int) -> np.ndarray | None:
    """The document offsets of `d`'s prepared corpus, or None when it (or the BPE it needs) is not cached yet:
    the planner reads them without tokenizing anything."""
    try:
        files = corpus_files(d.path, int(d.max_corpus_mb * 2**20))
        if not model_path and not _bpe_dir(vocab_size, files).is_dir():
            return None
        corpus, _ = prepare_corpus(d, model_path, vocab_size, build=False)
    except LcgraphError:  # a path or model this machine does not have: a plan made elsewhere
        return None
    return None if corpus is None else np.asarray(corpus.offsets)


def workers(num_workers: int) -> int:
    """`data.num_workers`, 0 meaning one per core (at most 8)."""
    return num_workers or min(8, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 1)
