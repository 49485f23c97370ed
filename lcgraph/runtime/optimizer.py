"""Gradient synchronisation and the optimizer step (the RS, AG and OPT actions of a stage program).

The distributed optimizer, `ShardedAdamW`: ZeRO-1 memory with reduce-scatter communication, like
Megatron's distributed optimizer. Optimizer state is sharded; gradients are not (every replica keeps
whole-stage gradient buffers), so this is not ZeRO-2.
- A stage's parameters live in flat buckets of whole parameters, in gradient-ready order (the last
  layers' gradients are final first). Parameters and gradients are views into the bucket buffers.
- The `add_bucket_actions` pass puts `RS<b>` after the stage's last backward and `AG<b>` after OPT.
  The interpreter arms grad-ready hooks for that last backward, so each bucket's reduce-scatter over the
  stage's dp*sp replicas is *issued* the moment its last gradient is accumulated, while the backward
  goes on; the RS action is where the program *waits* for it. Issue and wait times are recorded.
- Each replica keeps 1/(dp*sp) of every bucket: fp32 master (an alias when training in fp32) and the
  two AdamW moments; unsharded, 16 B per parameter (bf16 weights and gradients, fp32 master and moments).
  A bf16 run steps all its buckets in one call from their bf16 gradients (mixed_adamw.py): no fp32 gradient.
- OPT clips by the global norm and updates the shard (bf16: clip and non-finite drop decided on the device, the
  norm read after the launch); AG all-gathers the updated parameters asynchronously, in the order the forward reads
  them: the `gather_waits` pass puts each bucket's wait right before the first node reading it, so the next forward
  runs while later buckets are still gathered (without it, as under `train.compile`, the first forward waits).

`ReplicatedAdamW` (parallel.zero=false) all-reduces whole gradients at OPT instead.

Checkpoints see neither buckets nor replicas: `checkpoint_state` names each AdamW moment by its HF parameter
(`<name>.exp_avg`, `<name>.exp_avg_sq`, `<name>.master` for a bf16 run's fp32 master), 1-D over its elements; a
replica's part of a bucket shard is a ShardedTensor chunk naming every replica's, so any layout can load it.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import torch
import torch.distributed as dist
from torch.distributed._shard.metadata import ShardMetadata
from torch.distributed._shard.sharded_tensor import Shard, ShardedTensor
from torch.distributed._shard.sharded_tensor.metadata import ShardedTensorMetadata, TensorProperties
from torch.distributed.device_mesh import DeviceMesh

from lcgraph.graph.capture import NodeInfo
from lcgraph.graph.passes import StageGraph
from lcgraph.runtime import faults
from lcgraph.runtime.config import OptimConfig, ParallelConfig
from lcgraph.runtime.interpreter import Interpreter, OptimizerHooks, StageState
from lcgraph.runtime.mixed_adamw import MixedAdamW
from lcgraph.schedule.actions import Action
from lcgraph.schedule.mesh import Coords


class OptimizerJob(Protocol):
    """What the optimizers read from the training job (app/job.py: Job satisfies it)."""

    @property
    def optim(self) -> OptimConfig: ...
    @property
    def parallel(self) -> ParallelConfig: ...  # bucket_mb, virtual_stages, zero
    @property
    def coords(self) -> Coords: ...
    @property
    def device(self) -> torch.device: ...
    @property
    def mesh(self) -> DeviceMesh | None: ...  # None on one rank
    @property
    def replica_group(self) -> dist.ProcessGroup | None: ...  # the stage's dp*cp*sp replicas
    @property
    def tied_group(self) -> dist.ProcessGroup | None: ...  # the two ranks holding a tied weight
    @property
    def stages(self) -> dict[int, StageState]: ...
    @property
    def tied(self) -> list[str]: ...  # HF names of the weights tied across the first and last stage

    def all_params(self) -> dict[str, torch.Tensor]: ...


def _param_order(stage: StageState) -> list[str]:
    """HF names of a stage's parameters, last-used first (the order their gradients become final)."""
    first_use: dict[str, int] = {}
    for i, node in enumerate(stage.graph.gm.graph.nodes):
        for arg in node.all_input_nodes:
            if arg.name in stage.graph.param_names and arg.name not in first_use:
                first_use[arg.name] = i
    names = sorted(first_use, key=first_use.__getitem__, reverse=True)
    return [stage.graph.param_names[ph] for ph in names]


