"""Which device profile describes the GPU a rank runs on.

`lcgraph-plan` plans for the profile named by `+plan.device` (a laptop has no GPU to ask). A training run
on CUDA plans `train.recompute=auto` and `train.recompute_layers=0` for the GPU it has: the profile is
picked from `torch.cuda.get_device_name()` and its memory replaced by the device's real total memory, so
an H200 is planned with 139.8 GiB and an 80 GB part with 80 GB, whatever the default profile is. An
unknown GPU gets the shipped profile nearest to it in memory (its rates stand in) with its own memory,
and one line says so. `gpu_profile` is a pure function of (name, total memory): tests fake both.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from lcgraph.planner.profile import DeviceProfile, load_profile, profile_names

GiB = 2**30
# shipped profile -> (words its device names contain, words that mark another part of the same family:
# H100 PCIe / NVL and H200 NVL run at lower clocks and power than the SXM parts the profiles describe)
GPU_NAMES: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "h200": (("h200",), ("nvl",)),
    "h100": (("h100",), ("pcie", "nvl")),
    "a100": (("a100",), ()),
}


@dataclass(frozen=True)
class GpuProfile:
    """The profile a GPU plans with; `exact`: its name matched a shipped profile (its datasheet peak holds)."""

    profile: DeviceProfile
    exact: bool
    note: str


def match_profile(device_name: str) -> str | None:
    """The shipped profile whose GPU this device name names ("NVIDIA H200" -> "h200"), or None."""
    name = device_name.lower()
    for profile, (words, other_parts) in GPU_NAMES.items():
        if any(w in name for w in words) and not any(w in name for w in other_parts):
            return profile
    return None


def gpu_profile(device_name: str, total_memory: int, requested: str | None = None) -> GpuProfile:
    """The profile for a GPU called `device_name` with `total_memory` bytes; `requested` (a `+plan.device`
    name or path) supplies the rates instead of the name match. The memory is always the device's own."""
    if requested:
        base, exact, how = load_profile(requested), match_profile(device_name) is not None, f"+plan.device={requested}"
    elif (name := match_profile(device_name)) is not None:
        base, exact, how = load_profile(name), True, f"profile {name}"
    else:
        shipped = [load_profile(n) for n in profile_names()]
        # ties (the 80 GB a100 and h100) go to the newer part: an unknown GPU today is more likely a recent one
        base = min(shipped, key=lambda p: (abs(p.memory_bytes - total_memory), -p.peak_bf16_flops))
        exact, how = False, f"no profile for this GPU: the nearest by memory, {base.name}, with its own memory"
    profile = dataclasses.replace(base, memory_bytes=float(total_memory))
    return GpuProfile(profile, exact, f"{device_name} ({total_memory / GiB:.1f} GiB): {how}")


def device_gpu(device: torch.device, requested: str | None = None) -> GpuProfile | None:
    """The profile of the CUDA device a rank runs on (by name, with its real total memory); None on CPU.
    `requested` (`+plan.device`) supplies the rates instead of the name match; the memory stays the GPU's."""
    if device.type != "cuda":
        return None
    props = torch.cuda.get_device_properties(device)
    return gpu_profile(torch.cuda.get_device_name(device), int(props.total_memory), requested)
