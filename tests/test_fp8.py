"""FP8 matmuls (train.fp8, ops/fp8.py, graph/fp8.py) against an independent implementation: torchao's float8
training linear (pytorch/ao), op by op and through training HF eager whose decoder linears torchao converted.

The scales are dynamic and cover what one call sees, so a layout that runs the whole sequence in one call (one
process, pp, dp, recompute, compile) rounds as the reference does: its first loss equals the reference's to fp32
rounding (the unquantized reference's does not). One that cuts it (Seq1F1B chunks, Ulysses, ring) scales each
piece by its own amax and stays within FP8's rounding of the reference (PIECES).
"""

from __future__ import annotations

import pytest
import torch
import torch.fx as fx
import torch.nn.functional as F
from test_reference import BF16, hf_reference, run_cfg

from lcgraph.app.testing import (
    assert_close_run,
    compose,
    planned,
    run_config,
    run_here,
    run_losses,
    train_local,
    train_spawned,
)
from lcgraph.app.validate import check_fp8
from lcgraph.errors import PlanError
from lcgraph.graph.capture import capture
from lcgraph.graph.fp8 import fp8_matmuls
from lcgraph.ops.fp8 import eager_note, fp8_linear, fp8_recipe, gpu_refusal
from lcgraph.planner.profile import load_profile
from lcgraph.runtime.checkpoint import CHECKPOINTS
from lcgraph.runtime.model import build_config

torchao_float8 = pytest.importorskip("torchao.float8")  # the test extra installs it

STEPS = 2  # the reference's schedule needs its warm-up; the checks read the first step
# rtol of (the first loss, the first gradient norm) against the reference. After the first update, AdamW turns an
# FP8 rounding flip of a near-zero gradient element into a full-size update of it: later steps tell nothing.
WHOLE = (1e-6, 2e-3)  # the same FP8 roundings in the forward; a flip here and there in backward (e5m2: 25% a step)
PIECES = (5e-4, 3e-2)  # each chunk or rank scaled by its own amax, not the whole sequence's
BF16_ROWWISE = (2e-3, 3e-2)  # bf16 weights and activations against the fp32 reference


def torchao_linears(recipe: str):
    """The reference's conversion: every decoder linear to torchao's Float8Linear, the LM head as it is."""
    config = torchao_float8.Float8LinearConfig.from_recipe_name(recipe)

    def prepare(model: torch.nn.Module) -> None:
        torchao_float8.convert_to_float8_training(model, config=config, module_filter_fn=lambda _, fqn: "layers" in fqn)
        assert sum(type(m).__name__ == "Float8Linear" for m in model.modules()) == 7 * model.config.num_hidden_layers

    return prepare


@pytest.mark.parametrize(
    "recipe,dtype",
    [
        ("tensorwise", torch.float32),
        ("tensorwise", torch.bfloat16),
        ("rowwise", torch.bfloat16),
        ("rowwise_with_gw_hp", torch.bfloat16),
    ],
)
def test_fp8_linear_is_torchaos_float8_linear_forward_and_backward(recipe, dtype):
    torch.manual_seed(0)
    # input features of magnitudes two decades apart: a scale per feature and one per tensor round differently
    weight = (torch.randn(96, 64) / 8 * torch.logspace(-1.5, 0.5, 64)).to(dtype).requires_grad_()
    x = (torch.randn(3, 37, 64) * 3).to(dtype)  # 111 tokens: no multiple of 16 on the CPU path
    grad = torch.randn(3, 37, 96).to(dtype)
    ref = torch.nn.Linear(64, 96, bias=False).to(dtype)
    ref.weight.data.copy_(weight.detach())
    ref = torchao_float8.convert_to_float8_training(
        torch.nn.Sequential(ref), config=torchao_float8.Float8LinearConfig.from_recipe_name(recipe)
    )
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    ours, theirs = fp8_linear(xa, weight, recipe), ref(xb)
    ours.backward(grad)
    theirs.backward(grad)
    assert torch.equal(ours, theirs)
    assert torch.equal(xa.grad, xb.grad)
    assert torch.equal(weight.grad, ref[0].weight.grad)
    plain = F.linear(x, weight.detach())
    assert (ours - plain).abs().max() > 1e-2 * plain.abs().max()  # FP8 did round: the comparison can tell


