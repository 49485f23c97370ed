"""GPU attention kernels against the CPU reference, and the KV relay under each recompute mode.

Run on a GPU machine: python -m pytest -m gpu tests/test_gpu_attention.py
"""

import pytest
import torch

from lcgraph.ops import attention
from lcgraph.ops.relay import RelayContext, relay_attention

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

GPU_BACKENDS = ["cudnn", "flash", "efficient", "math"]


@pytest.fixture
def backend(request):
    attention.set_backend(request.param)
    yield request.param
    attention.set_backend("auto")


def cpu_reference(q, k, v, scale, grad):
    """fp32 math on CPU: output and gradients of q, k, v."""
    attention.set_backend("math")
    try:
        leaves = [t.detach().float().cpu().requires_grad_(True) for t in (q, k, v)]
        out = attention.attention_fn(*leaves, scale)
        out.backward(grad.float().cpu())
    finally:
        attention.set_backend("auto")
    return out.detach(), [t.grad for t in leaves]


def assert_bf16_close(got, want, what):
    # bf16 keeps 8 bits of mantissa: compare relative to each tensor's scale
    err = float((got.float().cpu() - want).norm() / want.norm())
    assert err < 2e-2, f"{what}: relative error {err:.2e}"


@pytest.mark.parametrize("backend", GPU_BACKENDS, indirect=True)
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("kv_heads", [8, 2], ids=["mha", "gqa"])
@pytest.mark.parametrize("sq,sk", [(256, 256), (128, 384)], ids=["no-prefix", "prefix"])
def test_backend_forward_and_gradients_agree_with_cpu_reference(backend, head_dim, kv_heads, sq, sk):
    torch.manual_seed(0)
    dtype = torch.float32 if backend == "math" else torch.bfloat16
    # q as HF hands it over: a [B, H, S, D] view of a [B, S, H, D] tensor
    q = torch.randn(1, sq, 8, head_dim, device="cuda", dtype=dtype).transpose(1, 2).requires_grad_(True)
    k, v = (torch.randn(1, kv_heads, sk, head_dim, device="cuda", dtype=dtype, requires_grad=True) for _ in range(2))
    grad = torch.randn(1, 8, sq, head_dim, device="cuda", dtype=dtype)
    ref, ref_grads = cpu_reference(q, k, v, head_dim**-0.5, grad)
    attention.KERNEL_CALLS.clear()
    out = attention.attention_fn(q, k, v, head_dim**-0.5)
    out.backward(grad)
    assert dict(attention.KERNEL_CALLS) == {"forward": 1, "backward": 1}
    assert_bf16_close(out, ref, f"{backend} out")
    for t, want, name in zip((q, k, v), ref_grads, "qkv"):
        assert_bf16_close(t.grad, want, f"{backend} d{name}")


@pytest.mark.parametrize("backend", GPU_BACKENDS[:3], indirect=True)
def test_relay_chunks_agree_with_unchunked_attention(backend):
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 8, 1024, 64, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    k, v = k[:, :2].contiguous(), v[:, :2].contiguous()
    grad = torch.randn_like(q)
    ref, ref_grads = cpu_reference(q, k, v, 0.125, grad)
    lengths = [384, 256, 256, 128]
    ctx = RelayContext(lengths)
    RelayContext.current = ctx
    outs, leaves, start = [], [], 0
    for c, n in enumerate(lengths):
        leaf = [t[:, :, start : start + n].clone().requires_grad_(True) for t in (q, k, v)]
        ctx.unit = (0, c)
        outs.append(relay_attention(*leaf, 0.125, 0))
        leaves.append(leaf)
        start += n
    start = sum(lengths)
    for c in reversed(range(len(lengths))):
        start -= lengths[c]
        outs[c].backward(grad[:, :, start : start + lengths[c]])
    RelayContext.current = None
    assert_bf16_close(torch.cat(outs, 2), ref, "relay out")
    for i, name in enumerate("qkv"):
        assert_bf16_close(torch.cat([leaf[i].grad for leaf in leaves], 2), ref_grads[i], f"relay d{name}")
    assert not ctx.caches


@pytest.mark.parametrize(
    "mode,extra",
    [
        ("none", []),
        ("full", []),
        ("keep_attention", []),
        ("keep_attention", ["train.keep_attention_layers=1", "train.recompute_layers=2"]),
        ("keep_attention", ["train.compile=true"]),
        ("keep_attention", ["train.compile=true", "parallel.chunk_split=uniform_comp"]),
    ],
    ids=[
        "none",
        "full",
        "keep_attention",
        "keep_one_layer_2_layer_segment",
        "keep_attention_compiled",
        "keep_attention_compiled_uneven",
    ],
)
def test_seq1f1b_relay_with_each_recompute_mode_matches_unchunked_run_in_bf16(mode, extra):
    """A 2-layer Llama-3.2-1B-shaped model, 4k tokens, one step: 4 even chunks under each recompute mode (also
    keeping one layer's attention in one 2-layer segment, and compiled segments, static for even chunks and
    dynamic-shape for uneven ones) against the unchunked run (loss and gradient norm, bf16 tolerance)."""
    from lcgraph.app.testing import compose, job_of

    def run(*extra):
        cfg = compose(
            "parallel=single",
            "model=llama3_1b",
            "model.num_hidden_layers=2",
            "data.seq_len=4096",
            "data.synthetic=true",
            "train.dtype=bf16",
            "train.device=cuda",
            "train.steps=1",
            "logging.wandb.mode=disabled",
            "train.progress=false",
            *extra,
            tiny=False,
        )
        return job_of(cfg, "/tmp/lcgraph-gpu-test").run_step(0)

    ref = run()
    got = run("parallel.schedule=seq1f1b", "parallel.seq_chunks=4", f"train.recompute={mode}", *extra)
    assert abs(got["loss"] - ref["loss"]) < 1e-2 * abs(ref["loss"])
    assert abs(got["grad_norm"] - ref["grad_norm"]) < 3e-2 * ref["grad_norm"]
