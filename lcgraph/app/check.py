"""`lcgraph-check --gpus N [--out DIR]`: check a machine's GPUs before training on them, and profile their links.

1. exactness: a few steps of the tiny test LLaMA in every layout N GPUs allow (pp, Seq1F1B, sp, dp, cp, and
   pp x sp, pp x sp x dp on 4 and 8) against one GPU: losses, gradient norms and final weights, each layout's
   largest relative difference against `--rtol`;
2. replay: every schedule family's pipeline programs on all N GPUs with stand-in compute and NCCL's buffers far
   smaller than the messages (lcgraph.app.replay): a wrong order of sends and receives hangs or fails here, fast;
3. links: p2p and all-to-all times, fitted into bandwidths, and the host link (lcgraph.app.links), written into
   DIR/profile.json, a copy of the GPU's device profile that `lcgraph-plan +plan.profile=DIR/profile.json` reads.

Without CUDA (or with `--backend gloo`) the same checks run on N gloo processes on CPU at small sizes. DIR gets
check.json (everything), replay.json, links.json, host_link.json, profile.json and nccl.png. Exit code 0: every
check passed; 1: one failed (the table says which and by how much); 2: a request that cannot run, in one line.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError, record

from lcgraph.app import links, replay
from lcgraph.app.cli import first_failure, init_distributed, launch_local, share_cores
from lcgraph.app.testing import compose, relative_error, train_local, train_spawned
from lcgraph.errors import LaunchError, LcgraphError, full_tracebacks
from lcgraph.planner.devices import device_gpu
from lcgraph.planner.profile import DeviceProfile, load_profile, profile_json
from lcgraph.runtime.config import TrainConfig

PROG = "lcgraph-check"
CHECKS = ("exactness", "replay", "links")
RTOL = {"nccl": 1e-3, "gloo": 3e-5}  # fp32 on GPU kernels that differ by layout; fp32 on CPU (as tests/ compare)
# per backend: replay message MiB and matmuls per compute; link sizes MiB; host copy MiB
SIZES = {
    "nccl": {"mbytes": 32.0, "matmuls": 20, "link_mib": [4, 16, 64, 128, 256], "host_mib": 1024},
    "gloo": {"mbytes": 0.25, "matmuls": 2, "link_mib": [1, 4, 16], "host_mib": 16},
}
REPLAY_BUFFSIZE = "262144"  # NCCL_BUFFSIZE of the replay: every 32 MiB message waits for its receiver
DATA = ["data.synthetic=true", "train.dtype=fp32"]
ONE = ["parallel.microbatches=4"]  # every layout below sees these 4 micro-batches (dp x microbatches = 4)
PP = ["parallel.pp=2", "parallel.schedule=1f1b", "parallel.seq_chunks=1", "parallel.microbatches=4"]
SEQ = ["parallel.schedule=seq1f1b", "parallel.seq_chunks=2", "parallel.chunk_split=uniform_comp"]
LAYOUTS: list[tuple[str, int, list[str]]] = [  # name, ranks, overrides
    ("pp=2 1f1b", 2, PP),
    ("pp=2 seq1f1b k=2", 2, ["parallel.pp=2", *SEQ, "parallel.microbatches=4"]),
    ("sp=2 (Ulysses)", 2, ["parallel.sp=2", "parallel.microbatches=4"]),
    ("dp=2 (ZeRO-1)", 2, ["parallel.dp=2", "parallel.microbatches=2"]),
    ("cp=2 (ring)", 2, ["parallel.cp=2", "parallel.microbatches=4"]),
    ("pp=2 x sp=2 seq1f1b", 4, ["parallel.pp=2", "parallel.sp=2", *SEQ, "parallel.microbatches=4"]),
    ("pp=2 x cp=2 1f1b", 4, [*PP, "parallel.cp=2"]),
    ("pp=2 x sp=2 x dp=2", 8, ["parallel.pp=2", "parallel.sp=2", "parallel.dp=2", *SEQ, "parallel.microbatches=2"]),
]


def layouts_for(gpus: int) -> list[tuple[str, int, list[str]]]:
    """The layouts `gpus` ranks can hold; one GPU: the launched rank against the in-process run."""
    if gpus == 1:
        return [("1 rank, launched", 1, ONE)]
    return [lay for lay in LAYOUTS if lay[1] <= gpus]


# --- the request -----------------------------------------------------------------------------------------------
def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog=PROG, description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--gpus", type=int, required=True, help="GPUs to check (gloo: CPU processes)")
    ap.add_argument("--out", type=Path, default=Path("runs/check"), help="directory for the results (runs/check)")
    ap.add_argument("--backend", choices=["auto", "nccl", "gloo"], default="auto", help="auto: nccl with CUDA")
    ap.add_argument("--only", nargs="+", choices=CHECKS, help="run these checks only (default: all)")
    ap.add_argument("--steps", type=int, default=3, help="training steps per layout (default 3)")
    ap.add_argument("--rtol", type=float, help="largest relative difference (default 1e-3 on nccl, 3e-5 on gloo)")
    ap.add_argument("--base", help="device profile the fitted links go into (default: the one of this GPU)")
    ap.add_argument("--timeout", type=int, default=120, help="seconds a collective may wait before it fails")
    return ap


def resolve_backend(requested: str) -> str:
    """nccl with CUDA GPUs, gloo without; a request for nccl without CUDA is refused."""
    cuda = torch.cuda.is_available()
    if requested == "nccl" and not cuda:
        raise LaunchError(
            "--backend nccl needs CUDA GPUs but torch sees none; run on a GPU machine or pass --backend gloo"
        )
    return requested if requested != "auto" else ("nccl" if cuda else "gloo")


def refuse_bad_request(gpus: int, backend: str, checks: list[str], explicit: bool) -> list[str]:
    """The checks to run, or a LaunchError naming the numbers and the fix (before any process starts)."""
    if gpus < 1:
        raise LaunchError(f"--gpus {gpus}: give the number of GPUs to check, 1 or more")
    if backend == "nccl" and gpus > (present := torch.cuda.device_count()):
        raise LaunchError(
            f"--gpus {gpus} but this machine has {present} CUDA GPU{'s' * (present != 1)} (NCCL runs one process "
            f"per GPU); pass --gpus {present} or fewer, or check more GPUs per machine with CUDA_VISIBLE_DEVICES"
        )
    if gpus == 1 and "replay" in checks:
        if explicit:
            raise LaunchError(
                "--gpus 1: the replay sends between pipeline stages on 2 GPUs; pass --gpus 2 or more, "
                "or --only exactness links"
            )
        checks = [c for c in checks if c != "replay"]
    return checks


# --- 1. exactness ----------------------------------------------------------------------------------------------
def exactness(gpus: int, device: str, steps: int, rtol: float, timeout: int) -> dict:
    """Each layout against one GPU (the parent process); one launch of ranks per layout width."""
    extra = [*DATA, f"train.device={device}", f"train.steps={steps}", f"train.comm_timeout_s={timeout}"]
    ref_losses, ref_params, ref_extra = train_local(compose(*ONE, *extra))
    del ref_extra["job"]  # its GPU memory goes back before the ranks start
    rows: list[dict[str, Any]] = []
    chosen = layouts_for(gpus)
    for width in sorted({ranks for _, ranks, _ in chosen}):
        group = [(name, overrides) for name, ranks, overrides in chosen if ranks == width]
        try:
            runs = train_spawned([compose(*o, *extra) for _, o in group], width)
        except ChildFailedError as exc:
            failure = _failure_line(exc)
            rows += [{"layout": name, "ranks": width, "error": failure, "passed": False} for name, _ in group]
            continue
        for (name, _), run in zip(group, runs):
            row: dict[str, Any] = {"layout": name, "ranks": width}
            row["loss"] = max(relative_error(a, b) for a, b in zip(run["losses"], ref_losses))
            row["grad_norm"] = max(relative_error(a, b) for a, b in zip(run["grad_norms"], ref_extra["grad_norms"]))
            if set(run["params"]) != set(ref_params):
                row["error"] = f"parameter names differ: {sorted(set(run['params']) ^ set(ref_params))[:4]}"
            else:
                row["weights"] = max(relative_error(run["params"][n], p) for n, p in ref_params.items())
            row["passed"] = "error" not in row and max(row["loss"], row["grad_norm"], row["weights"]) <= rtol
            rows.append(row)
    worst = max((max(r.get(k, 0.0) for k in ("loss", "grad_norm", "weights")) for r in rows), default=0.0)
    passed = bool(rows) and all(r["passed"] for r in rows)
    return {"rows": rows, "reference_losses": ref_losses, "max_rel_diff": worst, "rtol": rtol, "passed": passed}


def exactness_table(result: dict) -> str:
    lines = [f"{'layout':22s} {'ranks':>5s} {'loss':>9s} {'grad norm':>9s} {'weights':>9s}  result"]
    for r in result["rows"]:
        if "loss" in r and "weights" in r:
            diffs = f"{r['loss']:9.1e} {r['grad_norm']:9.1e} {r['weights']:9.1e}"
        else:
            diffs = f"{'-':>9s} {'-':>9s} {'-':>9s}"
        verdict = "ok" if r["passed"] else f"FAIL {r.get('error', '')}".strip()
        lines.append(f"{r['layout']:22s} {r['ranks']:5d} {diffs}  {verdict}")
    return "\n".join(lines)


# --- 2. replay and 3. links: one launch of N ranks each ------------------------------------------------------------
@record
def _comm_worker(task: dict, out: str) -> None:
    """Entry of a launched rank: the replay cases and/or the link benchmark `task` names."""
    share_cores()
    init_distributed(TrainConfig(device=task["device"], comm_timeout_s=task["timeout_s"]))
    nccl = dist.get_backend() == "nccl"
    device = torch.device("cuda", torch.cuda.current_device()) if nccl else torch.device("cpu")
    try:
        if task.get("replay"):
            cases = [replay.Case(**c) for c in task["replay"]]
            replay.replay_on_ranks(cases, device, task["mbytes"], task["matmuls"], Path(out) / "replay.json")
        if task.get("link_mib"):
            rows = links.bench_links(device, task["link_mib"], warmup=2, iters=5)
            if dist.get_rank() == 0:
                (Path(out) / "links.json").write_text(json.dumps({"rows": rows}, indent=1) + "\n")
    finally:
        dist.destroy_process_group()


def _failure_line(exc: ChildFailedError) -> str:
    rank, failure, message, _ = first_failure(exc)
    return f"rank {rank}: {str(message).strip().splitlines()[-1] if message else 'exit ' + str(failure.exitcode)}"


def launch(ranks: int, task: dict, out: Path, env: dict[str, str] | None = None) -> str | None:
    """`_comm_worker(task)` on `ranks` local ranks (with `env` set for them); None, or the first failure's line."""
    elastic = logging.getLogger("torch.distributed.elastic")
    level, before = elastic.level, {k: os.environ.get(k) for k in env or {}}
    elastic.setLevel(logging.CRITICAL)  # the failure is reported once, in the check's table
    os.environ.update(env or {})
    try:
        launch_local(ranks, _comm_worker, task, str(out), run_id="check")
        return None
    except ChildFailedError as exc:
        return _failure_line(exc)
    finally:
        elastic.setLevel(level)
        for k, v in before.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def base_profile(backend: str, requested: str | None) -> DeviceProfile:
    """The profile the fitted figures go into: `--base`, else the one of GPU 0 (its own memory), else h100."""
    gpu = device_gpu(torch.device("cuda", 0), requested) if backend == "nccl" else None
    if gpu is not None:
        return gpu.profile
    return load_profile(requested or "h100")


