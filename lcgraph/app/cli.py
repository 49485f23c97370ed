"""`lcgraph-train`: the Hydra app. Validates the plan, launches the ranks, runs the training loop.

Plain `lcgraph-train` with pp*dp*sp > 1 spawns the ranks itself through torch's elastic launcher (the
engine behind torchrun); under torchrun (LOCAL_RANK set) every rank runs this same app and rank 0's
run directory is shared with the others.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from omegaconf import DictConfig

from lcgraph.app.config import register_configs
from lcgraph.app.job import Job, prepare_data
from lcgraph.app.paths import conf_dir
from lcgraph.app.validate import validate_plan
from lcgraph.errors import LaunchError, LcgraphError, full_tracebacks
from lcgraph.observability.graphs import comm_times, write_measured_timeline
from lcgraph.observability.metrics import RunLogger
from lcgraph.runtime import checkpoint, faults
from lcgraph.runtime.model import build_config
from lcgraph.schedule.programs import format_programs

os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")  # long sequences fragment the cache


def fail(message: str, mode=None, prog: str = "lcgraph") -> None:
    """One line for the user; in a multirun, the job fails and the sweep goes on."""
    print(f"{prog}: error: {message}", file=sys.stderr)
    from hydra.types import RunMode

    if mode == RunMode.MULTIRUN:
        raise RuntimeError(message)
    sys.exit(2)


@contextlib.contextmanager
def one_line_errors(prog: str = "lcgraph", sweep_goes_on: bool = True):
    """A user's error (an LcgraphError: a plan that cannot work, a missing file) ends the app with one line.

    Anything else is a bug and keeps its traceback; LCGRAPH_TRACEBACK=1 shows user errors' tracebacks too.
    """
    try:
        yield
    except LcgraphError as exc:
        if full_tracebacks():
            raise
        from hydra.core.hydra_config import HydraConfig

        fail(str(exc), HydraConfig.get().mode if sweep_goes_on else None, prog)


def hydra_app(task) -> None:
    """Run `task(cfg)` as a Hydra app over lcgraph's config groups and recipes (lcgraph-train, lcgraph-plan)."""
    import hydra

    register_configs()
    hydra.main(version_base=None, config_path=str(conf_dir()), config_name="config")(task)()


def launch_local(world: int, entry, *args, run_id: str = "lcgraph") -> None:
    """Run `entry(*args)` on `world` local ranks with torch's elastic launcher (the engine behind torchrun)."""
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    config = LaunchConfig(
        min_nodes=1,
        max_nodes=1,
        nproc_per_node=world,
        run_id=f"{run_id}-{os.getpid()}",
        rdzv_backend="c10d",
        rdzv_endpoint="127.0.0.1:0",
        max_restarts=0,
        monitor_interval=0.1,
        start_method="spawn",
    )
    elastic_launch(config, entry)(*args)


def run(cfg: DictConfig, run_dir: str, rank: int = 0, world: int = 1) -> dict:
    """The training loop of one rank; rank 0 writes metrics, W&B, progress, summary."""
    run_path = Path(run_dir)
    job = Job(cfg, run_path, rank, world)
    logger = RunLogger(cfg, run_path, enabled=rank == 0)
    if rank == 0:
        (run_path / "programs.txt").write_text(format_programs(job.programs, job.spec).rstrip("\n") + "\n")
        logger.note(
            f"layers per stage {job.layer_counts}, chunks {job.chunk_lengths}, "
            f"capture {job.captured.capture_seconds:.1f}s"
        )
    start = 0
    resume = checkpoint.resume_path(cfg.train.resume, run_path)
    if resume is not None:
        start = checkpoint.load_checkpoint(job, resume)
        logger.note(f"resumed from {resume} at step {start}")
    every, saves = cfg.train.checkpoint_every, run_path / checkpoint.CHECKPOINTS
    end = max(start, cfg.train.steps)
    with faults.graceful_stop(cfg.train.comm_timeout_s):  # SIGTERM/SIGINT: finish the step, checkpoint, exit 0
        for step in range(start, cfg.train.steps):
            metrics = job.run_step(step)
            logger.log({**metrics, **comm_times(job.interpreter.timeline)})  # the timeline holds this step
            faults.check_replicas(job, step)  # every train.check_every steps
            if job.stopping:
                end = step + 1
                logger.note(f"stop requested: checkpoint at step {end}, then exit")
                break
            if every and (step + 1) % every == 0 and step + 1 < cfg.train.steps:
                checkpoint.save_checkpoint(job, saves, step + 1)
        checkpoint.save_checkpoint(job, saves, end)
    measured = write_measured_timeline(job, run_path, world)  # collective: every rank
    summary = logger.finish(extra={**_memory_summary(job, world), **measured})
    return summary


def _memory_summary(job: Job, world: int) -> dict:
    # on the job's device: an NCCL group has no CPU backend
    peaks = torch.zeros(job.coords.pp * job.cfg.parallel.virtual_stages, dtype=torch.float64, device=job.device)
    for s, v in job.activation_peaks().items():
        peaks[s] = v
    if world > 1:
        dist.all_reduce(peaks, op=dist.ReduceOp.MAX)
    out: dict[str, int | list[int]] = {"activation_peak_bytes_per_stage": [int(v) for v in peaks.tolist()]}
    if job.device.type == "cuda":
        out["cuda_peak_bytes"] = int(torch.cuda.max_memory_allocated(job.device))
    return out


