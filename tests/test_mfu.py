"""MFU has one definition (lcgraph.planner.mfu) and training plans for the GPU it runs on (lcgraph.planner.devices).

MFU = (6*N + 6*L*h*S) x tokens/s per GPU / the GPU's dense datasheet peak: checked against a hand computation
for Llama-3.2-1B at 128k on an H200, through each reader (the trainer's per-step figures, the planner's summary,
tools/bench.py's table). The GPU a rank runs on is faked by name and memory: the recompute planner must see an
H200's 139.8 GiB, not the default profile's 80 GiB.
"""

import dataclasses
import importlib.util
import sys
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig

from lcgraph.app.job import resolve_plan
from lcgraph.app.testing import TINY, compose, job_of, planned, run_config
from lcgraph.graph.capture import capture
from lcgraph.planner import plan
from lcgraph.planner.costs import GraphCosts, Layout
from lcgraph.planner.devices import gpu_profile
from lcgraph.planner.mfu import RunPerf, model_flops_per_token
from lcgraph.planner.profile import load_profile
from lcgraph.runtime.model import build_config

GiB = 2**30
H200 = ("NVIDIA H200", 150_109_880_320)  # torch.cuda.get_device_name / total_memory on one H200
H100 = ("NVIDIA H100 80GB HBM3", 85_520_809_984)
DATASHEET_BF16 = 989.4e12  # H100 / H200 SXM dense bf16 (1,979 TFLOP/s with 2:4 sparsity)
DATASHEET_FP32 = 67e12

# Llama-3.2-1B (16 layers, hidden 2048, 32 heads of 64, 8 kv heads, ffn 8192, vocab 128256) at 131,072 tokens:
#   per layer  q, o: 2 * 2048 * 2048 = 8,388,608   k, v: 2 * 2048 * 512 = 2,097,152   MLP: 3 * 2048 * 8192 = 50,331,648
#   N = 16 * 60,817,408 + 2048 * 128,256 (head) = 973,078,528 + 262,668,288 = 1,235,746,816
#   6N = 7,414,480,896;  6*L*h*S = 6 * 16 * 2048 * 131,072 = 25,769,803,776
LLAMA1B_128K_FLOPS_PER_TOKEN = 33_184_284_672
TOKENS_PER_S = 10_196.0  # one H200, lcgraph-train +recipe=llama1b_128k_1gpu
HAND_MFU = LLAMA1B_128K_FLOPS_PER_TOKEN * TOKENS_PER_S / DATASHEET_BF16  # 0.342


