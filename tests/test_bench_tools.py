"""The GPU benchmark tools' CPU-side parts: tools/attention_kernels.py end to end on CPU kernels (each candidate
against the exact fp32 reference, GQA included; its ring steps), and tools/bench.py's table arithmetic on a hand-made result list
(speed against each peer, the targets asked for, the memory target of the peer's peak plus 8 bytes per parameter),
tools/calibrate.py's refit of saved measurements; every run tools/multi_gpu.py and the several-GPU tests
(tests/test_gpu_multi.py) make composes and validates on CPU, and multi_gpu.py's ratios and targets."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

from lcgraph.app.config import compose_config
from lcgraph.app.testing import compose
from lcgraph.app.validate import validate_plan
from lcgraph.runtime.model import build_config

ROOT = Path(__file__).resolve().parents[1]
TOOLS = ROOT / "tools"


def _tool(name: str):
    spec = importlib.util.spec_from_file_location(name, TOOLS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses resolve their annotations through sys.modules
    spec.loader.exec_module(module)
    return module


def test_attention_kernel_sweep_on_cpu_matches_the_exact_reference_for_every_shape_with_gqa(tmp_path):
    kernels = _tool("attention_kernels")
    argv = ["--device", "cpu", "--configs", "16:4/2", "--causal-seq", "256", "--prefix", "128:384"]
    out = kernels.main([*argv, "--diagonal", "128", "--json", str(tmp_path / "k.json")])
    assert json.loads((tmp_path / "k.json").read_text())["rows"] == out["rows"]
    cpu = [r for r in out["rows"] if r["candidate"] == "cpu"]
    assert sorted((r["shape"], r["sq"], r["sk"]) for r in cpu) == [
        ("causal", 256, 256),
        ("diagonal", 128, 128),
        ("prefix", 128, 384),
    ]
    for r in cpu:  # fp32 kernels: agreement to rounding, in output, LSE and all three gradients
        diffs = {k: v for k, v in r.items() if k.startswith("diff_")}
        assert set(diffs) == {"diff_out", "diff_lse", "diff_dq", "diff_dk", "diff_dv"}
        assert max(diffs.values()) < 1e-4, (r["shape"], diffs)
        assert r["fwd_tflops"] > 0 and r["bwd_tflops"] > 0
    assert {r["gqa"] for r in out["rows"] if r["candidate"] == "math"} == {"expanded"}
    assert set(out["best"]) == {kernels.Case(16, 4, 2, r["shape"], r["sq"], r["sk"]).name for r in cpu}


def test_attention_kernels_times_lcgraph_attention_under_a_document_mask_on_cpu(tmp_path):
    """`--documents`: lcgraph's own attention over log-normal documents, timed, its FLOPs the kept pairs only
    (counted here from the ids the tool drew), and the case's best backend named."""
    kernels = _tool("attention_kernels")
    argv = ["--device", "cpu", "--configs", "16:4/2", "--causal-seq", "--prefix", "--diagonal"]
    out = kernels.main([*argv, "--documents", "64", "--document-seq", "512", "--json", str(tmp_path / "k.json")])
    (row,) = out["rows"]
    ids = kernels.document_ids(512, 64)
    lengths = torch.unique_consecutive(ids[0], return_counts=True)[1]
    kept = int((lengths * (lengths + 1) // 2).sum())
    assert row["candidate"] == "math" and row["documents"] == len(lengths) > 2
    assert row["kept"] == pytest.approx(kept / (512 * 513 / 2))
    assert row["fwd_tflops"] == pytest.approx(4 * 4 * 16 * kept / (row["fwd_ms"] / 1e3) / 1e12)
    assert out["best"]["d16 4/2 documents of 64 in 512"]["candidate"] == "math"


def test_attention_kernels_ring_steps_on_cpu_time_every_length_and_ring_size(tmp_path):
    """`--ring-steps`: one row per (length, cp) with a rank's queries, one step's K/V payload and both times."""
    kernels = _tool("attention_kernels")
    argv = ["--ring-steps", "--device", "cpu", "--configs", "16:4/2", "--ring-seq", "256", "--cp", "2", "4"]
    out = kernels.main([*argv, "--repeats", "1", "--json", str(tmp_path / "r.json")])
    assert json.loads((tmp_path / "r.json").read_text()) == out and out["meta"]["device"] == "cpu"
    assert [(r["seq"], r["cp"], r["queries_per_rank"]) for r in out["rows"]] == [(256, 2, 128), (256, 4, 64)]
    for r in out["rows"]:
        assert r["payload_bytes"] == 2 * 2 * r["queries_per_rank"] * 16 * 4  # K and V, 2 heads, fp32
        assert r["ring_s"] > 0 and r["overhead"] == pytest.approx(r["ring_s"] / r["ulysses_only_s"])
        assert r["step_sends_nvlink_s"] == pytest.approx(4 * r["send_nvlink_s"])


def _row(seq, side, **result):
    return {"seq": seq, "label": side.label, "side": side.__dict__, "result": result}


def test_bench_table_gives_speed_per_peer_and_targets_with_oom_and_checkpointing_said():
    bench = _tool("bench")
    config = build_config(compose("model=llama3_1b", tiny=False).model)
    args = bench.parser().parse_args(
        ["--variant", "chunked", "--chunks", "32", "--recompute", "keep_attention", "--target-speed", "1.25"]
        + ["--target-mfu", "0.47", "--extra-bytes", "8"]
    )
    liger, hf, lcg = bench.sides_from_args(args)
    assert (liger.kind, hf.kind, lcg.chunks, lcg.recompute) == ("liger", "hf", 32, "keep_attention")
    assert "train.recompute=keep_attention" in lcg.overrides([])
    ckpt = bench.Side("liger", checkpointing=True)
    rows = [
        _row(16384, liger, tokens_per_s=40000.0, peak_gib=26.0),
        _row(16384, hf, tokens_per_s=32000.0, peak_gib=60.0),
        _row(16384, lcg, tokens_per_s=50000.0, peak_gib=34.0, held_gib=18.4),
        _row(262144, ckpt, tokens_per_s=5000.0, peak_gib=46.0, plain_oom=True),
        _row(262144, hf, oom=True),
        _row(262144, lcg, tokens_per_s=6000.0, peak_gib=60.0),
    ]
    bench.summarize(rows, config, peak_tflops=798.0, targets=bench.targets_from_args(args))
    n_params = 1_235_814_400  # Llama-3.2-1B, tied head (HF's own count for this shape)
    short, long = rows[2], rows[5]
    assert short["speed_x"] == pytest.approx({"liger": 1.25, "hf": 50000 / 32000})
    assert short["memory_target_gib"] == pytest.approx(26.0 + 8 * n_params / 2**30)
    assert short["targets"] == {"speed>=1.25x": True, "MFU>=0.47": True, "memory": True}  # MFU 0.66 here
    assert long["speed_x"] == pytest.approx({"liger": 1.2})  # HF eager ran out of memory: no ratio
    flops = 6 * (16 * (2048 * (2 * 2048 + 2 * 512) + 3 * 2048 * 8192) + 2048 * 128256) + 6 * 16 * 2048 * 262144
    assert long["result"]["mfu"] == pytest.approx(6000 * flops / 798e12)
    assert long["targets"] == {"speed>=1.25x": False, "MFU>=0.47": False, "memory": False}

    from rich.console import Console

    console = Console(width=250, record=True)
    console.print(bench.render(rows, "t"))
    text = console.export_text()
    assert "HF+Liger +ckpt" in text and "plain OOM" in text and "OOM" in text.split("HF eager")[-1]
    assert "speed>=1.25x MISSED" in text and "speed>=1.25x ok" in text
    assert "held GiB" in text and "34.0 │     18.4" in text  # the held column beside the peak; "-" if not measured


def test_calibrate_refits_saved_measurements_to_the_factor_that_made_them(tmp_path):
    """`calibrate.py --measured` replans earlier runs; its fit must recover the saved-activation and traffic
    factors a run really had: here the 'measurements' are the planner's own at compiled factors 0.5 / 0.6."""
    import dataclasses

    from lcgraph.planner.profile import load_profile

    calibrate = _tool("calibrate")
    base = load_profile("h200")
    truth = dataclasses.replace(
        base,
        traffic_factor={**base.traffic_factor, "compiled": 0.6},
        saved_factor={**base.saved_factor, "compiled": 0.5},
    )
    args = calibrate.overrides(16384, 1, "none", True)
    run = {
        "name": "16k none compiled",
        "args": args,
        "compiled": True,
        "measured": calibrate.predict(args, "h200", truth),
    }
    saved = tmp_path / "calibration.json"
    saved.write_text(json.dumps({"gpu": "NVIDIA H200", "rows": [run]}))
    gpu, rows = calibrate.measured_rows([str(saved)], "h200")
    fitted = calibrate.fit(calibrate.table(rows), "h200")
    assert gpu == "NVIDIA H200"
    assert fitted.saved_factor["compiled"] == pytest.approx(0.5, abs=0.002)
    assert fitted.traffic_factor["compiled"] == pytest.approx(0.6, abs=0.002)
    assert fitted.saved_factor["eager"] == base.saved_factor["eager"]  # no eager run: left as it was


def _valid_on_cpu(overrides: list[str]) -> None:
    """Compose as lcgraph-train does, then validate with the CPU standing in for the GPUs."""
    cfg = compose_config(overrides)
    cfg.train.device, cfg.train.allow_oversubscribe = "cpu", True
    validate_plan(cfg, env={})


def test_every_several_gpu_test_config_composes_and_validates():
    spec = importlib.util.spec_from_file_location("test_gpu_multi", ROOT / "tests" / "test_gpu_multi.py")
    gm = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gm)
    for overrides in [gm.PP_1F1B, gm.SP_OWN, *([*gm.FAMILY_BASE, *f] for f in gm.FAMILIES.values())]:
        _valid_on_cpu([*gm.SHAPE, gm.TIMEOUT, *overrides])


@pytest.mark.parametrize("gpus", [2, 4, 8])
def test_every_multi_gpu_run_composes_and_validates(gpus):
    mg = _tool("multi_gpu")
    runs = [o for rows in mg.experiments(gpus).values() for _, o in rows]
    widths = set()
    for overrides in runs:
        _valid_on_cpu([*mg.MODEL, *overrides, "train.steps=4"])
        cfg = compose_config([*mg.MODEL, *overrides])
        widths.add(cfg.parallel.pp * cfg.parallel.sp * cfg.parallel.dp * cfg.parallel.cp)
    assert max(widths) == gpus and 1 in widths


def test_multi_gpu_ratios_and_targets_on_hand_made_rows():
    mg = _tool("multi_gpu")

    def row(label, tps, peaks, pred_tps):
        measured = {"tokens_per_s": tps, "peak_gib_per_gpu": peaks, "final_loss": 11.0}
        return {
            "label": label,
            "measured": measured,
            "predicted": {"tokens_per_s": pred_tps, "peak_gib_per_gpu": [60.0]},
        }

    pipe = [row("1f1b", 40000.0, [80.0, 40.0], 44000.0), row("seq1f1b", 44000.0, [60.0, 45.0], 66000.0)]
    verdict = mg.compare("pipeline32k", pipe)
    assert pipe[1]["vs_baseline"] == pytest.approx({"tokens_per_s": 1.1, "stage0_peak": 0.75})
    assert pipe[1]["pred_over_meas"] == pytest.approx({"tokens_per_s": 1.5, "stage0_peak": 1.0})
    assert verdict == {"target_met": True}
    pipe[1]["measured"]["peak_gib_per_gpu"][0] = 70.0  # 0.875x the memory: not the target
    assert mg.compare("pipeline32k", pipe) == {"target_met": False}
    uly = [row("1 GPU", 6000.0, [60.0], 6000.0), row("sp=2", 10200.0, [35.0, 35.0], 12000.0)]
    verdict = mg.compare("ulysses", uly)
    assert verdict["scaling_efficiency"] == pytest.approx(0.85) and not verdict["target_met"]
    assert "0.85" in mg.table("ulysses", uly, verdict)
