"""Where lcgraph's config groups and recipes live: beside the package in a checkout, inside it when installed."""

from pathlib import Path

_PKG = Path(__file__).resolve().parents[1]  # the lcgraph package


def _first(*candidates: Path) -> Path:
    return next((c for c in candidates if c.is_dir()), candidates[-1])


def conf_dir() -> Path:
    return _first(_PKG.parent / "conf", _PKG / "conf")


def recipes_dir() -> Path:
    return _first(_PKG.parent / "recipes", _PKG / "recipes")
