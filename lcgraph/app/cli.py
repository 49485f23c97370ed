"""`lcgraph-train`: the Hydra app. Validates the plan, launches the ranks, runs the training loop.

Plain `lcgraph-train` with pp*dp*sp > 1 spawns the ranks itself through torch's elastic launcher (the
engine behind torchrun); under torchrun (LOCAL_RANK set) every rank runs this same app and rank 0's
run directory is shared with the others.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from omegaconf import DictConfig, OmegaConf
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError, record

from lcgraph.app.config import RunConfig, register_configs, typed
from lcgraph.app.job import Job, prepare_data, resolve_plan
from lcgraph.app.paths import conf_dir
from lcgraph.app.validate import check_overrides, validate_plan
from lcgraph.errors import LaunchError, LcgraphError, PlanError, RankError, full_tracebacks, user_error_names
from lcgraph.observability.measured import comm_times, write_measured_timeline
from lcgraph.observability.metrics import RunLogger, throughput
from lcgraph.planner.devices import device_gpu
from lcgraph.planner.mfu import RunPerf, model_flops_per_token
from lcgraph.planner.plan import Recompute
from lcgraph.runtime import checkpoint, faults
from lcgraph.runtime.config import TrainConfig
from lcgraph.runtime.model import build_config
from lcgraph.schedule.text import format_programs

os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")  # long sequences fragment the cache


def fail(message: str, mode=None, prog: str = "lcgraph") -> None:
    """One line for the user; in a multirun, the job fails and the sweep goes on.

    Under torchrun every rank runs this app: rank 0 prints the line, and each failing rank hands it to the
    elastic agent through TORCHELASTIC_ERROR_FILE, whose failure report shows it as the root cause (the
    rank that failed first, whichever it is) instead of "error_file: <N/A>"."""
    rank = int(os.environ.get("RANK", 0))
    if "LOCAL_RANK" in os.environ:  # a torchrun worker
        _tell_elastic_agent(f"{prog}: error: rank {rank}: {message}")
    if rank == 0:
        print(f"{prog}: error: {message}", file=sys.stderr)
    from hydra.types import RunMode

    if mode == RunMode.MULTIRUN:
        raise RuntimeError(message)
    sys.exit(2)


def _tell_elastic_agent(line: str) -> None:
    """Write `line` where torchrun's agent reads a worker's failure, in `record`'s format; the report prints
    py_callstack, which for a user's error is the line itself."""
    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if path:
        info = {"py_callstack": line, "timestamp": str(int(time.time()))}
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps({"message": {"message": line, "extraInfo": info}}))


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
    """Run `task(cfg)` as a Hydra app over lcgraph's config groups and recipes (lcgraph-train, lcgraph-plan); the
    command line's overrides are checked first (validate.check_overrides), so a typo is one line, not Hydra's."""
    import hydra
    from hydra._internal.utils import get_args_parser

    register_configs()
    args, _ = get_args_parser().parse_known_args(sys.argv[1:])
    try:
        check_overrides(args.overrides)
    except PlanError as exc:
        if full_tracebacks():
            raise
        fail(str(exc))
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


