"""Model configs and parameters: an HF LlamaConfig from the plan, and real tensors for a subset of names.

A rank materialises only the parameters its stage uses: `init_parameters` draws each tensor from its
own generator seeded by (seed, name), so any rank produces exactly the values the single-process
run has for that name, without building the rest; `load_parameters` reads only the named tensors
from a local safetensors checkpoint. `check_sliding_window` refuses a model whose attention window is shorter
than the run's sequence (lcgraph's attention is full causal).
"""

from __future__ import annotations

import json
import zlib
from pathlib import Path
from typing import Any

import torch

from lcgraph.errors import ModelPathError, PlanError
from lcgraph.runtime.config import ModelConfig

SHAPE_KEYS = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "max_position_embeddings",
    "rms_norm_eps",
    "rope_theta",
    "tie_word_embeddings",
    "initializer_range",
    "head_dim",
)


def build_config(model_cfg: ModelConfig) -> Any:  # a transformers.PretrainedConfig (imported lazily: it is slow)
    """HF config from `model.path` (a local directory) or from the shape keys of the model config group."""
    from transformers import AutoConfig, LlamaConfig

    path = model_cfg.path
    if path:
        if not (Path(path) / "config.json").is_file():
            if (Path(path) / "manifest.json").is_file() or (Path(path) / "checkpoints").is_dir():
                raise ModelPathError(
                    f"model.path={path!r} is an lcgraph checkpoint, not an HF model directory; continue it with "
                    f"train.resume={path}, or convert it with `lcgraph-export {path} OUT_DIR`"
                )
            raise ModelPathError(f"model.path={path!r} has no config.json; give a local HF model directory")
        config = AutoConfig.from_pretrained(path, local_files_only=True)
    else:
        kwargs = {k: getattr(model_cfg, k) for k in SHAPE_KEYS if getattr(model_cfg, k) is not None}
        rope_scaling = model_cfg.rope_scaling
        if rope_scaling:
            kwargs["rope_scaling"] = dict(rope_scaling)
        config = LlamaConfig(**kwargs)
    config.attention_dropout = 0.0
    config.use_cache = False
    return config


def _generator(seed: int, name: str) -> torch.Generator:
    return torch.Generator().manual_seed((seed * 1_000_003 + zlib.crc32(name.encode())) % (2**63))


def init_parameter(name: str, shape, config, seed: int) -> torch.Tensor:
    """HF LLaMA initialisation (normal(0, initializer_range) for matrices, ones for norms), per name."""
    if name.endswith("norm.weight"):
        return torch.ones(shape)
    if name.endswith(".bias"):
        return torch.zeros(shape)
    std = getattr(config, "initializer_range", 0.02)
    return torch.empty(shape).normal_(0.0, std, generator=_generator(seed, name))


def init_parameters(shapes: dict[str, tuple[int, ...]], config, seed: int, device, dtype) -> dict[str, torch.Tensor]:
    return {n: init_parameter(n, s, config, seed).to(device=device, dtype=dtype) for n, s in shapes.items()}


def _weight_index(path: Path) -> dict[str, str]:
    """HF parameter name -> safetensors file holding it."""
    index = path / "model.safetensors.index.json"
    if index.is_file():
        return json.loads(index.read_text())["weight_map"]
    single = path / "model.safetensors"
    if not single.is_file():
        raise ModelPathError(f"{path} has neither model.safetensors nor model.safetensors.index.json")
    from safetensors import safe_open

    with safe_open(str(single), "pt") as f:
        return {k: "model.safetensors" for k in f.keys()}


PROGRESS_BYTES = 2**30  # a load of more than this shows a progress bar


