"""The planner against one GPU (python -m pytest -m gpu tests/test_gpu_calibration.py; LCGRAPH_PROFILE=path
picks the profile, default the shipped h200): predicted step time within 15% and peak memory within 10%."""

import importlib.util
import os
from pathlib import Path

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

_spec = importlib.util.spec_from_file_location("calibrate", Path(__file__).parents[1] / "tools" / "calibrate.py")
calibrate = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(calibrate)


@pytest.mark.parametrize("seq,chunks,mode", [(16384, 1, "none"), (65536, 8, "keep_attention")])
def test_planner_predicts_a_single_gpu_step_within_the_bands(seq, chunks, mode):
    args = calibrate.overrides(seq, chunks, mode, False)
    profile = os.environ.get("LCGRAPH_PROFILE", "h200")
    measured = calibrate.measure_isolated(args, steps=2, warmup=1, timeout=300)
    assert "error" not in measured, measured
    predicted = calibrate.predict(args, profile)
    time_ratio = predicted["step_s"] / measured["step_s"]
    memory_ratio = predicted["peak_bytes"] / measured["peak_bytes"]
    assert abs(time_ratio - 1) <= calibrate.TIME_BAND, (time_ratio, predicted, measured)
    assert abs(memory_ratio - 1) <= calibrate.MEMORY_BAND, (memory_ratio, predicted, measured)
