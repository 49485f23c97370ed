"""Up-front plan validation: every layout that cannot work is refused before any process starts.

Each check raises PlanError naming every value involved as `key=value`, and the fix. The rules, in the
order they are checked (docs/recipes.md lists them with examples):

    keys       every key is one the schema declares (also those added with `+`), except under `plan`
               (lcgraph-plan's settings, checked by the planner); model=hf has a model.path
    choices    train.dtype, train.device, train.attention, parallel.schedule, parallel.chunk_split and
               logging.wandb.mode take one of the values their schema field declares (config.choice);
               train.recompute is none, keep_attention, full or auto (true/false still mean full/none);
               train.offload=attention needs train.recompute keep_attention (or auto)
    counts     parallel.{pp, sp, dp, microbatches, seq_chunks, virtual_stages}, data.seq_len,
               data.micro_batch_size and train.steps are >= 1
    model      hidden_size % num_attention_heads == 0 (unless head_dim is set), an even head dim (RoPE),
               and num_attention_heads % num_key_value_heads == 0
    stages     pp * virtual_stages <= num_hidden_layers; pp_layers, when given, has one entry >= 1 per
               stage and sums to num_hidden_layers
    schedule   seq_chunks > 1 only with seq1f1b; virtual_stages > 1 only with interleaved_1f1b, which
               needs pp >= 2, virtual_stages >= 2, and microbatches % pp == 0 or microbatches <= pp
    sequence   with k = seq_chunks (seq1f1b) or 1: seq_len >= 2 * sp * k (a length the chunks and shards do
               not divide is padded: graph/ring.py padded_length)
    ulysses    num_attention_heads % sp == 0; num_key_value_heads and sp divide one another
    ring       cp > 1: seq_len >= 2 * cp * sp * k (each chunk holds 2 * cp zigzag pieces of sp tokens or more)
    documents  data.num_workers >= 0, data.mean_document_tokens >= 0
    eval       train.eval_every > 0 has data.eval_fraction in (0, 1) or data.eval_path (not both)
    positions  data.seq_len <= the model's max_position_embeddings
    window     a model's sliding window (Mistral, Qwen2 with use_sliding_window) is >= data.seq_len
    files      model.path holds config.json, readable safetensors weights and (unless data.synthetic) a
               tokenizer, and no shape key is overridden beside it; data.path holds text
    launch     under a launcher (WORLD_SIZE set) WORLD_SIZE == pp * sp * cp * dp; the ranks of this node fit
               its GPUs (train.device cuda/auto with a GPU) or its CPU cores (train.device=cpu), unless
               train.allow_oversubscribe=true
"""

from __future__ import annotations

import difflib
import os
from collections.abc import Iterator, Sequence
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from lcgraph.app.config import LcgraphConfig, choice_fields
from lcgraph.app.job import run_device
from lcgraph.app.paths import conf_dir, recipes_dir
from lcgraph.errors import LaunchError, ModelPathError, PlanError
from lcgraph.graph.capture import check_llama_like
from lcgraph.graph.passes import check_ulysses
from lcgraph.graph.ring import check_ring
from lcgraph.ops.fp8 import fp8_recipe, fp8_refusal
from lcgraph.runtime import data
from lcgraph.runtime.model import build_config, check_sliding_window
from lcgraph.runtime.recompute import recompute_mode

COUNT_KEYS = (
    "parallel.pp",
    "parallel.sp",
    "parallel.cp",
    "parallel.dp",
    "parallel.microbatches",
    "parallel.seq_chunks",
    "parallel.virtual_stages",
    "data.seq_len",
    "data.micro_batch_size",
    "train.steps",
)
OPEN_SECTIONS = ("plan",)  # sections whose keys their own module checks (lcgraph-plan's settings)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model")  # HF fast tokenizer, or a sentencepiece model


