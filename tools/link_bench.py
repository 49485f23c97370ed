"""Time the two links the planner models between GPUs of one node: a pipeline send/receive and a Ulysses all-to-all.

    python3 tools/link_bench.py --gpus 2 --json out/links.json        # NCCL, one process per GPU
    python3 tools/link_bench.py --gpus 2 --json /tmp/links.json --mib 1 4   # gloo on CPU: checks the tool

p2p: rank 0 sends one message of each size to rank 1 (one batch_isend_irecv, as a pipeline stage sends its
hidden state). all_to_all: every rank exchanges `size` bytes with the others (all_to_all_single, as Ulysses
moves Q, K, V and the output). Each case: `--warmup` untimed, then the mean of `--iters` timed repeats. Rows
give `moved_bytes`, the bytes the planner divides by the link's figure (p2p: the message; all-to-all: the
share a rank sends to the others, size x (n-1)/n), so tools/fit_links.py fits figure = moved_bytes / time.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch
import torch.distributed as dist


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn, device: torch.device, warmup: int, iters: int) -> float:
    for _ in range(warmup):
        fn()
    _sync(device)
    dist.barrier()
    start = time.perf_counter()
    for _ in range(iters):
        fn()
    _sync(device)
    return (time.perf_counter() - start) / iters


def worker(rank: int, world: int, port: int, sizes: list[float], warmup: int, iters: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", rank=rank, world_size=world, device_id=device)
    else:
        dist.init_process_group("gloo", rank=rank, world_size=world)
    rows = []
    for mib in sizes:
        numel = int(mib * 2**20) // 2 // world * world
        buf = torch.ones(numel, dtype=torch.bfloat16, device=device)
        recv = torch.empty_like(buf)

        def p2p() -> None:
            if rank in (0, 1):
                op = dist.P2POp(dist.isend, buf, 1) if rank == 0 else dist.P2POp(dist.irecv, recv, 0)
                for w in dist.batch_isend_irecv([op]):
                    w.wait()

        def a2a() -> None:
            dist.all_to_all_single(recv, buf)

        nbytes = numel * 2
        t = _timed(p2p, device, warmup, iters)
        rows.append({"kind": "p2p", "ranks": 2, "bytes": nbytes, "moved_bytes": nbytes, "seconds": t})
        t = _timed(a2a, device, warmup, iters)
        moved = nbytes * (world - 1) / world
        rows.append({"kind": "all_to_all", "ranks": world, "bytes": nbytes, "moved_bytes": moved, "seconds": t})
    if rank == 0:
        name = torch.cuda.get_device_name(device) if cuda else "cpu"
        meta = {"device": name, "backend": dist.get_backend(), "torch": torch.__version__, "gpus": world}
        meta["nccl"] = ".".join(map(str, torch.cuda.nccl.version())) if cuda else None
        meta["date"] = time.strftime("%Y-%m-%d")
        Path(out).write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
        for r in rows:
            print(
                f"{r['kind']:10s} {r['bytes'] / 2**20:8.1f} MiB {r['seconds'] * 1e3:9.3f} ms "
                f"{r['moved_bytes'] / r['seconds'] / 1e9:8.1f} GB/s"
            )
    dist.destroy_process_group()


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gpus", type=int, default=2, help="ranks (GPUs; CPU processes without CUDA)")
    ap.add_argument("--mib", type=float, nargs="+", default=[4, 16, 64, 128, 256], help="message sizes, MiB")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--port", type=int, default=29561)
    ap.add_argument("--json", required=True)
    args = ap.parse_args(argv)
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    torch.multiprocessing.spawn(
        worker, (args.gpus, args.port, args.mib, args.warmup, args.iters, args.json), nprocs=args.gpus
    )


if __name__ == "__main__":
    main()
