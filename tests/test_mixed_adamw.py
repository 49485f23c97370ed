"""The one-call AdamW of a bf16 run's buckets (runtime/mixed_adamw.py) against torch.optim.AdamW on the fp32 masters
with fp32 gradients, and inside a bf16 job."""

from __future__ import annotations

import pytest
import torch

from lcgraph.runtime import faults
from lcgraph.runtime.mixed_adamw import MixedAdamW

# (device, torch.compile backend): eager on CPU as a CPU run steps, the same function traced into one graph as a GPU
# compiles it (fullgraph: a graph break fails), and on a GPU compiled by inductor as a GPU run steps
DEVICES = [
    pytest.param("cpu", None, id="cpu-eager"),
    pytest.param("cpu", "aot_eager", id="cpu-traced"),
    pytest.param("cuda", None, id="cuda-inductor", marks=pytest.mark.gpu),
]
SIZES = (4099, 70001, 513, 12345)  # four buckets, none a multiple of a vector width
DECAY = (True, False, True, False)  # the two param groups: weight decay 0.1 and none
STAGE = (0, 0, 1, 1)  # the buckets' stages: two stage sums, as faults.stage_sums lays them out
CLIP = 40.0
# per step: the two groups' learning rates and the gradients' size. Step 1 (from 0) is clipped (its norm is over CLIP),
# step 3 has a NaN gradient (dropped), and step 4 starts from restored moments and step counts
STEPS = [((3e-3, 1e-3), 0.1), ((2e-3, 2e-3), 1.0), ((1e-3, 5e-4), 0.1), ((1e-3, 5e-4), 0.1), ((5e-4, 1e-4), 0.12)]
NAN_STEP, RESTORE_AFTER = 3, 4


@pytest.mark.parametrize("device,backend", DEVICES)
def test_one_call_over_buckets_of_two_groups_is_torch_adamw_clipped_dropped_and_restored(device, backend):
    """Four buckets of different sizes in two param groups, stepped in one call: each step the masters and moments
    match torch's AdamW (fused on a GPU) on the fp32 masters with the fp32 gradient clipped by the global norm;
    a non-finite step changes nothing but zeroes the gradients; after a restore (new moments and step counts,
    as a checkpoint load leaves them) the steps go on matching. On a GPU the call is one compiled graph."""
    dev = torch.device(device)
    torch.manual_seed(0)
    masters = [torch.nn.Parameter(torch.randn(n, device=dev), requires_grad=False) for n in SIZES]
    refs = [torch.nn.Parameter(m.detach().clone()) for m in masters]
    weights = [m.detach().to(torch.bfloat16) for m in masters]

    def groups_of(params):
        return [
            {"params": [p for p, d in zip(params, DECAY) if d], "weight_decay": 0.1},
            {"params": [p for p, d in zip(params, DECAY) if not d], "weight_decay": 0.0},
        ]

    fused = dev.type == "cuda"
    ref = torch.optim.AdamW(groups_of(refs), betas=(0.9, 0.95), eps=1e-8, fused=fused)
    ours = torch.optim.AdamW(groups_of(masters), betas=(0.9, 0.95), eps=1e-8)  # holds the state MixedAdamW steps
    mixed = _mixed(ours, masters, weights, backend)
    updates = 0
    for i, (lrs, size) in enumerate(STEPS):
        grads = [(torch.randn(n, device=dev) * size).to(torch.bfloat16) for n in SIZES]
        if i == NAN_STEP:
            grads[2][7] = float("nan")
        sums = faults.stage_sums(2, dev)
        for g, s in zip(grads, STAGE):
            sums[s] += torch.linalg.vector_norm(g, dtype=torch.float32).double() ** 2
        norm, bad = faults.bad_stages(sums)
        assert (norm > CLIP) == (i == 1) and bool(bad) == (i == NAN_STEP)
        before = [t.clone() for t in _tensors(ours, masters) + weights]
        for g, lr in zip(ours.param_groups + ref.param_groups, lrs + lrs):
            g["lr"] = lr
        if not bad:  # torch's AdamW, clipped as torch.nn.utils.clip_grad_norm_ does
            scale = CLIP / (norm + 1e-6) if norm > CLIP else 1.0
            for r, g in zip(refs, grads):
                r.grad = g.float() * scale
            ref.step()
            updates += 1
        other = torch.ones(5, dtype=torch.bfloat16, device=dev)  # another replica's part of a gradient buffer
        mixed.step(grads, [other], sums)
        assert not any(g.any() for g in [*grads, other])  # zeroed for the next step's accumulation
        if bad:
            assert all(torch.equal(a, b) for a, b in zip(before, _tensors(ours, masters) + weights))
        for m, r, w in zip(masters, refs, weights):
            torch.testing.assert_close(m, r.detach(), rtol=1e-6, atol=1e-7)
            torch.testing.assert_close(ours.state[m]["exp_avg_sq"], ref.state[r]["exp_avg_sq"], rtol=1e-6, atol=1e-12)
            assert torch.equal(w, m.detach().to(torch.bfloat16))
            assert ours.state[m]["step"].item() == ref.state[r]["step"].item() == updates
        if i == RESTORE_AFTER - 1:  # a checkpoint load: fresh state tensors, steps filled with the updates applied
            saved = {id(m): {k: t.clone() for k, t in ours.state[m].items()} for m in masters}
            ours = torch.optim.AdamW(groups_of(masters), betas=(0.9, 0.95), eps=1e-8)
            for m in masters:
                ours.state[m] = {"step": torch.zeros(()).fill_(updates), **{k: saved[id(m)][k] for k in _MOMENTS}}
            mixed = _mixed(ours, masters, weights, backend)
    assert updates == len(STEPS) - 1


_MOMENTS = ("exp_avg", "exp_avg_sq")


def _mixed(opt: torch.optim.AdamW, masters: list, weights: list, backend: str | None) -> MixedAdamW:
    for m in masters:
        if not opt.state[m]:
            opt.state[m] = {"step": torch.zeros(()), **{k: torch.zeros_like(m) for k in _MOMENTS}}
    return MixedAdamW(masters, weights, [opt.state[m] for m in masters], opt.param_groups, CLIP, backend)


def _tensors(opt: torch.optim.AdamW, masters: list[torch.Tensor]) -> list[torch.Tensor]:
    return [t for m in masters for t in (m.detach(), opt.state[m]["step"], *(opt.state[m][k] for k in _MOMENTS))]


def test_a_bf16_job_steps_its_masters_in_one_call_and_checkpoints_them(tmp_path):
    """Two steps of a bf16 CPU job: masters moved, weights are their bf16 rounding, gradients zeroed, AdamW's step
    count is the updates applied, and the moments are the ones checkpoint_state names."""
    from lcgraph.app.testing import job_of, run_config

    job = job_of(run_config("parallel=single", "train.dtype=bf16", "train.steps=2"), tmp_path)
    before = {id(b): b.master.detach().clone() for b in job.optimizer.buckets}
    for i in range(2):
        job.run_step(i)
    opt = job.optimizer
    for b in opt.buckets:
        assert not torch.equal(b.master.detach(), before[id(b)])
        assert torch.equal(b.param_flat[b.shard], b.master.detach().to(b.param_flat.dtype))
        assert not b.grad_flat.any()
        assert opt.adamw.state[b.master]["step"].item() == opt.updates == 2
    state = opt.checkpoint_state()
    moments = sum(t.numel() for k, t in state.items() if k.endswith(".exp_avg"))
    assert moments == sum(b.master.numel() for b in opt.buckets) and state
