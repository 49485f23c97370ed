"""The stage-program interpreter: runs one rank's program of actions over its stage graphs.

It knows nothing about LLaMA: a stage is a graph module with parameter placeholders, an optional
`hidden_in` input and one output (activation, or the summed loss on the last stage). Actions:

    F / B            forward / backward of one (micro-batch, chunk) unit on a stage
    [SEND_* RECV_*]  a p2p group: point-to-point activations and gradients issued as one batch_isend_irecv,
                     exactly as programs.txt brackets them (a bare token is a group of one)
    RS / AG          gradient reduce-scatter / parameter all-gather of a bucket (distributed optimizer, see optimizer.py)
    OPT              gradient synchronisation and the optimizer step

Groups are asynchronous: a received tensor is waited for right before the compute that reads it, and
every group is finished by OPT.
The runtime also measures what the planner predicts: live activation bytes per stage and a timeline.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
import torch.distributed as dist

from lcgraph.graph.passes import StageGraph
from lcgraph.ops import masks
from lcgraph.ops.relay import RelayContext
from lcgraph.runtime import recompute as recompute_layers
from lcgraph.runtime.offload import Offloader, backward_lookahead, offload_mode
from lcgraph.runtime.recompute import recompute_mode
from lcgraph.schedule.actions import P2P_KINDS, Action, issue_units, unit_token

# train.recompute (runtime/recompute.py): in modes other than none each stage runs its layers checkpointed one
# by one (recompute.seal), so F and B below look the same in every mode.


@dataclass
class UnitData:
    """Inputs of one (micro-batch, chunk) unit on this rank (already sharded for sequence parallelism)."""

    input_ids: torch.Tensor  # [B, s]
    position_ids: torch.Tensor  # [B, s]
    labels: torch.Tensor  # [B, s]
    document_ids: torch.Tensor | None = None  # [B, S] the whole window's documents (masked runs), else None
    ring_pairs: masks.RingPairs = ()  # masked runs with ring attention: each chunk's pieces per cp rank


class ActivationMeter:
    """Counts bytes the autograd graph saves for backward, per unit, excluding parameters."""

    def __init__(self, param_ptrs: set[int], enabled: bool = True):
        self.param_ptrs, self.enabled = param_ptrs, enabled  # off on GPU: the hook costs, the allocator reports
        self.unit_bytes: dict[tuple, int] = {}
        self.live = 0
        self.peak = 0
        self._seen: set[int] = set()
        self._current: tuple = ()  # the unit whose forward is running (set by start)

    def hooks(self, unit: tuple, offloader: Offloader | None = None):
        """Count what `unit`'s forward saves; with an offloader (train.offload=all), only what stays on the device."""
        self._current, self._seen = unit, set()
        self.unit_bytes[unit] = 0
        if offloader is not None:
            return offloader.hooks(unit, keep=self.count if self.enabled else None)
        if not self.enabled:
            return contextlib.nullcontext()
        return torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)

    def _pack(self, t: torch.Tensor):
        self.count(t)
        return t

    def count(self, t: torch.Tensor) -> None:
        """Add `t`'s storage to the running unit's bytes, once, unless it is a parameter's."""
        ptr = t.untyped_storage().data_ptr() if t.device.type != "meta" else id(t)
        if ptr not in self.param_ptrs and ptr not in self._seen:
            self._seen.add(ptr)
            self.unit_bytes[self._current] += t.untyped_storage().nbytes()

    def forward_done(self, unit: tuple, extra: int = 0) -> None:
        self.live += self.unit_bytes[unit]
        self.peak = max(self.peak, self.live + extra)

    def backward_done(self, unit: tuple) -> None:
        self.live -= self.unit_bytes.pop(unit)


@dataclass
class StageState:
    """A stage graph with its real parameters and per-step bookkeeping."""

    graph: StageGraph
    params: dict[str, torch.nn.Parameter]  # HF name -> parameter
    buffers: dict[str, torch.Tensor]  # HF name -> buffer
    relay: RelayContext = field(default_factory=RelayContext)

    def kwargs(self, unit: UnitData, hidden_in) -> dict[str, torch.Tensor]:
        g = self.graph
        args: dict[str, torch.Tensor] = {ph: self.params[name] for ph, name in g.param_names.items()}
        args.update({ph: self.buffers[name] for ph, name in g.buffer_names.items()})
        given = {
            "input_ids": unit.input_ids,
            "position_ids": unit.position_ids,
            "labels": unit.labels,
            "hidden_in": hidden_in,
        }
        args.update({name: given[name] for name in g.inputs})
        return args