def _unknown_keys(given: dict, schema: dict, prefix: str = "") -> Iterator[tuple[str, list[str]]]:
    """(dotted key, the keys its section does have) of every key of `given` that `schema` lacks."""
    for key, value in given.items():
        if key not in schema:
            if f"{prefix}{key}" not in OPEN_SECTIONS:
                yield f"{prefix}{key}", sorted(schema)
        elif isinstance(value, dict) and isinstance(schema[key], dict):
            yield from _unknown_keys(value, schema[key], f"{prefix}{key}.")


def check_keys(cfg: DictConfig) -> None:
    """Hydra's `+key=value` adds a key the schema lacks (its own hint for a typo): refuse it."""
    schema = OmegaConf.to_container(OmegaConf.structured(LcgraphConfig))
    given = OmegaConf.to_container(cfg, resolve=False)
    assert isinstance(schema, dict) and isinstance(given, dict)
    for key, known in _unknown_keys(given, schema):
        section, _, name = key.rpartition(".")
        near = difflib.get_close_matches(name, known, n=1)
        hint = f"did you mean {section + '.' if section else ''}{near[0]}? " if near else ""
        raise PlanError(f"unknown key {key}; {hint}known keys{' of ' + section if section else ''}: {', '.join(known)}")
    if OmegaConf.is_missing(cfg.model, "path") or (cfg.model.name == "hf" and not cfg.model.path):
        raise PlanError("model=hf needs model.path=/path/to/a/local/HF/model (config.json, safetensors, tokenizer)")


def check_overrides(overrides: Sequence[str]) -> None:
    """The command line's overrides before Hydra composes them (Hydra's own messages run to several lines): a
    misspelt key names the nearest, an unknown group option lists the options, a recipe without `+` says so."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import OverrideParseException

    try:
        parsed = OverridesParser.create().parse_overrides(overrides=list(overrides))
    except OverrideParseException as exc:
        raise PlanError(f"{str(exc).splitlines()[0]}; an override is key=value (a list: key=[a,b])") from None
    schema = OmegaConf.to_container(OmegaConf.structured(LcgraphConfig))
    assert isinstance(schema, dict)
    groups = {g.name: sorted(p.stem for p in g.glob("*.yaml")) for g in conf_dir().iterdir() if g.is_dir()}
    groups["recipe"] = sorted(p.stem for p in recipes_dir().glob("*.yaml"))
    for o in parsed:
        key = o.key_or_group
        if key.split(".")[0].split("/")[0] == "hydra" or o.is_delete():
            continue
        if key in groups:
            _check_group(key, o, groups[key])
        elif key.split(".")[0] not in OPEN_SECTIONS:
            _check_key(key, schema)


def _check_group(group: str, o, options: list[str]) -> None:
    plus = "+" if group == "recipe" else ""
    values = list(o.sweep_string_iterator()) if o.is_sweep_override() else [o.get_value_element_as_str()]
    given = ",".join(values)
    if plus and not (o.is_add() or o.is_force_add()):
        raise PlanError(f"a recipe is added to the defaults with +: use +recipe={given}")
    if not plus and o.is_add():
        raise PlanError(f"{group} is in the defaults already: use {group}={given} (without +)")
    for value in values:
        if value not in options:
            near = difflib.get_close_matches(value, options, n=1)
            hint = f"did you mean {plus}{group}={near[0]}? " if near else ""
            raise PlanError(f"unknown {group} {value!r}; {hint}the {group}s: {', '.join(options)}")


def _check_key(key: str, schema: dict) -> None:
    node: object = schema
    parts = key.split(".")
    for i, part in enumerate(parts):
        if not isinstance(node, dict) or not node:
            return  # a value, or a free-form mapping: Hydra and the schema check the rest
        if part not in node:
            section = ".".join(parts[:i])
            known = sorted(node)
            near = difflib.get_close_matches(part, known, n=1)
            hint = f"did you mean {section + '.' if section else ''}{near[0]}? " if near else ""
            where = f" of {section}" if section else ""
            raise PlanError(f"unknown key {key}; {hint}known keys{where}: {', '.join(known)}")
        node = node[part]


def check_model_overrides(cfg: DictConfig, overrides: Sequence[str]) -> None:
    """A loaded model's shape comes from its config.json: shape overrides beside model.path are refused."""
    if not cfg.model.path:
        return
    keys = [o.lstrip("+~").split("=", 1)[0] for o in overrides]
    clash = [k for k in keys if k.startswith("model.") and k not in ("model.path", "model.name")]
    if clash:
        raise PlanError(
            f"{', '.join(clash)} conflict with model.path={cfg.model.path}: a loaded model's shape comes from "
            "its config.json; drop the override or model.path"
        )


