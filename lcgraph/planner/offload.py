"""train.offload in the plan: what goes to host memory, whether the host holds it, whether the copies hide.

Per unit (runtime/offload.py says what each mode moves):

    attention   each kept layer's attention output and LSE (keep_attention's extra bytes)
    all         everything the unit keeps for its backward (recompute: each segment's input and the kept
                attention; no recompute: every saved activation), but a later stage's received input
                (the runtime holds it for its gradient) and the relay's K/V

Device memory: an offloaded unit holds nothing of those bytes between its forward and its backward; two units'
worth stay on the device at any time (one being copied out or computed, one brought back ahead of its
backward), charged as a transient to each stage (`CostModel.offload_transient`). Host memory: the same replay of the
programs as the device's, counting offloaded bytes: its peak per rank must fit the rank's share of host
memory (`+plan.host_memory_gb`, else this machine's RAM over its GPUs, HOST_USABLE of it).

Time: copies run on one side stream at the profile's `host_bandwidth`. Walking each rank's program, a unit's
copy to the host is issued when its forward ends, its copy back when the compute action before its backward
starts; the backward waits for it. The copy is hidden when the compute it overlaps is longer; else the
backward's wait (`exposed_s`, the largest over ranks) is added to the step.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from lcgraph.errors import PlanError
from lcgraph.planner.costs import CostModel
from lcgraph.planner.settings import PlanSettings
from lcgraph.planner.simulator import memory_peaks
from lcgraph.runtime.offload import backward_lookahead

HOST_USABLE = 0.8  # share of a rank's host memory the offload pool may take: the OS, loaders, pinning limits


@dataclass
class OffloadPlan:
    """What train.offload does to one evaluated layout, per rank (the largest over ranks)."""

    mode: str
    to_host_bytes: float  # per step, one direction
    host_peak_bytes: float  # host memory the pool needs
    host_memory_bytes: float  # the rank's usable share of host memory
    host_memory_source: str
    host_bandwidth: float
    copy_s: float  # both directions, one side stream
    exposed_s: float  # the part no compute hides: added to the step

    @property
    def fits_host(self) -> bool:
        return self.host_peak_bytes <= self.host_memory_bytes

    def summary(self) -> dict:
        return {k: getattr(self, k) for k in self.__dataclass_fields__} | {"fits_host": self.fits_host}

    def line(self) -> str:
        return (
            f"offload {self.mode}: {_size(self.to_host_bytes)} per step to the host and back, pool "
            f"{_size(self.host_peak_bytes)} of {_size(self.host_memory_bytes)} usable host memory "
            f"({self.host_memory_source}); copies {self.copy_s:.2f} s at {self.host_bandwidth / 1e9:.0f} GB/s, "
            f"{'hidden' if self.exposed_s == 0 else f'{self.exposed_s:.2f} s not hidden'}"
        )


def _size(n: float) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n:.0f} B"


class _HostCosts:
    """The simulator's memory interface over offloaded bytes only: its replay gives the host pool's peak."""

    def __init__(self, cost: CostModel):
        self.cost = cost

    def static_bytes(self, stage: int) -> float:
        return 0.0

    def step_bytes(self, stage: int) -> float:
        return 0.0

    def unit_bytes(self, stage: int, chunk: int) -> tuple[float, float]:
        return self.cost.offloaded_bytes(stage, chunk), 0.0


def host_memory(settings: PlanSettings, ranks_per_node: int) -> tuple[float, str]:
    """Usable host bytes per rank, and where the figure comes from."""
    given = settings.host_memory_gb
    if given:
        return HOST_USABLE * float(given) * 1e9, f"+plan.host_memory_gb={given} x {HOST_USABLE}"
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    share = total / max(1, ranks_per_node)
    return HOST_USABLE * share, f"this machine's {total / 2**30:.0f} GiB / {ranks_per_node} GPU(s) x {HOST_USABLE}"


def _exposed(program, cost: CostModel, bandwidth: float) -> tuple[float, float, float]:
    """(bytes to the host, copy seconds, seconds a backward waits for its copy back) of one rank's program."""
    following, follows = backward_lookahead(program)
    moved: set[tuple] = set()
    sent = copy_s = waited = 0.0
    clock = side = 0.0  # compute time (bubbles left out: they only give the copies more room) and side stream
    back: dict[tuple, float] = {}
    for i, a in enumerate(program):
        if a.kind not in ("F", "B"):
            continue
        unit = (a.stage, a.mb, a.chunk)
        nbytes = cost.offloaded_bytes(a.stage, a.chunk)
        if a.kind == "B" and unit in moved:  # the backward waits for its copy back (issued now if not ahead)
            if unit not in back:
                side = back[unit] = max(side, clock) + nbytes / bandwidth
            ready = back.pop(unit)
            waited += max(0.0, ready - clock)
            clock = max(clock, ready)
        nxt = following[i]
        if nxt is not None and nxt in moved and nxt not in back:  # issued as this action starts
            side = max(side, clock) + cost.offloaded_bytes(nxt[0], nxt[2]) / bandwidth
            back[nxt] = side
        clock += cost.duration(a, 0)
        if a.kind == "F" and not follows[i] and nbytes:  # copied out once the forward is done
            side = max(side, clock) + nbytes / bandwidth
            moved.add(unit)
            sent += nbytes
            copy_s += 2 * nbytes / bandwidth
    return sent, copy_s, waited


def offload_plan(programs, spec, cost: CostModel, settings: PlanSettings) -> OffloadPlan | None:
    """The offload figures of an evaluated layout (None without offload)."""
    lay, dev = cost.layout, cost.profile
    if lay.offload == "none":
        return None
    if not dev.host_bandwidth:
        raise PlanError(
            f"train.offload={lay.offload} but device profile {dev.name!r} has no host_bandwidth; "
            "measure it with lcgraph-check --gpus 1 --only links and plan with +plan.profile=DIR/profile.json"
        )
    _, host_peaks = memory_peaks(programs, spec, _HostCosts(cost))
    per_rank = [_exposed([a for a in p if a.kind in ("F", "B")], cost, dev.host_bandwidth) for p in programs]
    usable, source = host_memory(settings, min(lay.gpus, dev.gpus_per_node))
    return OffloadPlan(
        lay.offload,
        max(r[0] for r in per_rank),
        max(host_peaks),
        usable,
        source,
        dev.host_bandwidth,
        max(r[1] for r in per_rank),
        max(r[2] for r in per_rank),
    )


def check_host(plan: OffloadPlan | None) -> None:
    """Refuse, in one line, an offload whose pool does not fit the rank's host memory."""
    if plan is not None and not plan.fits_host:
        gib = 2**30
        raise PlanError(
            f"train.offload={plan.mode} needs {plan.host_peak_bytes / gib:.1f} GiB of host memory per rank but "
            f"{plan.host_memory_bytes / gib:.1f} GiB is usable ({plan.host_memory_source}); set "
            "+plan.host_memory_gb to this machine's RAM per GPU, offload less (train.offload=attention or none) "
            "or use more GPUs"
        )