def test_the_pass_rewrites_each_decoder_linear_and_leaves_the_lm_head():
    cfg = compose()
    captured = capture(build_config(cfg.model))
    gm = captured.gm
    linears = [n for n in gm.graph.nodes if n.target == torch.ops.aten.linear.default]
    assert fp8_matmuls(gm, "tensorwise") == 7 * cfg.model.num_hidden_layers == len(linears) - 1
    left = [n for n in gm.graph.nodes if n.target == torch.ops.aten.linear.default]
    assert [n.meta["lcgraph"].part for n in left] == ["head"]
    fp8 = [n for n in gm.graph.nodes if n.target is fp8_linear]
    assert all(n.meta["lcgraph"].part == "layer" and n.args[2] == "tensorwise" for n in fp8)
    assert isinstance(gm, fx.GraphModule)


@pytest.fixture(scope="module")
def references():
    cache = {}

    def get(batch: int, recipe: str | None):
        if (batch, recipe) not in cache:
            prepare = torchao_linears(recipe) if recipe else None
            cache[batch, recipe] = hf_reference(run_cfg(steps=STEPS), batch, STEPS, prepare=prepare, one_by_one=True)
        return cache[batch, recipe]

    return get


def check(losses, grad_norms, ref, rtols: tuple[float, float], label: str) -> None:
    """The first loss and gradient norm against the reference's, within WHOLE or PIECES."""
    ref_losses, ref_norms, _ = ref
    pairs = [("first loss", losses[0], ref_losses[0]), ("first gradient norm", grad_norms[0], ref_norms[0])]
    for (what, got, want), rtol in zip(pairs, rtols):
        assert abs(got - want) <= rtol * abs(want), f"{label}: {what} {got} vs {want} (rtol {rtol})"


def test_one_process_fp8_runs_match_hf_eager_with_torchaos_float8_linears(references):
    """Tensorwise in fp32, the whole sequence in one call: plain, recompute=full and compiled; Seq1F1B chunks
    scale each chunk alone. The unquantized reference fails the whole-sequence check."""
    ref = references(1, "tensorwise")
    plain = references(1, None)
    with pytest.raises(AssertionError, match="first loss"):
        check(plain[0], plain[1], ref, WHOLE, label="the unquantized reference")
    for label, extra, whole in [
        ("fp8 tensorwise", [], True),
        ("fp8 recompute=full", ["train.recompute=full"], True),
        ("fp8 compiled", ["train.compile=true"], True),
        ("fp8 seq1f1b 2 chunks", ["parallel.schedule=seq1f1b", "parallel.seq_chunks=2"], False),
    ]:
        losses, _, extra_out = train_local(run_cfg("train.fp8=tensorwise", *extra, steps=STEPS))
        check(losses, extra_out["grad_norms"], ref, WHOLE if whole else PIECES, label)


def test_two_rank_fp8_layouts_match_hf_eager_with_torchaos_float8_linears(references):
    layouts = {  # label -> (overrides, sequences per step, whole sequence in one call)
        "pp=2 1f1b": (["parallel.pp=2", "parallel.microbatches=2", "parallel.schedule=1f1b"], 2, True),
        "dp=2 distributed optimizer": (["parallel.dp=2", "parallel.microbatches=1"], 2, True),
        "sp=2 ulysses": (["parallel.sp=2"], 1, False),
        "cp=2 ring": (["parallel.cp=2"], 1, False),
    }
    cfgs = [run_cfg("train.fp8=tensorwise", *v[0], steps=STEPS) for v in layouts.values()]
    results = train_spawned(cfgs, world=2, keep_params=False)
    for (label, (_, batch, whole)), r in zip(layouts.items(), results):
        check(r["losses"], r["grad_norms"], references(batch, "tensorwise"), WHOLE if whole else PIECES, label)


def test_rowwise_bf16_dp2_matches_one_process_over_five_steps():
    """dp=2 with the distributed optimizer against one process running the same two sequences a step as
    micro-batches, both rowwise FP8 in bf16: each sequence is scaled alone either way, so only the gradients'
    summation order differs (the bf16 tolerance of the layout tests, BF16 in test_reference)."""
    one = train_local(run_cfg("train.fp8=rowwise", "train.dtype=bf16", "parallel.microbatches=2", steps=5))
    (two,) = train_spawned(
        [run_cfg("train.fp8=rowwise", "train.dtype=bf16", "parallel.dp=2", "parallel.microbatches=1", steps=5)], world=2
    )
    params, ref = ({n: p.float() for n, p in run.items()} for run in (two["params"], one[1]))
    assert_close_run(two["losses"], params, one[0], ref, rtol=BF16, label="rowwise bf16 dp=2")
    torch.testing.assert_close(torch.tensor(two["grad_norms"]), torch.tensor(one[2]["grad_norms"]), rtol=BF16, atol=0)