@dataclass
class Bucket:
    stage: int
    index: int
    names: list[str]
    params: list[torch.nn.Parameter]
    param_flat: torch.Tensor
    grad_flat: torch.Tensor
    decay: bool  # weight decay applies (matrices) or not (norms); a bucket holds one kind
    shard: slice
    tied: bool = False
    pending: set = field(default_factory=set)
    work: dist.Work | None = None  # the reduce-scatter in flight
    master: torch.Tensor | None = None  # fp32, an alias of the parameter shard when training in fp32
    grad_shard: torch.Tensor | None = None
    gather: dist.Work | None = None  # the parameter all-gather in flight


class ShardedAdamW:
    def __init__(self, job: OptimizerJob):
        self.job = job
        o = job.optim
        self.lr, self.betas, self.eps, self.wd = o.lr, (o.beta1, o.beta2), o.eps, o.weight_decay
        self.group_size = job.coords.replicas
        self.group = job.replica_group if self.group_size > 1 else None
        self.events: list[tuple[str, int, int, float]] = []  # (what, stage, bucket, time) since the step began
        self.nonfinite: list[int] = []  # the last step's non-finite stages (and loss slot): its update was dropped
        self.updates = 0  # updates applied (AdamW's step count: dropped ones do not count), checkpointed
        limit = max(1, int(job.parallel.bucket_mb * 2**20))
        self.buckets: list[Bucket] = []
        for s, stage in job.stages.items():
            self._make_buckets(s, stage, limit)
        self._hooks: list[torch.utils.hooks.RemovableHandle] = []
        self.waited_in_graph: set[int] = set()  # buckets whose gather wait is a graph node (gather_waits)
        self.skip_rs: set[int] = set()  # buckets whose reduce-scatter this step skips (faults: skip_rs test hook)
        self.adamw = self._make_adamw()
        self.param_groups = self.adamw.param_groups  # the trainer sets the lr per step here
        self.mixed: MixedAdamW | None = None  # bf16 weights: the one-call step, made at the first step

    # --- layout ------------------------------------------------------------------------------------------
    def _make_buckets(self, s: int, stage: StageState, limit: int) -> None:
        order = [n for n in _param_order(stage) if n not in self.job.tied]
        decay = [n for n in order if stage.params[n].ndim >= 2]
        groups: list[tuple[list[str], bool]] = []
        current: list[str] = []
        size = 0
        for name in decay:
            p = stage.params[name]
            if current and size + p.numel() * p.element_size() > limit:
                groups.append((current, False))
                current, size = [], 0
            current.append(name)
            size += p.numel() * p.element_size()
        if current:
            groups.append((current, False))
        no_decay = [n for n in order if stage.params[n].ndim < 2]  # norms: small, one bucket, no weight decay
        if no_decay:
            groups.append((no_decay, False))
        groups += [([n], True) for n in self.job.tied if n in stage.params]  # synced across stages first
        for names, tied in groups:
            self.buckets.append(self._bucket(s, len(self.buckets), names, stage.params, tied))

    def _bucket(self, s, index, names, params, tied) -> Bucket:
        plist = [params[n] for n in names]
        total = sum(p.numel() for p in plist)
        padded = math.ceil(total / self.group_size) * self.group_size
        ref = plist[0]
        param_flat = torch.zeros(padded, dtype=ref.dtype, device=ref.device)
        grad_flat = torch.zeros_like(param_flat)
        offset = 0
        for p in plist:
            n = p.numel()
            param_flat[offset : offset + n].copy_(p.detach().flatten())
            p.data = param_flat[offset : offset + n].view_as(p)
            p.grad = grad_flat[offset : offset + n].view_as(p)
            offset += n
        rank = self.job.coords.replica_rank
        per = padded // self.group_size
        shard = slice(rank * per, (rank + 1) * per)
        b = Bucket(s, index, names, plist, param_flat, grad_flat, plist[0].ndim >= 2, shard, tied)
        master_dtype = torch.float32
        own = param_flat[shard]
        b.master = own if own.dtype == master_dtype else own.to(master_dtype).clone()
        return b

    def _make_adamw(self) -> torch.optim.AdamW:
        """torch's AdamW over the shards' fp32 masters (fused kernel where the device has it)."""
        for b in self.buckets:
            assert b.master is not None  # set by _bucket
            b.master = torch.nn.Parameter(b.master, requires_grad=False)  # shares storage: still an alias
        groups = [
            {"params": [b.master for b in self.buckets if b.decay], "weight_decay": self.wd},
            {"params": [b.master for b in self.buckets if not b.decay], "weight_decay": 0.0},
        ]
        groups = [g for g in groups if g["params"]]
        fused = self.job.device.type == "cuda"
        return torch.optim.AdamW(groups, lr=self.lr, betas=self.betas, eps=self.eps, fused=fused, foreach=not fused)

    def state_bytes(self) -> int:
        """Optimizer state held by this rank: fp32 master (if a separate copy) and the two moments."""
        total = 0
        for b in self.buckets:
            extra = b.master.data_ptr() != b.param_flat[b.shard].data_ptr()
            total += (2 * b.master.numel() + (b.master.numel() if extra else 0)) * 4  # two moments (+ master)
        return total

    # --- checkpoints ------------------------------------------------------------------------------------------
    def checkpoint_state(self, masters: bool = True) -> dict[str, torch.Tensor]:
        """Moments (and separate fp32 masters if `masters`) by HF name; views into the live state, so a
        checkpoint load writes straight into it (see the module docstring)."""
        out: dict[str, torch.Tensor] = {}
        for b in self.buckets:
            assert b.master is not None  # set by _bucket
            state = adamw_state(self.adamw, b.master)
            kinds = {"exp_avg": state["exp_avg"], "exp_avg_sq": state["exp_avg_sq"]}
            if masters and _separate_master(b):
                kinds["master"] = b.master.data
            offset = 0
            for name, p in zip(b.names, b.params):
                for kind, flat in kinds.items():
                    part = self._part(b, offset, p.numel(), flat)
                    if part is not None:  # a key without a local part would make DCP's load misread the rest
                        out[f"{name}.{kind}"] = part
                offset += p.numel()
        return out

    def _part(self, b: Bucket, offset: int, numel: int, flat: torch.Tensor) -> torch.Tensor | None:
        """This replica's part of elements [offset, offset + numel) of bucket `b`, `flat` being its shard
        (None when its shard holds none of them)."""
        if self.group_size == 1:
            return flat[offset : offset + numel]
        c, per = self.job.coords, b.shard.stop - b.shard.start
        chunks, local = [], []
        for r in range(self.group_size):
            lo, hi = max(offset, r * per), min(offset + numel, (r + 1) * per)
            if hi <= lo:
                continue
            where = f"rank:{c.replica_global_rank(r)}/{flat.device}"
            chunks.append(ShardMetadata([lo - offset], [hi - lo], where))
            if r * per == b.shard.start:
                local.append(Shard(flat[lo - b.shard.start : hi - b.shard.start], chunks[-1]))
        if not local:
            return None
        meta = ShardedTensorMetadata(chunks, torch.Size([numel]), TensorProperties(dtype=flat.dtype))
        return ShardedTensor._init_from_local_shards_and_global_metadata(local, meta)  # placements: global ranks

    def restored(self, updates: int, masters_loaded: bool) -> None:
        """After a checkpoint load: AdamW's step count is the `updates` applied before it (not the training step:
        dropped updates do not count); masters not in the checkpoint come from the weights."""
        self.updates = updates
        for state in self.adamw.state.values():
            state["step"].fill_(updates)
        for b in self.buckets:
            assert b.master is not None  # set by _bucket
            if _separate_master(b) and not masters_loaded:
                b.master.data.copy_(b.param_flat[b.shard])

    def masters_from(self, read: Callable[[dict[str, torch.Size]], dict[str, torch.Tensor]]) -> None:
        """Separate fp32 masters from full-precision weights (a fp32 checkpoint resumed in bf16): `read` gives the
        fp32 tensors of the names and shapes asked for, one bucket at a time (memory: one bucket in fp32)."""
        for b in self.buckets:
            assert b.master is not None  # set by _bucket
            if not _separate_master(b):
                continue
            weights = read({n: p.shape for n, p in zip(b.names, b.params)})
            flat = torch.cat([weights[n].reshape(-1) for n in b.names])
            lo, hi = b.shard.start, min(b.shard.stop, flat.numel())
            b.master.data.zero_()  # the bucket's padding
            b.master.data[: max(0, hi - lo)].copy_(flat[lo:hi])

    def program_actions(self) -> dict[int, tuple[list[Action], list[Action]]]:
        """Per stage: the RS actions (after its last backward) and AG actions (after OPT)."""
        out: dict[int, tuple[list[Action], list[Action]]] = {}
        if self.group is None:
            return out
        for b in self.buckets:
            out.setdefault(b.stage, ([], []))[0].append(Action("RS", b.stage, b.index))
        for b in reversed(self.buckets):  # gradient-ready order reversed: the order the forward reads them
            out[b.stage][1].append(Action("AG", b.stage, b.index))
        return out

    def tied_buckets(self) -> frozenset[tuple[int, int]]:
        """(stage, bucket) of the tied embedding's buckets: their RS first all-reduces across the pipeline."""
        return frozenset((b.stage, b.index) for b in self.buckets if b.tied and self.group is not None)

    def gather_waits(self, stage: StageGraph) -> bool:
        """The `gather_waits` pass on one of this rank's stage graphs (see the module docstring); whether
        it inserted any wait node."""
        if self.group is None:
            return False
        mine = [b for b in self.buckets if b.stage == stage.index]
        waited = gather_waits(stage, {n: b.index for b in mine for n in b.names}, self.wait_gather)
        self.waited_in_graph |= waited
        return bool(waited)

    def wait_gather(self, index: int) -> None:
        """A graph node: the parameters of bucket `index` are read next (a no-op when none is in flight)."""
        b = self.buckets[index]
        if _finish_gather(b):
            self.events.append(("ag_wait", b.stage, b.index, time.perf_counter()))

    # --- interpreter hooks --------------------------------------------------------------------------------
    def start_step(self) -> None:
        self.events = []  # the all-gathers issued at the previous step's end stay in flight

    def before_forward(self, action: Action) -> None:
        """Wait for the all-gathers (issued at AG) of this stage's buckets that have no wait node."""
        for b in self.buckets:
            if b.stage == action.stage and b.index not in self.waited_in_graph:
                self.wait_gather(b.index)

    def sync_params(self) -> None:
        """Finish every outstanding all-gather (before parameters are read outside a step)."""
        for b in self.buckets:
            _finish_gather(b)

    def before_backward(self, action: Action, final: bool) -> None:
        """For the stage's last backward of the step: issue each bucket's reduce-scatter once it is final."""
        if not final or self.group is None:
            return
        for b in self.buckets:
            if b.stage != action.stage or b.tied:
                continue
            b.pending = {id(p) for p in b.params}
            for p in b.params:
                self._hooks.append(p.register_post_accumulate_grad_hook(self._ready_hook(b)))

    def _ready_hook(self, b: Bucket):
        def hook(p):
            b.pending.discard(id(p))
            if not b.pending and b.work is None:
                self._issue(b)

        return hook

    def after_backward(self, action: Action, final: bool) -> None:
        if final:
            self.events.append(("backward_end", action.stage, -1, time.perf_counter()))  # autograd has returned
            for h in self._hooks:
                h.remove()
            self._hooks = []
            for b in self.buckets:  # parameters the last backward did not reach (unused on this stage)
                if b.stage == action.stage and not b.tied and b.work is None and self.group is not None:
                    self._issue(b)

    def _issue(self, b: Bucket) -> None:
        if b.index in self.skip_rs:  # injected fault: this rank's own gradients, never summed over the replicas
            b.grad_shard = b.grad_flat[b.shard].clone()
            b.work = faults.SkippedWork()  # type: ignore[assignment]
            return
        b.grad_shard = torch.empty(b.shard.stop - b.shard.start, dtype=b.grad_flat.dtype, device=b.grad_flat.device)
        reduce_scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
        b.work = reduce_scatter(b.grad_shard, b.grad_flat, group=self.group, async_op=True)
        self.events.append(("rs_issue", b.stage, b.index, time.perf_counter()))

    def collective(self, action: Action, interp: Interpreter) -> None:
        b = self.buckets[action.mb]
        if action.kind == "RS":
            if b.tied:  # summed across the two stages at OPT: here the other stage's rank may still run
                return  # backwards that this rank's earlier stages wait for (interleaved: deadlock)
            b.work.wait()
            self.events.append(("rs_wait", b.stage, b.index, time.perf_counter()))
        elif action.kind == "AG":
            own = b.param_flat[b.shard].clone()
            b.gather = _all_gather(b.param_flat, own, self.group)
            self.events.append(("ag_issue", b.stage, b.index, time.perf_counter()))

    # --- OPT ----------------------------------------------------------------------------------------------
    def sync_and_step(self, interp: Interpreter) -> float:
        for b in self.buckets:
            if b.tied and self.group is not None:  # the tied weight: sum across the two stages, then RS
                dist.all_reduce(b.grad_flat, group=self.job.tied_group)
                self._issue(b)
                b.work.wait()
        if self.group is None:
            for name in self.job.tied:
                b = next(b for b in self.buckets if name in b.names)
                dist.all_reduce(b.grad_flat, group=self.job.tied_group)
            for b in self.buckets:
                b.grad_shard = b.grad_flat[b.shard]
        sums = self._stage_sums(interp)
        if any(_separate_master(b) for b in self.buckets):  # bf16 weights: one call for every bucket
            self._mixed_step(sums)  # launched before the norm is read: a non-finite step is dropped on the device
            norm, self.nonfinite = faults.bad_stages(sums)  # the step's one read of a device value
            if not self.nonfinite:
                self.updates += 1
            return norm
        norm, self.nonfinite = faults.bad_stages(sums)
        if self.nonfinite:  # every rank agrees (the sums were all-reduced): all drop this update
            for b in self.buckets:
                b.grad_flat.zero_()
                b.work = None
            return norm
        self.updates += 1
        clip = self.job.optim.grad_clip
        scale = clip / (norm + 1e-6) if clip > 0 and norm > clip else 1.0
        for b in self.buckets:  # fp32 weights: each master is its weight shard, torch's AdamW steps it in place
            assert b.grad_shard is not None and b.master is not None  # issued by RS (or taken above); set by _bucket
            b.master.grad = b.grad_shard.mul_(scale) if scale != 1.0 else b.grad_shard
        self.adamw.step()
        for b in self.buckets:
            assert b.master is not None  # set by _bucket
            b.master.grad = None
            b.grad_flat.zero_()
            b.work = None
        return norm

    def _mixed_step(self, sums: torch.Tensor) -> None:
        """bf16 weights: AdamW from the bf16 gradient shards into the fp32 masters and back into the weights, every
        bucket in one call (mixed_adamw.py), clipped and, on non-finite `sums`, dropped on the device."""
        grads: list[torch.Tensor] = []
        for b in self.buckets:
            assert b.grad_shard is not None and b.master is not None  # issued by RS (or taken above); set by _bucket
            grads.append(b.grad_shard)
            b.work = None
        if self.mixed is None:  # at the first step: AdamW's state exists by then (made here or by a checkpoint load)
            masters = [b.master for b in self.buckets if b.master is not None]
            states = [adamw_state(self.adamw, m) for m in masters]
            weights = [b.param_flat[b.shard] for b in self.buckets]
            self.mixed = MixedAdamW(masters, weights, states, self.adamw.param_groups, self.job.optim.grad_clip)
        others = [b.grad_flat for b, g in zip(self.buckets, grads) if g.numel() != b.grad_flat.numel()]  # replicas'
        self.mixed.step(grads, others, sums)

    def _stage_sums(self, interp: Interpreter) -> torch.Tensor:
        """The per-stage sums of squared gradients and the loss flag, all-reduced, on the device (faults.py)."""
        job = self.job
        sq = faults.stage_sums(job.coords.pp * job.parallel.virtual_stages, job.device)
        for b in self.buckets:
            if b.tied and job.coords.pp_rank != 0:
                continue  # a tied weight counts once
            sq[b.stage] += torch.linalg.vector_norm(b.grad_shard, dtype=torch.float32).double() ** 2
        faults.flag_loss(sq, interp.loss_sum)
        if self.group is not None:
            dist.all_reduce(sq, group=self.group)
        if job.mesh is not None and job.coords.pp > 1:
            dist.all_reduce(sq, group=job.mesh["pp"].get_group())
        return sq


