"""One rank's training job: plan -> capture -> passes -> programs -> interpreter, step after step.

`Job` builds everything a rank needs from the resolved config (only its own stage's parameters are
ever materialised); `run_step(step)` runs one optimizer step. The loop around it, with metrics, W&B,
progress and checkpoints, is `lcgraph.app.cli.run`.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import math
import os
import time
import zlib
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from lcgraph.app import held_out
from lcgraph.app.config import RunConfig
from lcgraph.errors import LaunchError, PlanError
from lcgraph.graph import passes
from lcgraph.graph.capture import IGNORE_INDEX, capture
from lcgraph.graph.fusion import fuse_wanted
from lcgraph.graph.ring import ring_align, ring_pairs, run_length, shard_positions
from lcgraph.observability.graphs import dump_graph, graph_text
from lcgraph.ops import context, masks
from lcgraph.ops.fp8 import eager_note, fp8_recipe, fp8_refusal
from lcgraph.planner.devices import device_gpu
from lcgraph.planner.documents import DocumentMix, pairs_before
from lcgraph.planner.plan import Recompute, given_recompute, resolve_recompute
from lcgraph.runtime import data, faults, model, recompute
from lcgraph.runtime.checkpoint import model_shape
from lcgraph.runtime.config import OptimConfig
from lcgraph.runtime.interpreter import Interpreter, StageState, UnitData
from lcgraph.runtime.optimizer import build_optimizer
from lcgraph.schedule import nccl
from lcgraph.schedule.actions import ScheduleSpec
from lcgraph.schedule.buckets import add_bucket_actions
from lcgraph.schedule.mesh import Coords
from lcgraph.schedule.p2p import add_p2p
from lcgraph.schedule.programs import build_programs
from lcgraph.schedule.sequence import split_sequence
from lcgraph.schedule.validator import validate

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def run_device(name: str) -> torch.device:
    """The device `train.device` names for this process (`auto`: a GPU when one is visible; on CUDA the
    LOCAL_RANK-th), without making it current."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")


def pick_device(name: str) -> torch.device:
    """`run_device(name)`, made this process's current CUDA device."""
    device = run_device(name)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    return device