@pytest.mark.parametrize("recipe", ["rowwise", "rowwise_with_gw_hp"])
def test_rowwise_trains_in_bf16_near_the_reference(references, recipe):
    """Row-wise scales in bf16 (the op equals torchao's, above) against the fp32 reference with torchao's
    linears of the same recipe: within what bf16 weights and activations move it (BF16_ROWWISE)."""
    losses, _, extra = train_local(run_cfg(f"train.fp8={recipe}", "train.dtype=bf16", steps=STEPS))
    check(losses, extra["grad_norms"], references(1, recipe), BF16_ROWWISE, f"fp8 {recipe} bf16")


def test_an_fp8_run_resumed_from_its_checkpoint_equals_the_uninterrupted_run_bit_for_bit(tmp_path):
    """Dynamic scales keep no state, so a checkpoint holds what a bf16 run's holds and the resumed steps are the
    uninterrupted run's exactly; the same checkpoint resumed without FP8 takes other steps (FP8 is in them)."""
    base = ["train.fp8=rowwise", "train.dtype=bf16", "train.steps=6", "train.checkpoint_every=3"]
    step3 = f"train.resume={tmp_path / 'a' / CHECKPOINTS / 'step-00000003'}"
    run_here(run_config(*base), tmp_path / "a")
    run_here(run_config(*base, step3), tmp_path / "b")
    run_here(run_config(*base, step3, "train.fp8=false"), tmp_path / "c")
    whole, resumed, unquantized = (run_losses(tmp_path / d) for d in "abc")
    assert len(whole) == 6 and torch.equal(torch.tensor(resumed), torch.tensor(whole[3:])), (resumed, whole)
    assert not torch.equal(torch.tensor(unquantized), torch.tensor(whole[3:]))


def test_fp8_with_every_saved_activation_offloaded_trains_bit_for_bit_as_on_the_device():
    """offload=all parks what autograd saves for the first chunk, the FP8 linears' inputs among it (weights are
    parameters and stay), in host memory until its backward; the copies are exact: the run is the unoffloaded one."""
    layout = ["train.fp8=tensorwise", "parallel.schedule=seq1f1b", "parallel.seq_chunks=2", "train.recompute=none"]
    plain = train_local(run_cfg(*layout, steps=STEPS))
    moved = train_local(run_cfg(*layout, "train.offload=all", steps=STEPS))
    assert moved[2]["job"].interpreter.offloader.stats.to_host > 0, "the first chunk's activations went to the host"
    assert torch.equal(torch.tensor(moved[0]), torch.tensor(plain[0]))
    assert torch.equal(torch.tensor(moved[2]["grad_norms"]), torch.tensor(plain[2]["grad_norms"]))


def test_fp8_mistakes_are_one_line():
    with pytest.raises(
        PlanError, match=r"^train.fp8=fp4 is not a recipe; use false, tensorwise, rowwise or rowwise_with_gw_hp$"
    ):
        check_fp8(compose("train.fp8=fp4"), "cpu")
    assert fp8_recipe(False) is None and fp8_recipe("False") is None and fp8_recipe("rowwise") == "rowwise"
    check_fp8(compose("train.fp8=rowwise"), "cpu")  # the CPU runs either recipe in any dtype
    old = gpu_refusal("tensorwise", "NVIDIA A100-SXM4-80GB", (8, 0), torch.bfloat16)
    assert old == (
        "train.fp8=tensorwise needs FP8 tensor cores (compute capability 8.9+: Ada, Hopper, Blackwell), but "
        "NVIDIA A100-SXM4-80GB is 8.0; set train.fp8=false"
    )
    assert gpu_refusal("tensorwise", "NVIDIA H100 80GB HBM3", (9, 0), torch.float32) is None
    for recipe in ("rowwise", "rowwise_with_gw_hp"):
        assert "set train.dtype=bf16" in gpu_refusal(recipe, "NVIDIA H100 80GB HBM3", (9, 0), torch.float32)


def test_fp8_uncompiled_on_a_gpu_gets_a_line_naming_compile():
    """Uncompiled, FP8's casts are chains of eager kernels: on one H100 a 1B step ran at a third of bf16's rate."""
    line = eager_note("rowwise", False, "cuda")
    assert line is not None and line.startswith("train.fp8=rowwise without train.compile")
    assert line.endswith("set train.compile=true")
    assert eager_note("rowwise", True, "cuda") is None  # compiled: the casts fuse
    assert eager_note("tensorwise", False, "cpu") is None  # the CPU emulation is for tests
    assert eager_note(None, False, "cuda") is None


