"""Up-front plan validation: a random layout is refused exactly when the rules say so, naming its numbers.

The rules are restated here independently of lcgraph/validate.py (`violations`); hypothesis draws layouts
around the boundaries and checks both directions: every invalid layout raises PlanError naming the
offending `key=value`s, every valid one composes through Hydra and yields programs that validate
accepts. A few valid single-rank layouts train one step; the CLI turns plan and config errors into a
short message with a non-zero exit.
"""

import math
import os
import re
import subprocess
import sys

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from omegaconf import OmegaConf

from lcgraph.app.config import LcgraphConfig
from lcgraph.app.testing import TINY, compose, hf_model_dir, train_local
from lcgraph.app.validate import check_launch, validate_plan
from lcgraph.errors import LcgraphError, PlanError
from lcgraph.graph.ring import run_length
from lcgraph.schedule.actions import ScheduleSpec
from lcgraph.schedule.p2p import add_p2p
from lcgraph.schedule.programs import build_programs
from lcgraph.schedule.sequence import split_sequence
from lcgraph.schedule.validator import validate

SCHEDULES = ("gpipe", "1f1b", "seq1f1b", "interleaved_1f1b")
SPLITS = ("even", "uniform_comp")


# --- the rules, restated -------------------------------------------------------------------------------


