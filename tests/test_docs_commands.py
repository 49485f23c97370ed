"""Every command in README.md and docs/*.md runs as written (shrunk to CPU sizes by the documented tables below).

Each command is taken from the fenced code blocks (continuation lines joined, `$ ` prompts and comments
dropped, shell variables the block sets expanded). Every job of every command (a multirun expanded as Hydra's
basic sweeper does) is composed and validated exactly as the CLI does; lcgraph-plan and the pictures tool
run in this process; each distinct (pp, sp, dp, schedule, model.path) of the training jobs trains one step
(one launch of gloo ranks per world size, up to COMPOSE_ONLY ranks). GPU, cluster, network and install
lines are skipped with their reason (SKIP).
"""

from __future__ import annotations

import math
import re
import shlex
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from hydra import compose, initialize_config_dir
from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.global_hydra import GlobalHydra
from hydra.core.override_parser.overrides_parser import OverridesParser

from lcgraph.app import pictures
from lcgraph.app.config import register_configs
from lcgraph.app.paths import conf_dir
from lcgraph.app.plan_cli import checked_plan
from lcgraph.app.testing import hf_model_dir, train_local, train_spawned
from lcgraph.app.validate import validate_plan
from lcgraph.errors import LcgraphError
from lcgraph.planner.profile import PROFILES_DIR
from lcgraph.planner.report import write_plan

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
PROGRAMS = ("lcgraph-train", "lcgraph-plan", "lcgraph-check", "python", "python3", "torchrun", "wandb", "pip")

# Lines that cannot run on CI's 2-core CPU machine, and why (first match wins).
SKIP = [
    (r"\bpip install\b", "installs packages: .ci/run's own first lines"),
    (r"\bpytest\b", "the test suite itself"),
    (r"tools/calibrate\.py --measured", "replans saved runs on CPU: tests/test_bench_tools.py runs it"),
    (
        r"tools/(bench|profile_device|calibrate|attention_kernels|fused_kernels|multi_gpu)\.py",
        "GPU only: times CUDA kernels",
    ),
    (r"tools/fp8_convergence\.py", "trains a 1B model twice on a GPU: tests/test_fp8_convergence.py runs it on CPU"),
    (r"^lcgraph-check ", "starts a rank per GPU (or gloo process): tests/test_check.py runs it end to end on gloo"),
    (r"^python3? -c ", "a Python one-liner, not a command line (the export it loads: tests/test_resume.py)"),
    (r"train\.device=cuda", "GPU only: train.device=cuda"),
    (r"--nnodes|submitit_slurm", "needs several nodes (torchrun --nnodes, SLURM)"),
    (r"^wandb sync", "uploads to W&B: needs network and an API key"),
]
# Always set, whatever the command says: one step, no W&B, no bar, a small corpus, CPU fp32.
FORCED = [
    "train.steps=1",
    "train.checkpoint_every=0",
    "train.progress=false",
    "logging.wandb.mode=disabled",
    "data.max_corpus_mb=0.3",
    "train.device=cpu",
    "train.dtype=fp32",
]
# Set only where the command leaves them (and never beside model.path): a tiny shape and sequence.
SHRINK = {
    "model.num_hidden_layers": "4",
    "model.hidden_size": "64",
    "model.intermediate_size": "128",
    "model.num_attention_heads": "8",
    "model.num_key_value_heads": "4",
    "model.vocab_size": "512",
    "data.seq_len": "64",
}
# Placeholders in the docs, and what stands for them here; and sizes too slow for CI's 2 cores.
PLACEHOLDERS = {
    "+recipe=NAME": "+recipe=tiny_cpu",
    # 80 layers on 8 stages: 2 minutes of drawing; 8 layers on 2 stages still hold layer 7
    "model.num_hidden_layers=80 parallel.pp=8": "model.num_hidden_layers=8 parallel.pp=2",
    # the 70B x 1M plan's 8 x 8 layout and 64 chunks, on the tiny shape's 4 layers and 64 tokens
    "+recipe=llama70b_1m +plan.device=h200": "+recipe=llama70b_1m +plan.device=h200 parallel.pp=2 parallel.sp=2 "
    "parallel.seq_chunks=2",
    # the profile lcgraph-check writes: a shipped one stands in; the 32-rank layout on the tiny shape's 4 layers
    "+recipe=llama8b_256k +plan.profile=runs/check/profile.json": "+recipe=llama8b_256k "
    f"+plan.profile={PROFILES_DIR / 'h200.json'} parallel.pp=2 parallel.sp=2 parallel.seq_chunks=2",
}
# Layouts with more ranks are composed and validated, not trained here (CI has 2 cores): 4-rank layouts train in
# test_cli (the default plan), test_sequence_parallel and test_reference.
COMPOSE_ONLY = 2