def run(cfg: RunConfig, run_dir: str, rank: int = 0, world: int = 1, *, plan: Recompute) -> dict:
    """The training loop of one rank (`plan`: `resolve_plan(cfg)`); rank 0 writes config.yaml, metrics, W&B,
    progress, summary."""
    run_path = Path(run_dir)
    job = Job(cfg, run_path, rank, world, plan=plan)
    resume = checkpoint.resume_path(cfg.train.resume, run_path)
    superseded = checkpoint.supersede_later(run_path, resume) if rank == 0 and resuming(cfg) else None
    start = checkpoint.load_checkpoint(job, resume) if resume is not None else 0
    if rank == 0:
        run_path.mkdir(parents=True, exist_ok=True)
        (run_path / "config.yaml").write_text(OmegaConf.to_yaml(cfg.composed))
    logger = RunLogger(
        cfg.logging, run_path, cfg.train.steps, cfg.train.progress, cfg.composed, rank == 0, resuming(cfg)
    )
    if superseded:
        logger.note(superseded)
    if rank == 0:
        (run_path / "programs.txt").write_text(format_programs(job.programs, job.spec).rstrip("\n") + "\n")
        logger.note(
            f"layers per stage {job.layer_counts}, chunks {job.chunk_lengths}, "
            f"capture {job.captured.capture_seconds:.1f}s, recompute {job.recompute}, offload {job.offload} "
            f"({job.recompute_reason})"
        )
    if resume is not None:
        logger.note(f"resumed from {resume} at step {start}")
    every, saves = cfg.train.checkpoint_every, run_path / checkpoint.CHECKPOINTS
    end = max(start, cfg.train.steps)
    flops, linear = (model_flops_per_token(job.config, seq) for seq in (cfg.data.seq_len, 0))
    perf = RunPerf(flops, world, cfg.train.dtype, device_gpu(job.device), attention_flops_per_token=flops - linear)
    if rank == 0 and (line := perf.peak_line()):
        logger.note(line)
    if rank == 0 and job.fp8_note:
        logger.note(job.fp8_note)
    with faults.graceful_stop(cfg.train.comm_timeout_s):  # SIGTERM/SIGINT: finish the step, checkpoint, exit 0
        for step in range(start, cfg.train.steps):
            if job.device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(job.device)
            metrics = job.run_step(step)
            metrics.update(perf.step(metrics, job.device))
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
    # the summary's MFU is that of its own tokens/s (tokens over time of the second half), as bench counts it
    whole_run = perf.at(throughput(logger.history), mean_kept(logger.history)) if logger.history else {}
    summary = logger.finish(extra={**_memory_summary(job, world), **measured, **whole_run})
    return summary


def resuming(cfg: RunConfig) -> bool:
    """Whether this run continues the one in its run directory (train.resume)."""
    return bool(cfg.train.resume)


def claim_run_dir(run_dir: Path, resume: bool) -> None:
    """Make metrics.jsonl exclusively: two runs never share a run directory; a resumed run appends to it."""
    run_dir.mkdir(parents=True, exist_ok=True)
    try:
        (run_dir / checkpoint.METRICS).open("x").close()
    except FileExistsError:
        if not resume:
            raise LaunchError(
                f"run directory {run_dir} already holds a run ({checkpoint.METRICS}); choose another hydra.run.dir "
                "or resume that run (train.resume)"
            ) from None


def mean_kept(history: list[dict]) -> float:
    """The share of causal attention pairs a document mask left, over the steps `throughput` reads (1 without)."""
    tail = history[len(history) // 2 :] or history
    return sum(m.get("attention_kept", 1.0) for m in tail) / len(tail)


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


def backend_for(train: TrainConfig) -> str:
    """The torch.distributed backend of a run: NCCL on GPUs, gloo on CPU."""
    return "nccl" if train.device != "cpu" and torch.cuda.is_available() else "gloo"


def init_distributed(train: TrainConfig) -> None:
    """Join the process group; on GPUs first bind this rank to its own device (LOCAL_RANK).

    NCCL refuses two ranks on one GPU, and every collective before the first CUDA call (the run
    directory broadcast, barriers) would otherwise run on device 0 in every process.
    """
    backend = backend_for(train)
    timeout = datetime.timedelta(seconds=train.comm_timeout_s)
    store = _attempt_store(timeout)
    if backend != "nccl":
        dist.init_process_group(backend, timeout=timeout, **store)
        return
    local = int(os.environ.get("LOCAL_RANK", 0))
    if local >= torch.cuda.device_count():
        raise LaunchError(
            f"local rank {local} has no GPU: this node has {torch.cuda.device_count()}; start one process per GPU"
        )
    torch.cuda.set_device(local)
    # LCGRAPH_NCCL_EAGER_INIT=0: communicators are created at first use instead of here
    eager = os.environ.get("LCGRAPH_NCCL_EAGER_INIT", "1") != "0"
    device = torch.device("cuda", local) if eager else None
    dist.init_process_group(backend, timeout=timeout, device_id=device, **store)


def _attempt_store(timeout: datetime.timedelta) -> dict:
    """Under a torch elastic agent, the process group's keys live under this attempt's prefix.

    The agent's store outlives a restart (`torchrun --max-restarts`), and the keys the dead attempt wrote stay
    in it: without a prefix, a restarted rank reads a dead rank's gloo address and fails to connect."""
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return {}
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    agent = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False, timeout=timeout)
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    return {"store": dist.PrefixStore(f"lcgraph/attempt_{attempt}", agent), "rank": rank, "world_size": world}


