"""README.md and docs/ as a user meets them: a short README that opens with the two commands CI runs, links and
pictures that resolve, and words about lcgraph only (no tracker numbers or notes on how the work was done)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = [README, *sorted((ROOT / "docs").glob("*.md"))]
MAX_README_LINES = 200
# Words that belong to a tracker or a work log, not to a user's guide or the code.
WORK_LOG = re.compile(
    r"\bissues? ?#?\d+|\bissue's\b|\bdevice (tool|call)s?\b|\b(this|that|earlier|other|last) session\b", re.I
)
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")


def _project_files() -> list[Path]:
    out = []
    for folder in ("lcgraph", "tests", "tools", "conf", "recipes", "docs", ".ci"):
        out += [p for p in (ROOT / folder).rglob("*") if p.is_file() and p.suffix in {".py", ".md", ".yaml", ""}]
    return [README, ROOT / "pyproject.toml", *out]


def _anchor(heading: str) -> str:
    """GitHub's anchor of a markdown heading: lower case, punctuation dropped, spaces to dashes."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_readme_is_short_and_opens_with_the_commands_ci_runs():
    text = README.read_text()
    assert len(text.splitlines()) <= MAX_README_LINES, f"README.md has {len(text.splitlines())} lines"
    first_block = text.split("```bash\n", 1)[1].split("```", 1)[0]
    commands = [line.split("#")[0].strip() for line in first_block.splitlines() if line.strip()]
    assert len(commands) == 2 and commands[0].endswith("lcgraph-train"), commands
    ci = (ROOT / ".ci" / "run").read_text()
    assert commands[1].replace("python ", "python3 ") in ci, "README's test command is not the one .ci/run runs"


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_every_link_and_picture_resolves(doc):
    broken = []
    for target in LINK.findall(doc.read_text()):
        if target.startswith(("http://", "https://", "mailto:")):
            continue
        path, _, anchor = target.partition("#")
        file = (doc.parent / path).resolve() if path else doc
        if not file.exists():
            broken.append(target)
        elif anchor and file.suffix == ".md":
            headings = re.findall(r"^#+ (.+)$", file.read_text(), re.M)
            if anchor not in {_anchor(h) for h in headings}:
                broken.append(target)
    assert not broken, f"{doc.name}: {broken}"


def test_no_project_file_speaks_of_trackers_or_work_sessions():
    found = []
    for path in _project_files():
        if "results" in path.parts:  # measured records keep their own provenance lines
            continue
        for n, line in enumerate(path.read_text(errors="ignore").splitlines(), 1):
            if path.name != "test_readme.py" and WORK_LOG.search(line):
                found.append(f"{path.relative_to(ROOT)}:{n}: {line.strip()[:100]}")
    assert not found, "\n".join(found)


def test_the_checks_catch_what_they_name(tmp_path):
    # the work-log phrases the check must catch, joined here so that this file holds none of them itself
    assert WORK_LOG.search("as issue" + " 14 asked") and WORK_LOG.search("measured through the device" + " tool")
    assert not WORK_LOG.search("each rank issues its sends; the launcher runs in its own session")
    assert _anchor("Checkpoints and resume") == "checkpoints-and-resume"
    assert _anchor("Sequence parallelism and the distributed optimizer") in {
        "sequence-parallelism-and-the-distributed-optimizer"
    }
