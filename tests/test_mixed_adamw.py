"""The one-pass AdamW of a bf16 run's buckets (runtime/mixed_adamw.py) against torch.optim.AdamW on the fp32 master
with the fp32 gradient, and inside a bf16 job."""

from __future__ import annotations

import pytest
import torch

from lcgraph.runtime.mixed_adamw import step_bucket, step_scalars

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_one_pass_update_is_torch_adamw_on_the_fp32_master(weight_decay, device):
    """On a GPU the update is one compiled kernel for buckets of any size (two sizes here), against torch's fused
    AdamW there."""
    torch.manual_seed(0)
    for n in (4099, 70001):  # not a multiple of any vector width
        _against_torch(n, weight_decay, torch.device(device))


def _against_torch(n: int, weight_decay: float, dev: torch.device) -> None:
    master = torch.randn(n, device=dev)
    weights = master.to(torch.bfloat16)
    ref = torch.nn.Parameter(master.clone())
    fused = dev.type == "cuda"
    opt = torch.optim.AdamW([ref], lr=1.0, betas=(0.9, 0.95), eps=1e-8, weight_decay=weight_decay, fused=fused)
    group = opt.param_groups[0]
    state = {
        "step": torch.zeros((), device=dev),
        "exp_avg": torch.zeros_like(master),
        "exp_avg_sq": torch.zeros_like(master),
    }
    for step, (lr, scale) in enumerate([(3e-3, 1.0), (2e-3, 0.37), (1e-3, 1.0)]):
        grad = (torch.randn(n, device=dev) * (step + 1)).to(torch.bfloat16)
        ref.grad = grad.float() * scale
        group["lr"] = lr
        opt.step()
        step_bucket(master, state, grad, weights, step_scalars([group], scale, dev)[id(group)], group)
        torch.testing.assert_close(master, ref.detach(), rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(state["exp_avg_sq"], opt.state[ref]["exp_avg_sq"], rtol=1e-6, atol=1e-12)
        assert torch.equal(weights, master.to(torch.bfloat16))
        assert not grad.any()  # zeroed for the next step's accumulation
    assert state["step"].item() == opt.state[ref]["step"].item() == 3


def test_a_bf16_job_steps_its_masters_in_one_pass_and_checkpoints_them(tmp_path):
    """Two steps of a bf16 CPU job: masters moved, weights are their bf16 rounding, gradients zeroed, and the
    moments are the ones checkpoint_state names."""
    from lcgraph.app.job import Job
    from lcgraph.app.testing import run_config

    job = Job(run_config("parallel=single", "train.dtype=bf16", "train.steps=2"), tmp_path, 0, 1)
    before = {id(b): b.master.detach().clone() for b in job.optimizer.buckets}
    for i in range(2):
        job.run_step(i)
    for b in job.optimizer.buckets:
        assert not torch.equal(b.master.detach(), before[id(b)])
        assert torch.equal(b.param_flat[b.shard], b.master.detach().to(b.param_flat.dtype))
        assert not b.grad_flat.any()
    state = job.optimizer.checkpoint_state()
    moments = sum(t.numel() for k, t in state.items() if k.endswith(".exp_avg"))
    assert moments == sum(b.master.numel() for b in job.optimizer.buckets) and state