def violations(d: dict) -> list[tuple[str, ...]]:
    """Each broken rule as the `key=value` texts its error message must name; [] for a valid layout."""
    out = []
    if d["schedule"] not in SCHEDULES:
        out.append((f"parallel.schedule={d['schedule']}",))
    if d["chunk_split"] not in SPLITS:
        out.append((f"parallel.chunk_split={d['chunk_split']}",))
    for key in ("pp", "microbatches", "seq_chunks"):
        if d[key] < 1:
            out.append((f"parallel.{key}={d[key]}",))
    if any(d[key] < 1 for key in ("pp", "microbatches", "seq_chunks")):
        return out  # the rules below are about positive counts
    pp, sp, v, m, k, name = d["pp"], d["sp"], d["virtual_stages"], d["microbatches"], d["seq_chunks"], d["schedule"]
    seq, layers, heads, kv, hidden = d["seq_len"], d["layers"], d["heads"], d["kv_heads"], d["hidden"]
    if hidden % heads:
        out.append((f"model.hidden_size={hidden}", f"model.num_attention_heads={heads}"))
    if hidden % heads == 0 and (hidden // heads) % 2:
        out.append((f"model.hidden_size={hidden}", f"model.num_attention_heads={heads}"))
    if heads % kv:
        out.append((f"model.num_attention_heads={heads}", f"model.num_key_value_heads={kv}"))
    if pp * v > layers:
        out.append(
            (f"parallel.pp={pp}", f"model.num_hidden_layers={layers}")
            + ((f"parallel.virtual_stages={v}",) if v > 1 else ())
        )
    if k > 1 and name != "seq1f1b":
        out.append((f"parallel.seq_chunks={k}", f"parallel.schedule={name}"))
    if v > 1 and name != "interleaved_1f1b":
        out.append((f"parallel.virtual_stages={v}", f"parallel.schedule={name}"))
    if name == "interleaved_1f1b" and (pp < 2 or v < 2):
        out.append((f"parallel.pp={pp}", f"parallel.virtual_stages={v}"))
    if name == "interleaved_1f1b" and pp >= 2 and v >= 2 and m % pp != 0 and m > pp:
        out.append((f"parallel.microbatches={m}", f"parallel.pp={pp}"))
    chunks = k if name == "seq1f1b" else 1
    if seq < 2 * sp * chunks:
        out.append((f"data.seq_len={seq}", f"parallel.sp={sp}", f"parallel.seq_chunks={chunks}"))
    if heads % sp:
        out.append((f"parallel.sp={sp}", f"num_attention_heads={heads}"))
    if kv % sp and sp % kv:
        out.append((f"parallel.sp={sp}", f"num_key_value_heads={kv}"))
    return out


def names(message: str, texts: tuple[str, ...]) -> bool:
    return all(re.search(re.escape(t) + r"(?![\w.])", message) for t in texts)


# --- layouts -------------------------------------------------------------------------------------------


@st.composite
def layouts(draw):
    """Small layouts: each field valid most of the time, so that valid and invalid plans are both common
    and an invalid one usually breaks a single rule."""
    name = draw(st.sampled_from(SCHEDULES * 4 + ("zb_h1",)))
    pp = draw(st.sampled_from((2, 2, 3, 4, 1) if name == "interleaved_1f1b" else (1, 2, 3, 4)))
    sp = draw(st.sampled_from((1, 1, 2, 2, 4, 3)))
    k = draw(st.integers(1, 4)) if name == "seq1f1b" else draw(st.sampled_from((1,) * 6 + (2,)))
    v = draw(st.integers(2, 3)) if name == "interleaved_1f1b" else draw(st.sampled_from((1,) * 6 + (2,)))
    heads = draw(st.sampled_from((4, 8, 4, 8, 2, 6)))
    seq = sp * k * draw(st.integers(1, 6)) if draw(st.integers(0, 5)) else draw(st.integers(1, 64))
    d = dict(
        pp=pp,
        sp=sp,
        dp=draw(st.integers(1, 2)),
        schedule=name,
        microbatches=draw(st.integers(1, 6)),
        seq_chunks=k,
        chunk_split=draw(st.sampled_from(SPLITS * 6 + ("ragged",))),
        virtual_stages=v,
        seq_len=seq,
        layers=max(1, pp * v + draw(st.integers(-1, 3))),
        heads=heads,
        kv_heads=draw(st.sampled_from([h for h in (1, 2, 4, 8) if heads % h == 0] * 4 + [3, 4])),
        hidden=heads * 16 + draw(st.sampled_from((0,) * 12 + (8,))),
    )
    broken = draw(st.sampled_from((None,) * 20 + ("pp", "microbatches", "seq_chunks")))
    if broken:
        d[broken] = 0
    return d


def overrides(d: dict) -> list[str]:
    return [
        f"parallel.pp={d['pp']}",
        f"parallel.sp={d['sp']}",
        f"parallel.dp={d['dp']}",
        f"parallel.schedule={d['schedule']}",
        f"parallel.microbatches={d['microbatches']}",
        f"parallel.seq_chunks={d['seq_chunks']}",
        f"parallel.chunk_split={d['chunk_split']}",
        f"parallel.virtual_stages={d['virtual_stages']}",
        f"data.seq_len={d['seq_len']}",
        f"model.num_hidden_layers={d['layers']}",
        f"model.num_attention_heads={d['heads']}",
        f"model.num_key_value_heads={d['kv_heads']}",
        f"model.hidden_size={d['hidden']}",
        "train.device=cpu",
        "train.allow_oversubscribe=true",
    ]


def schema_config(d: dict):
    """The plan as the schema types it (what Hydra composes, without Hydra's cost)."""
    base = OmegaConf.structured(LcgraphConfig)
    return OmegaConf.merge(base, OmegaConf.from_dotlist(overrides(d) + ["logging.wandb.mode=disabled"]))


def check_programs(cfg) -> None:
    par = cfg.parallel
    k = par.seq_chunks if par.schedule == "seq1f1b" else 1
    spec = ScheduleSpec(par.schedule, par.pp, par.microbatches, k, par.virtual_stages)
    validate(add_p2p(build_programs(spec), spec), spec)
    length = run_length(par, cfg.data.seq_len)  # padded where the chunks and shards do not divide seq_len
    assert cfg.data.seq_len <= length < cfg.data.seq_len + par.sp * k
    lengths = split_sequence(length, k, par.chunk_split, 1.0, 1.0, align=par.sp)
    assert sum(lengths) == length and all(n > 0 and n % par.sp == 0 for n in lengths), lengths


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(layouts())
def test_layouts_are_refused_exactly_when_a_rule_is_broken(d):
    broken = violations(d)
    if broken:
        with pytest.raises(PlanError) as info:
            validate_plan(schema_config(d), env={})
        message = str(info.value)
        assert any(names(message, texts) for texts in broken), f"{message!r} names none of {broken}"
    else:
        validate_plan(schema_config(d), env={})
        cfg = compose(*overrides(d))
        validate_plan(cfg, env={})
        check_programs(cfg)


@st.composite
def single_rank_layouts(draw):
    name = draw(st.sampled_from(("gpipe", "1f1b", "seq1f1b")))
    k = draw(st.integers(2, 4)) if name == "seq1f1b" else 1
    heads = draw(st.sampled_from((2, 4)))
    return dict(
        pp=1,
        sp=1,
        dp=1,
        schedule=name,
        microbatches=draw(st.integers(1, 2)),
        seq_chunks=k,
        chunk_split=draw(st.sampled_from(SPLITS)),
        virtual_stages=1,
        seq_len=k * draw(st.integers(4, 12)),
        layers=draw(st.integers(1, 3)),
        heads=heads,
        kv_heads=draw(st.sampled_from((1, heads))),
        hidden=16 * heads,
    )


@settings(max_examples=3, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(single_rank_layouts())
def test_valid_single_rank_layouts_train_one_step(d):
    assert violations(d) == []
    cfg = compose(*overrides(d), "model.intermediate_size=64", "train.steps=1")
    validate_plan(cfg, env={})
    losses, _, _ = train_local(cfg)
    assert len(losses) == 1 and math.isfinite(losses[0])


# --- rules the property test does not draw ---------------------------------------------------------------


def plan(**keys):
    return OmegaConf.merge(
        OmegaConf.structured(LcgraphConfig),
        OmegaConf.from_dotlist([f"{k.replace('__', '.')}={v}" for k, v in keys.items()]),
    )


def refused(fn, *texts):
    with pytest.raises(LcgraphError) as info:
        fn()
    assert names(str(info.value), texts), str(info.value)
    return str(info.value)


def test_launcher_world_size_must_match_the_layout():
    cfg = plan(parallel__pp=2, parallel__sp=2)
    refused(
        lambda: check_launch(cfg, {"WORLD_SIZE": "8", "LOCAL_WORLD_SIZE": "8"}, gpus=8),
        "WORLD_SIZE=8",
        "parallel.pp=2",
        "parallel.sp=2",
        "parallel.dp=1",
    )
    check_launch(cfg, {"WORLD_SIZE": "4", "LOCAL_WORLD_SIZE": "4"}, gpus=8)


def test_ranks_must_fit_the_devices_of_a_node():
    cfg = plan(parallel__pp=4, parallel__sp=4)  # 16 ranks
    message = refused(lambda: check_launch(cfg, {}, gpus=8), "parallel.pp=4", "parallel.sp=4")
    assert "only 8 GPUs" in message and "2 nodes" in message
    check_launch(cfg, {"WORLD_SIZE": "16", "LOCAL_WORLD_SIZE": "8"}, gpus=8)  # torchrun, 2 nodes x 8
    refused(lambda: check_launch(cfg, {"WORLD_SIZE": "16", "LOCAL_WORLD_SIZE": "8"}, gpus=4), "LOCAL_WORLD_SIZE=8")
    refused(lambda: check_launch(cfg, {}, gpus=None, cpus=2), "parallel.pp=4", "train.allow_oversubscribe=true")
    check_launch(plan(parallel__pp=4, parallel__sp=4, train__allow_oversubscribe=True), {}, gpus=None, cpus=2)


def test_config_rules_outside_the_drawn_ranges():
    base = dict(train__device="cpu", train__allow_oversubscribe=True)
    refused(lambda: validate_plan(plan(train__dtype="fp16", **base), env={}), "train.dtype=fp16")
    refused(lambda: validate_plan(plan(data__micro_batch_size=0, **base), env={}), "data.micro_batch_size=0")
    refused(lambda: validate_plan(plan(parallel__sp=0, **base), env={}), "parallel.sp=0")
    refused(
        lambda: validate_plan(plan(model__hidden_size=100, **base), env={}),
        "model.hidden_size=100",
        "model.num_attention_heads=8",
    )
    refused(
        lambda: validate_plan(plan(parallel__pp=2, parallel__pp_layers="[3,2]", **base), env={}),
        "parallel.pp_layers=[3, 2]",
        "model.num_hidden_layers=4",
    )
    refused(
        lambda: validate_plan(plan(parallel__pp=2, parallel__pp_layers="[4,0]", **base), env={}),
        "parallel.pp_layers=[4, 0]",
    )
    validate_plan(plan(parallel__pp=2, parallel__pp_layers="[3,1]", **base), env={})
    refused(lambda: validate_plan(plan(train__activation_budget=0.9, **base), env={}), "activation_budget=0.9")
    refused(lambda: validate_plan(plan(train__activation_budget=0, train__compile=True, **base), env={}), "(0, 1]")
    validate_plan(plan(train__activation_budget=0.9, train__compile=True, **base), env={})


# --- the command line ----------------------------------------------------------------------------------


def lcgraph_cli(tmp_path, *args):
    env = {k: v for k, v in os.environ.items() if k not in ("HYDRA_FULL_ERROR", "WORLD_SIZE", "LOCAL_RANK")}
    return subprocess.run(
        [sys.executable, "-m", "lcgraph", *args, f"hydra.run.dir={tmp_path}/run"],
        check=False,
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=env,
        timeout=300,
    )


@pytest.mark.slow
def test_cli_plan_error_is_one_line_without_traceback(tmp_path):
    result = lcgraph_cli(tmp_path, "parallel.pp=99", "logging.wandb.mode=disabled")
    assert result.returncode != 0
    errors = [line for line in result.stderr.splitlines() if line.startswith("lcgraph: error:")]
    assert len(errors) == 1 and "parallel.pp=99" in errors[0], result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    assert not (tmp_path / "run" / "summary.json").exists()


@pytest.mark.slow
def test_a_plan_the_host_cannot_hold_is_refused_before_the_ranks_are_spawned(tmp_path):
    """train.offload is resolved by the planner once, in the launching process: an offload pool larger than the
    host's memory is one line naming the numbers, not a rank's failure (`rank 0: ...`), and no rank starts."""
    plan = ["train.recompute=keep_attention", "train.offload=attention", "+plan.host_memory_gb=1e-6"]
    result = lcgraph_cli(tmp_path, *TINY, "parallel.dp=2", "train.steps=1", *plan)
    assert result.returncode != 0
    errors = [line for line in result.stderr.splitlines() if line.startswith("lcgraph: error:")]
    assert len(errors) == 1, result.stderr
    assert re.match(r"lcgraph: error: train.offload=attention needs [\d.]+ GiB of host memory per rank", errors[0])
    assert not (tmp_path / "run" / "heartbeats").exists(), "a rank was started"
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


@pytest.mark.slow
@pytest.mark.parametrize("override, named", [("parallel.ppp=2", "ppp"), ("train.steps=abc", "abc")])
def test_cli_config_error_is_a_short_hydra_message(tmp_path, override, named):
    result = lcgraph_cli(tmp_path, override)
    assert result.returncode != 0
    assert named in result.stderr and "Traceback" not in result.stderr + result.stdout
    assert len(result.stderr.strip().splitlines()) <= 10, result.stderr


def test_the_config_choices_are_what_the_code_knows():
    """The schema's Literal choices agree with the names the schedule builders and attention backends take."""
    from typing import get_args

    from lcgraph.app.config import AttentionBackend, ChunkSplit, Dtype, ScheduleName
    from lcgraph.app.job import DTYPES
    from lcgraph.ops.context import BACKENDS
    from lcgraph.schedule.actions import SCHEDULES, SPLIT_MODES

    assert get_args(ScheduleName) == SCHEDULES
    assert get_args(ChunkSplit) == SPLIT_MODES
    assert get_args(AttentionBackend) == BACKENDS
    assert set(get_args(Dtype)) == set(DTYPES)


# --- what a newcomer gets wrong, refused before any process starts ---------------------------------------


def test_unknown_keys_missing_and_conflicting_model_keys_steps_and_positions_are_refused():
    cpu = ["train.device=cpu"]
    refused(lambda: validate_plan(compose("+parallel.ppp=2", *cpu), env={}), "parallel.ppp", "parallel.pp?")
    refused(lambda: validate_plan(compose("+train.stepz=2", *cpu), env={}), "train.stepz", "train.steps?")
    refused(lambda: validate_plan(compose("model=hf", *cpu), env={}), "model=hf needs model.path")
    refused(lambda: validate_plan(compose("train.steps=0", *cpu), env={}), "train.steps=0")
    refused(
        lambda: validate_plan(compose("model.max_position_embeddings=32", "data.seq_len=64", *cpu), env={}),
        "data.seq_len=64",
        "max_position_embeddings=32",
    )
    refused(lambda: validate_plan(compose("data.path=/nonexistent/corpus", *cpu), env={}), "data.path=")
    validate_plan(compose("+plan.device=h200", *cpu), env={})  # lcgraph-plan's settings: the planner checks them


def test_a_model_directory_is_checked_before_any_process_starts(tmp_path):
    path, _ = hf_model_dir(tmp_path)
    over = ["model=hf", f"model.path={path}"]
    cfg = compose(*over, "train.device=cpu")
    validate_plan(cfg, env={}, overrides=over)
    refused(lambda: validate_plan(cfg, env={}, overrides=[*over, "model.hidden_size=128"]), "model.hidden_size")
    (path / "tokenizer.json").rename(path / "tokenizer.json.off")
    refused(lambda: validate_plan(cfg, env={}), "has no tokenizer", str(path))
    validate_plan(compose(*over, "train.device=cpu", "data.synthetic=true"), env={})  # no tokenizer needed
    (path / "tokenizer.json.off").rename(path / "tokenizer.json")
    weights = path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])  # a truncated download
    refused(lambda: validate_plan(cfg, env={}), str(weights), "re-download")
    weights.unlink()
    refused(lambda: validate_plan(cfg, env={}), "has no weights")


