"""Fused LM head + cross-entropy that never builds the full logits.

The summed cross-entropy of `hidden @ weight.T` is computed over blocks of rows; each block's logits
live only while the block is processed. Because the loss is the graph's final output, the gradients
w.r.t. hidden and weight are computed in the same pass (softmax minus one-hot, two matmuls) and scaled
by the incoming gradient in backward: the same three matmuls as the unfused head, without the
[tokens x vocab] fp32 tensor that dominates a long-sequence step's memory.
"""

from __future__ import annotations

import torch

IGNORE_INDEX = -100
BLOCK_BYTES = 1 << 30  # fp32 logits per block: 1 GiB (few blocks: the fp32 dW accumulation runs per block)


def _block_rows(vocab: int) -> int:
    return max(256, BLOCK_BYTES // (4 * vocab))


def _block_loss_and_grad(logits, target, valid):
    """Summed CE of one block and d(loss)/d(logits) (softmax minus one-hot) in the logits' dtype, softmax math
    in fp32 (compiled on GPU: the cast back is part of the one kernel, never an fp32 [rows x vocab] tensor)."""
    dtype, logits = logits.dtype, logits.float()
    lse = torch.logsumexp(logits, dim=-1)
    picked = logits.gather(1, target.unsqueeze(1)).squeeze(1)
    loss = ((lse - picked) * valid).sum()
    probs = torch.exp(logits - lse.unsqueeze(1))
    onehot = torch.nn.functional.one_hot(target, logits.shape[1]).to(probs.dtype)
    return loss, ((probs - onehot) * valid.unsqueeze(1)).to(dtype)


_compiled: dict = {}


def _block_fn(device: torch.device):
    """On GPU the block's elementwise work runs as one compiled (fused) kernel; eager elsewhere."""
    if device.type != "cuda":
        return _block_loss_and_grad
    if "cuda" not in _compiled:
        _compiled["cuda"] = torch.compile(_block_loss_and_grad, dynamic=True)
    return _compiled["cuda"]


def _accumulate_fp32(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """out (fp32) += a @ b. On CUDA with bf16/fp16 operands cuBLAS accumulates into the fp32 output itself
    (addmm's out_dtype), instead of writing a bf16 product, casting it and adding it: the fp32 [vocab x hidden]
    dW is read and written once per block, and the product is never rounded to bf16."""
    if out.is_cuda and a.dtype != torch.float32:
        torch.addmm(out, a, b, out_dtype=torch.float32, out=out)
    else:
        out += (a @ b).float()


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, labels):
        h = hidden.reshape(-1, hidden.shape[-1])
        y = labels.reshape(-1)
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_h = torch.empty_like(h) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        total = torch.zeros((), dtype=torch.float32, device=h.device)
        rows = _block_rows(weight.shape[0])
        block = _block_fn(h.device)
        for start in range(0, h.shape[0], rows):
            hb, yb = h[start : start + rows], y[start : start + rows]
            valid = yb != IGNORE_INDEX
            loss, dlogits = block(hb @ weight.t(), torch.where(valid, yb, 0), valid)
            total += loss
            if need_h:
                grad_h[start : start + rows] = dlogits @ weight
            if need_w:
                _accumulate_fp32(grad_w, dlogits.t(), hb)
        ctx.save_for_backward(grad_h if need_h else None, grad_w if need_w else None)
        ctx.hidden_shape, ctx.weight_dtype = hidden.shape, weight.dtype
        return total

    @staticmethod
    def backward(ctx, grad_out):
        grad_h, grad_w = ctx.saved_tensors
        dh = (grad_h * grad_out).reshape(ctx.hidden_shape) if grad_h is not None else None
        dw = (grad_w * grad_out).to(ctx.weight_dtype) if grad_w is not None else None
        return dh, dw, None


@torch.compiler.disable  # a Python loop over blocks: keep it out of compiled stage graphs
def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """sum over tokens of cross_entropy(hidden @ weight.T, labels), ignoring IGNORE_INDEX labels."""
    return _LinearCrossEntropy.apply(hidden, weight, labels)