def check_model_dir(path: str, needs_tokenizer: bool) -> None:
    """model.path holds readable safetensors weights and a tokenizer (config.json: build_config checks it)."""
    from safetensors import safe_open

    root = Path(path)
    index = root / "model.safetensors.index.json"
    if index.is_file():
        import json

        shards = sorted({root / f for f in json.loads(index.read_text())["weight_map"].values()})
    elif (root / "model.safetensors").is_file():
        shards = [root / "model.safetensors"]
    else:
        raise ModelPathError(
            f"model.path={path} has no weights (model.safetensors or model.safetensors.index.json); "
            "save the model with save_pretrained(safe_serialization=True) or convert its .bin files"
        )
    for shard in shards:
        try:
            with safe_open(str(shard), "pt") as f:
                f.keys()
        except Exception as exc:  # noqa: BLE001 - missing, truncated or not safetensors: all the same fix
            raise ModelPathError(
                f"{shard} is not a readable safetensors file ({type(exc).__name__}: {exc}); re-download or re-save it"
            ) from exc
    if needs_tokenizer and not any((root / f).is_file() for f in TOKENIZER_FILES):
        raise ModelPathError(
            f"model.path={path} has no tokenizer ({' or '.join(TOKENIZER_FILES)}); copy the model's tokenizer "
            "files there, or train on data.synthetic=true"
        )


def check_files(cfg: DictConfig) -> None:
    """The model directory and the corpus, before any process starts."""
    if cfg.model.path:
        check_model_dir(cfg.model.path, needs_tokenizer=not cfg.data.synthetic)
    if cfg.data.path and not cfg.data.synthetic:  # the default corpus (the standard library) is always there
        data.corpus_files(cfg.data.path, int(cfg.data.max_corpus_mb * 2**20))


def check_positions(seq: int, max_positions: int) -> None:
    if seq > max_positions:
        raise PlanError(
            f"data.seq_len={seq} exceeds the model's max_position_embeddings={max_positions}; use data.seq_len <= "
            f"{max_positions} (or a model with longer RoPE scaling)"
        )


def _get(cfg, dotted: str):
    node = cfg
    for part in dotted.split("."):
        node = node[part]
    return node


def check_choices(cfg: DictConfig) -> None:
    for key, allowed in choice_fields():
        value = _get(cfg, key)
        if value not in allowed:
            raise PlanError(f"{key}={value} is not a known choice; use one of: {', '.join(allowed)}")


def check_offload(cfg: DictConfig) -> None:
    """train.offload=attention moves what keep_attention keeps: with another recompute mode there is nothing."""
    recompute = recompute_mode(cfg.train.recompute, allow_auto=True)
    if cfg.train.get("offload", "none") == "attention" and recompute not in ("keep_attention", "auto"):
        raise PlanError(
            f"train.offload=attention moves the attention outputs train.recompute=keep_attention keeps, but "
            f"train.recompute={cfg.train.recompute} keeps none; set train.recompute=keep_attention or train.offload=all"
        )


