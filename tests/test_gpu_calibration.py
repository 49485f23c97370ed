"""The planner against one GPU (python -m pytest -m gpu tests/test_gpu_calibration.py; LCGRAPH_PROFILE=path
picks the profile, default the shipped one of the GPU present): predicted step time within 15% and peak memory
within 10%. Each case is sized through the planner to the memory free on the GPU when it starts (an 80 GB part,
or a pytest process still holding earlier tests' blocks): as many of its 16 layers as fit, or a skip naming why."""

import gc
import importlib.util
import os
from pathlib import Path

import pytest
import torch

from lcgraph.planner.devices import match_profile
from lcgraph.planner.plan import AUTO_USABLE

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

_spec = importlib.util.spec_from_file_location("calibrate", Path(__file__).parents[1] / "tools" / "calibrate.py")
calibrate = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(calibrate)
GiB = 2**30


def sized_case(seq: int, chunks: int, mode: str, profile: str) -> tuple[list[str], dict]:
    """The case's overrides and prediction with the most layers (16, 8, 4, 2) whose planned peak fits
    AUTO_USABLE of the GPU's free memory; a skip with the planner's figures when not even 2 do."""
    gc.collect()
    torch.cuda.empty_cache()  # blocks this process cached for earlier tests go back to the device
    usable = AUTO_USABLE * torch.cuda.mem_get_info()[0]
    for layers in (16, 8, 4, 2):
        args = [*calibrate.overrides(seq, chunks, mode, False), f"model.num_hidden_layers={layers}"]
        predicted = calibrate.predict(args, profile)
        if predicted["peak_bytes"] <= usable:
            return args, predicted
    pytest.skip(
        f"the planner puts {seq} tokens {mode} with 2 layers at {predicted['peak_bytes'] / GiB:.1f} GiB, above the "
        f"{usable / GiB:.1f} GiB usable of this GPU's free memory"
    )


@pytest.mark.parametrize("seq,chunks,mode", [(16384, 1, "none"), (65536, 8, "keep_attention")])
def test_planner_predicts_a_single_gpu_step_within_the_bands(seq, chunks, mode):
    profile = os.environ.get("LCGRAPH_PROFILE") or match_profile(torch.cuda.get_device_name()) or "h200"
    args, predicted = sized_case(seq, chunks, mode, profile)
    measured = calibrate.measure_isolated(args, steps=2, warmup=1, timeout=300)
    assert "error" not in measured, (measured, predicted, args[-1])
    time_ratio = predicted["step_s"] / measured["step_s"]
    memory_ratio = predicted["peak_bytes"] / measured["peak_bytes"]
    assert abs(time_ratio - 1) <= calibrate.TIME_BAND, (time_ratio, predicted, measured)
    assert abs(memory_ratio - 1) <= calibrate.MEMORY_BAND, (memory_ratio, predicted, measured)
