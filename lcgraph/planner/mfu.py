"""Model FLOPs utilisation: the one definition every report of lcgraph uses.

    model FLOPs per token = 6*N + 6*L*h*S
    MFU                   = model FLOPs per token x tokens/s per GPU / the GPU's datasheet dense peak

Under a document mask (`data.cross_document_attention=false`) the attention term counts only the pairs the mask
leaves: 6*L*h*S*f, f the kept share of a window's causal pairs (planner/documents.py for a plan). N counts the matmul weights (every layer's q, k, v, o and MLP projections plus the LM head; embedding and
norms aside), L the decoder layers, h the hidden size, S the sequence length. The peak is the datasheet's
dense bf16 figure (fp32 for fp32 runs) stored in the device profile (`peak_bf16_flops`, `peak_fp32_flops`,
`peak_source`), not the profile's measured `matmul_flops`: that one is the planner's time model, and a
figure "of measured matmul peak" is reported beside MFU under that name. The trainer, the planner and
tools/bench.py all call these functions, so the same run reads the same MFU everywhere (docs/observability.md).
`RunPerf` reads a training run's steps this way on the GPU it runs on (`devices.device_gpu`); a GPU no shipped
profile names reports TFLOP/s only: another GPU's peak would give a wrong MFU.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lcgraph.planner.devices import GpuProfile
from lcgraph.planner.profile import DeviceProfile


def flops_per_token(matmul_params: float, layers: int, hidden: int, seq: int, attention_kept: float = 1.0) -> float:
    """6*N + 6*L*h*S*f: forward and backward FLOPs per token, causal attention over `seq` tokens included (f: the
    share of its pairs a document mask leaves)."""
    return 6.0 * matmul_params + 6.0 * layers * hidden * seq * attention_kept


def matmul_params(config) -> int:
    """N of the formula from an HF LLaMA-like config: per layer q, k, v, o and the three MLP projections,
    plus the LM head (counted even when tied to the embedding: it is a matmul every token pays)."""
    h, L = config.hidden_size, config.num_hidden_layers
    head_dim = getattr(config, "head_dim", None) or h // config.num_attention_heads
    q = config.num_attention_heads * head_dim
    kv = (getattr(config, "num_key_value_heads", None) or config.num_attention_heads) * head_dim
    per_layer = h * (2 * q + 2 * kv) + 3 * h * config.intermediate_size
    return L * per_layer + h * config.vocab_size


def model_flops_per_token(config, seq: int, attention_kept: float = 1.0) -> float:
    """6*N + 6*L*h*S*f of an HF config at sequence length `seq`."""
    return flops_per_token(matmul_params(config), config.num_hidden_layers, config.hidden_size, seq, attention_kept)


def datasheet_peak(profile: DeviceProfile, dtype: str) -> float | None:
    """The dense datasheet peak (FLOP/s) of `dtype` ("bf16" or "fp32") on this profile's GPU, or None when
    the profile does not know it (then no MFU is reported rather than a wrong one)."""
    peak = profile.peak_fp32_flops if dtype == "fp32" else profile.peak_bf16_flops
    return peak or None


def utilisation(flops_per_token_: float, tokens_per_s_per_gpu: float, peak: float | None) -> float | None:
    """Achieved model FLOP/s per GPU over `peak`; None without a peak."""
    return flops_per_token_ * tokens_per_s_per_gpu / peak if peak else None


def mfu(flops_per_token_: float, tokens_per_s_per_gpu: float, profile: DeviceProfile, dtype: str) -> float | None:
    """MFU against the GPU's datasheet dense peak of `dtype`."""
    return utilisation(flops_per_token_, tokens_per_s_per_gpu, datasheet_peak(profile, dtype))


def of_measured_matmul(
    flops_per_token_: float, tokens_per_s_per_gpu: float, profile: DeviceProfile, dtype: str
) -> float | None:
    """The same achieved rate over the profile's measured dense matmul rate (not MFU: a figure beside it)."""
    return utilisation(flops_per_token_, tokens_per_s_per_gpu, profile.matmul_rate(dtype))


def mfu_text(value: float | None) -> str:
    """A printed MFU: '34.2%', or 'n/a' when the GPU's datasheet peak is unknown."""
    return "n/a" if value is None else f"{value:.1%}"


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
        `attention_kept`: the share of causal attention pairs a document mask left (`flops_per_token`)."""
        per_gpu = tokens_per_s / self.world
        flops = self.flops_per_token - self.attention_flops_per_token * (1.0 - attention_kept)
        out = {"tflops_per_gpu": flops * per_gpu / 1e12}
        if self.gpu is not None and self.gpu.exact:
            figures = {
                "mfu": mfu(flops, per_gpu, self.gpu.profile, self.dtype),
                "of_measured_matmul_peak": of_measured_matmul(flops, per_gpu, self.gpu.profile, self.dtype),
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
        peak = datasheet_peak(prof, self.dtype) if self.gpu.exact else None
        if peak is None:
            return f"{self.gpu.note}; no datasheet peak known for it: TFLOP/s only, no MFU"
        return (
            f"MFU over the {self.dtype} datasheet peak of profile {prof.name}, {peak / 1e12:.1f} TFLOP/s "
            f"(its peak_source); of_measured_matmul_peak over {prof.matmul_rate(self.dtype) / 1e12:.0f} TFLOP/s"
        )