def check_fp8(cfg: DictConfig, device: str) -> None:
    """train.fp8: a known recipe, on a device whose matmuls take it (`device`: cpu or cuda, as the ranks run)."""
    import torch

    recipe = fp8_recipe(cfg.train.fp8)
    dtype = torch.bfloat16 if cfg.train.dtype == "bf16" else torch.float32
    why = recipe and fp8_refusal(recipe, torch.device(device), dtype)
    if why:
        raise PlanError(why)


def check_counts(cfg: DictConfig) -> None:
    for key in COUNT_KEYS:
        value = _get(cfg, key)
        if value < 1:
            raise PlanError(f"{key}={value} must be >= 1")


def check_documents(cfg: DictConfig) -> None:
    """data.num_workers is a process count, data.mean_document_tokens a length. (data.cross_document_attention=false
    needs no check: every kernel and layout runs it, one causal span per document: ops/masks.py, ops/ring.py.)"""
    d = cfg.data
    if d.num_workers < 0:
        raise PlanError(f"data.num_workers={d.num_workers} must be >= 0 (0: one tokenizer process per core)")
    if d.mean_document_tokens < 0:
        raise PlanError(f"data.mean_document_tokens={d.mean_document_tokens} must be >= 0 (0: one document)")


def check_eval(cfg: DictConfig) -> None:
    """train.eval_every needs a held-out split, a share of the corpus below 1 or another corpus, not both."""
    d, t = cfg.data, cfg.train
    if not 0.0 <= d.eval_fraction < 1.0:
        raise PlanError(f"data.eval_fraction={d.eval_fraction} must be in [0, 1): the share of windows held out")
    if d.eval_fraction > 0 and d.eval_path:
        raise PlanError(
            f"data.eval_fraction={d.eval_fraction} and data.eval_path={d.eval_path} both name the held-out split; "
            "keep one"
        )
    if t.eval_every < 0 or t.eval_windows < 1:
        raise PlanError(f"train.eval_every={t.eval_every} must be >= 0 and train.eval_windows={t.eval_windows} >= 1")
    if t.eval_every > 0 and not (d.eval_fraction > 0 or d.eval_path):
        raise PlanError(
            f"train.eval_every={t.eval_every} needs a held-out split: set data.eval_fraction (e.g. 0.01) or "
            "data.eval_path"
        )
    if d.eval_path and d.synthetic:
        raise PlanError(f"data.eval_path={d.eval_path} with data.synthetic=true: use data.eval_fraction instead")


def check_activation_budget(cfg: DictConfig) -> None:
    """train.activation_budget tells inductor's partitioner what to keep: only compiled graphs have one."""
    t = cfg.train
    if not 0 < t.activation_budget <= 1:
        raise PlanError(
            f"train.activation_budget={t.activation_budget} must be in (0, 1] (1: keep what autograd keeps)"
        )
    if t.activation_budget < 1 and not t.compile:
        raise PlanError(
            f"train.activation_budget={t.activation_budget} needs train.compile=true (the partitioner of compiled "
            "graphs applies it); set train.compile=true or train.activation_budget=1"
        )


def check_model(hidden: int, heads: int, kv_heads: int, head_dim: int | None = None) -> None:
    if heads < 1 or kv_heads < 1:
        raise PlanError(f"model.num_attention_heads={heads} and model.num_key_value_heads={kv_heads} must be >= 1")
    if head_dim is None and hidden % heads:
        raise PlanError(
            f"model.hidden_size={hidden} is not divisible by model.num_attention_heads={heads}; "
            f"use a multiple of {heads} or set model.head_dim"
        )
    dim = head_dim if head_dim is not None else hidden // heads
    if dim % 2:
        what = (
            f"model.head_dim={head_dim}"
            if head_dim is not None
            else f"model.hidden_size={hidden} / model.num_attention_heads={heads} = {dim}"
        )
        raise PlanError(f"head dim {what} is odd; RoPE rotates pairs of channels: use an even head dim")
    if heads % kv_heads:
        fits = [d for d in range(1, heads + 1) if heads % d == 0]
        raise PlanError(
            f"model.num_attention_heads={heads} is not a multiple of model.num_key_value_heads="
            f"{kv_heads} (grouped-query attention); use num_key_value_heads in {fits}"
        )


