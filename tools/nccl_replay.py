"""Replay pipeline programs on real NCCL, with stand-in compute, to see which ones hang.

The NCCL model (lcgraph/schedule/nccl.py) is a claim about the hardware; this is the experiment that
tests it. Each rank of a `pp`-GPU job walks its program as the runtime issues it: every p2p group is one
`batch_isend_irecv` of `--mbytes` messages, a compute first waits for the receive that feeds it and
then runs a matmul loop of about `--compute-ms`, OPT waits for every send. A case that does not finish
within `--timeout` seconds is a hang. Programs come in three forms:

    built       what lcgraph issues (`add_p2p`: grouped, receive-ahead, mirrored)
    unmirrored  grouped (and receive-ahead) but not mirrored: the form that hung on 2 H200s
    ungrouped   every transfer its own batch: the classic 1F1B deadlock

    python3 tools/nccl_replay.py --pp 2 --schedules gpipe,1f1b,interleaved_1f1b --forms built,unmirrored
(pp GPUs, or gloo on CPU to check the tool; NCCL_BUFFSIZE is set small so that every message waits for its receiver).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lcgraph.schedule import nccl  # noqa: E402
from lcgraph.schedule.actions import P2P_KINDS, Program, ScheduleError, ScheduleSpec, issue_units  # noqa: E402
from lcgraph.schedule.p2p import add_p2p, group_p2p, receive_ahead, ungroup_p2p, with_transfers  # noqa: E402
from lcgraph.schedule.programs import build_programs  # noqa: E402


def programs_in_form(spec: ScheduleSpec, form: str) -> list[Program]:
    if form == "built":
        return add_p2p(build_programs(spec), spec)
    grouped = [group_p2p(with_transfers(p, spec)) for p in build_programs(spec)]
    if spec.virtual_stages > 1:
        grouped = [receive_ahead(p) for p in grouped]
    return grouped if form == "unmirrored" else [ungroup_p2p(p) for p in grouped]


def model_verdict(spec: ScheduleSpec, form: str) -> str:
    try:
        nccl.check(programs_in_form(spec, form), spec)
        return "passes"
    except ScheduleError as error:
        return "rejects: " + str(error).splitlines()[1].strip()[:120]


def wait_once(works: list, waited: set[int]) -> None:
    """Each work once: a second wait on a finished gloo receive never returns."""
    for w in works:
        if id(w) not in waited:
            w.wait()
            waited.add(id(w))


def worker(case: dict) -> None:
    rank = int(os.environ["RANK"])
    if torch.cuda.is_available():
        torch.cuda.set_device(rank)
        device = torch.device("cuda", rank)
        dist.init_process_group("nccl", device_id=device)
    else:  # gloo on CPU: checks the tool itself (gloo's sends never wait, so nothing hangs there)
        device = torch.device("cpu")
        dist.init_process_group("gloo")
    spec = ScheduleSpec(case["schedule"], case["pp"], case["m"], case["k"], case["v"])
    program = programs_in_form(spec, case["form"])[rank]
    numel = int(case["mbytes"] * 2**20) // 2
    n = 2048 if device.type == "cuda" else 64  # CPU: only the tool's mechanics are under test
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16) / n**0.5
    sends, pending, waited = [], {}, set()
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    start = time.perf_counter()
    for unit in issue_units(program):
        head = unit[0]
        if head.kind in P2P_KINDS:
            ops = []
            for x in unit:
                buf = torch.ones(numel, device=device, dtype=torch.bfloat16)
                ops.append(dist.P2POp(dist.isend if x.kind.startswith("SEND") else dist.irecv, buf, x.peer))
            works = dist.batch_isend_irecv(ops)
            sends += works
            for x in unit:
                if x.kind.startswith("RECV"):
                    pending[(x.kind[-1], x.stage, x.mb, x.chunk)] = works
        elif head.kind in ("F", "B"):
            wait_once(pending.pop((head.kind, head.stage, head.mb, head.chunk), []), waited)
            for _ in range(case["matmuls"]):
                a = (a @ a).clamp_(-1, 1)
        elif head.kind == "OPT":
            wait_once(sends, waited)
    done = torch.ones(1, device=device)
    dist.all_reduce(done)
    sync()
    if rank == 0:
        print(json.dumps({"seconds": time.perf_counter() - start}), flush=True)
    dist.destroy_process_group()


def run_case(case: dict, timeout: float) -> tuple[str, float]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(case["pp"]))
    env.setdefault("NCCL_BUFFSIZE", "262144")
    procs = [
        subprocess.Popen(
            [sys.executable, __file__, "--worker", json.dumps(case)],
            env=dict(env, RANK=str(r), LOCAL_RANK=str(r)),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for r in range(case["pp"])
    ]
    start = time.perf_counter()
    try:
        outs = [p.communicate(timeout=max(1.0, timeout - (time.perf_counter() - start)))[0] for p in procs]
    except subprocess.TimeoutExpired:
        for p in procs:
            p.kill()
        return "HANG", time.perf_counter() - start
    if any(p.returncode for p in procs):
        tail = " | ".join(o.strip().splitlines()[-1] for o in outs if o.strip())
        return f"ERROR {tail[:200]}", time.perf_counter() - start
    return "ok", json.loads(outs[0].strip().splitlines()[-1])["seconds"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--pp", type=int, default=2)
    parser.add_argument("--schedules", default="gpipe,1f1b,seq1f1b,interleaved_1f1b")
    parser.add_argument("--forms", default="built,unmirrored")
    parser.add_argument("--microbatches", type=int, default=4)
    parser.add_argument("--mbytes", type=float, default=32.0, help="message size, MiB")
    parser.add_argument("--matmuls", type=int, default=20, help="stand-in compute per F/B (2048^2 bf16 matmuls)")
    parser.add_argument("--timeout", type=float, default=60.0)
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()
    if args.worker:
        worker(json.loads(args.worker))
        return
    rows = []
    for schedule in args.schedules.split(","):
        k = 2 if schedule == "seq1f1b" else 1
        v = 2 if schedule == "interleaved_1f1b" else 1
        spec = ScheduleSpec(schedule, args.pp, args.microbatches, k, v)
        for form in args.forms.split(","):
            case = dict(schedule=schedule, pp=args.pp, m=args.microbatches, k=k, v=v, form=form)
            case.update(mbytes=args.mbytes, matmuls=args.matmuls)
            result, seconds = run_case(case, args.timeout)
            rows.append(dict(case, hardware=result, seconds=round(seconds, 2), model=model_verdict(spec, form)))
            print(f"{schedule:17s} {form:11s} hardware: {result:5s} ({seconds:6.2f} s)   model: {rows[-1]['model']}")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