@dataclass
class Command:
    where: str  # file:line
    text: str

    @property
    def skip(self) -> str | None:
        return next((why for pattern, why in SKIP if re.search(pattern, self.text)), None)


def _blocks(text: str):
    """(first line number, lines) of each fenced code block."""
    inside, start, lines = False, 0, []
    for n, line in enumerate(text.splitlines(), 1):
        if line.startswith("```"):
            if inside:
                yield start, lines
            inside, start, lines = not inside, n + 1, []
        elif inside:
            lines.append(line)


def _logical_lines(start: int, lines: list[str]):
    """Continuation lines (`\\`) joined, `$ ` prompts dropped; (line number, text)."""
    buf, first = "", start
    for n, line in enumerate(lines, start):
        if not buf:
            first = n
        buf += line.rstrip().removesuffix("\\")
        if not line.rstrip().endswith("\\"):
            yield first, buf.strip().removeprefix("$ ")
            buf = ""


def doc_commands() -> list[Command]:
    out = []
    for doc in DOCS:
        for start, lines in _blocks(doc.read_text()):
            env: dict[str, str] = {}
            for n, line in _logical_lines(start, lines):
                if line.split(" ", 1)[0] not in PROGRAMS and not re.match(r"(export )?[A-Z_]+=", line):
                    continue  # a command's output quoted in the doc (its apostrophes are no shell quotes)
                words = shlex.split(line, comments=True)
                if words and words[0] == "export":
                    words = words[1:]
                if words and all(re.fullmatch(r"[A-Z_]+=.*", w) for w in words):
                    env.update(w.split("=", 1) for w in words)  # type: ignore[misc]
                    continue
                for part in re.split(r"\s&&\s", line.split(" #")[0]):
                    text = re.sub(r"\$(\w+)", lambda m: env.get(m.group(1), m.group(0)), part.strip())
                    if text.split(" ", 1)[0] in PROGRAMS:
                        out.append(Command(f"{doc.relative_to(ROOT)}:{n}", text))
    return out


COMMANDS = doc_commands()


def _args(cmd: Command, hf_dir: Path) -> tuple[str, bool, list[str]]:
    """(program, multirun, overrides) with the placeholders and the model path substituted."""
    text = cmd.text
    for old, new in PLACEHOLDERS.items():
        text = text.replace(old, new)
    words = [f"model.path={hf_dir}" if w.startswith("model.path=") else w for w in shlex.split(text)]  # tiny HF dir
    words = [w for w in words if not w.startswith("data.path=/data/")]  # the docs' example corpus: stdlib's here
    # the docs' example held-out corpus: a held-out share of stdlib's here
    words = ["data.eval_fraction=0.05" if w.startswith("data.eval_path=/data/") else w for w in words]
    if words[0] == "torchrun":  # torchrun [options] -m lcgraph OVERRIDES
        words = ["lcgraph-train", *words[words.index("lcgraph") + 1 :]]
    if words[:3] in (["python", "-m", "lcgraph.app.pictures"], ["python", "-m", "lcgraph.app.plan_cli"]):
        words = [words[2], *words[3:]]
    multirun = "-m" in words[1:2]
    return words[0], multirun, [w for w in words[1:] if w != "-m"]


def _shrunk(overrides: list[str]) -> list[str]:
    keys = {o.lstrip("+~").split("=", 1)[0] for o in overrides}
    if "model.path" in keys:  # the tiny HF dir's positions bound the sequence
        overrides = [o for o in overrides if not o.startswith("data.seq_len=")]
    shrink = ["data.seq_len=64"] if "model.path" in keys else [f"{k}={v}" for k, v in SHRINK.items() if k not in keys]
    return [o for o in overrides if not o.startswith("hydra")] + shrink + FORCED


