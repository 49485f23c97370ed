"""AdamW on a bucket's fp32 master from its bf16 gradient, in one pass.

torch's fused AdamW steps tensors of one dtype, so a bf16 run's update took five passes over each bucket: the
bf16 gradient cast to a new fp32 tensor, the clip scale applied to it, the fused update, the master copied back
into the bf16 weights, the gradient zeroed. `step_bucket` does torch.optim.AdamW's arithmetic (decoupled weight
decay, bias-corrected moments) reading and writing each tensor once: compiled on a GPU (one kernel for every
bucket size), eager elsewhere. Moments and step counts stay in torch's AdamW state, so checkpoints are unchanged.
"""

from __future__ import annotations

from collections.abc import Callable

import torch


def _update(
    master: torch.Tensor,
    exp_avg: torch.Tensor,
    exp_avg_sq: torch.Tensor,
    grad: torch.Tensor,
    weights: torch.Tensor,
    scale: torch.Tensor,
    lr: torch.Tensor,
    step: torch.Tensor,
    weight_decay: float,
    beta1: float,
    beta2: float,
    eps: float,
) -> None:
    """torch.optim.AdamW's update (decoupled decay, bias corrections) of the fp32 master from the scaled bf16
    gradient; the bf16 weights take the result and the gradient is zeroed, in the same pass."""
    g = grad.float() * scale
    master.mul_(1 - lr * weight_decay)
    exp_avg.lerp_(g, 1 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(g, g, value=1 - beta2)
    denom = (exp_avg_sq.sqrt() / (1 - beta2**step).sqrt()).add_(eps)
    master.sub_(exp_avg / denom * (lr / (1 - beta1**step)))
    weights.copy_(master)
    grad.zero_()


_compiled: dict[str, Callable[..., None]] = {}


def _kernel(device: torch.device) -> Callable[..., None]:
    if device.type != "cuda":
        return _update
    if "cuda" not in _compiled:  # dynamic: buckets of every size share one kernel
        _compiled["cuda"] = torch.compile(_update, dynamic=True, fullgraph=True)
    return _compiled["cuda"]


def step_scalars(
    groups: list[dict], scale: float, device: torch.device
) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """Per param group (by id): its lr and the clip scale as device scalars, made in one copy per step. A Python
    float would recompile the kernel each step, and a host-to-device copy per bucket waits for the GPU each time."""
    values = torch.tensor([float(scale)] + [float(g["lr"]) for g in groups], dtype=torch.float32).to(device)
    return {id(g): (values[1 + i], values[0]) for i, g in enumerate(groups)}


def step_bucket(
    master: torch.Tensor,
    state: dict,
    grad: torch.Tensor,
    weights: torch.Tensor,
    scalars: tuple[torch.Tensor, torch.Tensor],
    group: dict,
) -> None:
    """One AdamW step of `master` (fp32) from `grad` (its bf16 shard, times the clip scale, zeroed after), written
    back to `weights` (the bf16 shard); `state` is torch AdamW's for `master` (step counted here), `group` its
    param group, `scalars` its (lr, clip scale) from `step_scalars`."""
    state["step"] += 1
    step = state["step"].to(master.device, torch.float32)  # on the device already where AdamW is fused
    lr, scale = scalars
    beta1, beta2 = group["betas"]
    _kernel(master.device)(
        master, state["exp_avg"], state["exp_avg_sq"], grad, weights, scale, lr, step,
        float(group["weight_decay"]), float(beta1), float(beta2), float(group["eps"]),
    )  # fmt: skip
