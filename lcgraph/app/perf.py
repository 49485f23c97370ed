"""What GPU a rank runs on, and how a run's speed reads against it (TFLOP/s per GPU, MFU).

The figures come from lcgraph.planner.mfu, the definition the planner and tools/bench.py share: MFU is over
the GPU's datasheet dense peak of the run's dtype, and `of_measured_matmul_peak` (the same rate over the
profile's measured matmul rate) is reported beside it under that name. A GPU no shipped profile names
reports TFLOP/s only: another GPU's peak would give a wrong MFU.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lcgraph.planner import mfu
from lcgraph.planner.devices import GpuProfile, gpu_profile


def device_gpu(device: torch.device, requested: str | None = None) -> GpuProfile | None:
    """The profile of the CUDA device a rank runs on (by name, with its real total memory); None on CPU.
    `requested` (`+plan.device`) supplies the rates instead of the name match; the memory stays the GPU's."""
    if device.type != "cuda":
        return None
    props = torch.cuda.get_device_properties(device)
    return gpu_profile(torch.cuda.get_device_name(device), int(props.total_memory), requested)


@dataclass(frozen=True)
class RunPerf:
    """Model FLOPs per token of the run, its ranks and dtype, and the GPU it runs on (None: CPU)."""

    flops_per_token: float
    world: int
    dtype: str
    gpu: GpuProfile | None
    attention_flops_per_token: float = 0.0  # the 6*L*h*S part of flops_per_token (a document mask keeps less)

    def at(self, tokens_per_s: float, attention_kept: float = 1.0) -> dict[str, float]:
        """tflops_per_gpu, and on a known GPU mfu and of_measured_matmul_peak, at a whole-run `tokens_per_s`;
        `attention_kept`: the share of causal attention pairs a document mask left (mfu.py)."""
        per_gpu = tokens_per_s / self.world
        flops = self.flops_per_token - self.attention_flops_per_token * (1.0 - attention_kept)
        out = {"tflops_per_gpu": flops * per_gpu / 1e12}
        if self.gpu is not None and self.gpu.exact:
            figures = {
                "mfu": mfu.mfu(flops, per_gpu, self.gpu.profile, self.dtype),
                "of_measured_matmul_peak": mfu.of_measured_matmul(flops, per_gpu, self.gpu.profile, self.dtype),
            }
            out.update({k: v for k, v in figures.items() if v is not None})
        return out

    def step(self, metrics: dict, device: torch.device) -> dict[str, float | int]:
        """`at` the tokens/s of one step's `metrics` (and its attention_kept) and, on GPU, the step's peak memory."""
        out: dict[str, float | int] = {
            **self.at(metrics["tokens"] / metrics["step_time_s"], metrics.get("attention_kept", 1.0))
        }
        if device.type == "cuda":
            out["cuda_step_peak_bytes"] = int(torch.cuda.max_memory_allocated(device))
        return out

    def peak_line(self) -> str | None:
        """One line on what MFU divides by, or why there is none (None on CPU)."""
        if self.gpu is None:
            return None
        prof = self.gpu.profile
        peak = mfu.datasheet_peak(prof, self.dtype) if self.gpu.exact else None
        if peak is None:
            return f"{self.gpu.note}; no datasheet peak known for it: TFLOP/s only, no MFU"
        return (
            f"MFU over the {self.dtype} datasheet peak of profile {prof.name}, {peak / 1e12:.1f} TFLOP/s "
            f"(its peak_source); of_measured_matmul_peak over {prof.matmul_rate(self.dtype) / 1e12:.0f} TFLOP/s"
        )
