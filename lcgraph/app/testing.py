"""Helpers that make a multi-rank test read like a single-process one.

`compose(...)` builds a config exactly as `lcgraph-train` would (Hydra compose, same groups, same
recipes). `train_local(cfg)` trains in this process; `train_spawned(cfgs, world)` launches `world`
ranks once (torch's elastic launcher, gloo on CPU) and trains each config in turn inside them, so a
grid of layouts costs one process start. Both return per-step losses and the final parameters
(and the gradient norms before clipping).
"""

from __future__ import annotations

import gc
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from omegaconf import DictConfig

from lcgraph.app.cli import init_distributed, launch_local, run, share_cores
from lcgraph.app.config import RunConfig, compose_config, typed
from lcgraph.app.job import Job, resolve_plan
from lcgraph.planner.settings import PlanConfig
from lcgraph.runtime import data, faults
from lcgraph.runtime.checkpoint import METRICS
from lcgraph.schedule.text import format_programs

TINY = [
    "parallel=single",
    "model.hidden_size=64",
    "model.intermediate_size=128",
    "model.num_hidden_layers=4",
    "model.num_attention_heads=4",
    "model.num_key_value_heads=2",
    "model.vocab_size=512",
    "data.seq_len=64",
    "data.max_corpus_mb=0.3",
    "train.steps=5",
    "train.progress=false",
    "logging.wandb.mode=disabled",
    "train.device=cpu",
    "optim.warmup_steps=1",
    "optim.lr=1e-3",
]


def torchrun(overrides: list[str], run_dir: Path, *launcher: str, env: dict | None = None):
    """`torchrun --standalone --nproc-per-node 2 <launcher> -m lcgraph <overrides>` on CPU ranks (one thread each,
    W&B off), run directory `run_dir`; the finished process, its output captured."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", *launcher]
    cmd += ["-m", "lcgraph", *overrides, f"hydra.run.dir={run_dir}"]
    return subprocess.run(cmd, capture_output=True, text=True, env=cli_env(env), timeout=600)


def cli_env(extra: dict | None = None) -> dict[str, str]:
    """The environment a test gives a launched `lcgraph` CLI: CPU ranks on one thread each, W&B off."""
    return {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled", **(extra or {})}


def hf_model_dir(root: Path, num_hidden_layers: int = 2, tie: bool = True):
    """A real HF checkpoint directory under `root`: config.json, safetensors weights, a tokenizer; and its model."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = data.build_tokenizer(None, 512, data.corpus_files(None, int(0.3 * 2**20)))
    config = LlamaConfig(
        vocab_size=512,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=tie,
    )
    torch.manual_seed(1)
    model = LlamaForCausalLM(config)
    model.save_pretrained(Path(root) / "hf")
    tokenizer.save_pretrained(Path(root) / "hf")
    return Path(root) / "hf", model


def compose(*overrides: str, tiny: bool = True) -> DictConfig:
    """A config as the CLI composes it; `tiny` puts the tiny CPU test shape first."""

    return compose_config((TINY if tiny else []) + list(overrides))


def run_config(*overrides: str, tiny: bool = True) -> RunConfig:
    """`compose(...)` typed, as the app hands it to a Job."""
    return typed(compose(*overrides, tiny=tiny))


def planned(*overrides: str, tiny: bool = True) -> PlanConfig:
    """The sections a plan of `compose(...)` reads, as the app hands them to the planner."""
    return run_config(*overrides, tiny=tiny).planned()


def job_of(cfg: DictConfig | RunConfig, run_dir: Path | str, rank: int = 0, world: int = 1) -> Job:
    """A Job for a composed config (typed here, as the app does) or a typed one."""
    run = typed(cfg) if isinstance(cfg, DictConfig) else cfg
    return Job(run, Path(run_dir), rank, world, plan=resolve_plan(run))