def check_stages(par, num_layers: int) -> None:
    stages = par.pp * par.virtual_stages
    what = f"parallel.pp={par.pp}" + (
        f" x parallel.virtual_stages={par.virtual_stages} = {stages}" if par.virtual_stages > 1 else ""
    )
    if stages > num_layers:
        raise PlanError(
            f"{what} pipeline stages but model.num_hidden_layers={num_layers}: every stage needs a "
            f"layer; use at most {num_layers} stages"
        )
    if par.pp_layers is not None:
        counts = list(par.pp_layers)
        if len(counts) != stages or sum(counts) != num_layers or min(counts) < 1:
            raise PlanError(
                f"parallel.pp_layers={counts} must have {stages} entries ({what} stages), each >= 1, "
                f"summing to model.num_hidden_layers={num_layers}; or drop it to balance by FLOPs"
            )


def check_schedule(par) -> None:
    name, pp, v, m, k = par.schedule, par.pp, par.virtual_stages, par.microbatches, par.seq_chunks
    if k > 1 and name != "seq1f1b":
        raise PlanError(
            f"parallel.seq_chunks={k} needs parallel.schedule=seq1f1b (got parallel.schedule={name}); "
            "set parallel.seq_chunks=1 or parallel.schedule=seq1f1b"
        )
    if v > 1 and name != "interleaved_1f1b":
        raise PlanError(
            f"parallel.virtual_stages={v} needs parallel.schedule=interleaved_1f1b (got "
            f"parallel.schedule={name}); set parallel.virtual_stages=1"
        )
    if name != "interleaved_1f1b":
        return
    if pp < 2 or v < 2:
        raise PlanError(
            f"parallel.schedule=interleaved_1f1b needs parallel.pp >= 2 and parallel.virtual_stages >= 2 "
            f"(got parallel.pp={pp}, parallel.virtual_stages={v}); raise them or use "
            "parallel.schedule=1f1b"
        )
    if m % pp and m > pp:
        raise PlanError(
            f"parallel.schedule=interleaved_1f1b needs parallel.microbatches a multiple of parallel.pp "
            f"or at most parallel.pp (got parallel.microbatches={m}, parallel.pp={pp}); "
            f"use parallel.microbatches={m - m % pp} or {m + pp - m % pp}"
        )


def check_sequence(par, seq: int) -> None:
    sp = par.sp
    k = par.seq_chunks if par.schedule == "seq1f1b" else 1
    if seq < 2 * sp * k:
        raise PlanError(
            f"data.seq_len={seq} is too short for parallel.sp={sp} x parallel.seq_chunks={k} chunks of "
            f">= 2 tokens each; use data.seq_len >= {2 * sp * k} or fewer chunks"
        )


def check_layout(cfg: DictConfig, num_layers: int, heads: int, kv_heads: int, device_count: int | None = None) -> None:
    """The layout rules that need only the config and the model's shape (no process, no weights)."""
    par = cfg.parallel
    check_counts(cfg)
    check_stages(par, num_layers)
    check_schedule(par)
    check_sequence(par, cfg.data.seq_len)
    check_ulysses(_Heads(heads, kv_heads), par.sp)
    check_ring(par, cfg.data.seq_len, cfg.train.attention)
    if device_count is not None:
        check_launch(cfg, env={}, gpus=device_count)


class _Heads:
    def __init__(self, heads, kv):
        self.num_attention_heads, self.num_key_value_heads = heads, kv


