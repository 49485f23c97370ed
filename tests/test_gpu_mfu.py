"""One GPU: lcgraph-train's MFU is the shared formula over the GPU's datasheet peak, and bench reads the same
figure for the same tokens/s; train.recompute=auto plans for the GPU it runs on (its name, its memory).

    python -m pytest -m gpu tests/test_gpu_mfu.py      # about 2 minutes on one H200
"""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lcgraph.app.testing import cli_env, compose
from lcgraph.planner.devices import match_profile
from lcgraph.planner.mfu import model_flops_per_token
from lcgraph.planner.profile import load_profile
from lcgraph.runtime.model import build_config

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

ROOT = Path(__file__).resolve().parents[1]
RUN = [
    "model=llama3_1b",
    "model.num_hidden_layers=4",
    "parallel=single",
    "data.seq_len=16384",
    "data.synthetic=true",
    "train.dtype=bf16",
    "train.device=cuda",
    "train.steps=6",
    "train.recompute=auto",
    "train.progress=false",
    "logging.wandb.mode=disabled",
]
DATASHEET_BF16 = {"h100": 989.4e12, "h200": 989.4e12, "a100": 312e12}


def _bench():
    spec = importlib.util.spec_from_file_location("bench", ROOT / "tools" / "bench.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench"] = module
    spec.loader.exec_module(module)
    return module


def test_lcgraph_train_reports_the_mfu_bench_computes_for_the_same_run(tmp_path):
    name = torch.cuda.get_device_name()
    profile = match_profile(name)
    if profile is None:
        pytest.skip(f"{name}: no shipped profile, so no datasheet peak and no MFU")
    out = subprocess.run(
        [sys.executable, "-m", "lcgraph", *RUN, f"hydra.run.dir={tmp_path}"],
        capture_output=True,
        text=True,
        env=cli_env(),
        timeout=900,
        cwd=ROOT,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    steps = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    config = build_config(compose(*RUN, tiny=False).model)
    flops = model_flops_per_token(config, 16384)
    peak = DATASHEET_BF16[profile]

    # per step and in the summary: the formula over the datasheet peak, at that step's / the summary's tokens/s
    for m in steps:
        assert m["mfu"] == pytest.approx(flops * m["tokens"] / m["step_time_s"] / peak, rel=1e-9)
    assert summary["mfu"] == pytest.approx(flops * summary["tokens_per_s"] / peak, rel=1e-9)
    measured = load_profile(profile).matmul_flops
    assert summary["of_measured_matmul_peak"] == pytest.approx(flops * summary["tokens_per_s"] / measured, rel=1e-9)

    # tools/bench.py, given the same tokens/s, prints the same MFU
    bench = _bench()
    result = {"tokens_per_s": summary["tokens_per_s"]}
    rows = [{"seq": 16384, "label": "lcgraph", "side": {"kind": "lcgraph"}, "result": result}]
    bench.summarize(rows, config, bench.datasheet_tflops(name))
    assert rows[0]["result"]["mfu"] == pytest.approx(summary["mfu"], rel=1e-9)
    print(
        f"{name}: {summary['tokens_per_s']:.0f} tokens/s, MFU {summary['mfu']:.3f} (bench {rows[0]['result']['mfu']:.3f})"
    )

    # train.recompute=auto planned for this GPU: its name and its own memory, the profile its name matches
    total = torch.cuda.get_device_properties(0).total_memory
    assert f"planned for {name} ({total / 2**30:.1f} GiB): profile {profile}" in out.stdout, out.stdout[-2000:]
    assert f"usable of {profile}" in out.stdout
    assert f"datasheet peak of profile {profile}, {peak / 1e12:.1f} TFLOP/s" in out.stdout
