"""Gradient synchronisation and the optimizer step of one rank (run by the OPT action).

Replicas of a stage (its dp x sp ranks) sum their gradients; parameters shared by two stages (tied
embeddings) sum theirs across the pipeline; the global gradient norm is clipped; AdamW updates.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


class ReplicatedAdamW(torch.optim.AdamW):
    """AdamW whose step first all-reduces gradients over the stage replicas, then clips the global norm."""

    def __init__(self, job):
        self.job = job
        params = job.all_params()
        decay = [p for n, p in params.items() if p.ndim >= 2]
        no_decay = [p for n, p in params.items() if p.ndim < 2]
        o = job.cfg.optim
        super().__init__([{"params": decay, "weight_decay": o.weight_decay},
                          {"params": no_decay, "weight_decay": 0.0}],
                         lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps, foreach=True)

    def sync_and_step(self, interp) -> float:
        job = self.job
        params = job.all_params()
        grads = {n: p.grad if p.grad is not None else torch.zeros_like(p) for n, p in params.items()}
        for n, p in params.items():
            p.grad = grads[n]
        if job.replica_group is not None and job.coords.dp * job.coords.sp > 1:
            for g in grads.values():
                dist.all_reduce(g, group=job.replica_group)
        for name in job.tied:
            dist.all_reduce(grads[name], group=job.tied_group)
        norm = self._global_norm(grads)
        clip = job.cfg.optim.grad_clip
        if clip > 0 and norm > clip:
            for g in grads.values():
                g.mul_(clip / (norm + 1e-6))
        self.step()
        self.zero_grad(set_to_none=True)
        return norm

    def _global_norm(self, grads: dict[str, torch.Tensor]) -> float:
        job = self.job
        counted = {n: g for n, g in grads.items()
                   if not (n in job.tied and job.coords.pp_rank != 0)}  # a tied weight counts once
        sq = torch.zeros((), dtype=torch.float64, device=job.device)
        for g in counted.values():
            sq += g.double().pow(2).sum()
        if job.mesh is not None and job.coords.pp > 1:
            dist.all_reduce(sq, group=job.mesh["pp"].get_group())
        return float(sq.sqrt())


def build_optimizer(job):
    return ReplicatedAdamW(job)