class OptimizerHooks(Protocol):
    """What the interpreter calls on the optimizer (runtime/optimizer.py: ShardedAdamW, ReplicatedAdamW).

    The optimizer, not the interpreter, knows buckets and replicas: the interpreter only says where in
    the program it is (before/after a forward or backward, at an RS/AG action, at OPT).
    """

    events: list[tuple[str, int, int, float]]  # (what, stage, bucket, time) of this step, for timelines
    param_groups: list[dict[str, Any]]  # the trainer sets the learning rate here every step
    nonfinite: list[int]  # stages (and the loss slot) whose gradients were not finite at the last OPT: update dropped
    updates: int  # updates applied so far: AdamW's step count (a dropped update does not count)

    def start_step(self) -> None: ...
    def before_forward(self, action: Action) -> None: ...
    def before_backward(self, action: Action, final: bool) -> None: ...
    def after_backward(self, action: Action, final: bool) -> None: ...
    def collective(self, action: Action, interp: Interpreter) -> None: ...
    def sync_and_step(self, interp: Interpreter) -> float: ...
    def sync_params(self) -> None: ...
    def program_actions(self) -> dict[int, tuple[list[Action], list[Action]]]: ...
    def tied_buckets(self) -> frozenset[tuple[int, int]]: ...
    def gather_waits(self, stage: StageGraph) -> bool: ...
    def state_bytes(self) -> int: ...
    # for the checkpointer (runtime/checkpoint.py)
    def checkpoint_state(self, masters: bool = True) -> dict[str, Any]: ...
    def restored(self, updates: int, masters_loaded: bool) -> None: ...
    def masters_from(self, read: Callable[[dict[str, torch.Size]], dict[str, torch.Tensor]]) -> None: ...


