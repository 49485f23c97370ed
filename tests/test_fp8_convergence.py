"""tools/fp8_convergence.py end to end on CPU: a small LLaMA trained twice by the real trainer from the same seed,
`train.fp8=false` and `train.fp8=tensorwise` (the CPU build runs `torch._scaled_mm` too, in fp32); and its GPU
default composes and validates."""

from __future__ import annotations

import importlib.util
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from lcgraph.app.config import compose_config
from lcgraph.app.validate import validate_plan

TOOL = Path(__file__).resolve().parents[1] / "tools" / "fp8_convergence.py"
# lcgraph.app.testing's tiny test shape with 2 layers: CPU FP8 matmuls are slow, so they stay small
CPU_RUN = [
    "parallel=single",
    "model.hidden_size=64",
    "model.intermediate_size=128",
    "model.num_hidden_layers=2",
    "model.num_attention_heads=4",
    "model.num_key_value_heads=2",
    "model.vocab_size=512",
    "data.seq_len=64",
    "data.max_corpus_mb=0.3",
    "train.device=cpu",
    "train.dtype=fp32",
    "optim.warmup_steps=2",
]
STEPS, LAST = 8, 4


def _tool():
    spec = importlib.util.spec_from_file_location("fp8_convergence", TOOL)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("parallel", [False, True], ids=["one-after-the-other", "parallel"])
def test_fp8_convergence_trains_both_runs_from_one_start_and_its_verdict_is_the_numbers(tmp_path, parallel):
    out_json = tmp_path / "conv.json"
    argv = ["--steps", str(STEPS), "--last", str(LAST), "--out", str(tmp_path / "runs"), "--json", str(out_json)]
    argv += ["--parallel"] if parallel else []
    done = subprocess.run([sys.executable, str(TOOL), *argv, "--set", *CPU_RUN], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(out_json.read_text())
    bf16, fp8, meta = result["bf16"]["losses"], result["fp8"]["losses"], result["meta"]
    assert len(bf16) == len(fp8) == STEPS
    assert fp8[0] == pytest.approx(bf16[0], rel=1e-3)  # same seed, same first batch: FP8's rounding apart
    assert fp8 != bf16  # and FP8 was on
    assert "train.fp8=false" in meta["commands"]["bf16"] and "train.fp8=tensorwise" in meta["commands"]["fp8"]
    assert (meta["gpu"], meta["steps"], meta["recipe"], meta["last"]) == ("cpu", STEPS, "tensorwise", LAST)
    assert meta["torch"] and meta["transformers"] and meta["date"] and meta["parallel"] is parallel
    assert out_json.with_suffix(".png").stat().st_size > 0
    mean_bf16, mean_fp8 = (sum(x[-LAST:]) / LAST for x in (bf16, fp8))
    rel = (mean_fp8 - mean_bf16) / mean_bf16
    assert meta["rel_diff"] == pytest.approx(rel) and meta["nonfinite"] is False
    expected = "ok" if abs(rel) <= meta["tolerance"] else "MISSED"
    assert re.search(r"^verdict: (\w+)", done.stdout, re.M).group(1) == meta["verdict"] == expected
    assert f"{rel:+.2%}" in done.stdout


def test_the_verdict_misses_a_difference_past_the_tolerance_or_a_skipped_step():
    tool = _tool()
    assert tool.compare([5.0, 4.0], [5.0, 4.02], 1, 0.01, False)["verdict"] == "ok"
    assert tool.compare([5.0, 4.0], [5.0, 4.06], 1, 0.01, False)["verdict"] == "MISSED"
    assert tool.compare([5.0, 4.0], [5.0, 3.94], 1, 0.01, False)["verdict"] == "MISSED"  # better counts too
    assert tool.compare([5.0, 4.0], [5.0, 4.0], 1, 0.01, True)["verdict"] == "MISSED"
    assert tool.compare([5.0, 4.0], [5.0, float("nan")], 1, 0.01, False)["verdict"] == "MISSED"
    rows = [{"step": 1, "loss": 5.0}, {"step": 2, "loss": float("nan"), "skipped": True}, {"step": 3, "loss": 4.0}]
    assert tool.nonfinite_steps(rows) == [2]


def test_the_gpu_default_composes_and_validates():
    tool = _tool()
    for recipe in ("tensorwise", "rowwise"):
        cfg = compose_config([*tool.GPU_RUN, "train.steps=300", f"train.fp8={recipe}", *tool.FIXED])
        assert (cfg.model.hidden_size, cfg.data.seq_len, cfg.parallel.dp, cfg.train.dtype) == (2048, 8192, 1, "bf16")
        cfg.train.device = "cpu"  # the CPU stands in for the GPU
        validate_plan(cfg, env={})


def test_a_run_that_fails_ends_the_tool_with_its_error(tmp_path):
    argv = ["--steps", "2", "--out", str(tmp_path / "runs"), "--json", str(tmp_path / "conv.json")]
    done = subprocess.run(
        [sys.executable, str(TOOL), *argv, "--set", *CPU_RUN, "parallel.sp=3"], capture_output=True, text=True
    )
    assert done.returncode == 1 and "the bf16 run failed" in done.stderr
    assert "lcgraph: error: parallel.sp=3 must divide num_attention_heads=4" in done.stderr
    assert not (tmp_path / "conv.json").exists() and not (tmp_path / "runs" / "fp8.log").exists()


def test_a_baseline_from_an_earlier_result_is_reused_only_for_the_same_overrides(tmp_path):
    """--baseline takes the bf16 curve of an earlier result instead of training bf16 again, and refuses one that
    trained with other overrides (another curve)."""

    def tool(*argv: str, out: str, more: tuple[str, ...] = ()):
        cmd = [sys.executable, str(TOOL), "--steps", str(STEPS), "--last", str(LAST), "--out", str(tmp_path / out)]
        return subprocess.run([*cmd, *argv, "--set", *CPU_RUN, *more], capture_output=True, text=True)

    first = tool("--json", str(tmp_path / "first.json"), out="first")
    assert first.returncode == 0, first.stderr[-3000:]
    again = tool("--baseline", str(tmp_path / "first.json"), "--json", str(tmp_path / "again.json"), out="again")
    assert again.returncode == 0, again.stderr[-3000:]
    earlier, result = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("first", "again"))
    assert (
        result["bf16"] == earlier["bf16"] and result["meta"]["commands"]["bf16"] == earlier["meta"]["commands"]["bf16"]
    )
    trained = {"json": str(tmp_path / "first.json"), "gpu": "cpu"}
    trained |= {"torch": earlier["meta"]["torch"], "date": earlier["meta"]["date"]}
    assert result["meta"]["baseline"] == trained
    assert not (tmp_path / "again" / "bf16.log").exists()  # not trained again
    assert (tmp_path / "again" / "fp8.log").exists() and len(result["fp8"]["losses"]) == STEPS
    # a result that reused a curve passes on where that curve was trained, not its own run's GPU and date
    chained = tool("--baseline", str(tmp_path / "again.json"), "--json", str(tmp_path / "chained.json"), out="c")
    assert chained.returncode == 0, chained.stderr[-3000:]
    assert json.loads((tmp_path / "chained.json").read_text())["meta"]["baseline"] == trained
    argv = ("--baseline", str(tmp_path / "first.json"), "--json", str(tmp_path / "x.json"))
    other = tool(*argv, out="x", more=("optim.lr=1e-2",))
    assert other.returncode != 0 and "(it had none; this call has optim.lr=1e-2)" in other.stderr
    assert not (tmp_path / "x" / "fp8.log").exists()