def test_a_sliding_window_shorter_than_the_sequence_is_refused_and_one_covering_it_trains_as_hf(tmp_path):
    """Mistral with sliding_window=16: at data.seq_len=64 HF masks keys more than 16 back and lcgraph's full causal
    attention would not, so the plan is refused in one line naming both; at 16 the window masks nothing and the
    first step's loss is HF eager's. Qwen2's window counts only with use_sliding_window on some layer."""
    import torch
    from transformers import MistralConfig, MistralForCausalLM, Qwen2Config

    from lcgraph.app.testing import job_of
    from lcgraph.runtime.model import sliding_window

    config = MistralConfig(
        vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, sliding_window=16,
    )  # fmt: skip
    torch.manual_seed(0)
    MistralForCausalLM(config).save_pretrained(tmp_path / "mistral")
    over = ["model=hf", f"model.path={tmp_path / 'mistral'}", "data.synthetic=true", "train.device=cpu"]
    refused(lambda: validate_plan(compose(*over), env={}), "sliding_window=16", "data.seq_len=64")
    cfg = compose(*over, "data.seq_len=16", "train.steps=1")
    validate_plan(cfg, env={})
    job = job_of(cfg, tmp_path / "run")
    units, total = job.step_units(0)
    hf = MistralForCausalLM.from_pretrained(tmp_path / "mistral", attn_implementation="eager")
    (u,) = units.values()
    with torch.no_grad():
        logits = hf(input_ids=u.input_ids, position_ids=u.position_ids).logits
    want = torch.nn.functional.cross_entropy(logits.flatten(0, 1), u.labels.flatten(), reduction="sum") / total
    assert abs(job.run_step(0)["loss"] - float(want)) <= 1e-5 * float(want)
    assert sliding_window(Qwen2Config(num_hidden_layers=4)) is None  # use_sliding_window off by default
    on = Qwen2Config(num_hidden_layers=4, use_sliding_window=True, sliding_window=8, max_window_layers=2)
    assert sliding_window(on) == 8
    assert sliding_window(Qwen2Config(num_hidden_layers=4, use_sliding_window=True, max_window_layers=4)) is None


