"""The held-out eval loss (`train.eval_every`): forward-only programs over windows training never reads.

Windows: the corpus's last `data.eval_fraction` of windows (the training sampler stops before them), or the windows
of `data.eval_path` tokenized as the training corpus; an evaluation reads the first `train.eval_windows` of them
(rounded up to whole global batches), the same ones every time, so evaluations compare.

Programs: this layout's training programs without their backwards, gradient messages and optimizer actions
(`forward_only`): every F with its activation sends and receives, in the training order, so pipeline stages, Ulysses
and ring collectives and Seq1F1B chunks run as in training. An Interpreter of its own runs them under
`torch.no_grad()` on KV relays of its own: nothing is kept for a backward, and the training step's state (saved
activations, relays, offloads, optimizer) is not touched. The loss is the training loss's: summed token
cross-entropy over the target tokens of every window, divided by their global count.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.distributed as dist

from lcgraph.errors import DataError
from lcgraph.runtime import data
from lcgraph.runtime.interpreter import Interpreter, StageState
from lcgraph.schedule.actions import Action, Program
from lcgraph.schedule.p2p import add_p2p
from lcgraph.schedule.programs import build_programs

FORWARD_KINDS = ("F", "SEND_F", "RECV_F")


def forward_only(programs: list[Program]) -> list[Program]:
    """Each rank's program with only its forwards and their activation messages, in the same order: every send
    keeps its matching receive on the peer, so the p2p stays paired as in training."""
    return [[a for a in program if a.kind in FORWARD_KINDS] for program in programs]


class _NoOptimizer:
    """The optimizer hooks of a forward-only program: there is nothing to reduce or update."""

    events: list = []

    def start_step(self) -> None:
        pass

    def before_forward(self, action: Action) -> None:
        pass


class HeldOut:
    """One rank's evaluator: `loss()` is a collective, called by every rank after the same step."""

    def __init__(self, job: Any, windows: data.HeldOutWindows):  # an app.job.Job, which builds this
        par, d = job.cfg.parallel, job.cfg.data
        self.job, self.windows = job, windows
        self.per_batch = par.dp * par.microbatches * d.micro_batch_size  # windows one forward pass reads
        if windows.count < self.per_batch:
            raise DataError(
                f"the held-out split has {windows.count} windows, fewer than one global batch of {self.per_batch} "
                "(parallel.dp x parallel.microbatches x data.micro_batch_size); raise data.eval_fraction or give a "
                "larger data.eval_path"
            )
        wanted = math.ceil(job.cfg.train.eval_windows / self.per_batch)
        self.batches = min(wanted, windows.count // self.per_batch)
        programs = forward_only(add_p2p(build_programs(job.spec), job.spec))
        stages = {s: StageState(st.graph, st.params, st.buffers) for s, st in job.stages.items()}  # own relays
        c = job.coords
        self.interpreter = Interpreter(
            programs[c.pp_rank],
            stages,
            job.peers,
            (d.micro_batch_size, job.config.hidden_size),
            job.dtype,
            job.device,
            _NoOptimizer(),  # type: ignore[arg-type]  # the forward-only subset of the hooks
            record_timeline=False,
            recompute=job.recompute,  # the stage graphs were sealed for it
            measure_activations=False,
            kept_attention_layers=job.kept_attention_layers,
        )
        self.stages = stages
        for st in stages.values():
            st.relay.keep = set()  # attention outputs are kept for a backward's rerun: there is none

    def loss(self) -> float:
        """The mean token loss over the held-out windows with the current weights."""
        job = self.job
        job.optimizer.sync_params()  # ZeRO: the last update's all-gathers land before the weights are read
        loss_sum = torch.zeros((), dtype=torch.float64, device=job.device)
        tokens = 0
        with torch.no_grad():
            for b in range(self.batches):
                units, total = job.units_for(self.windows.window, b * self.per_batch)
                loss_sum += self.interpreter.run_step(units, 1.0).double()
                tokens += total
                for st in self.stages.values():  # K/V a backward would have released
                    st.relay.caches.clear()
                self.interpreter.saved = {}  # the batch's outputs: nothing reads them again
        if job.world > 1:  # the last stage's ranks hold the sums of their shards and replicas
            dist.all_reduce(loss_sum)
        return float(loss_sum) / tokens

    def describe(self) -> dict[str, Any]:
        return {"windows": self.batches * self.per_batch, "held_out": self.windows.count}
