"""Checkpoints in HF format, written atomically: a crash leaves the previous checkpoint intact.

Each pipeline stage's first replica writes its own safetensors shard; rank 0 writes the index, the
config and the tokenizer, then renames the finished directory into place. The result loads with
`model.path=<run>/checkpoint` and with transformers' from_pretrained.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any, Protocol

import torch.distributed as dist
from omegaconf import DictConfig

from lcgraph.errors import CheckpointError
from lcgraph.runtime.interpreter import OptimizerHooks, StageState
from lcgraph.schedule.mesh import Coords


class CheckpointJob(Protocol):
    """What save_checkpoint reads from the training job (app/job.py: Job satisfies it)."""

    @property
    def cfg(self) -> DictConfig: ...  # reads cfg.parallel
    @property
    def coords(self) -> Coords: ...
    @property
    def optimizer(self) -> OptimizerHooks: ...
    @property
    def config(self) -> Any: ...  # the HF config (transformers.PretrainedConfig)
    @property
    def tokenizer(self) -> Any: ...  # an HF tokenizer, or None
    @property
    def stages(self) -> dict[int, StageState]: ...


def _barrier():
    if dist.is_initialized():
        dist.barrier()


def save_checkpoint(job: CheckpointJob, target: Path, step: int) -> None:
    from safetensors.torch import save_file

    c, par = job.coords, job.cfg.parallel
    job.optimizer.sync_params()
    stages = par.pp * par.virtual_stages
    tmp = target.with_name(target.name + ".tmp")
    if c.rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            tmp.mkdir(parents=True)
        except OSError as exc:  # a read-only or full disk, or a file where the directory goes: the user's to fix
            raise CheckpointError(f"cannot write a checkpoint at {target}: {exc}") from exc
    _barrier()
    weight_map = {}
    tie = getattr(job.config, "tie_word_embeddings", False)
    for s, st in job.stages.items():
        fname = f"model-{s + 1:05d}-of-{stages:05d}.safetensors"
        tensors = {
            n: p.detach().cpu().contiguous()
            for n, p in st.params.items()
            if not (tie and n == "model.embed_tokens.weight" and s != 0)
        }
        if c.dp_rank == 0 and c.sp_rank == 0:
            save_file(tensors, str(tmp / fname), metadata={"format": "pt"})
        weight_map.update({n: fname for n in tensors})
    maps = [None] * dist.get_world_size() if dist.is_initialized() else [weight_map]
    if dist.is_initialized():
        dist.all_gather_object(maps, weight_map)
    if c.rank == 0:
        merged = {k: v for m in maps for k, v in m.items()}
        (tmp / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {"step": step}, "weight_map": merged}, indent=1)
        )
        job.config.save_pretrained(tmp)
        if job.tokenizer is not None:
            job.tokenizer.save_pretrained(tmp)
        old = target.with_name(target.name + ".old")
        if target.exists():
            os.replace(target, old)
        os.replace(tmp, target)
        shutil.rmtree(old, ignore_errors=True)
    _barrier()