def meta(backend: str, gpus: int) -> dict:
    cuda = backend == "nccl"
    return {
        "date": time.strftime("%Y-%m-%d"),
        "ranks": gpus,
        "backend": backend,
        "device": torch.cuda.get_device_name(0) if cuda else "cpu",
        "torch": torch.__version__,
        "nccl": ".".join(map(str, torch.cuda.nccl.version())) if cuda else None,
    }


# --- the command -----------------------------------------------------------------------------------------------
def run_checks(args: argparse.Namespace, backend: str, checks: list[str]) -> dict:
    """Every chosen check in turn, each printed as it ends; everything also goes to DIR/check.json."""
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    for stale in ("replay.json", "links.json", "check.json"):
        (out / stale).unlink(missing_ok=True)
    sizes, device = SIZES[backend], "cuda" if backend == "nccl" else "cpu"
    info = meta(backend, args.gpus)
    result: dict = {"meta": info, "checks": checks}
    print(f"{PROG}: {args.gpus} x {info['device']} on {backend}, checks: {', '.join(checks)}; results in {out}")
    start = time.perf_counter()
    if "exactness" in checks:
        rtol = args.rtol or RTOL[backend]
        result["exactness"] = exactness(args.gpus, device, args.steps, rtol, args.timeout)
        print(f"\nexactness against one {'GPU' if backend == 'nccl' else 'process'}, {args.steps} steps, fp32:")
        print(exactness_table(result["exactness"]))
        ex = result["exactness"]
        verdict = "PASS" if ex["passed"] else "FAIL"
        print(
            f"exactness: {verdict} (max relative difference {ex['max_rel_diff']:.1e}, limit {rtol:.0e}; {_since(start)})"
        )
    task: dict = {"device": device, "timeout_s": args.timeout, **{k: v for k, v in sizes.items() if k != "link_mib"}}
    measure_links = "links" in checks and args.gpus >= 2
    if "replay" in checks:
        start = time.perf_counter()
        cases = replay.cases_for(args.gpus)
        replay_task = {**task, "replay": [asdict(c) for c in cases]}
        if backend == "gloo" and measure_links:  # no buffer size to set: one launch for both
            replay_task["link_mib"] = sizes["link_mib"]
            measure_links = False
        env = {"NCCL_BUFFSIZE": os.environ.get("NCCL_BUFFSIZE", REPLAY_BUFFSIZE), "NCCL_NVLS_ENABLE": "0"}
        failure = launch(args.gpus, replay_task, out, env)
        rows = replay.read_replay(out / "replay.json", cases, failure)
        result["replay"] = {"rows": rows, "passed": replay.replay_passed(rows) and failure is None}
        replay.draw_deadlock(out / "nccl.png")
        print(
            f"\nreplay of the programs of every schedule family on {args.gpus} ranks ({sizes['mbytes']} MiB messages):"
        )
        print(replay.replay_table(rows))
        print(f"replay: {'PASS' if result['replay']['passed'] else 'FAIL'} ({_since(start)})")
    if "links" in checks:
        result["links"] = measure(args, backend, task, out, measure_links, info)
    result["passed"] = all(result[c]["passed"] for c in checks)
    (out / "check.json").write_text(json.dumps(result, indent=1) + "\n")
    return result