class Interpreter:
    """Executes one rank's program for one optimizer step."""

    def __init__(
        self,
        program: list[Action],
        stages: dict[int, StageState],
        pp_peers: dict[int, int],
        hidden_shape,
        dtype,
        device,
        optimizer: OptimizerHooks,
        record_timeline: bool = True,
        recompute: str | bool = "none",
        measure_activations: bool = True,
        kept_attention_layers: int = -1,
        offload: str = "none",
    ):
        self.program = program
        self.stages = stages
        self.pp_peers = pp_peers  # pipeline rank -> global rank of my (dp, sp) replica on it
        self.hidden_shape = hidden_shape  # (batch, hidden) of the residual stream
        self.dtype, self.device = dtype, device
        self.optimizer = optimizer  # sync_and_step (OPT), collective (RS/AG), before/after_backward, before_forward
        self.final_backward = {}  # stage -> index of its last B in the program (gradients final after it)
        for i, a in enumerate(program):
            if a.kind == "B":
                self.final_backward[a.stage] = i
        self.grad_norm = 0.0
        self.recompute = recompute_mode(recompute)  # the stages' layers were sealed for it (recompute.seal)
        for st in stages.values():  # keep_attention: every layer of the stage, or its first kept_attention_layers
            kept = st.graph.layers if kept_attention_layers < 0 else st.graph.layers[:kept_attention_layers]
            st.relay.keep = set(kept) if self.recompute == "keep_attention" else set()
        ptrs = {p.untyped_storage().data_ptr() for s in stages.values() for p in s.params.values()}
        self.meters = {i: ActivationMeter(ptrs, enabled=measure_activations) for i in stages}
        mode = offload_mode(offload)  # train.offload (runtime/offload.py)
        self.offloader = Offloader(mode, torch.device(device), ptrs) if mode != "none" else None
        self.next_backward, self.backward_follows = backward_lookahead(program)
        self.timeline: list[tuple[str, float, float]] = []  # (action, start, end) of the last step only
        self.record_timeline = record_timeline
        self.on_action: Callable[[str], None] | None = None  # told each action before it runs (faults.Heartbeat)
        self.swap_next_send = False  # faults' swap hook: hold the next sends-only group back behind the group after it
        self._held: list[Action] | None = None

    # --- one step ------------------------------------------------------------------------------------------
    def run_step(self, units: dict[tuple[int, int], UnitData], loss_scale: float) -> torch.Tensor:
        """Run the program; `units[(mb, chunk)]` are this rank's inputs. Returns this rank's summed loss."""
        self.units, self.loss_scale = units, loss_scale
        lengths = [u.input_ids.shape[1] for (mb, _), u in sorted(units.items()) if mb == min(units)[0]]
        for st in self.stages.values():
            st.relay.chunk_lengths = lengths  # where the KV relay puts each chunk in its buffers
        self.timeline = []  # a long run must not grow it: the last step is what gets reported
        self.optimizer.start_step()
        if self.offloader is not None:
            self.offloader.start_step()
        self.saved: dict[tuple, Any] = {}  # unit -> (hidden_in, out); ("grad", *unit) -> hidden_in's gradient
        self.inbox: dict[tuple, torch.Tensor] = {}
        self.sends: list = []
        self.loss_sum = torch.zeros((), dtype=torch.float32, device=self.device)
        self.pending: dict[tuple, list] = {}  # inbox key -> works of the p2p group receiving it
        self._done: set[int] = set()  # ids of the p2p works already waited for
        self.issued: list[str] = []  # the p2p groups as issued, in programs.txt's form (tests compare them)
        multi_stage = len(self.stages) > 1
        self._index = 0
        for unit in issue_units(self.program):
            head = unit[0]
            if head.kind in P2P_KINDS:
                self._timed(unit_token(unit, multi_stage), self._p2p, unit)
            else:
                self._timed(head.token(multi_stage), self._dispatch, head)
            self._index += len(unit)
        self._release_held()
        self._finish(self.sends)
        masks.set_documents(None)  # attention outside a step is plain causal again
        return self.loss_sum

    def _finish(self, works: list) -> None:
        """Wait for p2p works once each (a second wait on a finished gloo receive never returns)."""
        for work in works:
            if id(work) not in self._done:
                work.wait()
                self._done.add(id(work))

    def _timed(self, name: str, fn, arg):
        if self.on_action is not None:
            self.on_action(name)
        start = time.perf_counter()
        with torch.profiler.record_function(name):  # names the action's kernels in a profiler trace
            fn(arg)
        if self.record_timeline:
            self.timeline.append((name, start, time.perf_counter()))

    def _dispatch(self, action: Action):
        if action.kind == "F":
            self._forward(action)
        elif action.kind == "B":
            self._backward(action)
        elif action.kind == "OPT":
            self._release_held()
            self._finish(self.sends)
            self.sends = []
            self.grad_norm = self.optimizer.sync_and_step(self)
        elif action.kind in ("RS", "AG"):
            self.optimizer.collective(action, self)
        else:
            raise RuntimeError(f"no handler for action {action}")

    # --- compute -------------------------------------------------------------------------------------------
    def _forward(self, a: Action):
        st = self.stages[a.stage]
        unit = self.units[(a.mb, a.chunk)]
        self.optimizer.before_forward(a)
        hidden_in = None
        if not st.graph.is_first:
            hidden_in = self._receive(("F", a.stage, a.mb, a.chunk))
            hidden_in.requires_grad_(True)
        RelayContext.current = st.relay
        st.relay.unit = (a.mb, a.chunk)
        masks.set_documents(unit.document_ids, unit.ring_pairs)
        key = (a.stage, a.mb, a.chunk)
        meter = self.meters[a.stage]
        offload = self.offloader if self.offloader is not None and not self.backward_follows[self._index] else None
        self._prefetch()
        every = offload if offload is not None and offload.mode == "all" else None
        with meter.hooks(key, every), _counting_held_inputs(meter, every is None):
            out = st.graph.gm(**st.kwargs(unit, hidden_in))
        if st.graph.is_last:
            self.loss_sum += out.detach()
            out = out * self.loss_scale
        self.meters[a.stage].forward_done(key, st.relay.live_bytes())
        if offload is not None:
            offload.stash_kept(st.relay, key)
        elif self.offloader is not None:
            self.offloader.stats.kept_units += 1
        self.saved[key] = (hidden_in, out)

    def _backward(self, a: Action):
        st = self.stages[a.stage]
        key = (a.stage, a.mb, a.chunk)
        hidden_in, out = self.saved.pop(key)
        RelayContext.current = st.relay  # checkpointed layers rerun inside this backward
        final = self.final_backward[a.stage] == self._index
        if self.offloader is not None:  # this backward's copies were issued ahead; issue the next one's
            self.offloader.restore_kept(st.relay, key)
            self._prefetch()
        self.optimizer.before_backward(a, final)
        unit = self.units[(a.mb, a.chunk)]
        masks.set_documents(unit.document_ids, unit.ring_pairs)  # for attention's backward and reruns
        if st.graph.is_last:
            out.backward()
        else:
            out.backward(self._receive(("B", a.stage, a.mb, a.chunk)))
        self.optimizer.after_backward(a, final)
        self.meters[a.stage].backward_done(key)
        if self.offloader is not None:
            self.offloader.release(key)
        if hidden_in is not None:
            self.saved[("grad",) + key] = hidden_in.grad

    def _prefetch(self) -> None:
        """Issue the copies back of the next backward's offloaded activations (train.offload)."""
        unit = self.next_backward[self._index]
        if self.offloader is not None and unit is not None:
            self.offloader.prefetch(unit)

    # --- point to point ------------------------------------------------------------------------------------
    def _unit_shape(self, a: Action):
        unit = self.units[(a.mb, a.chunk)]
        batch, hidden = self.hidden_shape
        return (batch, unit.input_ids.shape[1], hidden)

    def _p2p(self, group: list[Action]):
        """Issue one p2p group as one batch; its receives are waited for by the compute that reads them.

        With the swap test hook armed, a group of sends alone is held back and issued right after the next group:
        the two transfers change places on the wire (faults.py)."""
        if self.swap_next_send and self._held is None and all(a.kind.startswith("SEND") for a in group):
            self.swap_next_send, self._held = False, group
            return
        self._issue_group(group)
        self._release_held()

    def _release_held(self) -> None:
        held, self._held = self._held, None
        if held is not None:
            self._issue_group(held)

    def _issue_group(self, group: list[Action]):
        ops, recvs = [], []
        for a in group:
            peer = self.pp_peers[a.peer]
            if a.kind == "SEND_F":
                tensor = self.saved[(a.stage, a.mb, a.chunk)][1].detach()
                ops.append(dist.P2POp(dist.isend, tensor.contiguous(), peer))
            elif a.kind == "SEND_B":
                tensor = self.saved.pop(("grad", a.stage, a.mb, a.chunk))
                ops.append(dist.P2POp(dist.isend, tensor.contiguous(), peer))
            else:
                buf = torch.empty(self._unit_shape(a), dtype=self.dtype, device=self.device)
                ops.append(dist.P2POp(dist.irecv, buf, peer))
                recvs.append((a, buf))
        works = dist.batch_isend_irecv(ops)
        self.issued.append(unit_token(group, len(self.stages) > 1))
        self.sends.extend(works)  # all finished by OPT
        for a, buf in recvs:
            key = (a.kind[-1], a.stage, a.mb, a.chunk)
            self.inbox[key], self.pending[key] = buf, works

    def _receive(self, key: tuple) -> torch.Tensor:
        """The tensor a p2p group received for `key`, once the group has finished."""
        works = self.pending.pop(key)
        start = time.perf_counter()
        self._finish(works)
        if self.record_timeline:
            kind, stage, mb, chunk = key
            self.timeline.append((f"wait {kind}{mb}.{chunk}@{stage}", start, time.perf_counter()))
        return self.inbox.pop(key)


@contextlib.contextmanager
def _counting_held_inputs(meter: ActivationMeter, enabled: bool = True):
    """Checkpointed layers hold their inputs for their rerun: the meter counts them too, unless train.offload=all
    sends them to the host (they then pass through the offloader's saved-tensor hooks)."""
    before = recompute_layers.held_inputs
    recompute_layers.held_inputs = meter.count if meter.enabled and enabled else None
    try:
        yield
    finally:
        recompute_layers.held_inputs = before