def share_cores() -> None:
    """Local CPU ranks split the machine's cores instead of each taking all of them."""
    local = int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // local))


@record  # the rank's exception and traceback go to TORCHELASTIC_ERROR_FILE, which the launcher reads
def _worker(cfg_yaml: str, run_dir: str, plan: Recompute) -> None:
    """Entry of a spawned rank (elastic launcher)."""
    composed = OmegaConf.create(cfg_yaml)
    assert isinstance(composed, DictConfig)  # the YAML of a composed config: a mapping
    cfg = typed(composed)
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    share_cores()
    init_distributed(cfg.train)
    try:
        run(cfg, run_dir, rank, world, plan=plan)
    finally:
        dist.destroy_process_group()
    faults.exit_if_stopped()


def spawn(cfg: RunConfig, run_dir: str, world: int, plan: Recompute) -> None:
    """Start `world` local ranks with torch's elastic launcher and wait for them.

    A rank's LcgraphError comes back as one RankError line naming the rank; its traceback is kept in
    RUN_DIR/rank<r>.traceback. Any other failure (a bug) is re-raised with its traceback."""
    elastic = logging.getLogger("torch.distributed.elastic")
    level = elastic.level
    elastic.setLevel(logging.CRITICAL)  # the failure is reported below, once
    try:
        with faults.explained_failures([Path(run_dir)], cfg.train.comm_timeout_s):  # a dead or stuck rank: one line
            try:
                launch_local(world, _worker, OmegaConf.to_yaml(cfg.composed), run_dir, plan)
            except ChildFailedError as exc:  # a user error in a rank: its one line, first
                error = rank_error(exc, Path(run_dir))
                if error is None:
                    raise
                raise error from None
    finally:
        elastic.setLevel(level)


def first_failure(exc: ChildFailedError) -> tuple[int, Any, str, str]:
    """The first failed rank of a launch: (rank, its failure record, its error message, its Python traceback)."""
    rank, failure = exc.get_first_failure()
    info = failure.error_file_data.get("message", {})
    message = info.get("message", failure.message) if isinstance(info, dict) else str(info)
    trace = info.get("extraInfo", {}).get("py_callstack", "") if isinstance(info, dict) else ""
    return rank, failure, message, trace


def rank_error(exc: ChildFailedError, run_dir: Path) -> RankError | None:
    """The first failed rank's user error as one line (None for a bug); its traceback goes to the run dir."""
    rank, _, message, trace = first_failure(exc)
    kept = run_dir / f"rank{rank}.traceback"
    if trace:
        run_dir.mkdir(parents=True, exist_ok=True)
        kept.write_text(trace)
    kind, _, text = message.partition(": ")
    if kind not in user_error_names():
        return None
    return RankError(f"rank {rank}: {text}" + (f" (traceback: {kept})" if trace else ""))