# --- the planner ------------------------------------------------------------------------------------------
STAGE_70B = ["model=llama70b_2l", "parallel=single", "data.seq_len=16384", "train.dtype=bf16"]


def _stage_parts(*overrides: str) -> tuple[dict[str, float], dict[str, float], float]:
    """Forward and backward seconds by part of the one stage of Llama-2-70B's 2-layer stage shape at 16k on an
    h100, and the plan's peak bytes."""
    from lcgraph.planner.plan import build_plan

    plan = build_plan(planned(*STAGE_70B, "+plan.alternatives=false", *overrides, tiny=False))
    cost = plan.main.cost
    return cost.compute_parts(0, 16384, 0), cost.backward_parts(0, 0), max(plan.main.sim.rank_peak)


def test_a_plan_runs_the_decoder_matmuls_at_the_fp8_rate_and_adds_the_casts():
    """The decoder's matmuls at the profile's FP8 rate (bf16's times its fp8_speedup), the LM head's (the loss's
    part, fused or not) at bf16's; the casts cost memory traffic; what autograd keeps is the same."""
    fwd, bwd, peak = _stage_parts()
    fwd8, bwd8, peak8 = _stage_parts("train.fp8=tensorwise")
    speedup = load_profile("h100").fp8_speedup
    assert 1 < speedup < 3
    assert fwd8["matmul"] == pytest.approx(fwd["matmul"] / speedup)
    assert bwd8["matmul"] == pytest.approx(bwd["matmul"] / speedup)
    assert fwd["fp8_casts"] == 0 < fwd8["fp8_casts"] < bwd8["fp8_casts"]
    assert peak8 == peak
    assert fwd8["loss"] == fwd["loss"] > 0
    unfused = _stage_parts("train.fused_loss=false")[0]
    assert _stage_parts("train.fused_loss=false", "train.fp8=rowwise")[0]["loss"] == unfused["loss"] > 0
    rowwise = _stage_parts("train.fp8=rowwise")[1]
    assert rowwise["fp8_casts"] > bwd8["fp8_casts"]  # row-wise casts the output gradient along both axes
    fwd_hp, bwd_hp, _ = _stage_parts("train.fp8=rowwise_with_gw_hp")
    assert fwd_hp["matmul"] == pytest.approx(fwd8["matmul"])  # forward as rowwise
    assert bwd_hp["matmul"] == pytest.approx((bwd["matmul"] + bwd8["matmul"]) / 2)  # dX in FP8, dW in bf16
    assert 0 < bwd_hp["fp8_casts"] < bwd8["fp8_casts"]  # the output gradient along one axis; the input not again


def test_the_plan_prints_fp8_beside_bf16_and_a_device_without_fp8_refuses_it():
    from lcgraph.planner.plan import build_plan

    plan = build_plan(planned(*STAGE_70B, "+plan.alternatives=false", tiny=False))
    (label, main), (other_label, other) = plan.alternatives
    assert other_label == f"{label}, train.fp8=tensorwise" and other.cost.layout.fp8 == "tensorwise"
    assert other.sim.step_time < main.sim.step_time and main.cost.layout.fp8 is None
    with pytest.raises(PlanError, match=r"^train.fp8=tensorwise needs FP8 tensor cores, which the a100 profile has"):
        build_plan(planned(*STAGE_70B, "train.fp8=tensorwise", "+plan.device=a100", tiny=False))


def test_bench_fp8_flag_puts_bf16_and_fp8_rows_side_by_side():
    import importlib.util
    import sys
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "tools" / "bench.py"
    spec = importlib.util.spec_from_file_location("bench", path)
    bench = importlib.util.module_from_spec(spec)
    sys.modules["bench"] = bench  # dataclasses resolve their annotations through sys.modules
    spec.loader.exec_module(bench)
    args = bench.parser().parse_args(["--peers", "--model", "llama70b_2l", "--fp8", "false", "tensorwise"])
    sides = bench.sides_from_args(args)
    assert [s.label for s in sides] == ["lcgraph", "lcgraph fp8=tensorwise"]
    assert [[o for o in s.overrides([]) if "fp8" in o] for s in sides] == [[], ["train.fp8=tensorwise"]]
    assert [s.fuse for s in sides] == ["auto", "auto"] and not any(s.checkpointing for s in sides)
