"""The plan's schema: structured configs (type-checked by Hydra/OmegaConf) with the defaults in one place,
and the composed config turned into them once (`typed`).

YAML files in conf/<group>/ pick values; the sections' dataclasses define which keys exist and their types, so
a misspelt key or a wrong type is refused by Hydra with one line naming it. Each section is defined in the room
that reads it (lcgraph/runtime/config.py: model, data, parallel, optim, train; observability/metrics.py:
logging; planner/settings.py: the optional `plan` section); `LcgraphConfig` gathers them for Hydra, and
`RunConfig` is what the app hands on: the sections, the planner's settings and the config as composed.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import MISSING, dataclass, field, fields, is_dataclass
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

from lcgraph.app.paths import conf_dir, recipes_dir
from lcgraph.app.sweep import register_resolvers
from lcgraph.observability.metrics import LoggingConfig, WandbConfig, WandbMode
from lcgraph.planner.settings import PlanConfig, PlanSettings
from lcgraph.runtime.config import (
    AttentionBackend,
    ChunkSplit,
    DataConfig,
    Device,
    Dtype,
    FuseMode,
    ModelConfig,
    Offload,
    OnNonfinite,
    OptimConfig,
    ParallelConfig,
    ScheduleName,
    TrainConfig,
)

__all__ = [
    "AttentionBackend",
    "ChunkSplit",
    "DataConfig",
    "Device",
    "Dtype",
    "FuseMode",
    "LoggingConfig",
    "ModelConfig",
    "Offload",
    "OnNonfinite",
    "OptimConfig",
    "ParallelConfig",
    "ScheduleName",
    "TrainConfig",
    "WandbConfig",
    "WandbMode",
]


@dataclass
class DumpConfig:
    graphs: bool = False


@dataclass
class LcgraphConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    dump: DumpConfig = field(default_factory=DumpConfig)


@dataclass
class RunConfig(LcgraphConfig):
    """The composed config as the app hands it on: typed sections, the planner's settings (`+plan.KEY`), and
    `composed`, the config as composed and resolved (what config.yaml, W&B and the ranks' agreement record)."""

    plan: PlanSettings = field(default_factory=PlanSettings)
    composed: dict = field(default_factory=dict)

    @property
    def plan_device(self) -> str | None:
        """`+plan.device` when the command line gives it (None: a rank plans for its own GPU's profile)."""
        given = self.composed.get("plan") or {}
        return given.get("device")

    def planned(self) -> PlanConfig:
        """The sections a plan of this run reads (lcgraph/planner)."""
        return PlanConfig(self.model, self.data, self.parallel, self.train, self.plan)


def typed(cfg: DictConfig) -> RunConfig:
    """The composed config (Hydra's, or its YAML read back in a spawned rank) as typed sections, once."""
    composed = OmegaConf.to_container(cfg, resolve=True)
    assert isinstance(composed, dict)  # a composed config is a mapping
    sections = {k: v for k, v in composed.items() if k != "plan"}
    schema = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(LcgraphConfig), sections))
    assert isinstance(schema, LcgraphConfig)
    plan = PlanSettings.of(dict(composed.get("plan") or {}))
    return RunConfig(**{f.name: getattr(schema, f.name) for f in fields(LcgraphConfig)}, plan=plan, composed=composed)


def choice_fields(schema: Any = LcgraphConfig, prefix: str = "") -> Iterator[tuple[str, tuple[str, ...]]]:
    """(dotted key, allowed values) of every choice field in the schema, e.g. ("parallel.schedule", (...))."""
    for f in fields(schema):
        kind = f.default_factory if f.default_factory is not MISSING else None
        if kind is not None and is_dataclass(kind):
            yield from choice_fields(kind, f"{prefix}{f.name}.")
        elif "choices" in f.metadata:
            yield f"{prefix}{f.name}", f.metadata["choices"]


def seq_chunks_for(schedule: str, chunks: int) -> int:
    """`parallel.seq_chunks` when it follows the schedule: `chunks` for seq1f1b, 1 for every other schedule.

    conf/parallel/*.yaml set `seq_chunks: ${lcgraph_seq_chunks:${.schedule},K}`, so a sweep over
    `parallel.schedule` from a seq1f1b plan compares every schedule; an explicit `parallel.seq_chunks=K`
    still wins (and is refused with a schedule other than seq1f1b)."""
    return int(chunks) if schedule == "seq1f1b" else 1


def local_gpus() -> int:
    """The GPUs of this machine (at least 1: a CPU machine plans and tests the layout as for one GPU);
    `${lcgraph_gpus:}` in recipes/gpu.yaml."""
    import torch

    return max(1, torch.cuda.device_count())


def register_configs() -> None:
    """Schemas for the config groups, and every recipe in recipes/ as `+recipe=NAME`."""
    register_resolvers()
    OmegaConf.register_new_resolver("lcgraph_seq_chunks", seq_chunks_for, replace=True)
    OmegaConf.register_new_resolver("lcgraph_gpus", local_gpus, replace=True)
    cs = ConfigStore.instance()
    cs.store(name="lcgraph_schema", node=LcgraphConfig)
    for group, node in (
        ("model", ModelConfig),
        ("data", DataConfig),
        ("parallel", ParallelConfig),
        ("optim", OptimConfig),
        ("train", TrainConfig),
        ("logging", LoggingConfig),
    ):
        cs.store(group=group, name=f"{group}_schema", node=node)
    for recipe in sorted(recipes_dir().glob("*.yaml")):
        cs.store(group="recipe", name=recipe.stem, node=OmegaConf.load(recipe), package="_global_")


def compose_config(overrides: list[str]):
    """The config exactly as lcgraph-train composes it (groups, schema, recipes), without running an app."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    register_configs()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(conf_dir()), version_base=None):
        return compose("config", overrides=list(overrides))
