"""Up-front plan validation: every layout that cannot work is refused before any process starts.

Each check raises PlanError with the numbers involved and the fix.
"""

from __future__ import annotations

from lcgraph.config import CHOICES
from lcgraph.passes import PlanError, check_ulysses


def _get(cfg, dotted: str):
    node = cfg
    for part in dotted.split("."):
        node = node[part]
    return node


def check_choices(cfg) -> None:
    for key, allowed in CHOICES.items():
        value = _get(cfg, key)
        if value not in allowed:
            raise PlanError(f"{key}={value!r} is not one of {', '.join(allowed)}")


def check_layout(cfg, num_layers: int, heads: int, kv_heads: int, device_count: int | None = None) -> None:
    par, seq = cfg.parallel, cfg.data.seq_len
    for key in ("pp", "sp", "dp", "microbatches", "seq_chunks", "virtual_stages"):
        if par[key] < 1:
            raise PlanError(f"parallel.{key}={par[key]} must be >= 1")
    world = par.pp * par.sp * par.dp
    if device_count is not None and world > device_count:
        raise PlanError(f"pp*sp*dp = {par.pp}*{par.sp}*{par.dp} = {world} ranks but only {device_count} GPUs here; "
                        "lower the layout or run under torchrun/SLURM on more nodes")
    stages = par.pp * par.virtual_stages
    if stages > num_layers:
        raise PlanError(f"pp*virtual_stages = {stages} stages but the model has {num_layers} layers; "
                        f"use at most {num_layers} stages")
    if par.schedule == "interleaved_1f1b" and (par.virtual_stages < 2 or par.pp < 2):
        raise PlanError("parallel.schedule=interleaved_1f1b needs pp >= 2 and virtual_stages >= 2")
    if par.schedule != "interleaved_1f1b" and par.virtual_stages != 1:
        raise PlanError(f"parallel.virtual_stages={par.virtual_stages} needs parallel.schedule=interleaved_1f1b")
    if par.schedule != "seq1f1b" and par.seq_chunks != 1:
        raise PlanError(f"parallel.seq_chunks={par.seq_chunks} needs parallel.schedule=seq1f1b")
    k = par.seq_chunks if par.schedule == "seq1f1b" else 1
    if seq % par.sp:
        raise PlanError(f"data.seq_len={seq} must be divisible by parallel.sp={par.sp}")
    if par.chunk_split == "even" and seq % (par.sp * k):
        raise PlanError(f"data.seq_len={seq} must be divisible by sp*seq_chunks = {par.sp}*{k} = {par.sp * k} "
                        f"for even chunks; use data.seq_len={seq - seq % (par.sp * k)} or chunk_split=uniform_comp")
    if seq < par.sp * k * 2:
        raise PlanError(f"data.seq_len={seq} is too short for sp*seq_chunks = {par.sp * k} chunks of >= 2 tokens")
    if par.pp_layers is not None and (len(par.pp_layers) != stages or sum(par.pp_layers) != num_layers):
        raise PlanError(f"parallel.pp_layers={list(par.pp_layers)} must have {stages} entries summing to {num_layers}")
    check_ulysses(_Heads(heads, kv_heads), par.sp)


class _Heads:
    def __init__(self, heads, kv):
        self.num_attention_heads, self.num_key_value_heads = heads, kv


def validate_plan(cfg) -> None:
    """All checks that need only the config (no process, no weights)."""
    import torch

    from lcgraph.model import build_config

    check_choices(cfg)
    config = build_config(cfg.model)
    from lcgraph.capture import check_llama_like

    check_llama_like(config)
    device = cfg.train.device
    gpus = torch.cuda.device_count() if device == "cuda" or (device == "auto" and torch.cuda.is_available()) else None
    if device == "cuda" and not torch.cuda.is_available():
        raise PlanError("train.device=cuda but no GPU is visible; use train.device=cpu")
    kv = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    check_layout(cfg, config.num_hidden_layers, config.num_attention_heads, kv, gpus if "LOCAL_RANK" not in __import__("os").environ else None)
