"""Full-state checkpoints with torch.distributed.checkpoint (DCP), published atomically; HF export from them.

`<run>/checkpoints/step-00000010/` holds everything a run needs to go on exactly where it stopped: the
weights, the optimizer's AdamW moments (and fp32 masters), the step (which is also the LR schedule's
position), AdamW's own step count (fewer when updates were dropped: `train.on_nonfinite=skip`), the data
position (`job.sampler.state_dict()`) and every rank's RNG states, plus `hf/` (the HF config and tokenizer) and
`manifest.json` (step, optimizer updates, layout, model shape, complete flag).
- A resume in the other dtype loads the fp32 masters: a bf16 checkpoint's masters become a fp32 run's weights,
  a fp32 checkpoint's weights a bf16 run's masters (never rebuilt from rounded bf16 weights).

- Every tensor is keyed by its HF parameter name (`model.<name>`, `optim.<name>.exp_avg`, ...), never by
  rank or stage: each rank writes what it holds (replicas' copies are written once, ZeRO shards as
  chunks), and DCP reshards on load, so a checkpoint resumes under any pp/sp/cp/dp layout.
- It is written to `step-N.tmp/`; after every rank has written, rank 0 adds the manifest last and renames
  the directory to `step-N` in one `os.replace`. A crash at any moment leaves either the old checkpoints or
  the old ones plus the new: a directory without a complete manifest is never loaded.
- Only the newest `train.keep_checkpoints` are kept (0 keeps all); older ones go after the new one is in place.
- Resuming at step N in a run directory that went past N (a rollback, or a crash after the last checkpoint) moves
  its later checkpoints and metrics.jsonl rows aside (`supersede_later`, into
  `<run>/superseded/<time>-after-step-N/`) before the first step: the run directory then holds one trajectory,
  which `train.resume=auto` and pruning read.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import re
import shutil
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp

from lcgraph.errors import CheckpointError
from lcgraph.runtime.config import ParallelConfig, TrainConfig
from lcgraph.runtime.interpreter import OptimizerHooks, StageState
from lcgraph.schedule.mesh import Coords

FORMAT = 1
CHECKPOINTS = "checkpoints"  # under the run directory
SUPERSEDED = "superseded"  # under the run directory: what a resume at an earlier step moved aside
METRICS = "metrics.jsonl"  # under the run directory: one row per step (observability.metrics writes it)
MANIFEST = "manifest.json"
HF_DIR = "hf"  # config.json and the tokenizer, inside a checkpoint
STEP_DIR = re.compile(r"step-(\d+)$")
# the config keys that fix the tensors' shapes: a checkpoint only loads into a model that agrees on all
WEIGHT_SHAPE_KEYS = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "tie_word_embeddings",
)


class Sampler(Protocol):
    def state_dict(self) -> dict: ...
    def load_state_dict(self, state: dict) -> None: ...


class CheckpointJob(Protocol):
    """What the checkpointer reads from the training job (app/job.py: Job satisfies it)."""

    @property
    def parallel(self) -> ParallelConfig: ...
    @property
    def train(self) -> TrainConfig: ...
    @property
    def coords(self) -> Coords: ...
    @property
    def device(self) -> torch.device: ...
    @property
    def optimizer(self) -> OptimizerHooks: ...
    @property
    def config(self) -> Any: ...  # the HF config (transformers.PretrainedConfig)
    @property
    def tokenizer(self) -> Any: ...  # an HF tokenizer, or None
    @property
    def sampler(self) -> Sampler: ...
    @property
    def stages(self) -> dict[int, StageState]: ...


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _no_dist() -> bool:
    return not dist.is_initialized()


@contextlib.contextmanager
def _quiet_single_process() -> Iterator[None]:
    """DCP warns on every single-process save or load that it assumes one process: here that is the intent."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


# --- what a checkpoint holds --------------------------------------------------------------------------------
def model_shape(config) -> dict:
    return {k: getattr(config, k, None) for k in WEIGHT_SHAPE_KEYS}


def layout(par: ParallelConfig, dtype: str) -> dict:
    return {
        "pp": par.pp,
        "dp": par.dp,
        "sp": par.sp,
        "cp": par.cp,
        "virtual_stages": par.virtual_stages,
        "zero": par.zero,
        "dtype": dtype,
    }


def same_layout(saved: dict, mine: dict) -> bool:
    """Whether a checkpoint's manifest layout is this run's, `mine` (so its ranks, and their RNG states, are the same)."""
    return {"cp": 1, **saved} == mine  # manifests written before ring attention have no cp: it was 1


