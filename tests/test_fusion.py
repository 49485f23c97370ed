"""The fuse_pointwise pass and its fused ops (RMSNorm, SwiGLU, rotary) on CPU, forced on with train.fuse=on.

Each op against HF's own modules (LlamaRMSNorm, LlamaMLP's act * up, apply_rotary_pos_emb) in fp32, forward
and backward; what each keeps for backward (saved-tensor hooks) against the plain ops; the pass's rewrite
counted per layer; training with the pass against HF eager + AdamW (tests/test_reference.py's reference).
"""

from __future__ import annotations

import copy
import importlib.util
import sys
from pathlib import Path

import pytest
import torch
from test_reference import check, hf_reference, run_cfg
from transformers import LlamaConfig
from transformers.models.llama import modeling_llama as hf

from lcgraph.app.testing import train_local, train_spawned
from lcgraph.graph import passes
from lcgraph.graph.capture import capture
from lcgraph.graph.fusion import fuse_pointwise, fuse_wanted
from lcgraph.ops import fused_pointwise as fp
from lcgraph.runtime.interpreter import ActivationMeter

FUSE = "train.fuse=on"
TOOLS = Path(__file__).resolve().parents[1] / "tools"
SEQ1F1B = ["parallel.schedule=seq1f1b", "parallel.seq_chunks=2", "parallel.chunk_split=uniform_comp"]
TINY = LlamaConfig(
    vocab_size=512,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
)


def _saved_bytes(fn, *args) -> tuple[torch.Tensor, int]:
    """fn's output and the bytes autograd keeps for its backward (each storage once): the runtime's meter."""
    meter = ActivationMeter(param_ptrs=set())
    with meter.hooks(()):
        out = fn(*args)
    return out, meter.unit_bytes[()]


def _leaf(*shape, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g).to(dtype).requires_grad_()


# --- each op against HF, fp32 -------------------------------------------------------------------------------