def measure(args: argparse.Namespace, backend: str, task: dict, out: Path, launch_now: bool, info: dict) -> dict:
    """3. links (measured now, or read from the replay's launch) and the host link, fitted into DIR/profile.json."""
    start = time.perf_counter()
    failure = launch(args.gpus, {**task, "link_mib": SIZES[backend]["link_mib"]}, out) if launch_now else None
    path = out / "links.json"
    rows = json.loads(path.read_text())["rows"] if path.is_file() else []
    failure = failure or (None if rows or args.gpus < 2 else "no link times: the launch that measures them failed")
    device = torch.device("cuda", 0) if backend == "nccl" else torch.device("cpu")
    host = links.host_link(device, task["host_mib"])
    (out / "host_link.json").write_text(json.dumps(host, indent=1) + "\n")
    fits = links.fit(rows)
    base = base_profile(backend, args.base)
    profile = links.fitted_profile(base, fits, host, info)
    (out / "profile.json").write_text(profile_json(profile.to_dict()))
    print(f"\nlinks ({'p2p ranks 0 -> 1, all-to-all over all ' + str(args.gpus) if rows else 'host only'}):")
    print(links.links_table(fits, host, base))
    print(f"links: {'FAIL ' + failure if failure else 'measured'} ({_since(start)}); profile: {out / 'profile.json'}")
    return {"fits": fits, "host": host, "profile": str(out / "profile.json"), "passed": failure is None}


def _since(start: float) -> str:
    return f"{time.perf_counter() - start:.0f} s"


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        backend = resolve_backend(args.backend)
        checks = refuse_bad_request(args.gpus, backend, list(args.only or CHECKS), explicit=bool(args.only))
    except LcgraphError as exc:
        if full_tracebacks():
            raise
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2
    if args.gpus == 1 and "replay" not in checks and not args.only:
        print(f"{PROG}: one GPU: the replay and the p2p / all-to-all links need 2 and are skipped")
    result = run_checks(args, backend, checks)
    print(
        f"\n{PROG}: {'PASS' if result['passed'] else 'FAIL'}: "
        + ", ".join(f"{c} {'ok' if result[c]['passed'] else 'FAILED'}" for c in checks)
    )
    return 0 if result["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