def lr_at(step: int, o: OptimConfig, total: int) -> float:
    """Linear warm-up, then cosine decay to lr * min_lr_ratio at the last step `total` (steps counted from 1, as
    Megatron does: the peak is step `warmup_steps`, the minimum step `steps`)."""
    if step < o.warmup_steps:
        return o.lr * (step + 1) / o.warmup_steps
    progress = (step + 1 - o.warmup_steps) / max(1, total - o.warmup_steps)
    return o.lr * (o.min_lr_ratio + (1 - o.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def prepare_data(cfg: RunConfig) -> None:
    """Tokenize and cache the corpus once, in this process, before any rank starts (bad input fails here)."""
    if not cfg.data.synthetic:
        _, tokenizer = data.prepare_corpus(cfg.data, cfg.model.path, model.build_config(cfg.model).vocab_size)
        if cfg.data.eval_path:
            data.prepare_eval_corpus(cfg.data, tokenizer)


def resolve_plan(cfg: RunConfig) -> Recompute:
    """What every rank recomputes and offloads, resolved once before the ranks start: `auto` values by the planner,
    for the GPU this process sees (+plan.profile / +plan.device: the rates), given values as they are. What the
    planner refuses (an offload pool the host's memory cannot hold) is refused here, before any rank is spawned."""
    if (given := given_recompute(cfg.train)) is not None:
        return given
    gpu = device_gpu(run_device(cfg.train.device), cfg.plan.profile or cfg.plan_device)  # not made current
    # the graph the ranks will capture (same micro-batch and dtype): a second capture in this process is cached
    captured = capture(
        model.build_config(cfg.model), batch_size=cfg.data.micro_batch_size, dtype=DTYPES[cfg.train.dtype]
    )
    return resolve_recompute(cfg.planned(), captured, gpu)


class Job:
    """Everything one rank holds for a run; `plan` is `resolve_plan(cfg)`, made once before the ranks start."""

    def __init__(self, cfg: RunConfig, run_dir: Path, rank: int = 0, world: int = 1, *, plan: Recompute):
        self.cfg, self.run_dir = cfg, Path(run_dir)
        self.parallel, self.train, self.optim = cfg.parallel, cfg.train, cfg.optim  # what the runtime reads
        par = cfg.parallel
        self.coords = Coords.of(rank, par.pp, par.dp, par.sp, par.cp)
        self.world = world
        self.device = pick_device(cfg.train.device)
        self.dtype = DTYPES[cfg.train.dtype]
        self.config = model.build_config(cfg.model)
        model.check_sliding_window(self.config, cfg.data.seq_len)  # also when a Job is built without validate_plan
        self._setup_groups()
        self.fp8 = fp8_recipe(cfg.train.fp8)
        if self.fp8 and (why := fp8_refusal(self.fp8, self.device, self.dtype)):  # this rank's own GPU
            raise PlanError(why)
        self.fp8_note = eager_note(self.fp8, cfg.train.compile, self.device)  # FP8 casts uncompiled: slower
        torch.manual_seed(cfg.train.seed)
        self._setup_data()
        self.captured = capture(self.config, batch_size=cfg.data.micro_batch_size, dtype=self.dtype)
        if self.world > 1:  # the ranks compare what they captured too
            self._check_ranks_agree(plan)
        self._setup_schedule()
        self._setup_stages()
        self._setup_optimizer()
        self._setup_interpreter(plan)

    # --- setup ---------------------------------------------------------------------------------------------
    def _setup_groups(self):
        """The mesh's process groups, this replica's global rank on each pipeline stage (the p2p peers), and the
        context the ops run with (their groups, the attention kernel). Under pp > 1 the first and the last stage of
        a replica share a group for a tied embedding, whose gradients are summed across the two; like Megatron's
        embedding group it is made whether or not the model ties it, so no rank's model config decides which
        groups exist (ranks that disagree on it are named by `_check_ranks_agree`, not left waiting)."""
        c = self.coords
        self.mesh = None
        self.sp_group = self.cp_group = self.replica_group = self.tied_group = None
        if self.world > 1:
            from torch.distributed.device_mesh import init_device_mesh

            shape, names = (c.pp, c.dp, c.cp, c.sp), ("pp", "dp", "cp", "sp")
            self.mesh = init_device_mesh(self.device.type, shape, mesh_dim_names=names)
            self.sp_group = self.mesh["sp"].get_group()
            self.cp_group = self.mesh["cp"].get_group()  # the ring's p2p: a communicator of its own
            self.replica_group = self.mesh["dp", "cp", "sp"]._flatten("dp_cp_sp").get_group()
            if c.pp > 1:  # every rank creates every pair's group; each keeps its own
                self.tied_group, _ = dist.new_subgroups_by_enumeration(c.first_and_last_stages())
        self.peers = {r: c.global_rank(r) for r in range(c.pp)}
        self.tied_embeddings = c.pp > 1 and bool(getattr(self.config, "tie_word_embeddings", False))
        self.tied: list[str] = (
            ["model.embed_tokens.weight"] if self.tied_embeddings and c.pp_rank in (0, c.pp - 1) else []
        )
        context.configure(self.sp_group, c.sp, self.cp_group, c.cp, c.cp_rank, self.cfg.train.attention)

    def _setup_data(self):
        """The sampler and held-out windows; lcgraph-train builds each token cache before spawning ranks, and under
        torchrun the first rank of each machine builds it while the others wait."""
        self.length = run_length(self.cfg.parallel, self.cfg.data.seq_len)  # padded to what the layout divides
        builds = self.world == 1 or int(os.environ.get("LOCAL_RANK", self.coords.rank)) == 0
        barrier = dist.barrier if self.world > 1 else lambda: None
        run_data = data.open_data(
            self.cfg.data,
            self.cfg.model.path,
            vocab_size=self.config.vocab_size,
            seed=self.cfg.train.seed,
            length=self.length,
            builds=builds,
            barrier=barrier,
        )
        self.sampler, self.eval_windows, self.tokenizer = run_data.sampler, run_data.eval_windows, run_data.tokenizer

    def _check_ranks_agree(self, plan: Recompute) -> None:
        """Every rank must train the same plan of the same graph on the same tokens (under torchrun each composes its
        own config, captures with its own torch and transformers, and each node reads its own corpus cache): a
        difference is refused on every rank, naming it, before a step. Paths may differ per node; the captured graph
        is compared by its text (`graph_text`: each node's op, name and target), the token stream by length, documents and a strided sample."""
        composed = copy.deepcopy(self.cfg.composed)
        for section, key in (("model", "path"), ("data", "path")):
            composed.get(section, {}).pop(key, None)
        tokens = self.sampler.corpus.tokens
        sample = np.asarray(tokens[:: max(1, len(tokens) // 4096)], dtype=np.uint32)
        mine = {
            "config": hashlib.sha256(json.dumps(composed, sort_keys=True, default=str).encode()).hexdigest(),
            "model": model_shape(self.config),
            "graph": (len(self.captured.graph.nodes), zlib.crc32(graph_text(self.captured.gm).encode())),
            # (recompute mode, layers per segment, kept attention layers, offload): under torchrun each rank
            # resolves `auto` for its own GPU and host
            "plan": dataclasses.astuple(dataclasses.replace(plan, reason="")),
            "corpus": (len(tokens), self.sampler.corpus.num_documents, zlib.crc32(sample.tobytes())),
        }
        everyone: list = [None] * self.world
        dist.all_gather_object(everyone, mine)
        for rank, theirs in enumerate(everyone):
            differ = [k for k in mine if theirs[k] != everyone[0][k]]
            if differ:
                fix = {
                    "plan": "set train.recompute, train.recompute_layers and train.offload instead of auto",
                    "graph": "install the same torch and transformers on every node",
                }.get(differ[0], "start every rank with the same overrides and the same data")
                raise LaunchError(
                    f"rank {rank} and rank 0 differ in their {differ[0]} ({theirs[differ[0]]} vs "
                    f"{everyone[0][differ[0]]}); {fix}"
                )

    def _setup_schedule(self):
        par = self.cfg.parallel
        k = par.seq_chunks if par.schedule == "seq1f1b" else 1
        self.spec = ScheduleSpec(par.schedule, par.pp, par.microbatches, k, par.virtual_stages)
        programs = build_programs(self.spec)
        programs = add_p2p(programs, self.spec)
        validate(programs, self.spec)
        self.programs = programs
        self.chunk_lengths = self._chunk_lengths(k)

    def _chunk_lengths(self, k: int) -> list[int]:
        par, seq = self.cfg.parallel, self.length
        if k == 1:
            return [seq]
        per_token = sum(n.meta["lcgraph"].flops_per_token for n in self.captured.graph.nodes)
        per_pair = sum(n.meta["lcgraph"].flops_per_pair for n in self.captured.graph.nodes)
        curve = None
        if not self.cfg.data.cross_document_attention:  # balance the work the mask leaves (planner/documents.py)
            mix = DocumentMix.from_offsets(self.sampler.corpus.offsets, "this run's corpus")
            curve = pairs_before(mix, seq)
        return split_sequence(seq, k, par.chunk_split, per_token, per_pair, ring_align(par), curve)

    def _setup_stages(self):
        c, par = self.coords, self.cfg.parallel
        dump = self._dumper() if self.cfg.dump.graphs else None
        progress = self.cfg.train.progress and c.rank == 0  # one bar, rank 0's, when the HF model is large
        self.layer_counts = passes.plan_layer_counts(self.captured, par, self.length)
        mine = {s for s in range(par.pp * par.virtual_stages) if s % par.pp == c.pp_rank}
        graphs = passes.compile_stages(
            self.captured,
            self.layer_counts,
            self.device,
            self.spec.seq_chunks,
            par.sp,
            only=mine,
            dump=dump,
            fused_loss=self.cfg.train.fused_loss,
            fuse=fuse_wanted(self.cfg.train.fuse, self.device, self.cfg.train.compile),
            cp=par.cp,
            fp8=self.fp8,
        )
        self.stages: dict[int, StageState] = {}
        for s, g in graphs.items():
            values = model.stage_values(
                g.gm,
                g.param_names,
                self.cfg.model,
                self.config,
                seed=self.cfg.train.seed,
                device=self.device,
                dtype=self.dtype,
                progress=progress,
            )
            params = {n: torch.nn.Parameter(v) for n, v in values.items()}
            buffers = model.rotary_buffers(self.config, g.buffer_names.values(), self.device)
            self.stages[s] = StageState(g, params, buffers)

    def _setup_optimizer(self):

        self.optimizer = build_optimizer(self)
        if not self.cfg.train.compile:  # a compiled graph is sealed: its first forward waits for every bucket
            dump = self._dumper() if self.cfg.dump.graphs else None
            for s, st in self.stages.items():
                if self.optimizer.gather_waits(st.graph) and dump:
                    dump(f"08_gather_waits_stage{s}", st.graph.gm)
        # every rank needs every rank's RS/AG actions for programs.txt; buckets are per stage, so ask
        # each stage's layout: ranks of one pipeline rank agree, other pipeline ranks report theirs
        actions, tied_buckets = self._gather_bucket_actions(
            self.optimizer.program_actions(), self.optimizer.tied_buckets()
        )
        self.programs = [add_bucket_actions(p, actions) for p in self.programs]
        validate(self.programs, self.spec)
        par = self.cfg.parallel
        comms = nccl.Comms(par.dp, par.sp, self.tied_embeddings, par.zero, tied_buckets, cp=par.cp)
        nccl.check(self.programs, self.spec, comms)

    def _gather_bucket_actions(self, mine: dict, tied: frozenset) -> tuple[dict, frozenset]:
        if self.world == 1:
            return mine, tied
        everyone: list = [None] * self.world
        dist.all_gather_object(everyone, (mine, tied))
        merged: dict = {}
        for actions, _ in everyone:
            merged.update(actions)
        return merged, frozenset().union(*(t for _, t in everyone))

    def _setup_interpreter(self, resolved: Recompute) -> None:
        self.recompute, self.recompute_reason = resolved.mode, resolved.reason
        self.offload = resolved.offload  # train.offload, `auto` resolved by the planner
        self.kept_attention_layers = resolved.kept_attention_layers
        for s, st in self.stages.items():  # the module each stage runs: compiled and/or layer by layer checkpointed
            st.graph.gm = recompute.seal(  # type: ignore[assignment]  # sealed: the callable the stage runs
                st.graph.gm,
                self.recompute,
                self.cfg.train.compile,
                resolved.segment_layers,
                uneven=len(set(self.chunk_lengths)) > 1,
                budget=self.cfg.train.activation_budget,
            )
            if self.cfg.dump.graphs and self.recompute != "none" and self.coords.replica_rank == 0:
                (self.run_dir / "graphs" / f"09_segment_layers_stage{s}.txt").write_text(graph_text(st.graph.gm))
        c = self.coords
        self.interpreter = Interpreter(
            self.programs[c.pp_rank],
            self.stages,
            self.peers,
            (self.cfg.data.micro_batch_size, self.config.hidden_size),
            self.dtype,
            self.device,
            self.optimizer,
            recompute=self.recompute,
            measure_activations=self.device.type == "cpu",
            kept_attention_layers=resolved.kept_attention_layers,
            offload=self.offload,
        )
        self.heartbeat = faults.Heartbeat(self.run_dir, c.rank)  # what a failure report names
        self.interpreter.on_action = self.heartbeat.beat
        self.replica_check: faults.ReplicaCheck | None = None  # built at the first check (collective)
        self.stopping = False  # a stop signal reached some rank: every rank stops after this step
        self.held_out = held_out.HeldOut(self, self.eval_windows) if self.eval_windows is not None else None

    def _dumper(self):

        out = self.run_dir / "graphs"

        def dump(name, gm):
            if self.coords.replica_rank == 0:
                dump_graph(gm, out / name)

        return dump

    # --- data ----------------------------------------------------------------------------------------------
    def step_units(self, step: int) -> tuple[dict, int]:
        """This rank's (micro-batch, chunk) inputs for `step`, and the step's global count of target tokens.

        The step reads the global batch at the sampler's cursor (advanced by `run_step`); position ids and
        labels are sliced per chunk and sequence shard (`graph.ring.shard_positions`: the cp rank's two pieces, then the
        Ulysses rank's part of them), the document ids (masked runs) stay whole-window.
        """
        self.attention_kept = 0.0 if not self.cfg.data.cross_document_attention else None
        return self.units_for(self.sampler.window, self.sampler.consumed, count_kept=True)

    def units_for(self, window, base: int, count_kept: bool = False) -> tuple[dict, int]:
        """`step_units` for the global batch of windows `window(base) ..` (the sampler's, or held-out ones)."""
        par, d = self.cfg.parallel, self.cfg.data
        units, total = {}, 0
        offsets = [0]
        for length in self.chunk_lengths:
            offsets.append(offsets[-1] + length)
        for dp_rank in range(par.dp):
            for mb in range(par.microbatches):
                rows = [
                    window(base + (dp_rank * par.microbatches + mb) * d.micro_batch_size + b)
                    for b in range(d.micro_batch_size)
                ]
                ids, labels, positions, docs = (
                    torch.stack([getattr(r, f) for r in rows])
                    for f in ("input_ids", "labels", "position_ids", "document_ids")
                )
                total += int((labels != IGNORE_INDEX).sum())
                if count_kept and self.attention_kept is not None:
                    self.attention_kept += kept_pairs(docs[:, : d.seq_len]) / (par.dp * par.microbatches)
                if dp_rank != self.coords.dp_rank:
                    continue
                masked_docs = None if d.cross_document_attention else docs  # on the host: spans cut there (masks.py)
                pairs = ring_pairs(masked_docs, offsets, self.chunk_lengths, self.coords.cp)
                for c, length in enumerate(self.chunk_lengths):
                    pair = pairs[c][self.coords.cp_rank] if pairs else None
                    sl = offsets[c] + shard_positions(length, self.coords, pair)
                    units[(mb, c)] = UnitData(
                        ids[:, sl].to(self.device),
                        positions[:, sl].to(self.device),
                        labels[:, sl].to(self.device),
                        masked_docs,
                        pairs,
                    )
        return units, total

    # --- step ----------------------------------------------------------------------------------------------
    def run_step(self, step: int) -> dict:
        lr = lr_at(step, self.optim, self.train.steps)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        units, total = self.step_units(step)
        self.heartbeat.step = step
        injected = faults.before_step(self, step)  # LCGRAPH_FAULT test hooks; nothing otherwise
        started = time.perf_counter()
        loss_sum = self.interpreter.run_step(units, 1.0 / total)
        self.sampler.advance(self.cfg.parallel.dp * self.cfg.parallel.microbatches * self.cfg.data.micro_batch_size)
        self.stopping = faults.stop_requested()
        if self.world > 1:  # the stop flag rides on the loss: every rank stops after the same step
            both = torch.stack([loss_sum, faults.stop_flag(self.device)])
            dist.all_reduce(both)
            loss_sum, self.stopping = both[0], bool(both[1] > 0)
        if self.device.type == "cuda":  # the compute stream only: the ZeRO all-gathers go on into the next step
            torch.cuda.current_stream(self.device).synchronize()
        elapsed = time.perf_counter() - started
        tokens = total
        metrics = {
            "step": step + 1,
            "loss": float(loss_sum) / total,
            "tokens": tokens,
            "step_time_s": elapsed,
            "tokens_per_s": tokens / elapsed,
            "lr": lr,
            "grad_norm": self.interpreter.grad_norm,
            **({"attention_kept": self.attention_kept} if self.attention_kept is not None else {}),
        }
        faults.after_step(self, step, metrics, injected)  # a dropped update: logged, or the run stops
        every = self.cfg.train.eval_every
        if self.held_out is not None and every and (step + 1) % every == 0:
            metrics["eval_loss"] = self.held_out.loss()
        return metrics

    # --- memory --------------------------------------------------------------------------------------------
    def activation_peaks(self) -> dict[int, int]:
        return {s: m.peak for s, m in self.interpreter.meters.items()}

    def all_params(self) -> dict[str, torch.Tensor]:
        if hasattr(self, "optimizer"):
            self.optimizer.sync_params()
        out: dict[str, torch.Tensor] = {}
        for st in self.stages.values():
            out.update(st.params)
        return out


def kept_pairs(document_ids: torch.Tensor) -> float:
    """The share of a [B, S] batch's causal attention pairs that stay inside documents (what MFU counts)."""
    s = document_ids.shape[1]
    kept = sum((n * (n + 1) / 2) for row in masks.document_bounds(document_ids) for n in _lengths(row))
    return kept / (document_ids.shape[0] * s * (s + 1) / 2)


def _lengths(bounds: list[int]) -> list[int]:
    return [b - a for a, b in zip(bounds, bounds[1:])]
