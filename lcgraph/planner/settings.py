"""What a plan is of: the sections of the run's config the planner reads, and its own settings.

`PlanSettings` are the optional keys of the config's `plan` section (`+plan.KEY=VALUE` on the command line,
lcgraph/planner/plan.py lists them); `PlanConfig` bundles them with the model, data, layout and run sections
(lcgraph/runtime/config.py), as the app hands them over.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Optional

from lcgraph.errors import PlanError
from lcgraph.runtime.config import DataConfig, ModelConfig, ParallelConfig, TrainConfig


@dataclass
class PlanSettings:
    device: str = "h100"
    profile: Optional[str] = (
        None  # a device profile JSON file (lcgraph-check writes one): planned with instead of device
    )
    gpus_per_node: Optional[int] = None
    dtype: Optional[str] = None  # None: train.dtype
    alternatives: bool = True
    chunks: list[int] = field(default_factory=lambda: [2, 4, 8])
    timeline: bool = True
    host_memory_gb: Optional[float] = None  # host RAM per GPU for train.offload (default: this machine's over its GPUs)

    @classmethod
    def of(cls, given: dict[str, Any]) -> PlanSettings:
        """The `plan` section `given` over the defaults (a dtype left unset is train.dtype's: evaluation.setup)."""
        known = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(given) - set(known))
        if unknown:
            raise PlanError(
                f"unknown planner setting(s) plan.{', plan.'.join(unknown)}; known: "
                f"{', '.join('plan.' + k for k in known)}"
            )
        if given.get("profile") and "device" in given:
            raise PlanError("give +plan.device (a shipped profile) or +plan.profile (a profile file), not both")
        return cls(**given)


@dataclass
class PlanConfig:
    """The sections a plan reads."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    settings: PlanSettings = field(default_factory=PlanSettings)
