"""The sections of a run's config that the rooms below the app read, as typed dataclasses.

The app (lcgraph/app/config.py) registers them as Hydra's structured configs, so these dataclasses are the
schema and the defaults in one place, and turns the composed config into them once (`app.config.typed`);
each room then receives only the sections it uses: the model's shape (`ModelConfig`), the token data
(`DataConfig`), the layout (`ParallelConfig`), the optimizer (`OptimConfig`) and the run (`TrainConfig`).
The logging section is observability's (observability/metrics.py), the planner's settings the planner's
(planner/settings.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal, Optional, get_args

# The values a choice field takes. OmegaConf cannot check Literal annotations, so each choice field is a
# `str` for Hydra and carries its Literal in the field's metadata (`choice`); validate.check_choices
# reads them from the schema (`choice_fields`), and mypy users of the config read the aliases.
Dtype = Literal["fp32", "bf16"]
Device = Literal["auto", "cpu", "cuda"]
AttentionBackend = Literal["auto", "math", "cudnn", "flash", "efficient"]
ScheduleName = Literal["gpipe", "1f1b", "seq1f1b", "interleaved_1f1b"]
ChunkSplit = Literal["even", "uniform_comp"]
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
    fp8: str = "false"  # false | tensorwise | rowwise | rowwise_with_gw_hp: decoder matmuls in FP8 (docs/fp8.md)
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
