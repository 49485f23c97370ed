"""Data: a token stream and deterministic sampling of (input, shifted label) windows.

The default corpus is the Python standard library's own source files (real code text, present on every
machine with Python), tokenized with a byte-level BPE trained once on it and cached; `data.path`
(a text file or a directory of text files) and `model.path` (its tokenizer) replace either part.
Labels are shifted here, before any chunking or sharding, so no target is lost at a boundary.
"""

from __future__ import annotations

import hashlib
import os
import sysconfig
from pathlib import Path

import torch

from lcgraph.errors import DataError, DataPathError

EOS = "<|endoftext|>"


def cache_dir() -> Path:
    root = Path(os.environ.get("LCGRAPH_CACHE", Path.home() / ".cache" / "lcgraph"))
    root.mkdir(parents=True, exist_ok=True)
    return root


def corpus_files(path: str | None, max_bytes: int) -> list[Path]:
    """Sorted text files of `path` (or of the standard library), up to `max_bytes` in total."""
    root = Path(path) if path else Path(sysconfig.get_paths()["stdlib"])
    if not root.exists():
        raise DataPathError(f"data.path={str(root)!r} does not exist; give a text file or a directory of them")
    files = (
        [root]
        if root.is_file()
        else sorted(
            p for p in root.rglob("*.py" if not path else "*") if p.is_file() and "site-packages" not in p.parts
        )
    )
    chosen: list[Path] = []
    total = 0
    for f in files:
        size = f.stat().st_size
        if total + size > max_bytes and chosen:
            break
        chosen.append(f)
        total += size
    if not chosen:
        raise DataPathError(f"no text files under {root}")
    return chosen


def _read(files: list[Path]) -> list[str]:
    return [f.read_text(encoding="utf-8", errors="replace") for f in files]


def _fingerprint(files: list[Path], *extra) -> str:
    h = hashlib.sha256(repr(extra).encode())
    for f in files:
        h.update(str(f).encode())
        h.update(str(f.stat().st_size).encode())
    return h.hexdigest()[:16]


def build_tokenizer(model_path: str | None, vocab_size: int, files: list[Path]):
    """The model's own tokenizer, or a byte-level BPE trained on the corpus (cached by fingerprint)."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    if model_path:
        return AutoTokenizer.from_pretrained(model_path, local_files_only=True)
    target = cache_dir() / f"bpe-{vocab_size}-{_fingerprint(files, vocab_size)}"
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
        tok.train_from_iterator(_read(files), trainer=trainer)
        fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS)
        tmp = target.with_name(target.name + f".tmp{os.getpid()}")
        fast.save_pretrained(tmp)
        os.replace(tmp, target) if not target.exists() else None
    return PreTrainedTokenizerFast.from_pretrained(str(target))


def load_tokens(files: list[Path], tokenizer) -> torch.Tensor:
    """All files tokenized and joined with EOS, as one int64 tensor (cached)."""
    key = _fingerprint(files, tokenizer.name_or_path, len(tokenizer))
    path = cache_dir() / f"tokens-{key}.pt"
    if path.is_file():
        return torch.load(path)
    eos = tokenizer.eos_token_id
    ids: list[int] = []
    for text in _read(files):
        ids.extend(tokenizer(text, add_special_tokens=False)["input_ids"])
        if eos is not None:
            ids.append(eos)
    tokens = torch.tensor(ids, dtype=torch.long)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    torch.save(tokens, tmp)
    os.replace(tmp, path)
    return tokens


class WindowSampler:
    """Sample `index` -> (input_ids, labels) windows of `seq_len` tokens, reproducible from the seed alone."""

    def __init__(self, tokens: torch.Tensor, seq_len: int, seed: int):
        if len(tokens) < seq_len + 2:
            raise DataError(
                f"corpus has {len(tokens)} tokens, fewer than data.seq_len={seq_len}+1; "
                "lower data.seq_len or give a larger data.path"
            )
        self.tokens, self.seq_len, self.seed = tokens, seq_len, seed

    def sample(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        g = torch.Generator().manual_seed(self.seed * 7919 + index)
        start = int(torch.randint(0, len(self.tokens) - self.seq_len - 1, (1,), generator=g))
        window = self.tokens[start : start + self.seq_len + 1]
        labels = window[1:].clone()
        return window[:-1].clone(), labels

    def state_dict(self) -> dict:
        """The data position to resume from (a checkpoint holds it): windows are a function of (seed, index),
        and the index of the trainer's step, so the seed is all there is."""
        return {"seed": self.seed}

    def load_state_dict(self, state: dict) -> None:
        self.seed = int(state["seed"])