def llama1b_job(*overrides: str, layers: int, seq: int, steps: int = 1, run_dir: str = "/tmp/lcgraph-gpu-test") -> Job:
    """One-GPU bf16 job of the Llama-3.2-1B shape cut to `layers` decoder layers, on synthetic tokens: what the
    GPU tests train (`overrides` add to it, e.g. train.fuse=on)."""
    cfg = run_config(
        "parallel=single",
        "model=llama3_1b",
        f"model.num_hidden_layers={layers}",
        f"data.seq_len={seq}",
        "data.synthetic=true",
        "train.dtype=bf16",
        "train.device=cuda",
        f"train.steps={steps}",
        "logging.wandb.mode=disabled",
        "train.progress=false",
        *overrides,
        tiny=False,
    )
    return Job(cfg, Path(run_dir), 0, 1, plan=resolve_plan(cfg))


def cuda_allocated_before_a_job() -> int:
    """CUDA bytes allocated before a new job is built, for a test to count its job's memory above: a job holds
    reference cycles, so an earlier one's tensors stay allocated until a collection."""
    gc.collect()
    torch.cuda.empty_cache()
    return torch.cuda.memory_allocated()


def _train(cfg: DictConfig, rank: int = 0, world: int = 1) -> tuple[list[float], dict[str, torch.Tensor], dict]:

    job = job_of(cfg, tempfile.mkdtemp(prefix="lcgraph-test-"), rank, world)
    metrics = [job.run_step(step) for step in range(job.train.steps)]
    losses = [m["loss"] for m in metrics]
    params = {n: p.detach().cpu().clone() for n, p in job.all_params().items()}
    extra = {
        "activation_peaks": job.activation_peaks(),
        "relay_peaks": {s: st.relay.peak_bytes for s, st in job.stages.items()},
        "optimizer_state_bytes": job.optimizer.state_bytes(),
        "grad_norms": [m["grad_norm"] for m in metrics],
        "eval_losses": [m["eval_loss"] for m in metrics if "eval_loss" in m],
        "job": job,
    }
    return losses, params, extra


def run_here(cfg: RunConfig, run_dir: Path | str, rank: int = 0, world: int = 1) -> dict:
    """`lcgraph-train`'s loop (`cli.run`) in this process, with the plan resolved as `lcgraph-train` resolves it."""
    return run(cfg, str(run_dir), rank, world, plan=resolve_plan(cfg))


def train_local(cfg):
    """Train in this process; returns (losses, params, extras)."""
    return _train(cfg)


def _grid_worker(cfg_yamls: list[str], out_dir: str, keep_params: bool = True) -> None:
    import torch.distributed as dist
    from omegaconf import OmegaConf

    share_cores()
    first = OmegaConf.create(cfg_yamls[0])
    assert isinstance(first, DictConfig)  # the YAML of a composed config: a mapping
    init_distributed(typed(first).train)  # NCCL when the configs train on cuda (one rank per GPU), else gloo
    rank = dist.get_rank()
    try:
        for i, text in enumerate(cfg_yamls):
            cfg = OmegaConf.create(text)
            assert isinstance(cfg, DictConfig)
            losses, params, extra = _train(cfg, rank, dist.get_world_size())
            job = extra.pop("job")
            keep = keep_params and job.coords.replica_rank == 0
            record = {
                "losses": losses,
                "grad_norms": extra["grad_norms"],
                "eval_losses": extra["eval_losses"],
                "params": params if keep else {},
                "activation_peaks": extra["activation_peaks"],
                "relay_peaks": extra["relay_peaks"],
                "optimizer_state_bytes": extra["optimizer_state_bytes"],
                "events": job.optimizer.events,
                "timeline": job.interpreter.timeline,
                "program": [a.token(False) for a in job.interpreter.program],
                "issued": job.interpreter.issued,
                "programs_txt": format_programs(job.programs, job.spec),
            }
            torch.save(record, os.path.join(out_dir, f"{i}-rank{rank}.pt"))
            del job, params, extra
            dist.barrier()
    finally:
        dist.destroy_process_group()


