"""tools/slurm/lcgraph.sbatch as SLURM would run it: the script runs under bash with stand-ins for `scontrol` and
`srun` (which records the command it was given); torch's own torchrun parser reads that command, lcgraph's override
check reads what follows `-m lcgraph`, and the layout those overrides compose fills the nodes x GPUs it asks for."""

from __future__ import annotations

import os
import re
import stat
import subprocess
from pathlib import Path

from lcgraph.app.config import compose_config
from lcgraph.app.validate import check_launch, check_overrides

TEMPLATE = Path(__file__).resolve().parents[1] / "tools" / "slurm" / "lcgraph.sbatch"
NODES = ["gpu-a17", "gpu-a18"]  # scontrol's answer: the rendezvous must be on the first


def _stub(path: Path, body: str) -> None:
    path.write_text(f"#!/bin/bash\n{body}\n")
    path.chmod(path.stat().st_mode | stat.S_IXUSR)


def _sbatch(name: str) -> str:
    return re.search(rf"^#SBATCH --{name}=(\S+)$", TEMPLATE.read_text(), re.M).group(1)


def _srun_argv(tmp_path: Path, *args: str) -> list[str]:
    """The command the template hands srun, as srun would receive it."""
    bin_dir, out = tmp_path / "bin", tmp_path / "srun.argv"
    bin_dir.mkdir()
    _stub(bin_dir / "scontrol", f'[ "$1 $2" = "show hostnames" ] && printf "%s\\n" {" ".join(NODES)}')
    _stub(bin_dir / "srun", f'printf "%s\\0" "$@" > {out}')
    env = {
        **os.environ,
        "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
        "SLURM_JOB_NODELIST": "gpu-a[17-18]",
        "SLURM_NNODES": _sbatch("nodes"),
        "SLURM_JOB_ID": "31337",
    }
    subprocess.run(["bash", str(TEMPLATE), *args], env=env, cwd=tmp_path, check=True, timeout=60)
    return out.read_text().split("\0")[:-1]


def test_the_sbatch_template_runs_torchrun_as_torch_parses_it_with_overrides_lcgraph_accepts(tmp_path):
    from torch.distributed.run import get_args_parser

    argv = _srun_argv(tmp_path, "train.steps=100")
    assert argv[0] == "torchrun", argv
    args = get_args_parser().parse_args(argv[1:])
    nodes, gpus = int(_sbatch("nodes")), int(_sbatch("gpus-per-node"))
    assert (args.nnodes, args.nproc_per_node) == (str(nodes), str(gpus))
    assert (args.rdzv_backend, args.rdzv_id) == ("c10d", "31337")
    assert args.rdzv_endpoint == f"{NODES[0]}:{20000 + 31337 % 10000}"
    assert args.module and args.training_script == "lcgraph"
    overrides = args.training_script_args
    assert overrides[-1] == "train.steps=100" and "hydra.run.dir=runs/llama70b_1m-31337" in overrides
    check_overrides(overrides)
    cfg = compose_config([o for o in overrides if not o.startswith("hydra.")])
    check_launch(cfg, {"WORLD_SIZE": str(nodes * gpus), "LOCAL_WORLD_SIZE": str(gpus)}, gpus=gpus)
