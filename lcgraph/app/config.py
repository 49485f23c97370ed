"""The plan's schema: structured configs (type-checked by Hydra/OmegaConf) with the defaults in one place.

YAML files in conf/<group>/ pick values; these dataclasses define which keys exist and their types, so
a misspelt key or a wrong type is refused by Hydra with one line naming it.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import MISSING, dataclass, field, fields, is_dataclass
from typing import Any, Literal, Optional, get_args

from hydra.core.config_store import ConfigStore

from lcgraph.app.paths import conf_dir, recipes_dir
from lcgraph.observability.sweep import register_resolvers

# The values a choice field takes. OmegaConf cannot check Literal annotations, so each choice field is a
# `str` for Hydra and carries its Literal in the field's metadata (`choice`); validate.check_choices
# reads them from the schema (`choice_fields`), and mypy users of the config read the aliases.
Dtype = Literal["fp32", "bf16"]
Device = Literal["auto", "cpu", "cuda"]
AttentionBackend = Literal["auto", "math", "cudnn", "flash", "efficient"]
ScheduleName = Literal["gpipe", "1f1b", "seq1f1b", "interleaved_1f1b"]
ChunkSplit = Literal["even", "uniform_comp"]
WandbMode = Literal["offline", "online", "disabled"]
OnNonfinite = Literal["skip", "stop"]
FuseMode = Literal["auto", "on", "off"]
Offload = Literal["none", "attention", "all", "auto"]


def choice(options: Any, default: str) -> Any:
    """A `str` field for Hydra whose allowed values are the Literal `options`."""
    return field(default=default, metadata={"choices": get_args(options)})


@dataclass
class ModelConfig:
    name: str = "tiny"
    path: Optional[str] = None  # a local HF model directory (config.json, safetensors, tokenizer)
    vocab_size: int = 2048
    hidden_size: int = 256
    intermediate_size: int = 704
    num_hidden_layers: int = 4
    num_attention_heads: int = 8
    num_key_value_heads: int = 4
    head_dim: Optional[int] = None
    max_position_embeddings: int = 1048576
    rope_theta: float = 10000.0
    rope_scaling: Optional[Any] = None  # e.g. {rope_type: llama3, factor: 8.0, ...}
    rms_norm_eps: float = 1e-5
    tie_word_embeddings: bool = False
    initializer_range: float = 0.02


@dataclass
class DataConfig:
    path: Optional[str] = None  # text/JSONL/Parquet file, a directory of them, or a save_to_disk directory
    seq_len: int = 256
    micro_batch_size: int = 1
    max_corpus_mb: float = 3.0  # the standard-library demo corpus's size, and the text a trained BPE learns from
    text_key: str = "text"  # the JSONL / Parquet / save_to_disk column holding each document's text
    num_workers: int = 0  # tokenizer processes (0: one per core, at most 8)
    cross_document_attention: bool = True  # false: attention stays inside each packed document
    synthetic: bool = False  # uniform random tokens (benchmarks, planning runs): no corpus, no tokenizer
    # packed documents' mean length, log-normal with sigma 1: the synthetic corpus's documents (0: one endless
    # document), and what the planner prices a document mask with when data.path is not set
    mean_document_tokens: int = 0
    # a held-out split for train.eval_every: the corpus's last windows (this share of them; training never reads
    # them), or the windows of another corpus tokenized as this one
    eval_fraction: float = 0.0
    eval_path: Optional[str] = None


@dataclass
class ParallelConfig:
    pp: int = 1
    sp: int = 1
    cp: int = 1  # ring attention degree (context parallel); the sequence is sharded over sp x cp ranks
    dp: int = 1
    schedule: str = choice(ScheduleName, "1f1b")
    microbatches: int = 1
    seq_chunks: int = 1
    chunk_split: str = choice(ChunkSplit, "even")
    virtual_stages: int = 1
    pp_layers: Optional[list[int]] = None
    zero: bool = True  # distributed optimizer: optimizer state sharded over the dp*sp replicas (ZeRO-1, RS)
    bucket_mb: float = 25.0


@dataclass
class OptimConfig:
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 20
    weight_decay: float = 0.01
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0


@dataclass
class TrainConfig:
    steps: int = 200
    seed: int = 0
    dtype: str = choice(Dtype, "fp32")
    device: str = choice(Device, "auto")
    attention: str = choice(AttentionBackend, "auto")
    log_every: int = 1
    checkpoint_every: int = 0  # 0: only the final checkpoint
    keep_checkpoints: int = 2  # the newest N full-state checkpoints stay in <run>/checkpoints (0: all)
    resume: Optional[str] = None  # auto (this run directory's newest complete checkpoint, if any) or a path
    allow_oversubscribe: bool = False
    progress: bool = True
    fused_loss: bool = True  # LM head + cross-entropy without materialising the logits
    fuse: str = choice(FuseMode, "auto")  # fused RMSNorm/SwiGLU/rotary (auto: eager CUDA stages); docs/kernels.md
    fp8: str = "false"  # false | tensorwise | rowwise: the decoder layers' matmuls in FP8 (ops/fp8.py; docs/kernels.md)
    recompute: str = "none"  # none | full | keep_attention (true/false: full/none); see runtime.recompute
    recompute_layers: int = 0  # decoder layers per checkpoint segment (0: the planner picks); see runtime.recompute
    keep_attention_layers: int = -1  # keep_attention: layers per stage that keep attention (-1: all; auto: as fit)
    offload: str = choice(Offload, "none")  # kept activations to host memory and back; see runtime.offload
    compile: bool = False  # torch.compile each stage graph
    activation_budget: float = 1.0  # compiled: share of saved bytes kept (<1 reruns pointwise ops); runtime.recompute
    comm_timeout_s: float = 600.0  # process-group timeout: a collective or p2p stuck this long ends the run
    on_nonfinite: str = choice(OnNonfinite, "stop")  # NaN/inf loss or gradients: drop the update, then skip or stop
    check_every: int = 100  # compare replicas' parameter checksums every N steps (0: never)
    eval_every: int = 0  # a held-out loss every N steps, forward only (0: never); data.eval_fraction / eval_path
    eval_windows: int = 8  # held-out windows each evaluation reads (the same ones every time)


@dataclass
class WandbConfig:
    mode: str = choice(WandbMode, "offline")
    project: str = "lcgraph"
    entity: Optional[str] = None
    group: Optional[str] = None


@dataclass
class LoggingConfig:
    wandb: WandbConfig = field(default_factory=WandbConfig)


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
    from omegaconf import OmegaConf

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
