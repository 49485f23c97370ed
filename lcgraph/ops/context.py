"""What this process's graph ops run with: the Ulysses all-to-all's process group, the ring's group and its
neighbours, the attention kernel. The runtime sets them once per rank (`configure`); graph nodes take only
tensors, so stage graphs stay plain fx graphs and the ops read their context when they run."""

from __future__ import annotations

import os
from dataclasses import dataclass, field, replace

import torch.distributed as dist

BACKENDS = ("auto", "math", "cudnn", "flash", "efficient")  # attention kernels (ops/attention.py)


@dataclass(frozen=True)
class RingPlace:
    """This rank's place in the ring of context parallelism (cp), with the global ranks of its neighbours."""

    group: dist.ProcessGroup | None = None
    size: int = 1
    rank: int = 0
    send_to: int = 0
    recv_from: int = 0


@dataclass(frozen=True)
class OpContext:
    """The Ulysses group and its size, the ring place, the attention kernel (`BACKENDS`)."""

    sp_group: dist.ProcessGroup | None = None  # None when sp == 1
    sp: int = 1
    ring: RingPlace = field(default_factory=RingPlace)
    backend: str = os.environ.get("LCGRAPH_ATTENTION", "auto")


_current = OpContext()


def current() -> OpContext:
    """The context the ops of this process run with."""
    return _current


def configure(
    sp_group=None, sp: int = 1, cp_group=None, cp: int = 1, cp_rank: int = 0, backend: str | None = None
) -> None:
    """Set this rank's context: its sp group, its cp group and place in it (groups None for size 1) and, when
    given, the attention kernel (else the one set before: `set_backend`, or LCGRAPH_ATTENTION, or auto)."""
    global _current
    backend = _checked(backend if backend is not None else _current.backend)
    ring = RingPlace()
    if cp > 1:
        nxt, prev = (cp_rank + 1) % cp, (cp_rank - 1) % cp
        ring = RingPlace(
            cp_group, cp, cp_rank, dist.get_global_rank(cp_group, nxt), dist.get_global_rank(cp_group, prev)
        )
    _current = OpContext(sp_group, sp, ring, backend)


def set_backend(name: str) -> None:
    """Select the attention kernel for this process (ops/attention.py: `auto` or a kernel's name)."""
    global _current
    _current = replace(_current, backend=_checked(name))


def _checked(name: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"attention backend {name!r} unknown; choose one of {BACKENDS}")
    return name
