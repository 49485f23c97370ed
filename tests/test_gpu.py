"""GPU-only paths (run on a GPU machine: python -m pytest -m gpu tests/test_gpu.py)."""

import pytest
import torch

from lcgraph.app.testing import cuda_allocated_before_a_job, llama1b_job

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def test_bf16_loss_matches_hf_at_4k_tokens():
    from transformers import LlamaForCausalLM

    job = llama1b_job(layers=4, seq=4096, steps=1)
    units, total = job.step_units(0)
    params = {n: p.detach().clone() for n, p in job.all_params().items()}  # before the update
    loss = job.run_step(0)["loss"]
    with torch.device("cuda"):
        hf = LlamaForCausalLM(job.config).to(torch.bfloat16)
    hf.config._attn_implementation = "sdpa"
    hf.load_state_dict(params, strict=False)
    unit = units[(0, 0)]
    with torch.no_grad():
        logits = hf(input_ids=unit.input_ids, position_ids=unit.position_ids).logits.float()
    ref = torch.nn.functional.cross_entropy(logits.flatten(0, 1), unit.labels.flatten())
    assert abs(loss - float(ref)) < 2e-2 * float(ref)


def test_bf16_training_holds_16_bytes_per_parameter_between_steps():
    """bf16 weights and gradients, fp32 master and two fp32 moments: the memory budget of HF + bf16 AdamW's
    8 B per parameter plus 8 for fp32 master and moments. A persistent fp32 gradient would make it 20.
    Counted above what was allocated before the job was built: an earlier test's job, kept alive by its reference
    cycles until a collection, read as 37 B per parameter on an H200."""
    base = cuda_allocated_before_a_job()
    job = llama1b_job(layers=2, seq=1024, steps=2)
    job.run_step(0)
    torch.cuda.synchronize()
    held = torch.cuda.memory_allocated() - base
    params = sum(p.numel() for p in job.all_params().values())
    assert 16 * params <= held < 16.5 * params, held / params