def check_launch(cfg: DictConfig, env, gpus: int | None, cpus: int | None = None) -> None:
    """World size against the launcher (torchrun/SLURM export WORLD_SIZE) and this node's devices.

    `gpus` is the number of GPUs the ranks will use (None: they run on CPU, `cpus` cores).
    """
    par = cfg.parallel
    world = par.pp * par.sp * par.cp * par.dp
    ring = f" x parallel.cp={par.cp}" if par.cp > 1 else ""
    product = f"parallel.pp={par.pp} x parallel.sp={par.sp}{ring} x parallel.dp={par.dp} = {world}"
    if "WORLD_SIZE" in env and int(env["WORLD_SIZE"]) != world:
        raise LaunchError(
            f"the launcher started WORLD_SIZE={env['WORLD_SIZE']} ranks but {product}; launch {world} "
            "ranks (torchrun --nnodes x --nproc-per-node, or SLURM nodes x tasks_per_node) "
            "or change the layout"
        )
    local = int(env.get("LOCAL_WORLD_SIZE", world)) if "WORLD_SIZE" in env else world
    if cfg.train.allow_oversubscribe:
        return
    if gpus is not None and local > gpus:
        where = f"LOCAL_WORLD_SIZE={local} ranks on this node" if "WORLD_SIZE" in env else f"{product} ranks"
        raise LaunchError(
            f"{where} but only {gpus} GPUs here; lower the layout, run under torchrun/SLURM on "
            f"{-(-world // gpus)} nodes, or set train.allow_oversubscribe=true"
        )
    if gpus is None and cpus is not None and local > CPU_RANKS_PER_CORE * cpus:
        raise LaunchError(
            f"{product} ranks on train.device=cpu but only {cpus} CPU cores here (at most "
            f"{CPU_RANKS_PER_CORE} ranks per core); lower the layout or set train.allow_oversubscribe=true"
        )


CPU_RANKS_PER_CORE = 4  # CPU ranks time-share cores (small CPU runs and tests); more is only slow


def _cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def validate_plan(cfg: DictConfig, env=None, overrides: Sequence[str] = ()) -> None:
    """Every check that needs no process: config, model files, corpus; `env` defaults to os.environ.

    `overrides` are the command line's (Hydra's task overrides), for the ones a loaded model conflicts with."""
    import torch

    env = os.environ if env is None else env
    check_keys(cfg)
    check_choices(cfg)
    check_offload(cfg)
    if cfg.train.keep_attention_layers < -1:
        raise PlanError(f"train.keep_attention_layers={cfg.train.keep_attention_layers} must be >= -1 (-1: all)")
    if cfg.train.recompute_layers < 0:
        raise PlanError(f"train.recompute_layers={cfg.train.recompute_layers} must be >= 0 (0: the planner picks)")
    check_counts(cfg)
    check_documents(cfg)
    check_eval(cfg)
    check_activation_budget(cfg)
    m = cfg.model
    if not m.get("path"):  # before HF's own config checks, whose errors are tracebacks
        check_model(m.hidden_size, m.num_attention_heads, m.num_key_value_heads or m.num_attention_heads, m.head_dim)
    config = build_config(m)  # a model.path without config.json is the first thing to fix
    check_model_overrides(cfg, overrides)
    check_llama_like(config)
    check_sliding_window(config, cfg.data.seq_len)
    kv = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    check_model(config.hidden_size, config.num_attention_heads, kv, getattr(config, "head_dim", None))
    check_layout(cfg, config.num_hidden_layers, config.num_attention_heads, kv)
    check_positions(cfg.data.seq_len, config.max_position_embeddings)
    check_files(cfg)
    device = cfg.train.device
    if device == "cuda" and not torch.cuda.is_available():
        raise PlanError("train.device=cuda but no GPU is visible; use train.device=cpu")
    on_gpu = run_device(device).type == "cuda"
    check_fp8(cfg, "cuda" if on_gpu else "cpu")
    check_launch(cfg, env, gpus=torch.cuda.device_count() if on_gpu else None, cpus=_cpu_count())