def train_main(composed: DictConfig) -> None:
    """Validate, then run in this process, spawn the ranks, or join torchrun's."""
    from hydra.core.hydra_config import HydraConfig

    if os.environ.get("SUBMITIT_EXECUTOR") == "slurm" and "WORLD_SIZE" not in os.environ:
        import submitit  # SLURM through hydra-submitit-launcher: each task joins as a torchrun-style rank

        submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False)
    with one_line_errors():
        validate_plan(composed, overrides=HydraConfig.get().overrides.task)
        cfg = typed(composed)  # the sections every room below reads, from here on
    run_dir = HydraConfig.get().runtime.output_dir
    with one_line_errors():
        check_resume(cfg, Path(run_dir))
    world = cfg.parallel.pp * cfg.parallel.dp * cfg.parallel.sp * cfg.parallel.cp
    with one_line_errors():
        torchrun = "LOCAL_RANK" in os.environ and int(os.environ.get("WORLD_SIZE", 1)) > 1
        if world > 1 and not torchrun:
            _check_gpus(cfg, world)
        # train.recompute / offload `auto` chosen once, before any rank or the run directory (under torchrun: by
        # each rank, for its own GPU; the ranks compare their plans before a step)
        plan = resolve_plan(cfg)
        if torchrun:
            _join_torchrun(cfg, run_dir, plan)
        elif world > 1:
            prepare_data(cfg)  # one tokenizer pass here, not one per rank
            claim_run_dir(Path(run_dir), resuming(cfg))
            spawn(cfg, run_dir, world, plan)
        else:
            claim_run_dir(Path(run_dir), resuming(cfg))
            run(cfg, run_dir, plan=plan)
    if int(os.environ.get("RANK", 0)) == 0:
        _print_summary(run_dir)
        print(f"run directory: {run_dir}")


def check_resume(cfg: RunConfig, run_dir: Path) -> None:
    """A `train.resume` that names no complete checkpoint, or one of another model shape: refused before any rank starts."""
    path = checkpoint.resume_path(cfg.train.resume, run_dir)
    if path is not None:
        checkpoint.check_model(path, build_config(cfg.model))


def _check_gpus(cfg: RunConfig, world: int) -> None:
    """lcgraph's own launcher starts every rank on this node: on GPUs, one per GPU."""
    gpus = torch.cuda.device_count()
    if backend_for(cfg.train) == "nccl" and world > gpus:
        raise LaunchError(
            f"pp*dp*sp*cp = {world} ranks but this node has {gpus} GPUs (NCCL runs one rank per GPU); "
            f"lower the layout to {gpus} ranks, use train.device=cpu, or launch on more nodes "
            "with torchrun"
        )


def _join_torchrun(cfg: RunConfig, run_dir: str, plan: Recompute) -> None:
    init_distributed(cfg.train)
    shared = [run_dir, ""]
    if dist.get_rank() == 0:
        try:
            claim_run_dir(Path(run_dir), resuming(cfg))
        except LaunchError as exc:
            shared[1] = str(exc)
    dist.broadcast_object_list(shared, src=0)  # all ranks use rank 0's run directory
    try:
        if shared[1]:
            raise LaunchError(shared[1])
        run(cfg, shared[0], dist.get_rank(), dist.get_world_size(), plan=plan)
    finally:
        dist.destroy_process_group()


def _print_summary(run_dir: str) -> None:
    """The final line: the figures the progress bar ended on (throughput over the second half), MFU, GPU peak."""
    path = Path(run_dir) / "summary.json"
    if not path.is_file():
        return
    s = json.loads(path.read_text())
    parts = [f"final loss {s.get('final_loss'):.4f}", f"{s.get('tokens_per_s', 0):.0f} tokens/s"]
    if "eval_loss" in s:
        parts.insert(1, f"eval loss {s['eval_loss']:.4f} (step {s['eval_step']})")
    if "tflops_per_gpu" in s:
        parts.append(f"{s['tflops_per_gpu']:.3g} TFLOP/s per GPU")
    if "mfu" in s:
        parts.append(f"MFU {100 * s['mfu']:.1f}%")
    if "of_measured_matmul_peak" in s:
        parts.append(f"{100 * s['of_measured_matmul_peak']:.1f}% of measured matmul peak")
    if "cuda_step_peak_bytes" in s:
        parts.append(f"peak {s['cuda_step_peak_bytes'] / 2**30:.1f} GiB")
    print(", ".join(parts))


def main() -> None:
    hydra_app(train_main)


if __name__ == "__main__":
    main()
