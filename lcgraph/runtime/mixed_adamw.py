"""AdamW on a rank's fp32 masters from their bf16 gradients: every bucket in one call, launched before the host
knows the gradient norm.

torch's fused AdamW steps tensors of one dtype, so a bf16 run's update would take five passes over each bucket: the
bf16 gradient cast to a new fp32 tensor, the clip scale applied to it, the fused update, the master copied back
into the bf16 weights, the gradient zeroed. `MixedAdamW.step` does torch.optim.AdamW's arithmetic (decoupled weight
decay, bias-corrected moments) for all of a rank's buckets in one call, reading and writing each tensor once: on a
GPU one graph compiled for the job's buckets (static shapes: the buckets are fixed for a job), eager elsewhere.

It takes the all-reduced per-stage squared gradient norms (`faults.stage_sums`) as they are on the device: the clip
scale is made there from their sum, and if any is non-finite every tensor keeps its old value (selected element by
element, so a dropped update changes no weight, moment or step count). So nothing waits for the host: it reads the
norm and the flags once per step, after the launch (`ShardedAdamW.sync_and_step`). Step counts stay torch AdamW's
`state["step"]` per master, made views of one device tensor that the step advances by the finite flag; the learning
rates travel in one non-blocking copy per step. Moments stay in torch's AdamW state, so checkpoints are unchanged.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

Hyper = tuple[int, float, float, float, float]  # a bucket's (param group, weight decay, beta1, beta2, eps)


def _update(
    master: torch.Tensor,
    exp_avg: torch.Tensor,
    exp_avg_sq: torch.Tensor,
    grad: torch.Tensor,
    weights: torch.Tensor,
    step: torch.Tensor,
    lr: torch.Tensor,
    scale: torch.Tensor | float,
    finite: torch.Tensor,
    hyper: Hyper,
) -> None:
    """torch.optim.AdamW's update (decoupled decay, bias corrections) of one fp32 master from its scaled bf16
    gradient, kept only where `finite`; the bf16 weights take the master and the gradient is zeroed."""
    _, weight_decay, beta1, beta2, eps = hyper
    g = grad.float() * scale
    new = master * (1 - lr * weight_decay)
    avg = exp_avg.lerp(g, 1 - beta1)
    avg_sq = (exp_avg_sq * beta2).addcmul_(g, g, value=1 - beta2)
    denom = (avg_sq.sqrt() / (1 - beta2**step).sqrt()).add_(eps)
    new = new - avg / denom * (lr / (1 - beta1**step))
    master.copy_(torch.where(finite, new, master))
    exp_avg.copy_(torch.where(finite, avg, exp_avg))
    exp_avg_sq.copy_(torch.where(finite, avg_sq, exp_avg_sq))
    weights.copy_(master)
    grad.zero_()


def _step(
    masters: list[torch.Tensor],
    exp_avgs: list[torch.Tensor],
    exp_avg_sqs: list[torch.Tensor],
    grads: list[torch.Tensor],
    weights: list[torch.Tensor],
    others: list[torch.Tensor],
    steps: torch.Tensor,
    sums: torch.Tensor,
    lrs: torch.Tensor,
    hyper: tuple[Hyper, ...],
    clip: float,
) -> None:
    """Every bucket's update. `sums`: the stage sums of squares and the loss slot (faults.py); `steps`: one step
    count per bucket; `lrs`: one learning rate per param group; `others`: gradient buffers to zero besides `grads`."""
    finite = sums.isfinite().all()
    scale: torch.Tensor | float = 1.0
    if clip > 0:
        total = sums[0]
        for s in range(1, len(sums) - 1):  # in the order the host's sum takes them (faults.bad_stages)
            total = total + sums[s]
        norm = total.sqrt()
        scale = torch.where(norm > clip, clip / (norm + 1e-6), 1.0).float()
    steps.add_(finite)
    for i in range(len(masters)):
        lr = lrs[hyper[i][0]]
        _update(masters[i], exp_avgs[i], exp_avg_sqs[i], grads[i], weights[i], steps[i], lr, scale, finite, hyper[i])
    if others:
        torch._foreach_zero_(others)


class MixedAdamW:
    """The one-call AdamW of a bf16 run's buckets (see the module docstring); `states` are torch AdamW's for
    `masters` (their step counts become views of `steps`), `groups` its param groups, `weights` the bf16 shards
    the masters are written back to. `backend`: torch.compile's for the step (a test's "aot_eager" on CPU); by
    default inductor on a GPU and no compilation elsewhere."""

    def __init__(
        self,
        masters: list[torch.Tensor],
        weights: list[torch.Tensor],
        states: list[dict],
        groups: list[dict],
        clip: float,
        backend: str | None = None,
    ):
        self.device = masters[0].device
        self.masters = [m.detach() for m in masters]  # the same storage, as plain tensors for the compiler
        self.weights, self.groups = weights, groups
        self.exp_avgs = [s["exp_avg"] for s in states]
        self.exp_avg_sqs = [s["exp_avg_sq"] for s in states]
        self.steps = torch.stack([s["step"].to(self.device, torch.float32) for s in states])
        for i, s in enumerate(states):  # torch AdamW's layout, one count per master, advanced in one place
            s["step"] = self.steps[i]
        group_of = {id(p): (i, g) for i, g in enumerate(groups) for p in g["params"]}
        hyper = tuple(_hyper(*group_of[id(m)]) for m in masters)

        def step(masters, exp_avgs, exp_avg_sqs, grads, weights, others, steps, sums, lrs):
            _step(masters, exp_avgs, exp_avg_sqs, grads, weights, others, steps, sums, lrs, hyper, clip)

        backend = backend or ("inductor" if self.device.type == "cuda" else None)
        self._step: Callable[..., None] = (
            torch.compile(step, backend=backend, fullgraph=True, dynamic=False) if backend else step
        )

    def step(self, grads: list[torch.Tensor], others: list[torch.Tensor], sums: torch.Tensor) -> None:
        """Step every master from its bf16 gradient in `grads` (zeroed after, with `others`), clipped by the norm of
        `sums` and dropped if any of them is non-finite; nothing here reads a device value on the host."""
        pinned = self.device.type == "cuda"  # a pageable copy would wait for the GPU to catch up
        lrs = torch.tensor([float(g["lr"]) for g in self.groups], dtype=torch.float32, pin_memory=pinned)
        lrs = lrs.to(self.device, non_blocking=True)
        self._step(self.masters, self.exp_avgs, self.exp_avg_sqs, grads, self.weights, others, self.steps, sums, lrs)


def _hyper(index: int, group: dict) -> Hyper:
    beta1, beta2 = group["betas"]
    return index, float(group["weight_decay"]), float(beta1), float(beta2), float(group["eps"])