def test_rms_norm_matches_hf_llama_rms_norm_forward_and_backward_in_fp32():
    norm = hf.LlamaRMSNorm(64, eps=1e-6)
    with torch.no_grad():
        norm.weight.copy_(1 + 0.1 * torch.randn(64))
    x, dy = _leaf(2, 16, 64), torch.randn(2, 16, 64)
    x2, w2 = x.detach().clone().requires_grad_(), norm.weight.detach().clone().requires_grad_()
    ref = norm(x)
    ref.backward(dy)
    got = fp.rms_norm(x2, w2, 1e-6)
    got.backward(dy)
    torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(x2.grad, x.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(w2.grad, norm.weight.grad, rtol=1e-5, atol=1e-6)


def test_swiglu_matches_hf_act_times_up_forward_and_backward_in_fp32():
    gate, up, dy = _leaf(2, 16, 128, seed=1), _leaf(2, 16, 128, seed=2), torch.randn(2, 16, 128)
    ref = torch.nn.SiLU()(gate) * up
    ref.backward(dy)
    g2, u2 = gate.detach().clone().requires_grad_(), up.detach().clone().requires_grad_()
    got = fp.swiglu(g2, u2)
    got.backward(dy)
    torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(g2.grad, gate.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(u2.grad, up.grad, rtol=1e-5, atol=1e-6)


def _rotary_inputs(dtype=torch.float32):
    """q [1, 4, 16, 16] and k [1, 2, 16, 16] as HF lays them out (projection view, transposed), cos/sin [1, 16, 16]."""
    q = _leaf(1, 16, 4, 16, dtype=dtype, seed=3).detach().transpose(1, 2).requires_grad_()
    k = _leaf(1, 16, 2, 16, dtype=dtype, seed=4).detach().transpose(1, 2).requires_grad_()
    rope = hf.LlamaRotaryEmbedding(TINY)
    cos, sin = rope(q, torch.arange(16)[None])
    return q, k, cos, sin


def test_rotary_matches_hf_apply_rotary_pos_emb_forward_and_backward_in_fp32():
    q, k, cos, sin = _rotary_inputs()
    dq, dk = torch.randn(q.shape), torch.randn(k.shape)
    ref_q, ref_k = hf.apply_rotary_pos_emb(q, k, cos, sin)
    torch.autograd.backward((ref_q, ref_k), (dq, dk))
    q2, k2 = (t.detach().clone().requires_grad_() for t in (q, k))
    got_q, got_k = fp.rotary(q2, k2, cos.unsqueeze(1), sin.unsqueeze(1))
    torch.autograd.backward((got_q, got_k), (dq, dk))
    for got, ref in ((got_q, ref_q), (got_k, ref_k), (q2.grad, q.grad), (k2.grad, k.grad)):
        torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize(
    "op, args",
    [
        ("rms_norm", lambda: (_leaf(2, 8, 64), _leaf(64, seed=5), 1e-6)),
        ("swiglu", lambda: (_leaf(2, 8, 32), _leaf(2, 8, 32, seed=6))),
        ("rotary", lambda: tuple(t.unsqueeze(1) if t.dim() == 3 else t for t in _rotary_inputs())),
    ],
)
def test_fused_ops_pass_torch_library_opcheck(op, args):
    """Schema, fake (meta) kernels with the real strides, autograd registration and AOT dispatch: what
    torch.compile of a stage graph relies on to treat the ops as opaque calls."""
    torch.library.opcheck(getattr(torch.ops.lcgraph, op).default, args())


# --- what each op keeps for backward ------------------------------------------------------------------------


def test_rms_norm_keeps_its_input_weight_and_fp32_rstd_only():
    """bf16 (the GPU dtype, run here on CPU): HF keeps the fp32 upcast and the normalised bf16 tensor."""
    x, norm = _leaf(4, 32, 64, dtype=torch.bfloat16), hf.LlamaRMSNorm(64).to(torch.bfloat16)
    _, plain = _saved_bytes(norm, x)
    _, fused = _saved_bytes(fp.rms_norm, x, norm.weight, 1e-6)
    assert fused == x.nbytes + norm.weight.nbytes + 4 * 32 * 4  # x, weight, one fp32 rstd per row
    assert plain >= fused + x.nbytes * 2  # at least the fp32 copy of x more


def test_swiglu_keeps_gate_and_up_only():
    gate, up = _leaf(4, 32, 128, dtype=torch.bfloat16), _leaf(4, 32, 128, dtype=torch.bfloat16, seed=1)
    _, plain = _saved_bytes(lambda g, u: torch.nn.functional.silu(g) * u, gate, up)
    _, fused = _saved_bytes(fp.swiglu, gate, up)
    assert fused == gate.nbytes + up.nbytes
    assert plain == fused + gate.nbytes  # SiLU's output too


def test_rotary_keeps_cos_and_sin_only():
    q, k, cos, sin = _rotary_inputs(torch.bfloat16)
    _, fused = _saved_bytes(fp.rotary, q, k, cos.unsqueeze(1), sin.unsqueeze(1))
    assert fused == cos.nbytes + sin.nbytes


# --- the pass --------------------------------------------------------------------------------------------


def _stage(dtype=torch.float32):
    return passes.compile_stages(capture(TINY, dtype=dtype), [TINY.num_hidden_layers], "cpu", 1, 1)[0]


def _fused_nodes(gm) -> dict:
    """(layer or part, fused op) -> count, and the NodeInfo of each fused node in graph order."""
    names = {
        fp.rms_norm: "rms_norm",
        torch.ops.lcgraph.swiglu.default: "swiglu",
        torch.ops.lcgraph.rotary.default: "rotary",
    }
    counts: dict = {}
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target in names:
            info = node.meta["lcgraph"]
            key = (info.layer if info.part == "layer" else info.part, names[node.target])
            counts[key] = counts.get(key, 0) + 1
    return counts


def test_fuse_pointwise_puts_two_norms_one_swiglu_one_rotary_pair_in_each_layer_and_keeps_annotations():
    stage = _stage()
    plain = copy.deepcopy(stage.gm)
    norm_outputs = [  # each RMSNorm ends in a multiplication by its weight: what the fused node replaces
        n.meta["lcgraph"]
        for n in plain.graph.nodes
        if n.target == torch.ops.aten.mul.Tensor
        and any(str(stage.param_names.get(a.name, "")).endswith("norm.weight") for a in n.all_input_nodes)
    ]
    done = fuse_pointwise(stage.gm)
    counts = _fused_nodes(stage.gm)
    expected = {(layer, op): n for layer in range(2) for op, n in (("rms_norm", 2), ("swiglu", 1), ("rotary", 1))}
    assert counts == {**expected, ("norm", "rms_norm"): 1}
    assert done == {"rms_norm": 5, "swiglu": 2, "rotary": 2}
    left = {n.target for n in stage.gm.graph.nodes}
    assert not left & {torch.ops.aten.rsqrt.default, torch.ops.aten.silu.default, torch.ops.aten.neg.default}
    fused_norms = [n.meta["lcgraph"] for n in stage.gm.graph.nodes if n.target == fp.rms_norm]
    assert fused_norms == norm_outputs  # part, layer, role, bytes per token: the replaced outputs'


def _run_stage(gm, dtype):
    """Loss and every parameter gradient of a stage graph on fixed random inputs."""
    torch.manual_seed(0)
    values = []
    for node in gm.graph.nodes:
        if node.op != "placeholder":
            continue
        if node.name in ("input_ids", "labels"):
            values.append(torch.randint(0, TINY.vocab_size, (1, 32)))
        elif node.name == "position_ids":
            values.append(torch.arange(32)[None])
        else:
            shape = [int(s) for s in node.meta["val"].shape]
            base = 1.0 if "norm" in node.name else 0.0
            values.append((base + 0.1 * torch.randn(shape)).to(dtype).requires_grad_(node.name.startswith("p_")))
    loss = gm(*values)
    loss.backward()
    return loss, [v.grad for v in values if v.grad is not None]


def test_fused_stage_graph_computes_the_plain_graphs_loss_and_gradients_in_fp32():
    stage = _stage()
    plain = copy.deepcopy(stage.gm)
    fuse_pointwise(stage.gm)
    loss, grads = _run_stage(stage.gm, torch.float32)
    ref_loss, ref_grads = _run_stage(plain, torch.float32)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-6, atol=0)
    for got, ref in zip(grads, ref_grads, strict=True):  # relative in norm: summation order differs
        assert float((got - ref).norm() / ref.norm()) < 1e-6


def test_fused_bf16_stage_keeps_less_for_backward_than_the_plain_graph():
    stage = _stage(torch.bfloat16)
    plain = copy.deepcopy(stage.gm)
    fuse_pointwise(stage.gm)
    _, fused = _saved_bytes(_run_forward, stage.gm)
    _, unfused = _saved_bytes(_run_forward, plain)
    # per layer, at least: two norms' fp32 copies of x (4 B each) and SwiGLU's output (2 B x ffn)
    tokens, layers = 32, TINY.num_hidden_layers
    assert unfused - fused >= layers * tokens * (2 * 4 * TINY.hidden_size + 2 * TINY.intermediate_size)


def _run_forward(gm):
    torch.manual_seed(0)
    values = []
    for node in gm.graph.nodes:
        if node.op == "placeholder":
            if node.name in ("input_ids", "labels", "position_ids"):
                values.append(torch.arange(32)[None] % TINY.vocab_size)
            else:
                shape = [int(s) for s in node.meta["val"].shape]
                values.append((0.1 * torch.randn(shape)).to(torch.bfloat16).requires_grad_(node.name.startswith("p_")))
    return gm(*values)


def test_fused_kernels_tool_on_cpu_agrees_with_the_plain_ops_and_keeps_less(tmp_path):
    """tools/fused_kernels.py end to end on CPU kernels (fp32): every fused row agrees with plain; RMSNorm and
    SwiGLU keep less for backward than plain, rotary no more."""
    spec = importlib.util.spec_from_file_location("fused_kernels", TOOLS / "fused_kernels.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    argv = ["--device", "cpu", "--dtype", "fp32", "--tokens", "64", "--hidden", "64", "--ffn", "128", "--heads", "4/2"]
    out = tool.main(
        [
            *argv,
            "--head-dim",
            "16",
            "--candidates",
            "plain",
            "torch",
            "--repeats",
            "1",
            "--out",
            str(tmp_path / "f.json"),
        ]
    )
    rows = {(r["op"], r["candidate"]): r for r in out["rows"]}
    assert all(rows[(op, "torch")]["agrees"] for op in ("rms_norm", "swiglu", "rotary"))
    for op in ("rms_norm", "swiglu"):
        assert rows[(op, "torch")]["kept_bytes"] < rows[(op, "plain")]["kept_bytes"], op
    assert rows[("rotary", "torch")]["kept_bytes"] <= rows[("rotary", "plain")]["kept_bytes"]
    assert out["best"] == {"rms_norm": "torch", "swiglu": "torch", "rotary": "torch"}


def test_bench_fuse_flag_gives_one_lcgraph_side_per_value_with_its_override():
    spec = importlib.util.spec_from_file_location("bench", TOOLS / "bench.py")
    bench = importlib.util.module_from_spec(spec)
    sys.modules["bench"] = bench  # dataclasses resolve their annotations through sys.modules
    spec.loader.exec_module(bench)
    sides = bench.sides_from_args(bench.parser().parse_args(["--peers", "--compile", "on", "--fuse", "on", "off"]))
    assert [s.label for s in sides] == ["lcgraph compile fuse=on", "lcgraph compile fuse=off"]
    assert [[o for o in s.overrides([]) if o.startswith("train.fuse")] for s in sides] == [
        ["train.fuse=on"],
        ["train.fuse=off"],
    ]


def test_train_fuse_auto_is_on_for_eager_cuda_stages_only():
    assert [fuse_wanted(m, d) for m in ("auto", "on", "off") for d in ("cpu", "cuda")] == [
        False,
        True,
        True,
        True,
        False,
        False,
    ]
    assert not fuse_wanted("auto", "cuda", compiled=True)  # inductor keeps as little already (docs/kernels.md)
    assert fuse_wanted("on", "cuda", compiled=True)


# --- training against HF eager + AdamW -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def reference():
    cache: dict = {}

    def get(batch: int, tied: bool, steps: int = 4, *model: str):
        key = (batch, tied, steps, *model)
        if key not in cache:
            cache[key] = hf_reference(run_cfg(*model, tied=tied, steps=steps), batch, steps)
        return cache[key]

    return get


def test_single_process_with_fused_ops_matches_hf_eager_adamw(reference):
    losses, params, extra = train_local(run_cfg(FUSE, "parallel.microbatches=2"))
    assert any(n.target == fp.rms_norm for n in extra["job"].stages[0].graph.gm.graph.nodes)
    check(losses, params, reference(2, False), label="fuse=on", grad_norms=extra["grad_norms"])


def test_compiled_checkpoint_segments_with_fused_ops_over_uneven_chunks_match_hf_eager(reference):
    """train.compile=true with Seq1F1B chunks of two lengths (dynamic shapes) under keep_attention: inductor
    compiles each checkpoint segment around the fused ops (opaque custom ops), whose backward runs once per
    norm, chunk and step, after the segment's rerun."""
    one_layer = "model.num_hidden_layers=1"
    chunked = [*SEQ1F1B, "train.compile=true", "train.recompute=keep_attention"]
    before = fp.KERNEL_CALLS[("rms_norm_backward", "torch")]
    losses, params, extra = train_local(run_cfg(FUSE, *chunked, one_layer, tied=True, steps=3))
    assert len(set(extra["job"].chunk_lengths)) == 2
    assert fp.KERNEL_CALLS[("rms_norm_backward", "torch")] - before == 3 * 2 * 3  # 3 norms, 2 chunks, 3 steps
    check(losses, params, reference(1, True, 3, one_layer), label="fuse compile", grad_norms=extra["grad_norms"])


TWO_RANKS = {  # label -> (overrides, tied)
    "pp=2 seq1f1b 2 uneven chunks, keep_attention, tied": (
        ["parallel.pp=2", "parallel.microbatches=2", *SEQ1F1B, "train.recompute=keep_attention"],
        True,
    ),
    "sp=2 ulysses": (["parallel.sp=2", "parallel.microbatches=2"], False),
}


def test_two_rank_layouts_with_fused_ops_match_hf_eager(reference):
    labels = list(TWO_RANKS)
    results = train_spawned([run_cfg(FUSE, *TWO_RANKS[k][0], tied=TWO_RANKS[k][1]) for k in labels], world=2)
    failed = []
    for label, result in zip(labels, results):
        try:
            check(
                result["losses"],
                result["params"],
                reference(2, TWO_RANKS[label][1]),
                label=label,
                grad_norms=result["grad_norms"],
            )
        except AssertionError as exc:
            failed.append(str(exc).splitlines()[0])
    assert not failed, "\n".join(failed)