@pytest.mark.parametrize(
    "override,line",
    [
        ("parallel.ppp=2", "unknown key parallel.ppp; did you mean parallel.pp? known keys of parallel: bucket_mb,"),
        ("+optim.lrr=1", "unknown key optim.lrr; did you mean optim.lr?"),
        ("trian.steps=3", "unknown key trian.steps; did you mean train? known keys: data,"),
        (
            "+recipe=llama70b",
            "unknown recipe 'llama70b'; did you mean +recipe=llama70b_1m? the recipes: gpu, llama1b_128k",
        ),
        ("recipe=llama70b_1m", "a recipe is added to the defaults with +: use +recipe=llama70b_1m"),
        ("+model=tiny", "model is in the defaults already: use model=tiny (without +)"),
        ("model=tinyy", "unknown model 'tinyy'; did you mean model=tiny? the models: hf, llama3_1b, llama70b_2l, tiny"),
        ("+recipe=tiny_cpu,nope", "unknown recipe 'nope'"),
    ],
)
def test_command_line_mistakes_are_one_line_naming_the_fix_before_hydra(override, line):
    from lcgraph.app.validate import check_overrides

    with pytest.raises(PlanError) as err:
        check_overrides([override, "hydra.run.dir=/tmp/x", "+plan.device=h100"])
    assert str(err.value).startswith(line)
    check_overrides(["parallel.pp=1,2", "+recipe=tiny_cpu", "model=hf", "logging.wandb.mode=offline", "~train.seed"])


def test_a_misspelt_key_on_the_command_line_prints_one_line(tmp_path):
    from lcgraph.app.testing import cli_env

    out = subprocess.run(
        [sys.executable, "-m", "lcgraph", "parallel.ppp=2", f"hydra.run.dir={tmp_path}"],
        capture_output=True,
        text=True,
        env=cli_env(),
    )
    assert out.returncode == 2
    assert out.stderr.strip().splitlines() == [
        "lcgraph: error: unknown key parallel.ppp; did you mean parallel.pp? known keys of parallel: bucket_mb, "
        "chunk_split, cp, dp, microbatches, pp, pp_layers, schedule, seq_chunks, sp, virtual_stages, zero"
    ], out.stderr