def _separate_master(b: Bucket) -> bool:
    """Whether the bucket's fp32 master is its own copy (bf16 weights), not an alias of the parameter shard."""
    assert b.master is not None  # set by _bucket
    return b.master.data_ptr() != b.param_flat[b.shard].data_ptr()


def adamw_state(opt: torch.optim.Optimizer, p: torch.Tensor) -> dict:
    """AdamW's state of `p`, created as its first step would (zero moments, step 0) if it has none yet."""
    state = opt.state[p]
    if not state:
        group = next(g for g in opt.param_groups if any(q is p for q in g["params"]))
        on_device = bool(group.get("fused") or group.get("capturable"))
        state["step"] = torch.zeros((), dtype=torch.float32, device=p.device if on_device else "cpu")
        state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
    return state


def _finish_gather(b: Bucket) -> bool:
    """Wait for the bucket's parameter all-gather if one is in flight; whether there was one."""
    if b.gather is None:
        return False
    b.gather.wait()
    b.gather = None
    return True


def _all_gather(out: torch.Tensor, shard: torch.Tensor, group):
    """Asynchronous all-gather of equal shards into `out` (all_gather_single where torch has it)."""
    gather = getattr(dist, "all_gather_single", None)
    if gather is not None:
        return gather(out, shard, group=group, async_op=True)
    return dist.all_gather_into_tensor(out, shard, group=group, async_op=True)


