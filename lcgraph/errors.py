"""What a user causes, as exceptions: the app shows an LcgraphError as one line, anything else with its traceback.

Every package may import this module (it imports nothing of lcgraph). Set LCGRAPH_TRACEBACK=1 to see the full
traceback and chained cause of a user error too (e.g. the whole torch.export failure behind a CaptureError).
"""

from __future__ import annotations

import os

TRACEBACK_ENV = "LCGRAPH_TRACEBACK"


class LcgraphError(Exception):
    """A mistake the user can fix (a config, a path, a launch): reported in one line that says how."""


class PlanError(LcgraphError, ValueError):
    """A parallel layout or config that cannot work (checked before anything is built)."""


class LaunchError(PlanError):
    """A launch that does not match the layout: rank count, GPUs or CPU cores."""


class CaptureError(LcgraphError, ValueError):
    """A model lcgraph cannot capture (not LLaMA-like, or torch.export refused it)."""


class DataError(LcgraphError, ValueError):
    """A corpus or tokenizer that does not fit the config."""


class ModelPathError(LcgraphError, FileNotFoundError):
    """A model directory without the files an HF checkpoint has."""


class DataPathError(DataError, FileNotFoundError):
    """A data.path that holds no text."""


class ProfileError(PlanError, FileNotFoundError):
    """A device profile name or file that does not exist."""


class RankError(LcgraphError):
    """A user's error raised inside a spawned rank, carried to the launcher (the rank's traceback is kept)."""


def user_error_names() -> set[str]:
    """Class names of every LcgraphError kind: how a rank's error file (which holds the name) is told apart."""
    names, todo = set(), [LcgraphError]
    while todo:
        cls = todo.pop()
        names.add(cls.__name__)
        todo.extend(cls.__subclasses__())
    return names


class CheckpointError(LcgraphError):
    """A checkpoint that cannot be written where the run asked."""


class TrainingFault(LcgraphError):
    """A run the ranks stopped on purpose: non-finite gradients (train.on_nonfinite=stop), replicas that
    disagree, a dead or stuck rank. The message says what happened and how to go on (train.resume=auto)."""


def full_tracebacks() -> bool:
    """Whether the user asked to see user errors with their traceback (LCGRAPH_TRACEBACK=1)."""
    return os.environ.get(TRACEBACK_ENV, "") not in ("", "0")
