"""train.offload: activations kept for the backward wait in host memory instead of the GPU.

    none       nothing leaves the device
    attention  what train.recompute=keep_attention keeps: each layer's attention output and LSE per unit
    all        attention, and every tensor autograd saves outside a checkpointed segment (under recompute, each
               segment's input: the residual stream per layer and unit; without recompute, every activation)

A unit's tensors go to the host when its forward ends (attention) or as autograd saves them (all), on a side
stream, and come back ahead of the unit's backward: the interpreter knows its program, so when a forward or
backward starts it issues the copies for the next backward (`Offloader.prefetch`) and that backward waits only
on its own copies. A unit whose backward runs right after its forward (the last chunk of a micro-batch on the
last stage) stays on the device: there is no compute to hide the round trip behind.

The host side is one pool (`HostPool`), pinned on a GPU, carved into slots by byte size: a slot freed by a
unit's backward is reused by the next unit of the same size, so a step after the first allocates nothing. On
CPU the same code copies into an ordinary host pool, synchronously: the tests run the real path.

The KV relay's buffers (ops/relay.py) stay on the device: every later chunk's forward and backward reads them.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from lcgraph.errors import PlanError
from lcgraph.ops.attention import Saved
from lcgraph.ops.relay import RelayContext
from lcgraph.schedule.actions import Action

OFFLOAD_MODES = ("none", "attention", "all")  # least moved first
AUTO = "auto"  # the planner picks (planner.offload.resolve_offload)
ALIGN = 256  # slot offsets: any dtype views an aligned slot
ARENA_BYTES = 256 * 2**20  # the pool grows by at least this much (pinned allocations are slow: few, large)
MIN_SAVED_BYTES_GPU = 2**20  # offload=all leaves smaller saved tensors (ids, norms' statistics) on the GPU

Unit = tuple[int, int, int]  # (stage, micro-batch, chunk)


def offload_mode(value: object, allow_auto: bool = False) -> str:
    """`train.offload` as one of OFFLOAD_MODES (or `auto` where allowed)."""
    mode = value.lower() if isinstance(value, str) else ("none" if value in (None, False) else value)
    if mode not in OFFLOAD_MODES and not (allow_auto and mode == AUTO):
        choices = ", ".join(OFFLOAD_MODES + ((AUTO,) if allow_auto else ()))
        raise PlanError(f"train.offload={value} is unknown; use one of {choices}")
    return str(mode)


@dataclass(frozen=True)
class Slot:
    arena: int
    offset: int
    nbytes: int


class HostPool:
    """Host memory for offloaded tensors: arenas allocated once and kept, slots reused by byte size.

    `arenas_allocated` counts host allocations (the tests check that a second step makes none); `in_use` and
    `peak` are the bytes held by live slots."""

    def __init__(self, pin: bool, arena_bytes: int = ARENA_BYTES):
        self.pin, self.arena_bytes = pin, arena_bytes
        self.arenas: list[torch.Tensor] = []
        self.tail = 0  # first unused byte of the last arena
        self.free: dict[int, list[Slot]] = {}  # slot size -> freed slots
        self.in_use = self.peak = 0

    @property
    def arenas_allocated(self) -> int:
        return len(self.arenas)

    @property
    def capacity(self) -> int:
        return sum(a.numel() for a in self.arenas)

    def take(self, nbytes: int) -> Slot:
        size = -(-max(nbytes, 1) // ALIGN) * ALIGN
        slot = self.free[size].pop() if self.free.get(size) else self._carve(size)
        self.in_use += size
        self.peak = max(self.peak, self.in_use)
        return slot

    def give(self, slot: Slot) -> None:
        self.free.setdefault(slot.nbytes, []).append(slot)
        self.in_use -= slot.nbytes

    def view(self, slot: Slot, dtype: torch.dtype, shape: torch.Size) -> torch.Tensor:
        raw = self.arenas[slot.arena][slot.offset : slot.offset + slot.nbytes]
        n = shape.numel() * dtype.itemsize
        return raw[:n].view(dtype).view(shape)

    def _carve(self, size: int) -> Slot:
        if not self.arenas or self.tail + size > self.arenas[-1].numel():
            nbytes = max(size, self.arena_bytes)
            self.arenas.append(torch.empty(nbytes, dtype=torch.uint8, pin_memory=self.pin))
            self.tail = 0
        slot = Slot(len(self.arenas) - 1, self.tail, size)
        self.tail += size
        return slot


@dataclass
class Stashed:
    """One tensor in the host pool, and its copy back on the device once fetched (or prefetched)."""

    slot: Slot
    shape: torch.Size
    dtype: torch.dtype
    nbytes: int
    order: tuple[int, ...] | None = None  # the permutation that made the tensor contiguous, undone on the way back
    back: torch.Tensor | None = None  # the device copy (contiguous, in `order`), issued by prefetch
    ready: torch.cuda.Event | None = None  # recorded on the side stream after the copy back (GPU only)


@dataclass
class _KeptEntry:
    key: tuple[int, int, int]  # the relay's (micro-batch, chunk, layer)
    out: Stashed
    lse: Stashed
    saved: Saved  # backend and kernel aux (small, left on the device); out and lse replaced on restore


@dataclass
class OffloadStats:
    """What moved in the last step (reset by `start_step`)."""

    to_host: int = 0  # bytes copied device -> host
    to_device: int = 0  # bytes copied host -> device
    prefetched: int = 0  # of to_device, bytes issued ahead of the backward that needs them
    tensors: int = 0
    kept_units: int = 0  # units left on the device (their backward came next)
    by_unit: dict[Unit, int] = field(default_factory=dict)  # bytes each unit sent to the host


class Offloader:
    """Moves saved activations of units to a host pool and back, on a side stream on the GPU."""

    def __init__(self, mode: str, device: torch.device, param_ptrs: set[int], min_bytes: int | None = None):
        self.mode = offload_mode(mode)
        self.device = device
        self.cuda = device.type == "cuda"
        self.pool = HostPool(pin=self.cuda, arena_bytes=ARENA_BYTES if self.cuda else 0)
        self.stream = torch.cuda.Stream(device) if self.cuda else None
        self.param_ptrs = param_ptrs
        self.min_bytes = (MIN_SAVED_BYTES_GPU if self.cuda else 0) if min_bytes is None else min_bytes
        self.units: dict[Unit, list[Stashed]] = {}
        self.kept: dict[Unit, list[_KeptEntry]] = {}
        self.stats = OffloadStats()

    def start_step(self) -> None:
        self.stats = OffloadStats()

    # --- one tensor ----------------------------------------------------------------------------------------
    def stash(self, unit: Unit, t: torch.Tensor) -> Stashed:
        """Copy `t` into the pool (asynchronously on the GPU: the caller may drop `t` at once)."""
        nbytes = t.numel() * t.element_size()
        order = _dense_order(t)
        src = t.permute(order) if order is not None else t
        s = Stashed(self.pool.take(nbytes), src.shape, t.dtype, nbytes, order)
        host = self.pool.view(s.slot, t.dtype, src.shape)
        with torch.no_grad(), self._side():
            host.copy_(src, non_blocking=self.cuda)
        if self.stream is not None:
            t.record_stream(self.stream)  # the allocator reuses t's memory only after the copy
        self.units.setdefault(unit, []).append(s)
        self.stats.to_host += nbytes
        self.stats.tensors += 1
        self.stats.by_unit[unit] = self.stats.by_unit.get(unit, 0) + nbytes
        return s

    def _bring_back(self, s: Stashed) -> None:
        if s.back is not None:
            return
        s.back = torch.empty(s.shape, dtype=s.dtype, device=self.device)  # on the compute stream: freed there
        with torch.no_grad(), self._side():
            s.back.copy_(self.pool.view(s.slot, s.dtype, s.shape), non_blocking=self.cuda)
            if self.stream is not None:
                s.ready = torch.cuda.Event()
                s.ready.record(self.stream)
        self.stats.to_device += s.nbytes

    def fetch(self, s: Stashed) -> torch.Tensor:
        """The tensor back on the device; the compute stream waits for its copy only."""
        self._bring_back(s)
        back, s.back = s.back, None  # the caller owns it now: nothing here keeps device memory
        if s.ready is not None:
            torch.cuda.current_stream(self.device).wait_event(s.ready)
            s.ready = None
        assert back is not None
        if s.order is None:
            return back
        return back.permute(sorted(range(len(s.order)), key=s.order.__getitem__))  # the strides it left with

    @contextlib.contextmanager
    def _side(self):
        """Run copies on the side stream, after what the compute stream has issued so far."""
        if self.stream is None:
            yield
            return
        self.stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self.stream):
            yield

    # --- units ---------------------------------------------------------------------------------------------
    def prefetch(self, unit: Unit) -> None:
        """Issue the copies back of everything `unit` stashed (its backward comes next)."""
        for s in self.units.get(unit, []):
            if s.back is None:
                self._bring_back(s)
                self.stats.prefetched += s.nbytes

    def release(self, unit: Unit) -> None:
        """The unit's backward is done: its slots go back to the pool."""
        for s in self.units.pop(unit, []):
            self.pool.give(s.slot)
        self.kept.pop(unit, None)

    def stash_kept(self, relay: RelayContext, unit: Unit) -> None:
        """Move the attention outputs and LSEs the relay keeps for `unit` (keep_attention) to the host."""
        _, mb, chunk = unit
        for key in [k for k in relay.kept if k[:2] == (mb, chunk)]:
            saved = relay.kept.pop(key)
            entry = _KeptEntry(key, self.stash(unit, saved.out), self.stash(unit, saved.lse), saved)
            entry.saved.out = entry.saved.lse = torch.empty(0)  # no device reference left behind
            self.kept.setdefault(unit, []).append(entry)

    def restore_kept(self, relay: RelayContext, unit: Unit) -> None:
        """Put `unit`'s kept attention back where the backward's rerun reads it."""
        for e in self.kept.pop(unit, []):
            e.saved.out, e.saved.lse = self.fetch(e.out), self.fetch(e.lse)
            relay.kept[e.key] = e.saved

    # --- offload=all ---------------------------------------------------------------------------------------
    def hooks(self, unit: Unit, keep: Callable[[torch.Tensor], object] | None = None):
        """Saved-tensor hooks for `unit`'s forward: activations to the pool, parameters and small tensors left
        on the device (reported to `keep`, the activation meter)."""

        def pack(t: torch.Tensor):
            ptr = t.untyped_storage().data_ptr()
            if ptr in self.param_ptrs or t.numel() * t.element_size() < self.min_bytes or t.device.type == "meta":
                if keep is not None:
                    keep(t)
                return t
            return self.stash(unit, t)

        def unpack(packed):
            return self.fetch(packed) if isinstance(packed, Stashed) else packed

        return torch.autograd.graph.saved_tensors_hooks(pack, unpack)


