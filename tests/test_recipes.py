"""Recipes and sweeps: every shipped recipe composes and passes the plan checks; shrunk to a tiny CPU shape
from the command line, each trains two steps; a real multirun writes its comparison table."""

import csv
import json
import math
import os
import subprocess
import sys
from collections import defaultdict

import pytest
from hydra.core.config_store import ConfigStore
from omegaconf import OmegaConf

from lcgraph.app.paths import recipes_dir
from lcgraph.app.testing import TINY, compose, train_local, train_spawned
from lcgraph.app.validate import check_choices, check_layout, check_model, validate_plan

RECIPES = sorted(p.stem for p in recipes_dir().glob("*.yaml"))
SHIPPED = {"llama70b_1m", "llama70b_1m_80gb", "llama8b_256k", "llama7b_64k_seq1f1b", "llama1b_128k_1gpu", "tiny_cpu"}
SHIPPED |= {"gpu"}

# What a developer types to try a recipe on a laptop: the recipe's layout and schedule, a tiny shape.
SHRINK = [
    "model.num_hidden_layers=2",
    "model.hidden_size=64",
    "model.intermediate_size=128",
    "model.num_attention_heads=4",
    "model.num_key_value_heads=2",
    "model.vocab_size=512",
    "data.seq_len=64",
    "data.max_corpus_mb=0.3",
    "parallel.sp=1",
    "parallel.dp=1",
    "parallel.microbatches=2",
    "train.steps=2",
    "train.device=cpu",
    "train.dtype=fp32",
    "train.checkpoint_every=0",
    "logging.wandb.mode=disabled",
    "train.progress=false",
    "optim.warmup_steps=1",
]


def test_the_shipped_recipes_are_global_packages():
    assert SHIPPED <= set(RECIPES)
    for name in RECIPES:
        first = (recipes_dir() / f"{name}.yaml").read_text().splitlines()[0]
        assert first == "# @package _global_", f"{name}.yaml starts with {first!r}"


@pytest.mark.parametrize("name", RECIPES)
def test_recipe_composes_and_passes_the_plan_checks(name):
    cfg = compose(f"+recipe={name}", tiny=False)
    check_choices(cfg)
    m = cfg.model
    check_model(m.hidden_size, m.num_attention_heads, m.num_key_value_heads, m.head_dim)
    check_layout(cfg, m.num_hidden_layers, m.num_attention_heads, m.num_key_value_heads)


def test_the_gpu_recipe_gives_a_first_real_run_its_defaults_and_a_data_parallel_layout_over_the_gpus(
    tmp_path, monkeypatch
):
    """`+recipe=gpu model=hf model.path=... data.path=...`: bf16, a fine-tuning schedule, the planner's recompute and
    offload, and dp over as many GPUs as torch sees (4 here, 1 on a machine without one)."""
    import torch

    from lcgraph.app.testing import hf_model_dir

    path, _ = hf_model_dir(tmp_path)
    (tmp_path / "docs.txt").write_text("a short text.\n" * 50)
    given = ["+recipe=gpu", "model=hf", f"model.path={path}", f"data.path={tmp_path / 'docs.txt'}"]
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    cfg = compose(*given, tiny=False)
    train = cfg.train
    assert (train.dtype, train.device, train.recompute, train.offload) == ("bf16", "cuda", "auto", "auto")
    assert (cfg.optim.lr, cfg.optim.warmup_steps, cfg.model.path) == (2e-5, 50, str(path))
    assert (cfg.parallel.pp, cfg.parallel.sp, cfg.parallel.dp, cfg.parallel.zero) == (1, 1, 4, True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    assert compose(*given, tiny=False).parallel.dp == 1


def test_a_recipe_key_outside_the_schema_fails_to_compose():
    from hydra.errors import ConfigCompositionException

    repo = ConfigStore.instance().repo
    compose(tiny=False)  # registers the schema and the recipes
    ConfigStore.instance().store(
        group="recipe", name="misspelt", package="_global_", node=OmegaConf.create({"parallel": {"ppp": 2}})
    )
    try:
        with pytest.raises(ConfigCompositionException, match="ppp"):
            compose("+recipe=misspelt", tiny=False)
    finally:
        repo["recipe"].pop("misspelt.yaml", None)


@pytest.mark.slow
def test_every_recipe_shrunk_to_a_tiny_shape_trains_two_steps():
    cfgs = {}
    for name in RECIPES:
        full = compose(f"+recipe={name}", tiny=False).parallel
        chunks = ["parallel.seq_chunks=2"] if full.schedule == "seq1f1b" else []
        cfgs[name] = compose(f"+recipe={name}", *SHRINK, f"parallel.pp={min(full.pp, 2)}", *chunks, tiny=False)
        validate_plan(cfgs[name], env={})
    by_world = defaultdict(list)
    for name, cfg in cfgs.items():
        by_world[cfg.parallel.pp * cfg.parallel.sp * cfg.parallel.cp * cfg.parallel.dp].append(name)
    losses = {}
    for world, group in sorted(by_world.items()):
        if world == 1:
            losses.update({name: train_local(cfgs[name])[0] for name in group})
        else:  # one launch per world size trains every config of that size in turn
            results = train_spawned([cfgs[name] for name in group], world)
            losses.update({name: r["losses"] for name, r in zip(group, results)})
    for name in RECIPES:
        assert len(losses[name]) == 2 and all(math.isfinite(x) for x in losses[name]), (name, losses[name])


# --- sweeps --------------------------------------------------------------------------------------------


def read_csv(path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.mark.slow
def test_multirun_writes_a_comparison_table_and_shares_a_wandb_group(tmp_path):
    from lcgraph.observability.sweep import main as rebuild

    sweep = tmp_path / "sweep"
    tiny = [o for o in TINY if not o.startswith(("train.steps", "model.num_hidden_layers"))]
    env = {k: v for k, v in os.environ.items() if k not in ("HYDRA_FULL_ERROR", "WORLD_SIZE", "LOCAL_RANK")}
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "lcgraph",
            "-m",
            "parallel.schedule=1f1b,gpipe",
            *tiny,
            "train.steps=2",
            "model.num_hidden_layers=2",
            "logging.wandb.group=${lcgraph_sweep_group:}",
            f"hydra.sweep.dir={sweep}",
            "++hydra.callbacks.sweep_table._target_=lcgraph.app.sweep.SweepTable",
        ],
        check=False,
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=env,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    rows = read_csv(sweep / "comparison.csv")
    assert [r["parallel.schedule"] for r in rows] == ["1f1b", "gpipe"]
    for row in rows:
        assert row["status"] == "completed" and math.isfinite(float(row["final_loss"]))
        assert float(row["tokens_per_s"]) > 0 and float(row["activation_peak_mib_per_stage"]) > 0
    jobs = json.loads((sweep / "comparison.json").read_text())["jobs"]
    assert [j["summary"]["steps"] for j in jobs] == [2, 2]
    assert "lcgraph sweep" in result.stdout and "parallel.schedule" in result.stdout
    groups = {OmegaConf.load(sweep / j["job"] / "config.yaml").logging.wandb.group for j in jobs}
    assert groups == {str(sweep)}

    (sweep / "comparison.csv").unlink()
    rebuild([str(sweep)])  # python -m lcgraph.observability.sweep SWEEP_DIR
    assert [r["parallel.schedule"] for r in read_csv(sweep / "comparison.csv")] == ["1f1b", "gpipe"]
