"""Measure how much distributed-optimizer communication runs behind compute, with torch.profiler.

    python3 tools/overlap.py --out runs/overlap parallel=single parallel.dp=2             # any lcgraph-train overrides
    torchrun --nproc-per-node 8 tools/overlap.py --out runs/ov model=llama3_1b train.device=cuda \\
        train.dtype=bf16 data.synthetic=true data.seq_len=32768 parallel=single parallel.dp=2 parallel.sp=4

Each rank runs `--warmup` steps, then `--steps` steps under torch.profiler, and writes
trace_rank<r>.json (open in https://ui.perfetto.dev). Rank 0 prints, per rank and collective (the
gradient reduce-scatter, the parameter all-gather), the time it ran, the share of it that ran beside
compute (`lcgraph/observability/overlap.py` says how each backend's spans are found), and whether the first bucket's
reduce-scatter was issued before the step's last backward returned (the runtime's own events); all of
it goes to overlap.json. The plan is validated before any rank starts; under torchrun every rank
joins, otherwise the ranks are spawned here (NCCL on CUDA, gloo on CPU).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def issued_before_last_backward(job) -> bool | None:
    """The runtime's own record: the first rs_issue precedes the return of the step's last backward."""
    events = getattr(job.optimizer, "events", [])
    issues = [t for what, _, _, t in events if what == "rs_issue"]
    ends = [t for what, _, _, t in events if what == "backward_end"]
    return (min(issues) < max(ends)) if issues and ends else None


def profile_rank(cfg_yaml: str, out: str, warmup: int, steps: int) -> None:
    """One rank: train `warmup` steps, profile `steps` more, write its trace; rank 0 gathers the report."""
    import torch.distributed as dist
    from omegaconf import OmegaConf
    from torch.profiler import ProfilerActivity, profile

    from lcgraph.app.cli import backend_for, init_distributed, share_cores
    from lcgraph.app.config import typed
    from lcgraph.app.job import Job, resolve_plan
    from lcgraph.observability.overlap import analyze

    cfg = typed(OmegaConf.create(cfg_yaml))
    world = int(os.environ.get("WORLD_SIZE", 1))
    cuda = backend_for(cfg.train) == "nccl"
    share_cores()
    if world > 1:
        init_distributed(cfg.train)
    rank = dist.get_rank() if world > 1 else 0
    try:
        job = Job(cfg, Path(out), rank, world, plan=resolve_plan(cfg))
        for step in range(warmup):
            job.run_step(step)
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
        with profile(activities=activities) as prof:
            times = [job.run_step(warmup + i)["step_time_s"] for i in range(steps)]
        path = Path(out) / f"trace_rank{rank}.json"
        prof.export_chrome_trace(str(path))
        found = analyze(json.loads(path.read_text()))
        mine = {
            "rank": rank,
            "steps": steps,
            "step_time_s": sum(times) / steps,
            "issued_before_last_backward": issued_before_last_backward(job),
            "rs_actions": sum(a.kind == "RS" for a in job.interpreter.program),
            "ag_actions": sum(a.kind == "AG" for a in job.interpreter.program),
            **{name: o.as_dict() for name, o in found.items()},
        }
        everyone = [mine]
        if world > 1:
            everyone = [None] * world
            dist.all_gather_object(everyone, mine)
        if rank == 0:
            report(everyone, Path(out))
    finally:
        if world > 1:
            dist.destroy_process_group()


def report(ranks: list[dict], out: Path) -> None:
    (out / "overlap.json").write_text(json.dumps({"ranks": ranks}, indent=1) + "\n")
    print(
        f"{'rank':>4} {'collective':>14} {'device':>6} {'ops':>5} {'comm ms':>9} {'beside compute ms':>17} "
        f"{'overlap':>7} {'compute ms':>10}"
    )
    for r in ranks:
        for name in ("reduce_scatter", "all_gather"):
            o = r[name]
            print(
                f"{r['rank']:>4} {name:>14} {o['device']:>6} {o['count']:>5} {o['comm_s'] * 1e3:>9.2f} "
                f"{o['overlapped_s'] * 1e3:>17.2f} {o['fraction']:>7.1%} {o['compute_s'] * 1e3:>10.1f}"
            )
    issued = [r["issued_before_last_backward"] for r in ranks]
    print(
        f"first reduce-scatter issued before the last backward returned, per rank: {issued}; "
        f"mean step {sum(r['step_time_s'] for r in ranks) / len(ranks) * 1e3:.1f} ms over {ranks[0]['steps']} "
        "profiled steps"
    )
    if not any(r["reduce_scatter"]["count"] for r in ranks):
        print(
            "no reduce-scatter ran: the distributed optimizer shards over dp*sp replicas, so this layout needs dp*sp > 1"
        )
    print(f"wrote {out / 'overlap.json'} and trace_rank*.json")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="runs/overlap", help="directory for traces and overlap.json")
    parser.add_argument("--warmup", type=int, default=2, help="steps before the profiled ones")
    parser.add_argument(
        "--steps",
        type=int,
        default=2,
        help="profiled steps (all-gathers overlap the forward of the step after their issue)",
    )
    parser.add_argument("overrides", nargs="*", help="lcgraph-train config overrides")
    args = parser.parse_args(argv)

    from omegaconf import OmegaConf

    from lcgraph.app.cli import launch_local, one_line_errors
    from lcgraph.app.config import compose_config
    from lcgraph.app.validate import validate_plan

    cfg = compose_config(args.overrides + [f"train.steps={args.warmup + args.steps}"])
    with one_line_errors("overlap", sweep_goes_on=False):
        validate_plan(cfg)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    text = OmegaConf.to_yaml(cfg, resolve=True)
    world = cfg.parallel.pp * cfg.parallel.dp * cfg.parallel.sp
    if "LOCAL_RANK" in os.environ or world == 1:
        profile_rank(text, args.out, args.warmup, args.steps)
    else:
        launch_local(world, profile_rank, text, args.out, args.warmup, args.steps, run_id="overlap")


if __name__ == "__main__":
    main()