def _jobs(overrides: list[str], multirun: bool) -> list[list[str]]:
    """The override lists of every job (a multirun's sweep expanded as Hydra's basic sweeper does)."""
    if not multirun:
        return [overrides]
    parsed = OverridesParser.create().parse_overrides(overrides)
    return [job for batch in BasicSweeper.split_arguments(parsed, None) for job in batch]


def test_the_docs_hold_the_commands_a_newcomer_meets():
    texts = [c.text for c in COMMANDS]
    assert any(t.startswith("lcgraph-train") for t in texts) and any(t.startswith("lcgraph-plan") for t in texts)
    assert any(t.startswith("python -m lcgraph.app.pictures") for t in texts)
    assert sum(c.skip is None for c in COMMANDS) >= 10


@dataclass
class Job:
    where: str  # file:line and the job's overrides
    program: str  # lcgraph-train, lcgraph-plan, lcgraph.app.pictures
    cfg: Any = None  # the composed config (None for the pictures tool)
    argv: list[str] = field(default_factory=list)  # the pictures tool's arguments

    @property
    def layout(self) -> tuple:
        p = self.cfg.parallel
        return p.pp, p.sp, p.dp, p.schedule, bool(self.cfg.model.path), p.cp


@pytest.fixture(scope="module")
def doc_jobs(tmp_path_factory) -> list[Job]:
    """Every job of every command that runs here, composed as the CLI composes it (one Hydra context)."""
    hf_dir = hf_model_dir(tmp_path_factory.mktemp("hf"), num_hidden_layers=4)[0]
    register_configs()
    GlobalHydra.instance().clear()
    out = []
    with initialize_config_dir(config_dir=str(conf_dir()), version_base=None):
        for cmd in COMMANDS:
            if cmd.skip:
                continue
            program, multirun, overrides = _args(cmd, hf_dir)
            if program == "lcgraph.app.pictures":
                options = [o for o in overrides if "=" not in o]
                del options[options.index("--out") : options.index("--out") + 2]
                argv = [*options, *_shrunk([o for o in overrides if "=" in o])]
                out.append(Job(cmd.where, program, argv=argv))
                continue
            for job in _jobs(overrides, multirun):
                out.append(Job(f"{cmd.where}: {' '.join(job)}", program, compose("config", overrides=_shrunk(job))))
    return out


def test_every_doc_command_composes_validates_plans_and_draws(doc_jobs, tmp_path):
    planned = set()
    for job in doc_jobs:
        if job.program == "lcgraph.app.pictures":
            pictures.main(["--out", str(tmp_path / "pictures"), *job.argv])
        elif job.program == "lcgraph-plan":
            key = job.layout + (job.cfg.parallel.microbatches,)  # shapes differ only in the numbers
            if key not in planned:
                planned.add(key)
                written = write_plan(checked_plan(job.cfg), tmp_path / "plan")
                assert any(p.name == "plan.json" for p in written), job.where
        else:
            assert job.program == "lcgraph-train", job.where
            try:
                validate_plan(job.cfg, env={})
            except LcgraphError as exc:
                pytest.fail(f"{job.where} fails as written: {exc}")
    assert list((tmp_path / "pictures").glob("*.svg"))


def synthetic(cfg):
    """Random tokens instead of the corpus: the layouts are under test here, the corpus in test_cli."""
    cfg = cfg.copy()
    cfg.data.synthetic = True
    return cfg


@pytest.mark.slow
def test_every_doc_layout_trains_one_step(doc_jobs):
    """Each distinct (pp, sp, dp, schedule, model.path, cp) of the docs' training jobs: one step, one launch per world."""
    layouts: dict[tuple, Job] = {}
    for job in doc_jobs:
        if job.program == "lcgraph-train":
            layouts.setdefault(job.layout, job)
    by_world = defaultdict(list)
    for job in layouts.values():
        pp, sp, dp, *_, cp = job.layout
        by_world[pp * sp * dp * cp].append(job)
    for world, group in sorted(by_world.items()):
        if world > COMPOSE_ONLY:
            continue
        cfgs = [synthetic(job.cfg) for job in group]
        if world == 1:
            losses = [train_local(cfg)[0] for cfg in cfgs]
        else:
            losses = [r["losses"] for r in train_spawned(cfgs, world, keep_params=False)]
        for job, got in zip(group, losses):
            assert len(got) == 1 and math.isfinite(got[0]), (job.where, got)