class ReplicatedAdamW(torch.optim.AdamW):
    """AdamW whose step first all-reduces whole gradients over the stage replicas (parallel.zero=false)."""

    def __init__(self, job: OptimizerJob):
        self.job = job
        params = job.all_params()
        o = job.optim
        super().__init__(
            [
                {"params": [p for p in params.values() if p.ndim >= 2], "weight_decay": o.weight_decay},
                {"params": [p for p in params.values() if p.ndim < 2], "weight_decay": 0.0},
            ],
            lr=o.lr,
            betas=(o.beta1, o.beta2),
            eps=o.eps,
            foreach=True,
        )
        self.events: list[tuple[str, int, int, float]] = []  # no buckets: nothing to time
        self.nonfinite: list[int] = []  # the last step's non-finite stages (and loss slot): its update was dropped
        self.updates = 0  # updates applied (AdamW's step count: dropped ones do not count), checkpointed

    def start_step(self):
        pass

    def gather_waits(self, stage: StageGraph) -> bool:
        return False  # parameters are never sharded: nothing to gather

    def before_forward(self, action):
        pass

    def sync_params(self):
        pass

    def before_backward(self, action, final):
        pass

    def after_backward(self, action, final):
        pass

    def collective(self, action: Action, interp: Interpreter) -> None:
        raise RuntimeError(f"{action} needs parallel.zero=true")

    def program_actions(self):
        return {}

    def tied_buckets(self) -> frozenset[tuple[int, int]]:
        return frozenset()

    def state_bytes(self) -> int:
        return sum(
            t.numel() * t.element_size()
            for s in self.state.values()
            for t in s.values()
            if torch.is_tensor(t) and t.ndim > 0
        )

    def checkpoint_state(self, masters: bool = True) -> dict[str, torch.Tensor]:
        """Moments by HF name, flattened views into the live state (no masters: the weights are the state)."""
        out: dict[str, torch.Tensor] = {}
        for name, p in self.job.all_params().items():
            state = adamw_state(self, p)
            out[f"{name}.exp_avg"] = state["exp_avg"].view(-1)
            out[f"{name}.exp_avg_sq"] = state["exp_avg_sq"].view(-1)
        return out

    def restored(self, updates: int, masters_loaded: bool) -> None:
        self.updates = updates
        for state in self.state.values():
            state["step"].fill_(updates)

    def masters_from(self, read) -> None:
        pass  # the weights are the state: no separate masters

    def sync_and_step(self, interp: Interpreter) -> float:
        job = self.job
        params = job.all_params()
        for p in params.values():
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        if job.replica_group is not None and job.coords.replicas > 1:
            for p in params.values():
                dist.all_reduce(p.grad, group=job.replica_group)
        for name in job.tied:
            dist.all_reduce(params[name].grad, group=job.tied_group)
        sq = faults.stage_sums(job.coords.pp * job.parallel.virtual_stages, job.device)
        for s, st in job.stages.items():
            for n, p in st.params.items():
                if not (n in job.tied and job.coords.pp_rank != 0):
                    sq[s] += p.grad.double().pow(2).sum()
        faults.flag_loss(sq, interp.loss_sum)
        if job.mesh is not None and job.coords.pp > 1:
            dist.all_reduce(sq, group=job.mesh["pp"].get_group())
        norm, self.nonfinite = faults.bad_stages(sq)
        if self.nonfinite:  # every rank agrees (the sums were all-reduced): all drop this update
            self.zero_grad(set_to_none=True)
            return norm
        self.updates += 1
        clip = job.optim.grad_clip
        if clip > 0 and norm > clip:
            for p in params.values():
                p.grad.mul_(clip / (norm + 1e-6))
        self.step()
        self.zero_grad(set_to_none=True)
        return norm