def _bench():
    path = Path(__file__).resolve().parents[1] / "tools" / "bench.py"
    spec = importlib.util.spec_from_file_location("bench", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench"] = module
    spec.loader.exec_module(module)
    return module


def test_mfu_of_llama1b_at_128k_on_an_h200_is_the_hand_computation_in_trainer_and_bench():
    config = build_config(compose("+recipe=llama1b_128k_1gpu", tiny=False).model)
    flops = model_flops_per_token(config, 131_072)
    assert flops == LLAMA1B_128K_FLOPS_PER_TOKEN
    assert HAND_MFU == pytest.approx(0.342, abs=1e-3)

    perf = RunPerf(flops, 1, "bf16", gpu_profile(*H200))
    step = perf.step({"tokens": 131_072, "step_time_s": 131_072 / TOKENS_PER_S}, torch.device("cpu"))
    assert step["mfu"] == pytest.approx(HAND_MFU, rel=1e-9)
    assert step["tflops_per_gpu"] == pytest.approx(LLAMA1B_128K_FLOPS_PER_TOKEN * TOKENS_PER_S / 1e12, rel=1e-9)
    # the figure over the measured matmul rate is reported beside MFU, under its own name
    measured = load_profile("h200").matmul_flops
    assert step["of_measured_matmul_peak"] == pytest.approx(flops * TOKENS_PER_S / measured, rel=1e-9)
    # two ranks at twice the tokens/s: the same MFU per GPU
    assert RunPerf(flops, 2, "bf16", gpu_profile(*H200)).at(2 * TOKENS_PER_S)["mfu"] == pytest.approx(HAND_MFU)
    # fp32 runs divide by the fp32 datasheet peak
    assert RunPerf(flops, 1, "fp32", gpu_profile(*H100)).at(100.0)["mfu"] == pytest.approx(flops * 100 / DATASHEET_FP32)

    bench = _bench()
    peak_tflops = bench.datasheet_tflops(H200[0])
    rows = [{"seq": 131_072, "label": "lcgraph", "side": {"kind": "lcgraph"}, "result": {"tokens_per_s": TOKENS_PER_S}}]
    bench.summarize(rows, config, peak_tflops)
    assert rows[0]["result"]["mfu"] == pytest.approx(HAND_MFU, rel=1e-9)


def test_an_unknown_gpu_reports_tflops_but_no_mfu():
    perf = RunPerf(1e9, 1, "bf16", gpu_profile("NVIDIA GeForce RTX 4090", 25_393_692_672))
    assert set(perf.at(1000.0)) == {"tflops_per_gpu"}
    line = perf.peak_line()
    assert "no MFU" in line and "\n" not in line


@pytest.fixture(scope="module")
def tiny_capture():
    config = LlamaConfig(
        vocab_size=512,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    return capture(config)


def test_the_planners_mfu_is_the_hand_formula_over_the_datasheet_peak(tiny_capture):
    graph = GraphCosts.from_captured(tiny_capture, "bf16")
    for name in ("h100", "h200", "a100"):
        ev = plan.evaluate(graph, load_profile(name), Layout(), [4], 4096, "1f1b", 1)
        s = ev.summary()
        per_token = 6 * (4 * (64 * (2 * 64 + 2 * 32) + 3 * 64 * 128) + 64 * 512) + 6 * 4 * 64 * 4096
        peak = {"h100": DATASHEET_BF16, "h200": DATASHEET_BF16, "a100": 312e12}[name]
        assert s["mfu"] == pytest.approx(per_token * s["tokens_per_s_per_gpu"] / peak, rel=1e-9), name


def test_gpus_are_matched_by_name_and_planned_with_their_real_memory():
    h200 = gpu_profile(*H200)
    assert (h200.profile.name, h200.profile.memory_bytes, h200.exact) == ("h200", H200[1], True)
    h100 = gpu_profile(*H100)
    assert (h100.profile.name, h100.profile.memory_bytes, h100.exact) == ("h100", H100[1], True)
    a100 = gpu_profile("NVIDIA A100-SXM4-40GB", 42_505_273_344)
    assert (a100.profile.name, a100.profile.memory_bytes) == ("a100", 42_505_273_344)
    # an unknown GPU: the shipped profile nearest in memory, with its own memory, said in one line
    other = gpu_profile("NVIDIA RTX PRO 6000 Blackwell Server Edition", 102_000_000_000)
    assert (other.profile.name, other.profile.memory_bytes, other.exact) == ("h100", 102_000_000_000, False)
    assert "no profile" in other.note and "\n" not in other.note
    nvl = gpu_profile("NVIDIA H200 NVL", 150_000_000_000)  # another part: not the SXM profile's peak
    assert not nvl.exact and nvl.profile.name == "h200" and nvl.profile.memory_bytes == 150_000_000_000
    # +plan.device names the rates; the memory is still the GPU's
    asked = gpu_profile(*H200, requested="h100")
    assert (asked.profile.name, asked.profile.memory_bytes) == ("h100", H200[1])


def test_recompute_auto_plans_with_the_memory_of_the_gpu_it_runs_on(tiny_capture):
    """A layout whose `none` peak (~100 GiB) fits an H200 but not an 80 GB GPU: auto keeps everything on the
    H200 and recomputes on the H100; without a GPU (CPU, lcgraph-plan) the default profile (h100) decides."""

    def cfg(seq: int):
        return planned(
            *TINY,
            f"data.seq_len={seq}",
            f"model.max_position_embeddings={seq}",
            "train.recompute=auto",
            "train.dtype=bf16",
        )

    def none_peak(seq: int) -> float:
        c = cfg(seq)
        st = plan.setup(c, tiny_capture)
        return max(plan.evaluate_config(c, st, dataclasses.replace(st.layout, recompute="none")).sim.rank_peak)

    lo, hi = none_peak(1 << 20), none_peak(1 << 21)  # the peak grows linearly with the tokens
    seq = int((1 << 20) + (100 * GiB - lo) / (hi - lo) * (1 << 20)) // 1024 * 1024
    assert 0.9 * 80 * GiB < none_peak(seq) < 0.9 * H200[1], none_peak(seq) / GiB

    on_h200 = plan.resolve_recompute(cfg(seq), tiny_capture, gpu_profile(*H200))
    assert on_h200.mode == "none", on_h200.reason
    assert "NVIDIA H200 (139.8 GiB)" in on_h200.reason and "125.8G usable of h200" in on_h200.reason
    on_h100 = plan.resolve_recompute(cfg(seq), tiny_capture, gpu_profile(*H100))
    assert on_h100.mode != "none", on_h100.reason
    assert plan.resolve_recompute(cfg(seq), tiny_capture).mode != "none"  # no GPU: +plan.device's default, h100


def test_the_trainers_steps_and_summary_report_the_formula_on_a_faked_h200(tmp_path, monkeypatch):
    """cli.run on CPU with the GPU lookup faked as one H200: every step's MFU and the summary's (at the summary's
    own tokens/s, tokens over time of the second half, as bench counts it) are the formula over the fp32 datasheet
    peak of an H200, 67 TFLOP/s (the run is fp32)."""
    import json

    from lcgraph.app import cli

    monkeypatch.setattr(cli, "device_gpu", lambda device: gpu_profile(*H200))
    cfg = run_config("train.steps=4")
    summary = cli.run(cfg, str(tmp_path), plan=resolve_plan(cfg))
    flops = model_flops_per_token(build_config(cfg.model), cfg.data.seq_len)
    steps = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    for m in steps:
        assert m["mfu"] == pytest.approx(flops * m["tokens"] / m["step_time_s"] / DATASHEET_FP32, rel=1e-9)
    tail = steps[2:]
    tokens_per_s = sum(m["tokens"] for m in tail) / sum(m["step_time_s"] for m in tail)
    assert summary["tokens_per_s"] == pytest.approx(tokens_per_s, rel=1e-9)
    assert cfg.train.dtype == "fp32"
    assert summary["mfu"] == pytest.approx(flops * tokens_per_s / DATASHEET_FP32, rel=1e-9)


def test_a_job_resolves_auto_recompute_with_the_gpu_it_runs_on(tmp_path, monkeypatch):
    """The trainer resolves `auto` with its device's profile (faked here as one H200), and the planner's note says so."""
    from lcgraph.app import job as job_module

    asked = []

    def fake_gpu(device, requested=None):
        asked.append((device.type, requested))
        return gpu_profile(*H200, requested)

    monkeypatch.setattr(job_module, "device_gpu", fake_gpu)
    job = job_of(run_config("train.recompute=auto", "+plan.alternatives=false"), tmp_path)
    assert asked == [("cpu", None)]
    assert job.recompute_reason.startswith("planned for NVIDIA H200 (139.8 GiB): profile h200;"), job.recompute_reason
    assert "125.8G usable of h200" in job.recompute_reason