def _dense_order(t: torch.Tensor) -> tuple[int, ...] | None:
    """The dim order in which `t` is contiguous when it is a permuted dense tensor (a transposed attention output,
    a [B, H, S, D] view of [B, S, H, D]), else None: its copy back then gets its strides too, which kernels such as
    cuDNN's attention backward may depend on. Plain contiguous tensors: None (nothing to undo)."""
    if t.is_contiguous() or t.dim() < 2:
        return None
    strides, shape = t.stride(), t.shape
    order = tuple(sorted(range(t.dim()), key=lambda i: (-strides[i], -shape[i])))
    return order if t.permute(order).is_contiguous() else None


def backward_lookahead(program: list[Action]) -> tuple[list[tuple | None], list[bool]]:
    """Per program index: the unit of the next backward after it (what to prefetch), and whether the next
    compute action is the backward of this very forward (its activations then stay on the device)."""
    following: list[tuple | None] = [None] * len(program)
    follows = [False] * len(program)
    upcoming: tuple | None = None
    next_compute: Action | None = None
    for i in range(len(program) - 1, -1, -1):
        a = program[i]
        following[i] = upcoming
        if a.kind == "F" and next_compute is not None and next_compute.kind == "B":
            follows[i] = (next_compute.stage, next_compute.mb, next_compute.chunk) == (a.stage, a.mb, a.chunk)
        if a.kind in ("F", "B"):
            next_compute = a
        if a.kind == "B":
            upcoming = (a.stage, a.mb, a.chunk)
    return following, follows
