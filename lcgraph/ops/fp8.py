"""FP8 linear matmuls with dynamic scaling: `fp8_linear(x, weight, recipe)` computes `x @ weight.T` (a bias-free
`nn.Linear`) with its three matmuls, forward and both of backward, in FP8 on `torch._scaled_mm`.

Each operand is scaled just before its matmul by the largest magnitude it holds (dynamic scaling: no amax history
to checkpoint), saturated and cast; the matmul multiplies the scales back out and returns the high-precision
dtype. The recipes are the ones torchao's float8 training names (pytorch/ao, torchao/float8/README.md):

    tensorwise   one scale per tensor; x and weight in e4m3, the output gradient in e5m2 (its wider range)
    rowwise      one scale per row of each matmul operand along the dimension the matmul contracts, every
                 operand in e4m3, scales rounded down to a power of two (exact to apply and to undo)
    rowwise_with_gw_hp
                 rowwise, but the weight gradient's matmul stays in high precision and the weight is scaled
                 per tensor for the input gradient's: torchao's most accurate recipe (two of three matmuls in FP8)

What autograd keeps is x and weight in their own dtype, as nn.Linear keeps them; backward quantizes them again
along the axes its matmuls need. A scale covers the tensor this call sees: under Seq1F1B chunks, Ulysses or ring
attention that is one rank's chunk of the sequence, so a token's rounding can differ from one layout to another
by one FP8 step (never its scale's range). `torch._scaled_mm` runs on CUDA GPUs of compute capability 8.9 and up
and, in PyTorch's CPU build, on the CPU (the tests' exact path against torchao's float8 linear).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lcgraph.errors import PlanError

RECIPES = ("tensorwise", "rowwise", "rowwise_with_gw_hp")
E4M3, E5M2 = torch.float8_e4m3fn, torch.float8_e5m2
EPS = 1e-12  # the smallest amax a scale divides by: an all-zero operand scales by finfo.max / EPS, still finite
CUDA_ALIGN = 16  # cuBLASLt FP8 matmuls want every dimension a multiple of 16


OFF = ("false", "none", "off")


def fp8_recipe(value: object) -> str | None:
    """train.fp8 as a recipe name, None for off (`false`; YAML's false arrives as "False"); PlanError if neither."""
    name = str(value).lower()
    if name in OFF:
        return None
    if name not in RECIPES:
        raise PlanError(f"train.fp8={value} is not a recipe; use false, {', '.join(RECIPES[:-1])} or {RECIPES[-1]}")
    return name


def fp8_refusal(recipe: str, device: torch.device | str, dtype: torch.dtype) -> str | None:
    """Why `recipe` cannot run on `device` in `dtype` (one line naming the fix), or None when it can."""
    device = torch.device(device)
    if device.type == "cuda":
        return gpu_refusal(recipe, torch.cuda.get_device_name(device), torch.cuda.get_device_capability(device), dtype)
    if device.type != "cpu":
        return f"train.fp8={recipe} runs on CUDA GPUs and the CPU, not on {device.type}; set train.fp8=false"
    return None


def gpu_refusal(recipe: str, name: str, capability: tuple[int, int], dtype: torch.dtype) -> str | None:
    """Why `recipe` cannot run on the GPU `name` of compute `capability` in `dtype`, or None."""
    if capability < (8, 9):
        return (
            f"train.fp8={recipe} needs FP8 tensor cores (compute capability 8.9+: Ada, Hopper, Blackwell), "
            f"but {name} is {capability[0]}.{capability[1]}; set train.fp8=false"
        )
    if recipe.startswith("rowwise") and dtype != torch.bfloat16:
        return f"train.fp8={recipe} returns bf16 from its matmuls (row-wise scaled FP8 on CUDA); set train.dtype=bf16"
    return None


def eager_note(recipe: str | None, compiled: bool, device: torch.device | str) -> str | None:
    """The line a run gets when it would run FP8 uncompiled on a GPU, where its casts are chains of separate eager
    kernels and the step is slower than bf16's (docs/fp8.md); None otherwise."""
    if recipe is None or compiled or torch.device(device).type != "cuda":
        return None
    return (
        f"train.fp8={recipe} without train.compile casts in separate eager kernels, slower than bf16 matmuls; "
        "set train.compile=true"
    )


def quantize(x: torch.Tensor, dtype: torch.dtype, dim: int | None, pow2: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """`x` scaled to fill `dtype`'s range, saturated and cast; returns it and the inverse scale (fp32) that
    multiplies it back. `dim` None: one scale for the tensor; else one per slice along `dim` (kept as size 1)."""
    amax = x.abs().amax() if dim is None else x.abs().amax(dim=dim, keepdim=True)
    top = torch.finfo(dtype).max
    scale = (top / amax.double().clamp(min=EPS)).float()  # in fp64 so eager and compiled agree
    if pow2:
        scale = torch.exp2(torch.floor(torch.log2(scale)))
    bits = (x.float() * scale).clamp(-top, top).to(dtype)
    return bits, scale.reciprocal()


def _pad(t: torch.Tensor, rows: int, cols: int, value: float = 0.0) -> torch.Tensor:
    """`t` (2-D) grown by `rows` and `cols` of `value` (zero for FP8 data, one for scales)."""
    if not rows and not cols:
        return t
    if t.dtype in (E4M3, E5M2):  # F.pad has no FP8 kernels; zero is the all-zero bit pattern
        return F.pad(t.view(torch.uint8), (0, cols, 0, rows)).view(t.dtype)
    return F.pad(t, (0, cols, 0, rows), value=value)


def _mm(a: torch.Tensor, sa: torch.Tensor, b: torch.Tensor, sb: torch.Tensor, out: torch.dtype, fast: bool):
    """a @ b for FP8 `a` [M, K] and `b` [K, N], with `sa` ([] or [M, 1]) and `sb` ([] or [1, N]) the inverse
    scales. On CUDA every dimension is padded to a multiple of 16 with zeros, which add nothing to any sum."""
    (m, k), n = a.shape, b.shape[1]
    pm, pk, pn = ((-d % CUDA_ALIGN) for d in (m, k, n)) if a.is_cuda else (0, 0, 0)
    a, b = _pad(a, pm, pk).contiguous(), _pad(b, pk, pn).t().contiguous().t()  # row-major a, column-major b
    if sa.numel() > 1:
        sa = _pad(sa, pm, 0, 1.0)
    if sb.numel() > 1:
        sb = _pad(sb, 0, pn, 1.0)
    if sa.numel() == 1 and sb.numel() == 1:
        sa, sb = sa.reshape(()), sb.reshape(())
    y = torch._scaled_mm(a, b, scale_a=sa, scale_b=sb, out_dtype=out, use_fast_accum=fast)
    return y[:m, :n] if pm or pn else y


class _Fp8Linear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, recipe: str) -> torch.Tensor:
        ctx.save_for_backward(x, weight)
        ctx.recipe = recipe
        x2 = x.reshape(-1, x.shape[-1])
        rowwise = recipe != "tensorwise"
        xq, sx = quantize(x2, E4M3, -1 if rowwise else None, rowwise)  # per token
        wq, sw = quantize(weight, E4M3, -1 if rowwise else None, rowwise)  # per output feature
        y = _mm(xq, sx, wq.t(), sw.reshape(1, -1), x.dtype, fast=True)
        return y.reshape(*x.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, weight = ctx.saved_tensors
        g = grad.reshape(-1, grad.shape[-1])
        x2 = x.reshape(-1, x.shape[-1])
        dx = dw = None
        if ctx.recipe == "tensorwise":
            gq, sg = quantize(g, E5M2, None, False)
            xq, sx = quantize(x2, E4M3, None, False)
            wq, sw = quantize(weight, E4M3, None, False)
            if ctx.needs_input_grad[0]:
                dx = _mm(gq, sg, wq, sw, grad.dtype, fast=False)
            if ctx.needs_input_grad[1]:
                dw = _mm(gq.t(), sg, xq, sx, weight.dtype, fast=False)
        else:  # rowwise: each operand scaled along the dimension its matmul contracts; rowwise_with_gw_hp: see below
            hp = ctx.recipe == "rowwise_with_gw_hp"
            if ctx.needs_input_grad[0]:
                gq, sg = quantize(g, E4M3, -1, True)  # per token, over the output features
                if hp:  # one scale for the weight, repeated per input feature: a row-wise call all the same
                    wq, sw = quantize(weight, E4M3, None, True)
                    sw = sw.repeat(weight.shape[1]).reshape(1, -1)
                else:
                    wq, sw = quantize(weight, E4M3, 0, True)  # per input feature, over the output features
                dx = _mm(gq, sg, wq, sw, grad.dtype, fast=False)
            if ctx.needs_input_grad[1] and hp:  # the weight gradient unquantized
                dw = g.t() @ x2
            elif ctx.needs_input_grad[1]:
                gq, sg = quantize(g, E4M3, 0, True)  # per output feature, over the tokens
                xq, sx = quantize(x2, E4M3, 0, True)  # per input feature, over the tokens
                dw = _mm(gq.t(), sg.reshape(-1, 1), xq, sx, weight.dtype, fast=False)
        if dx is not None:
            dx = dx.reshape(x.shape)
        return dx, dw, None


def fp8_linear(x: torch.Tensor, weight: torch.Tensor, recipe: str) -> torch.Tensor:
    """`F.linear(x, weight)` with FP8 matmuls under `recipe` (see the module docstring)."""
    return _Fp8Linear.apply(x, weight, recipe)