def train_spawned(cfgs: list, world: int, keep_params: bool = True) -> list[dict]:
    """Train each config on `world` spawned ranks; per config: losses (rank 0), merged params, per-rank records.

    Configs that train on cuda run on NCCL, one rank per GPU; `keep_params=False` skips saving parameters
    (large models)."""
    from omegaconf import OmegaConf

    out = tempfile.mkdtemp(prefix="lcgraph-grid-")
    launch_local(
        world, _grid_worker, [OmegaConf.to_yaml(c, resolve=True) for c in cfgs], out, keep_params, run_id="test"
    )
    results = []
    for i in range(len(cfgs)):
        ranks = [torch.load(os.path.join(out, f"{i}-rank{r}.pt"), weights_only=False) for r in range(world)]
        params = {}
        for r in ranks:
            params.update(r["params"])
        results.append(
            {
                "losses": ranks[0]["losses"],
                "grad_norms": ranks[0]["grad_norms"],
                "eval_losses": ranks[0]["eval_losses"],
                "params": params,
                "ranks": ranks,
            }
        )
    return results


def _run_worker(cfg_yamls: list[str], run_dirs: list[str]) -> None:
    import torch.distributed as dist
    from omegaconf import OmegaConf

    share_cores()
    first = OmegaConf.create(cfg_yamls[0])
    assert isinstance(first, DictConfig)  # the YAML of a composed config: a mapping
    init_distributed(typed(first).train)
    try:
        for text, run_dir in zip(cfg_yamls, run_dirs):
            cfg = OmegaConf.create(text)
            assert isinstance(cfg, DictConfig)
            run_here(typed(cfg), run_dir, dist.get_rank(), dist.get_world_size())
            dist.barrier()
    finally:
        dist.destroy_process_group()


def run_losses(run_dir: Path) -> list[float]:
    """The per-step losses a run wrote to its metrics.jsonl."""
    import json

    return [json.loads(line)["loss"] for line in (Path(run_dir) / METRICS).read_text().splitlines()]


def run_spawned(cfgs: list, run_dirs: list[Path], world: int) -> list[list[float]]:
    """`lcgraph-train`'s own loop (checkpoints, resume, metrics) for each config in turn, in its run directory,
    on `world` ranks started once; returns each run's per-step losses from its metrics.jsonl."""
    from omegaconf import OmegaConf

    yamls = [OmegaConf.to_yaml(c, resolve=True) for c in cfgs]
    with faults.explained_failures(run_dirs, cfgs[0].train.comm_timeout_s):
        launch_local(world, _run_worker, yamls, [str(d) for d in run_dirs], run_id="test-run")
    return [run_losses(d) for d in run_dirs]


def assert_close_run(got_losses, got_params, ref_losses, ref_params, rtol=1e-5, label=""):
    """Per-step losses within `rtol` relative; each parameter tensor within `rtol` relative in norm.

    Parameters are compared tensor-wise (||got - ref|| / ||ref||): a parallel run sums the same terms in
    another order, and AdamW turns the fp32 rounding of a near-zero gradient element into a full-size
    update of that one element, so element-wise relative error is no measure of a pass's exactness.
    """
    assert len(got_losses) == len(ref_losses), label
    torch.testing.assert_close(
        torch.tensor(got_losses),
        torch.tensor(ref_losses),
        rtol=rtol,
        atol=0,
        msg=lambda m: f"{label}: losses differ\n{m}",
    )
    assert set(got_params) == set(ref_params), f"{label}: parameter names differ"
    for name, ref in ref_params.items():
        err = relative_error(got_params[name], ref)
        assert err <= rtol, f"{label}: parameter {name} differs by {err:.2e} relative (limit {rtol:.0e})"


def relative_error(got, ref) -> float:
    """||got - ref|| / ||ref|| of two numbers or tensors, in float64 (a tensor in norm, as `assert_close_run` compares)."""
    got, ref = torch.as_tensor(got, dtype=torch.float64), torch.as_tensor(ref, dtype=torch.float64)
    return float((got - ref).norm() / ref.norm().clamp_min(1e-30))