def test_fused_loss_on_cuda_in_bf16_matches_an_fp64_reference_over_several_blocks(monkeypatch):
    """The CUDA path: bf16 d(logits) from the compiled block, dW accumulated by cuBLAS into fp32 (addmm out_dtype)."""
    from lcgraph.ops import fused

    monkeypatch.setattr(fused, "BLOCK_BYTES", 4 * 5000 * 300)  # 300 rows per block: 10 blocks, the last partial
    torch.manual_seed(0)
    hidden = torch.randn(2, 1450, 256, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    weight = (torch.randn(5000, 256, device="cuda") / 16).to(torch.bfloat16).requires_grad_()
    labels = torch.randint(0, 5000, (2, 1450), device="cuda")
    labels[1, :100] = fused.IGNORE_INDEX
    loss = fused.linear_cross_entropy(hidden, weight, labels)
    (loss * 0.5).backward()
    h, w = hidden.detach().double().cpu().requires_grad_(), weight.detach().double().cpu().requires_grad_()
    ref = torch.nn.functional.cross_entropy(h.flatten(0, 1) @ w.t(), labels.cpu().flatten(), reduction="sum")
    (ref * 0.5).backward()
    assert abs(float(loss) - float(ref)) < 1e-3 * float(ref)
    for got, want in ((hidden.grad, h.grad), (weight.grad, w.grad)):
        err = float((got.double().cpu() - want).norm() / want.norm())
        assert err < 1e-2, err


def test_overlap_tool_reads_a_cuda_profiler_trace(tmp_path):
    """One GPU has no reduce-scatter (NCCL needs a GPU per rank); this checks the CUDA trace is parsed:
    kernels found, backward ranges named by the runtime's record_function."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    tool = Path(__file__).resolve().parents[1] / "tools" / "overlap.py"
    subprocess.run(
        [
            sys.executable,
            str(tool),
            "--out",
            str(tmp_path),
            "--warmup",
            "1",
            "parallel=single",
            "model=llama3_1b",
            "model.num_hidden_layers=2",
            "data.seq_len=4096",
            "data.synthetic=true",
            "train.dtype=bf16",
            "train.device=cuda",
            "logging.wandb.mode=disabled",
            "train.progress=false",
        ],
        check=True,
        timeout=600,
    )
    (rank,) = json.loads((tmp_path / "overlap.json").read_text())["ranks"]
    rs = rank["reduce_scatter"]
    assert rs["device"] == "cuda" and rs["count"] == 0 and rank["all_gather"]["count"] == 0
    assert 0.5 * rank["step_time_s"] < rs["compute_s"] / rank["steps"] < 1.5 * rank["step_time_s"]


def test_nccl_collectives_in_a_cuda_trace_are_found_through_their_c10d_call(tmp_path):
    """A one-rank NCCL group (one GPU here): NCCL copies instead of running a ring kernel, but the copy
    is still launched inside the c10d call, which is how lcgraph.observability.overlap finds a collective's GPU work."""
    import json
    import os

    import torch.distributed as dist
    from torch.profiler import ProfilerActivity, profile

    from lcgraph.observability.overlap import analyze

    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29533")
    dist.init_process_group("nccl", rank=0, world_size=1)
    try:
        a = torch.randn(4096, 4096, device="cuda")
        grads, shard = torch.randn(64 << 20, device="cuda"), torch.empty(64 << 20, device="cuda")
        params = torch.empty(64 << 20, device="cuda")
        dist.reduce_scatter_tensor(shard, grads)  # the communicator starts outside the trace
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            with torch.profiler.record_function("B0.0"):
                work = dist.reduce_scatter_tensor(shard, grads, async_op=True)
                for _ in range(8):
                    a = torch.nn.functional.normalize(a @ a)
            work.wait()
            dist.all_gather_into_tensor(params, shard)
            torch.cuda.synchronize()
        prof.export_chrome_trace(str(tmp_path / "trace.json"))
    finally:
        dist.destroy_process_group()
    found = analyze(json.loads((tmp_path / "trace.json").read_text()))
    rs, ag = found["reduce_scatter"], found["all_gather"]
    assert rs.device == "cuda" and rs.count >= 1 and ag.count >= 1 and rs.comm_s > 0
    assert rs.compute_s > 0  # the matmuls, not the collectives' copies
    print(json.dumps({k: v.as_dict() for k, v in found.items()}))


# bf16 inputs against the fp32 math reference: outputs within 3e-2, gradients within 5e-2 (absolute and relative)
DOCUMENT_BF16_TOLERANCE = {"out": 3e-2, "grad": 5e-2}


@pytest.mark.parametrize("backend", ["cudnn", "flash", "efficient", "math"])
@pytest.mark.parametrize("sq,sk", [(256, 256), (128, 384)])
def test_document_mask_on_each_gpu_kernel_agrees_with_cpu_math(backend, sq, sk):
    """Each kernel, one causal span per document (no [S, S] mask), against the fp32 math reference on CPU. The
    documents include one-token ones, one crossing the start of the queries (a Seq1F1B chunk's relayed prefix) and
    a different mix per row."""
    from lcgraph.ops import attention, masks

    torch.manual_seed(0)
    q = torch.randn(2, 8, sq, 64)
    k, v = torch.randn(2, 2, sk, 64), torch.randn(2, 2, sk, 64)
    lengths = [[100, 1, 1, 150, 1, 1000], [3, 1, 50, 1, 150, 1, 100, 1, 1000]]  # cut at sk
    docs = torch.stack([torch.repeat_interleave(torch.arange(len(n)), torch.tensor(n))[:sk] for n in lengths])
    before = attention.attention_backend()
    try:
        masks.set_documents(docs)
        attention.set_backend("math")
        cpu = [t.clone().requires_grad_(True) for t in (q, k, v)]
        ref = attention.attention_fn(*cpu, 0.125)
        ref.sum().backward()
        attention.set_backend(backend)
        dtype = torch.float32 if backend == "efficient" else torch.bfloat16
        dev = [t.cuda().to(dtype).requires_grad_(True) for t in (q, k, v)]
        out = attention.attention_fn(*dev, 0.125)
        out.float().sum().backward()
    finally:
        masks.set_documents(None)
        attention.set_backend(before)
    tol = DOCUMENT_BF16_TOLERANCE
    torch.testing.assert_close(out.float().cpu(), ref, atol=tol["out"], rtol=tol["out"])
    for d, c in zip(dev, cpu):
        torch.testing.assert_close(d.grad.float().cpu(), c.grad, atol=tol["grad"], rtol=tol["grad"])


def test_auto_runs_flash_under_a_document_mask_where_it_runs_cudnn_without():
    """cuDNN builds a plan per span shape and packed documents bring new shapes every step (docs/attention.md), so
    `auto` swaps it for flash under a mask, on the GPUs whose table picks cuDNN; the unmasked call keeps the table's
    choice."""
    from lcgraph.ops import attention, masks

    q = torch.randn(1, 8, 64, 64, device="cuda", dtype=torch.bfloat16)
    k, v = torch.randn_like(q[:, :2]), torch.randn_like(q[:, :2])
    before = attention.attention_backend()
    try:
        attention.set_backend("auto")
        table = attention.resolve_backend(q)
        plain = attention.attend(q, k, v, 0.125).backend
        masks.set_documents(torch.repeat_interleave(torch.arange(2), torch.tensor([20, 44]))[None])
        masked = attention.attend(q, k, v, 0.125).backend
    finally:
        masks.set_documents(None)
        attention.set_backend(before)
    assert plain == table
    assert masked == attention.DOCUMENT_AUTO.get(table, table) + attention.DOCUMENTS
    if torch.cuda.get_device_capability()[0] == 9:
        assert masked.startswith("flash"), masked


@pytest.mark.parametrize("recipe", ["tensorwise", "rowwise", "rowwise_with_gw_hp"])
def test_fp8_trains_on_the_gpu_beside_bf16(recipe):
    """The Llama-3.2-1B shape cut to 2 layers at 4k tokens, the same weights and window: the first FP8 loss within 1%
    of bf16's (FP8's rounding of 7 matmuls a layer), every step finite, and the stage graphs run fp8_linear (on a GPU
    below compute capability 8.9 the job refuses it instead). Also checks the CUDA path of _scaled_mm: row-major
    first operand, column-major second, every dimension padded to 16 (4096 tokens; hidden 2048, ffn 8192)."""
    from lcgraph.errors import PlanError
    from lcgraph.ops.fp8 import fp8_linear

    if torch.cuda.get_device_capability() < (8, 9):
        with pytest.raises(PlanError, match="needs FP8 tensor cores"):
            llama1b_job(f"train.fp8={recipe}", layers=2, seq=4096, steps=2)
        return
    bf16 = llama1b_job(layers=2, seq=4096, steps=2)
    ref = [bf16.run_step(s)["loss"] for s in range(2)]
    del bf16
    job = llama1b_job(f"train.fp8={recipe}", layers=2, seq=4096, steps=2)
    assert sum(n.target is fp8_linear for s in job.stages.values() for n in s.graph.gm.graph.nodes) == 14
    losses = [job.run_step(s)["loss"] for s in range(2)]
    assert all(torch.isfinite(torch.tensor(losses)))
    assert abs(losses[0] - ref[0]) < 1e-2 * ref[0], (losses, ref)
