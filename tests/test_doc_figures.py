"""Every figure README.md and docs/*.md quote from a command is what the command prints today: the planner's
outputs and the default run's losses; and docs/architecture.svg is the package graph the source has today
(tools/doc_figures.py regenerates them; this fails when one drifts)."""

import importlib.util
import sys
from pathlib import Path

import pytest

TOOLS = Path(__file__).resolve().parents[1] / "tools"


@pytest.fixture(scope="module")
def tool():
    spec = importlib.util.spec_from_file_location("doc_figures", TOOLS / "doc_figures.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["doc_figures"] = module
    spec.loader.exec_module(module)
    module.shared_cache = {}  # each command runs once for both tests
    return module


def test_every_quoted_figure_is_what_its_command_prints_today(tool):
    differ = tool.refresh(check=True, cache=tool.shared_cache)
    assert not differ, f"run `python3 tools/doc_figures.py` to rewrite: {differ}"


def test_a_figure_that_drifted_is_named(tool, tmp_path):
    readme = (tool.ROOT / "README.md").read_text()
    start = readme.index("<!-- figure: default-run-loss -->") + len("<!-- figure: default-run-loss -->")
    end = readme.index("<!-- /figure -->", start)
    drifted = tmp_path / "README.md"
    drifted.write_text(readme[:start] + "7.7 -> 6.6" + readme[end:])
    assert tool.refresh(check=True, only={"default-run-loss"}, docs=[drifted], cache=tool.shared_cache) == [
        "README.md: default-run-loss"
    ]
    assert "7.7 -> 6.6" in drifted.read_text()  # --check writes nothing
    tool.refresh(check=False, only={"default-run-loss"}, docs=[drifted], cache=tool.shared_cache)
    assert drifted.read_text() == readme


def test_an_architecture_picture_that_drifted_is_named_and_redrawn(tool, tmp_path):
    picture = tmp_path / "architecture.svg"
    today = tool.ARCHITECTURE.read_text()
    picture.write_text(today.replace("lcgraph/runtime/", "lcgraph/runtime_old/"))
    assert tool.redraw(check=True, target=picture) == ["architecture.svg: architecture"]
    assert "runtime_old" in picture.read_text()  # --check writes nothing
    assert tool.redraw(check=False, target=picture) == ["architecture.svg: architecture"]
    assert picture.read_text() == tool.architecture_svg() and tool.redraw(check=True, target=picture) == []
    picture.write_text(today.replace(" lines</tspan>", "1 lines</tspan>", 1))  # a module grew: its count alone
    assert tool.redraw(check=True, target=picture) == []
