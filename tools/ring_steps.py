"""Ring attention's block steps on one GPU: what a rank's ring steps cost against one Ulysses-only call.

    python3 tools/ring_steps.py --out out/ring_steps.json                  # head shape 128:8/1, 32k..128k, cp 2..8
    python3 tools/ring_steps.py --device cpu --seq 1024 --cp 2 --heads 4 --kv-heads 2 --head-dim 16 --out x.json

For each (per-rank queries S/cp, cp): forward + backward of `ring.simulate` (every cp rank's steps in one process,
payloads read, not sent: the same step functions a ring rank runs) divided by cp, against `attention.attend` +
`attend_backward` of the whole sequence divided by cp (the ideal split). `overhead` is their ratio: smaller
blocks, the LSE merges and the row copies. Each row also gives one step's K/V payload and its transfer time at
the NVLink and InfiniBand bandwidths of the shipped H200 profile, and a step's forward + backward (averaged) against
its sends (the payload twice and the fp32 dK/dV once): the ring hides its p2p while the compute is the longer. `--device cpu` checks the script end to end.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from lcgraph.ops import attention, ring
from lcgraph.planner.profile import load_profile


def _zigzag(cp: int, rank: int, length: int) -> torch.Tensor:
    c = length // (2 * cp)
    return torch.cat(
        [torch.arange(rank * c, (rank + 1) * c), torch.arange((2 * cp - 1 - rank) * c, (2 * cp - rank) * c)]
    )


def _timed(fn, device: torch.device, repeats: int) -> float:
    fn()  # warm-up: cuDNN plans, allocator
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return (time.perf_counter() - start) / repeats


def measure(seq: int, cp: int, heads: int, kv: int, d: int, device: torch.device, dtype, repeats: int) -> dict:
    torch.manual_seed(0)
    q = torch.randn(1, heads, seq, d, device=device, dtype=dtype)
    k, v = (torch.randn(1, kv, seq, d, device=device, dtype=dtype) for _ in range(2))
    grad = torch.randn_like(q)
    scale = d**-0.5
    owns = [_zigzag(cp, r, seq).to(device) for r in range(cp)]
    qs, ks, vs, gs = ([t[:, :, o] for o in owns] for t in (q, k, v, grad))

    def whole():
        saved = attention.attend(q, k, v, scale)
        attention.attend_backward(grad, q, k, v, saved, scale)

    def ring_steps():
        ring.simulate(qs, ks, vs, gs, scale)

    full_s = _timed(whole, device, repeats) / cp
    ring_s = _timed(ring_steps, device, repeats) / cp
    profile = load_profile("h200")
    payload = 2 * kv * (seq // cp) * d * q.element_size()  # one step's K and V of one layer
    sends = 4 * payload  # per step: the payload forward, again backward with its fp32 dK/dV accumulators
    return {
        "seq": seq,
        "cp": cp,
        "queries_per_rank": seq // cp,
        "ulysses_only_s": full_s,
        "ring_s": ring_s,
        "overhead": ring_s / full_s,
        "payload_bytes": payload,
        "send_nvlink_s": payload / profile.intra_node_bw,
        "send_ib_s": payload / profile.inter_node_bw,
        "mean_step_s": ring_s / cp,  # one step's forward + backward, averaged over the cp steps
        "step_sends_nvlink_s": sends / profile.intra_node_bw,
        "step_sends_ib_s": sends / profile.inter_node_bw,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument(
        "--seq", type=int, nargs="+", default=[32768, 65536, 131072], help="whole sequence (all cp ranks)"
    )
    parser.add_argument("--cp", type=int, nargs="+", default=[2, 4, 8])
    parser.add_argument("--heads", type=int, default=8, help="query heads of one Ulysses rank")
    parser.add_argument("--kv-heads", type=int, default=1)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    rows = []
    for seq in args.seq:
        for cp in args.cp:
            row = measure(seq, cp, args.heads, args.kv_heads, args.head_dim, device, dtype, args.repeats)
            rows.append(row)
            print(
                f"seq {seq:>7} cp {cp}: ring {row['ring_s'] * 1e3:8.2f} ms/rank, Ulysses-only share "
                f"{row['ulysses_only_s'] * 1e3:8.2f} ms ({row['overhead']:.2f}x); payload {row['payload_bytes'] / 2**20:.1f} "
                f"MiB; a step {row['mean_step_s'] * 1e3:.2f} ms against its sends {row['step_sends_nvlink_s'] * 1e3:.2f} ms "
                f"NVLink, {row['step_sends_ib_s'] * 1e3:.2f} ms IB",
                flush=True,
            )
    meta = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