def load_parameters(path: str, names, config, device, dtype, progress: bool = False) -> dict[str, torch.Tensor]:
    """Read just `names` from a local HF checkpoint (tied lm_head falls back to the embedding), each file opened
    once and each tensor read alone, so no rank ever holds more than its own stage; with `progress`, a bar
    for loads over PROGRESS_BYTES."""
    from rich.progress import Progress
    from safetensors import safe_open

    root = Path(path)
    index = _weight_index(root)
    by_file: dict[str, list[tuple[str, str]]] = {}
    for name in names:
        key = name
        if key not in index and name == "lm_head.weight" and getattr(config, "tie_word_embeddings", False):
            key = "model.embed_tokens.weight"
        if key not in index:
            raise ModelPathError(f"{path}: checkpoint has no tensor {key!r}")
        by_file.setdefault(index[key], []).append((name, key))
    out = {}
    with Progress(transient=True, disable=not progress) as bar:
        task = bar.add_task(f"loading {root.name}", total=sum(len(v) for v in by_file.values()))
        for fname, wanted in by_file.items():
            with safe_open(str(root / fname), "pt", device="cpu") as f:
                for name, key in wanted:
                    out[name] = f.get_tensor(key).to(device=device, dtype=dtype)
                    bar.advance(task)
    return out


def checkpoint_bytes(path: str) -> int:
    """Size on disk of an HF directory's safetensors files (whether a load is large enough for a progress bar)."""
    return sum(p.stat().st_size for p in Path(path).glob("*.safetensors"))


def rotary_buffers(config, names, device) -> dict[str, torch.Tensor]:
    """Real values for the captured graph's buffers (the rotary inverse frequencies), computed from the config."""
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    with torch.device("cpu"):
        rotary = LlamaRotaryEmbedding(config)
    out = {}
    for name in names:
        attr = name.rsplit(".", 1)[-1]
        if not hasattr(rotary, attr):
            raise ValueError(f"captured buffer {name!r} is not a rotary table; lcgraph cannot compute it")
        out[name] = getattr(rotary, attr).to(device)
    return out


def stage_values(
    gm: torch.fx.GraphModule,
    param_names: dict[str, str],
    model_cfg: ModelConfig,
    config,
    *,
    seed: int,
    device: torch.device,
    dtype: torch.dtype,
    progress: bool,
) -> dict[str, torch.Tensor]:
    """The parameters of one stage graph `gm` (placeholder -> name in `param_names`) at their placeholders' shapes:
    read from model_cfg.path (with a progress bar when `progress` and the checkpoint is large), else initialized
    from `seed`."""
    placeholders = {n.name: n.meta["val"].shape for n in gm.graph.nodes if n.op == "placeholder"}
    shapes = {name: tuple(int(s) for s in placeholders[ph]) for ph, name in param_names.items()}
    if model_cfg.path:
        bar = progress and checkpoint_bytes(model_cfg.path) > PROGRESS_BYTES
        return load_parameters(model_cfg.path, shapes, config, device, dtype, progress=bar)
    return init_parameters(shapes, config, seed, device, dtype)


def sliding_window(config) -> int | None:
    """The attention window HF applies to some layer of this config, or None (full causal attention): Mistral's
    `sliding_window`; Qwen2's only with `use_sliding_window` on some layer (`layer_types`, else
    `max_window_layers` below the layer count)."""
    window = getattr(config, "sliding_window", None)
    if window is None or getattr(config, "model_type", None) == "llama":
        return None
    if getattr(config, "model_type", None) == "qwen2":
        if not getattr(config, "use_sliding_window", False):
            return None
        types = getattr(config, "layer_types", None)
        if types is not None and "sliding_attention" not in types:
            return None
        if types is None and getattr(config, "max_window_layers", 0) >= config.num_hidden_layers:
            return None
    return int(window)


def check_sliding_window(config, seq_len: int) -> None:
    """A window shorter than the sequence changes which keys a query sees; lcgraph's attention is full causal, so
    it would train another model silently: refused (a window >= seq_len masks nothing)."""
    window = sliding_window(config)
    if window is not None and window < seq_len:
        raise PlanError(
            f"model_type {config.model_type!r} has sliding_window={window} < data.seq_len={seq_len}, and lcgraph "
            f"attends over the whole causal prefix; train with data.seq_len <= {window} or a model without a window"
        )