def _rng_states(device: torch.device) -> dict[str, torch.Tensor]:
    states = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        states["cuda"] = torch.cuda.get_rng_state(device)
    return states


def _state_dict(job: CheckpointJob, masters: bool, rng: bool) -> dict[str, Any]:
    """The DCP state dict of this rank: views of the live tensors, so a load writes into them in place."""
    state: dict[str, Any] = {
        "model": {n: p.detach() for st in job.stages.values() for n, p in st.params.items()},
        "optim": job.optimizer.checkpoint_state(masters),
        "data": job.sampler.state_dict(),
    }
    if rng:  # per rank: only meaningful when the layout (and so the ranks) are the same
        state["rng"] = {f"rank{job.coords.rank}": _rng_states(job.device)}
    return state


# --- save ---------------------------------------------------------------------------------------------------
def read_manifest(path: Path) -> dict | None:
    """The manifest of a published, complete checkpoint; None for anything else (a cut-off write)."""
    try:
        manifest = json.loads((path / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    return manifest if manifest.get("complete") is True and manifest.get("format") == FORMAT else None


def complete_checkpoints(root: Path) -> list[tuple[int, Path]]:
    """(step, path) of the complete checkpoints under `root`, oldest first."""
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        m = STEP_DIR.match(p.name)
        if m and p.is_dir() and read_manifest(p) is not None:
            found.append((int(m.group(1)), p))
    return sorted(found)


def save_checkpoint(job: CheckpointJob, root: Path, step: int) -> Path:
    """Write this rank's part of the full state at `step` under `root`; publish it atomically (collective)."""
    c = job.coords
    final = root / f"step-{step:08d}"
    tmp = final.with_name(final.name + ".tmp")
    if read_manifest(final) is not None:  # resumed at the last step: that state is already saved
        return final
    job.optimizer.sync_params()
    if c.rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            tmp.mkdir(parents=True)
        except OSError as exc:  # a read-only or full disk, or a file where the directory goes: the user's to fix
            raise CheckpointError(f"cannot write a checkpoint at {root}: {exc}") from exc
    _barrier()
    with _quiet_single_process():
        dcp.save(_state_dict(job, masters=True, rng=True), checkpoint_id=tmp, no_dist=_no_dist())
    _barrier()
    if c.rank == 0:
        _publish(job, tmp, final, step)
        _prune(root, job.train.keep_checkpoints)
    _barrier()
    return final


def _publish(job: CheckpointJob, tmp: Path, final: Path, step: int) -> None:
    job.config.save_pretrained(tmp / HF_DIR)
    if job.tokenizer is not None:
        job.tokenizer.save_pretrained(tmp / HF_DIR)
    manifest = {
        "format": FORMAT,
        "step": step,
        "optimizer_updates": job.optimizer.updates,  # AdamW's step count: bias correction after dropped updates
        "layout": layout(job.parallel, job.train.dtype),
        "model": model_shape(job.config),
        "complete": True,
    }
    with open(tmp / MANIFEST, "w") as f:  # last, and on disk before the rename publishes it
        json.dump(manifest, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    if final.exists():  # a directory left without a complete manifest (never loadable): replaced
        shutil.rmtree(final)
    os.replace(tmp, final)


def _prune(root: Path, keep: int) -> None:
    """Drop all but the newest `keep` complete checkpoints, and writes older than the newest that were cut off."""
    done = complete_checkpoints(root)
    newest = done[-1][0] if done else 0
    for _, path in done[: -keep if keep > 0 else 0]:
        shutil.rmtree(path, ignore_errors=True)
    for p in root.glob("step-*.tmp"):
        m = STEP_DIR.match(p.name[: -len(".tmp")])
        if m and int(m.group(1)) < newest:
            shutil.rmtree(p, ignore_errors=True)


def move_later(root: Path, step: int, resumed: Path | None, dest: Path) -> list[int]:
    """Move the checkpoints under `root` that a resume at `step` (from `resumed`) supersedes into `dest`: every
    complete or cut-off one after `step`, and one at `step` that is not `resumed` itself. Returns their steps."""
    moved = []
    for p in sorted(root.glob("step-*")) if root.is_dir() else []:
        m = STEP_DIR.match(p.name.removesuffix(".tmp"))
        if m is None:
            continue
        at = int(m.group(1))
        if at > step or (at == step and (resumed is None or p.resolve() != resumed.resolve())):
            dest.mkdir(parents=True, exist_ok=True)
            os.replace(p, dest / p.name)
            moved.append(at)
    return moved


# --- resume -------------------------------------------------------------------------------------------------
def supersede_later(run_dir: Path, resume: Path | None) -> str | None:
    """A resume at step N in a run directory that went past N (a rollback, or a crash after the last checkpoint;
    N = 0 when `train.resume=auto` found none yet): its later checkpoints and metrics rows move to
    `superseded/<UTC time>-after-step-N/`, so the directory holds the one trajectory this run continues; returns
    the line saying so (None when nothing was later)."""
    manifest = read_manifest(resume) if resume is not None else {"step": 0}
    assert manifest is not None  # resume_path returns complete checkpoints only
    step = int(manifest["step"])
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    dest = run_dir / SUPERSEDED / f"{stamp}-after-step-{step:08d}"
    moved = move_later(run_dir / CHECKPOINTS, step, resume, dest / CHECKPOINTS)
    rows = move_later_rows(run_dir / METRICS, step, dest)
    if not moved and not rows:
        return None
    return (
        f"resuming at step {step}: this run directory's later trajectory (checkpoints of steps {moved}, "
        f"{rows} metrics rows) moved to {dest}"
    )


def move_later_rows(path: Path, step: int, dest: Path) -> int:
    """Move metrics.jsonl's rows of steps after `step` (and any torn row) into `dest`/metrics.jsonl, rewriting
    `path` atomically with the rest; returns how many moved."""
    if not path.is_file():
        return 0
    keep: list[str] = []
    later: list[str] = []
    for line in path.read_text().splitlines():
        try:
            kept = json.loads(line).get("step", 0) <= step
        except ValueError:  # a row cut off by a crash
            kept = False
        (keep if kept else later).append(line)
    if later:
        dest.mkdir(parents=True, exist_ok=True)
        (dest / path.name).write_text("".join(f"{r}\n" for r in later))
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text("".join(f"{r}\n" for r in keep))
        os.replace(tmp, path)
    return len(later)


def find_checkpoint(source: Path) -> Path | None:
    """The newest complete checkpoint at `source`: a checkpoint, a `checkpoints/` directory or a run directory."""
    if STEP_DIR.match(source.name) and (source / MANIFEST).exists():
        return source if read_manifest(source) is not None else None
    for root in (source, source / CHECKPOINTS):
        done = complete_checkpoints(root)
        if done:
            return done[-1][1]
    return None


def resume_path(resume: str | None, run_dir: Path) -> Path | None:
    """What `train.resume` names: `auto` the run's own newest complete checkpoint (None when it has none
    yet), a path the newest complete one there (an error when there is none), null nothing."""
    if not resume:
        return None
    if resume == "auto":
        return find_checkpoint(run_dir / CHECKPOINTS)
    found = find_checkpoint(Path(resume))
    if found is None:
        raise CheckpointError(
            f"train.resume={resume}: no complete checkpoint there (a step-N directory with a complete "
            f"{MANIFEST}); give a run directory, its {CHECKPOINTS}/ or one checkpoint, or train.resume=auto"
        )
    return found


def check_model(path: Path, config) -> dict:
    """The checkpoint's manifest, if it holds a model of `config`'s shape; a CheckpointError naming the first
    difference otherwise."""
    manifest = read_manifest(path)
    if manifest is None:
        raise CheckpointError(f"{path} is not a complete lcgraph checkpoint (no complete {MANIFEST})")
    mine = model_shape(config)
    for key, theirs in manifest["model"].items():
        if mine.get(key) != theirs:
            raise CheckpointError(
                f"{path} holds a model with {key}={theirs} but this run's model has {key}={mine.get(key)}; "
                "resume with the model config it was trained with, or start without train.resume"
            )
    return manifest


def load_checkpoint(job: CheckpointJob, path: Path) -> int:
    """Load the full state at `path` into this rank (any layout: DCP reshards); returns the step to go on from."""
    manifest = check_model(path, job.config)
    job.optimizer.sync_params()
    saved = dcp.FileSystemReader(str(path)).read_metadata().state_dict_metadata
    saved_masters = any(k.startswith("optim.") and k.endswith(".master") for k in saved)
    same_ranks = same_layout(manifest["layout"], layout(job.parallel, job.train.dtype))
    state = _state_dict(job, masters=True, rng=same_ranks)
    run_masters = any(k.endswith(".master") for k in state["optim"])  # bf16 weights with fp32 masters
    if not saved_masters:  # a fp32 checkpoint (its weights were the masters) or a replicated-optimizer one
        state["optim"] = {k: v for k, v in state["optim"].items() if not k.endswith(".master")}
    elif not run_masters:  # a bf16 checkpoint resumed in fp32: its fp32 masters are the weights, not its bf16 copy
        for name in [n for n in state["model"] if f"optim.{n}.master" in saved]:
            state["optim"][f"{name}.master"] = state["model"].pop(name).view(-1)
    rank = f"rank{job.coords.rank}"
    rng = state.get("rng", {}).get(rank, {})
    for kind in [k for k in rng if f"rng.{rank}.{k}" not in saved]:  # e.g. saved on CPU, resumed on a GPU
        del rng[kind]
    with _quiet_single_process():
        dcp.load(state, checkpoint_id=path, no_dist=_no_dist())
    if "cpu" in rng:
        torch.set_rng_state(rng["cpu"])
    if "cuda" in rng:
        torch.cuda.set_rng_state(rng["cuda"], job.device)
    job.sampler.load_state_dict(state["data"])
    step = int(manifest["step"])
    job.optimizer.restored(int(manifest.get("optimizer_updates", step)), masters_loaded=saved_masters)
    if run_masters and not saved_masters and _full_precision_weights(saved):  # fp32 checkpoint resumed in bf16
        job.optimizer.masters_from(lambda shapes: _read_fp32(path, shapes))
    return step


def _full_precision_weights(saved: dict) -> bool:
    return all(md.properties.dtype == torch.float32 for k, md in saved.items() if k.startswith("model."))


def _read_fp32(path: Path, shapes: dict[str, torch.Size]) -> dict[str, torch.Tensor]:
    """The checkpoint's weights of these names in fp32, on the host (this rank alone reads them)."""
    part = {f"model.{n}": torch.empty(shape, dtype=torch.float32) for n, shape in shapes.items()}
    with _quiet_single_process():
        dcp.load(part, checkpoint_id=path, no_dist=True)
    return {n: part[f"model.{n}"] for n in shapes}


# --- HF export ----------------------------------------------------------------------------------------------
def _world_readable(path: Path) -> None:
    """Give a file the mode a plain `open` would (0666 less the umask): safetensors writes through a private
    temporary file, which would leave an exported model readable by its owner alone."""
    umask = os.umask(0)
    os.umask(umask)
    path.chmod(0o666 & ~umask)


def _shard_groups(sizes: dict[str, int], max_bytes: int) -> list[list[str]]:
    groups: list[list[str]] = [[]]
    total = 0
    for name, size in sizes.items():
        if groups[-1] and total + size > max_bytes:
            groups.append([])
            total = 0
        groups[-1].append(name)
        total += size
    return groups


def export_hf(source: Path, out: Path, max_shard_bytes: int = 5 * 2**30) -> Path:
    """Write the newest complete checkpoint at `source` as an HF directory at `out` (config, safetensors
    shards with an index, tokenizer), one shard in memory at a time; `out` appears whole or not at all."""
    from safetensors.torch import save_file
    from transformers import AutoConfig

    ckpt = find_checkpoint(source)
    if ckpt is None:
        raise CheckpointError(f"{source}: no complete lcgraph checkpoint there (a step-N directory with {MANIFEST})")
    if out.exists() and any(out.iterdir()):
        raise CheckpointError(f"{out} exists and is not empty; give a new directory")
    config = AutoConfig.from_pretrained(ckpt / HF_DIR, local_files_only=True)
    saved = dcp.FileSystemReader(str(ckpt)).read_metadata().state_dict_metadata
    tensors = {k[len("model.") :]: md for k, md in saved.items() if k.startswith("model.")}
    if getattr(config, "tie_word_embeddings", False):
        tensors.pop("lm_head.weight", None)
    sizes = {n: md.size.numel() * md.properties.dtype.itemsize for n, md in sorted(tensors.items())}
    groups = _shard_groups(sizes, max_shard_bytes)
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(ckpt / HF_DIR, tmp)
    weight_map = {}
    for i, names in enumerate(groups):
        fname = "model.safetensors" if len(groups) == 1 else f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
        part = {f"model.{n}": torch.empty(tuple(tensors[n].size), dtype=tensors[n].properties.dtype) for n in names}
        with _quiet_single_process():
            dcp.load(part, checkpoint_id=ckpt, no_dist=True)
        save_file({n: part[f"model.{n}"] for n in names}, str(tmp / fname), metadata={"format": "pt"})
        _world_readable(tmp / fname)
        weight_map.update(dict.fromkeys(names, fname))
    if len(groups) > 1:
        index = {"metadata": {"total_size": sum(sizes.values())}, "weight_map": weight_map}
        (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=1))
    if out.exists():
        out.rmdir()  # empty (checked above)
    os.replace(tmp, out)
    return ckpt