def gather_waits(stage: StageGraph, bucket_of: dict[str, int], wait: Callable[[int], object]) -> set[int]:
    """Insert `wait(bucket)` right before the first node that reads a parameter of that bucket.

    Assumes: `bucket_of` maps this stage's HF parameter names to bucket indices and `wait` is a no-op
    for a bucket with nothing in flight (first step, recomputed forward). Guarantees: no parameter
    placeholder is read before its bucket's wait node; nothing else in the graph changes. Returns the
    buckets that got a wait node.
    """

    graph = stage.gm.graph
    bucket_of_ph = {ph: bucket_of[name] for ph, name in stage.param_names.items() if name in bucket_of}
    waited: set[int] = set()
    for node in list(graph.nodes):
        due = sorted({bucket_of_ph[a.name] for a in node.all_input_nodes if a.name in bucket_of_ph} - waited)
        for index in due:
            with graph.inserting_before(node):
                w = graph.call_function(wait, (index,))
            info = node.meta.get("lcgraph")
            w.meta["lcgraph"] = NodeInfo(
                part=info.part if info else "glue",
                layer=info.layer if info else None,
                role="all_gather_wait",
                seq_dim=None,
            )
            waited.add(index)
    stage.gm.recompile()
    return waited


def build_optimizer(job: OptimizerJob) -> OptimizerHooks:
    """The distributed optimizer (parallel.zero=true) or replicated AdamW; both are the interpreter's OptimizerHooks."""
    return ShardedAdamW(job) if job.parallel.zero else ReplicatedAdamW(job)
