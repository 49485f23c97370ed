"""A user's mistake is one line; a bug keeps its traceback."""

from __future__ import annotations

import re

import pytest

from lcgraph.app.cli import one_line_errors, spawn
from lcgraph.app.config import typed
from lcgraph.app.job import resolve_plan
from lcgraph.app.testing import compose
from lcgraph.errors import DataError, LaunchError, LcgraphError, PlanError, RankError


def test_a_user_error_is_one_line_and_exit_code_2(capsys):
    with pytest.raises(SystemExit) as done, one_line_errors("lcgraph", sweep_goes_on=False):
        raise PlanError("parallel.pp=8 stages but the model has 4 layers; use pp <= 4")
    assert done.value.code == 2
    assert capsys.readouterr().err == "lcgraph: error: parallel.pp=8 stages but the model has 4 layers; use pp <= 4\n"


def test_a_value_error_from_torch_keeps_its_traceback():
    with pytest.raises(ValueError, match="not a user error"), one_line_errors("lcgraph", sweep_goes_on=False):
        raise ValueError("not a user error")


def test_the_traceback_flag_shows_user_errors_whole(monkeypatch):
    monkeypatch.setenv("LCGRAPH_TRACEBACK", "1")
    with pytest.raises(DataError), one_line_errors("lcgraph", sweep_goes_on=False):
        raise DataError("corpus too short")


def test_the_hierarchy():
    assert issubclass(LaunchError, PlanError) and issubclass(PlanError, LcgraphError)
    assert issubclass(PlanError, ValueError)  # callers that caught ValueError still do


def test_a_rank_error_reaches_the_user_as_one_line_naming_the_rank_with_the_traceback_kept(tmp_path, capfd):
    short = tmp_path / "short.txt"
    short.write_text("too short a corpus\n")
    cfg = compose(f"data.path={short}", "parallel.pp=2")
    run = tmp_path / "run"
    with pytest.raises(RankError) as info:
        run_cfg = typed(cfg)
        spawn(run_cfg, str(run), 2, resolve_plan(run_cfg))
    message = str(info.value)
    assert re.fullmatch(
        r"rank [01]: the corpus has \d+ tokens, too few for a training window of data.seq_len=64\+1; .* \(traceback: .*\)",
        message,
    )
    kept = run / f"rank{message[5]}.traceback"
    assert "Traceback" in kept.read_text() and "DataError" in kept.read_text()
    assert "Traceback" not in capfd.readouterr().err  # the ranks print none: it is in the run directory


def _disagreeing_rank(cfg_yaml: str, what: str) -> None:
    """A spawned rank whose rank 1 composed another learning rate (`config`: a torchrun node started with other
    overrides), resolved another recompute plan (`plan`: a torchrun node whose GPU the planner chose otherwise) or
    captured another graph (`graph`: a node whose transformers exports another op in one place)."""
    import torch
    import torch.distributed as dist
    from omegaconf import OmegaConf

    from lcgraph.app.cli import init_distributed
    from lcgraph.app.config import typed
    from lcgraph.app.job import Job
    from lcgraph.planner.plan import Recompute

    cfg = OmegaConf.create(cfg_yaml)
    init_distributed(typed(cfg).train)
    try:
        plan = resolve_plan(typed(cfg))
        if dist.get_rank() == 1 and what == "config":
            cfg.optim.lr = 2 * cfg.optim.lr
        if dist.get_rank() == 1 and what == "plan":
            plan = Recompute("full", 1, -1, "planned for another GPU")
        if dist.get_rank() == 1 and what == "graph":
            import lcgraph.app.job as job_module

            exported = job_module.capture

            def another_op(*args, **kwargs):  # as many nodes, one target other: only the graph's text tells
                captured = exported(*args, **kwargs)
                node = next(n for n in captured.graph.nodes if n.target == torch.ops.aten.mul.Tensor)
                node.target = torch.ops.aten.add.Tensor
                return captured

            job_module.capture = another_op
        with pytest.raises(LaunchError) as err:
            Job(typed(cfg), __import__("tempfile").mkdtemp(), dist.get_rank(), dist.get_world_size(), plan=plan)
        message = str(err.value)
        assert f"rank 1 and rank 0 differ in their {what}" in message and "\n" not in message, message
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("what", ["config", "plan", "graph"])
def test_ranks_that_composed_different_plans_are_refused_on_every_rank_before_a_step(what):
    from omegaconf import OmegaConf

    from lcgraph.app.cli import launch_local

    cfg = compose("parallel.dp=2", "data.synthetic=true")
    launch_local(2, _disagreeing_rank, OmegaConf.to_yaml(cfg, resolve=True), what, run_id="disagree")
