"""The attention kernels' CPU reference: output, LSE and the analytic backward against autograd of plain softmax
attention in fp64, with and without a prefix, with GQA; and the names train.recompute takes."""

import pytest
import torch

from lcgraph.errors import PlanError
from lcgraph.ops.attention import KERNEL_CALLS, attend, attention_fn
from lcgraph.runtime.recompute import recompute_mode


def softmax_attention(q, k, v, scale):
    """Textbook attention, bottom-right causal, K/V heads repeated: what autograd differentiates."""
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1)
    sq, sk = q.shape[2], k.shape[2]
    visible = torch.arange(sk)[None, :] <= torch.arange(sq)[:, None] + (sk - sq)
    scores = (q @ k.transpose(-1, -2) * scale).masked_fill(~visible, float("-inf"))
    return scores.softmax(-1) @ v, scores.logsumexp(-1)


@pytest.mark.parametrize("sq,sk", [(24, 24), (10, 24)], ids=["no-prefix", "prefix"])
@pytest.mark.parametrize("kv_heads", [4, 2], ids=["mha", "gqa"])
def test_math_backward_equals_fp64_autograd_of_softmax_attention(sq, sk, kv_heads):
    torch.manual_seed(0)
    q = torch.randn(2, 4, sq, 16, dtype=torch.float64, requires_grad=True)
    k, v = (torch.randn(2, kv_heads, sk, 16, dtype=torch.float64, requires_grad=True) for _ in range(2))
    grad = torch.randn(2, 4, sq, 16, dtype=torch.float64)
    ref, ref_lse = softmax_attention(q, k, v, 0.3)
    ref_grads = torch.autograd.grad(ref, (q, k, v), grad)
    KERNEL_CALLS.clear()
    out = attention_fn(q, k, v, 0.3)
    grads = torch.autograd.grad(out, (q, k, v), grad)
    assert dict(KERNEL_CALLS) == {"forward": 1, "backward": 1}  # the backward reran no forward
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(attend(q.detach(), k.detach(), v.detach(), 0.3).lse, ref_lse, rtol=1e-12, atol=1e-12)
    for got, want, name in zip(grads, ref_grads, "qkv"):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12, msg=lambda m, n=name: f"d{n}: {m}")


def test_recompute_takes_three_modes_and_the_old_booleans():
    assert [recompute_mode(v) for v in (True, "True", False, "false")] == ["full", "full", "none", "none"]
    assert [recompute_mode(v) for v in ("none", "full", "keep_attention")] == ["none", "full", "keep_attention"]
    with pytest.raises(PlanError, match="train.recompute=attention is unknown"):
        recompute_mode("attention")
    with pytest.raises(PlanError, match="train.recompute=auto is unknown"):  # the runtime runs a resolved mode
        recompute_mode("auto")
    assert recompute_mode("auto", allow_auto=True) == "auto"  # what the planner resolves


@pytest.mark.parametrize("device", ["cpu", "meta"])
@pytest.mark.parametrize("sk", [16, 24], ids=["no prefix", "prefix"])
def test_attention_output_is_laid_out_for_o_proj_without_a_copy(device, sk):
    """HF transposes attention's [B, H, S, D] output back and calls .contiguous() before o_proj: the op's output
    (the real kernels' and the fake capture sees) is already in that memory order, so o_proj reads the tensor
    attention's backward keeps, not a copy."""
    q = torch.randn(1, 16, 4, 8, device=device).transpose(1, 2)  # HF's q: [B, S, H, D] viewed as [B, H, S, D]
    k, v = (torch.randn(1, sk, 2, 8, device=device).transpose(1, 2) for _ in range(2))
    out = torch.ops.lcgraph.attention(q, k, v, 0.35)
    assert out.shape == (1, 4, 16, 8)
    assert out.transpose(1, 2).is_contiguous()
    if device == "cpu":
        assert out.transpose(1, 2).contiguous().data_ptr() == out.data_ptr()