def backend_for(cfg: DictConfig) -> str:
    """The torch.distributed backend of a run: NCCL on GPUs, gloo on CPU."""
    return "nccl" if cfg.train.device != "cpu" and torch.cuda.is_available() else "gloo"


def init_distributed(cfg: DictConfig) -> None:
    """Join the process group; on GPUs first bind this rank to its own device (LOCAL_RANK).

    NCCL refuses two ranks on one GPU, and every collective before the first CUDA call (the run
    directory broadcast, barriers) would otherwise run on device 0 in every process.
    """
    backend = backend_for(cfg)
    timeout = datetime.timedelta(seconds=cfg.train.comm_timeout_s)
    if backend != "nccl":
        dist.init_process_group(backend, timeout=timeout)
        return
    local = int(os.environ.get("LOCAL_RANK", 0))
    if local >= torch.cuda.device_count():
        raise LaunchError(
            f"local rank {local} has no GPU: this node has {torch.cuda.device_count()}; start one process per GPU"
        )
    torch.cuda.set_device(local)
    # LCGRAPH_NCCL_EAGER_INIT=0: communicators are created at first use instead of here
    eager = os.environ.get("LCGRAPH_NCCL_EAGER_INIT", "1") != "0"
    dist.init_process_group(backend, timeout=timeout, device_id=torch.device("cuda", local) if eager else None)


def share_cores() -> None:
    """Local CPU ranks split the machine's cores instead of each taking all of them."""
    local = int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // local))


def _worker(cfg_yaml: str, run_dir: str) -> None:
    """Entry of a spawned rank (elastic launcher) or of a torchrun rank."""
    from omegaconf import OmegaConf

    cfg = OmegaConf.create(cfg_yaml)
    assert isinstance(cfg, DictConfig)  # the YAML of a composed config: a mapping
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    share_cores()
    init_distributed(cfg)
    try:
        run(cfg, run_dir, rank, world)
    finally:
        dist.destroy_process_group()
    faults.exit_if_stopped()


def spawn(cfg: DictConfig, run_dir: str, world: int) -> None:
    """Start `world` local ranks with torch's elastic launcher and wait for them."""
    from omegaconf import OmegaConf

    with faults.explained_failures([Path(run_dir)], cfg.train.comm_timeout_s):  # a dead or stuck rank: one line
        launch_local(world, _worker, OmegaConf.to_yaml(cfg, resolve=True), run_dir)


def train_main(cfg: DictConfig) -> None:
    """Validate, then run in this process, spawn the ranks, or join torchrun's."""
    from hydra.core.hydra_config import HydraConfig

    if os.environ.get("SUBMITIT_EXECUTOR") == "slurm" and "WORLD_SIZE" not in os.environ:
        import submitit  # SLURM through hydra-submitit-launcher: each task joins as a torchrun-style rank

        submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False)
    with one_line_errors():
        validate_plan(cfg)
    run_dir = HydraConfig.get().runtime.output_dir
    with one_line_errors():
        check_resume(cfg, Path(run_dir))
    world = cfg.parallel.pp * cfg.parallel.dp * cfg.parallel.sp
    with one_line_errors():
        if "LOCAL_RANK" in os.environ and int(os.environ.get("WORLD_SIZE", 1)) > 1:
            _join_torchrun(cfg, run_dir)
        elif world > 1:
            _check_gpus(cfg, world)
            prepare_data(cfg)  # one tokenizer pass here, not one per rank
            spawn(cfg, run_dir, world)
            _print_summary(run_dir)
        else:
            run(cfg, run_dir)
    if int(os.environ.get("RANK", 0)) == 0:
        print(f"run directory: {run_dir}")


def check_resume(cfg: DictConfig, run_dir: Path) -> None:
    """A `train.resume` that names no complete checkpoint, or one of another model shape: refused before any rank starts."""
    path = checkpoint.resume_path(cfg.train.resume, run_dir)
    if path is not None:
        checkpoint.check_model(path, build_config(cfg.model))


def _check_gpus(cfg: DictConfig, world: int) -> None:
    """lcgraph's own launcher starts every rank on this node: on GPUs, one per GPU."""
    gpus = torch.cuda.device_count()
    if backend_for(cfg) == "nccl" and world > gpus:
        raise LaunchError(
            f"pp*dp*sp = {world} ranks but this node has {gpus} GPUs (NCCL runs one rank per GPU); "
            f"lower the layout to {gpus} ranks, use train.device=cpu, or launch on more nodes "
            "with torchrun"
        )


def _join_torchrun(cfg: DictConfig, run_dir: str) -> None:
    init_distributed(cfg)
    shared = [run_dir]
    dist.broadcast_object_list(shared, src=0)  # all ranks use rank 0's run directory
    try:
        run(cfg, shared[0], dist.get_rank(), dist.get_world_size())
    finally:
        dist.destroy_process_group()


def _print_summary(run_dir: str) -> None:
    path = Path(run_dir) / "summary.json"
    if path.is_file():
        s = json.loads(path.read_text())
        print(f"final loss {s.get('final_loss'):.4f}, {s.get('tokens_per_s', 0):.0f} tokens/s")


def main() -> None:
    hydra_app(train_main)


if __name__ == "__main__":
    main()
