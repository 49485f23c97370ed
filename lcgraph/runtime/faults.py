"""Faults: fail fast, say why, lose nothing.

- Non-finite loss or gradients: the optimizer folds one flag per stage (and one for the loss) into the
  grad-norm all-reduce it already does (`stage_sums` / `bad_stages`), so every rank learns in the same
  step which stages went bad; it then drops that step's update. `after_step` applies
  `train.on_nonfinite`: skip (logged in metrics.jsonl) or stop (the run ends before any new checkpoint).
- Replica drift: every `train.check_every` steps `check_replicas` takes a position-weighted sum of each
  parameter's bits on every rank that holds it (dp and sp replicas, the two copies of a tied weight) and compares them through one MAX
  all-reduce over the world; a mismatch stops the run naming the stage and the tensor.
- Dead or stuck ranks: each rank writes its current step and program action to
  `<run>/heartbeats/rank-N` (one pwrite per action). When the launcher's ranks fail, `explained_failures`
  turns torch's ChildFailedError into one line naming the dead (or stuck) rank and every rank's last action.

Test hook (documented in docs/training.md): LCGRAPH_FAULT="KIND:STEP:WHERE[,...]" injects faults at a 0-based step:
nan:S:STAGE (NaN gradients for the stage's last parameter in name order, on its first replica),
perturb:S:RANK (after step S's update, swaps two differing elements of the rank's first parameter in name order: a plain
sum of bits misses that),
kill:S:RANK (SIGKILL at its first backward), hang:S:RANK (sleeps forever at its first backward),
term:S:RANK (sends itself SIGTERM at its first backward; once per process),
swap:S:RANK (the rank's first send of the step goes out after its next p2p group: two transfers change places,
so the peer reads each where it expects the other), skip_rs:S:STAGE (every replica of the stage skips its first
bucket's gradient reduce-scatter and steps on its own unreduced shard). None fires after a torchrun
restart (TORCHELASTIC_RESTART_COUNT > 0). swap and skip_rs break a run's numbers, not its process: the exactness
tests use them to show they notice a broken transfer or reduction.

- Preemption: SIGTERM or SIGINT (`graceful_stop`) asks for a stop; the ranks agree on it through the loss
  all-reduce of the step (`stop_flag`), finish that step, write a checkpoint and exit 0. A second signal
  (more than a second after the first: one Ctrl-C reaches a rank directly and through the launcher) exits
  at once; checkpoints are published atomically, so nothing is left half-written.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from lcgraph.errors import TrainingFault
from lcgraph.runtime.checkpoint import CHECKPOINTS, complete_checkpoints

FAULT_ENV = "LCGRAPH_FAULT"
HEARTBEATS = "heartbeats"  # under the run directory
FAULT_FILE = "fault.txt"  # in HEARTBEATS: the message of a fault the ranks detected themselves
BEAT_BYTES = 256
INT_OF_SIZE = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
ABSENT = torch.iinfo(torch.int64).min  # a parameter this rank does not hold: never wins a MAX
SHUTDOWN_ENV = "TORCH_ELASTIC_SHUTDOWN_TIMEOUT"  # how long torch's agent waits for ranks it signalled
TIMEOUT_SIGNALS = {signal.SIGABRT}  # NCCL's watchdog aborts a rank whose collective timed out: a waiter, not the cause
SAME_SIGNAL_S = 1.0  # signals this close to the first are the same request
_TERMS_SENT: set[int] = set()  # term injections already sent by this process


# --- injected faults (tests) ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Injection:
    kind: str  # nan | perturb | kill | hang | term | swap | skip_rs
    step: int
    where: int  # a stage (nan) or a global rank


def injections() -> list[Injection]:
    """The faults to inject; none after a torchrun restart (an injected fault is transient, like most real ones:
    the restarted ranks must get past it)."""
    if int(os.environ.get("TORCHELASTIC_RESTART_COUNT", 0)) > 0:
        return []
    spec = os.environ.get(FAULT_ENV, "")
    out = []
    for item in filter(None, spec.split(",")):
        kind, step, where = item.split(":")
        out.append(Injection(kind, int(step), int(where)))
    return out


def _injected(kind: str, step: int) -> list[int]:
    return [i.where for i in injections() if i.kind == kind and i.step == step]


def before_step(job: Any, step: int) -> list:
    """Apply this step's injected nan/swap/skip_rs faults on this rank; returns hook handles for `after_step`."""
    handles = []
    c = job.coords
    for stage in _injected("nan", step):
        if stage in job.stages and c.dp_rank == 0 and c.sp_rank == 0:
            p = job.stages[stage].params[max(job.stages[stage].params)]
            handles.append(p.register_hook(lambda g: g * float("nan")))
    if c.rank in _injected("swap", step):
        job.interpreter.swap_next_send = True
    for stage in _injected("skip_rs", step):
        skip_first_reduce_scatter(job.optimizer, stage)
    return handles


def _perturb(job: Any, step: int) -> None:
    """perturb: after the step's update (the replica check that follows sees exactly this change)."""
    if job.coords.rank in _injected("perturb", step):
        job.optimizer.sync_params()
        st = job.stages[min(job.stages)]
        with torch.no_grad():
            flat = st.params[min(st.params)].view(-1)
            other = int(torch.nonzero(flat != flat[0])[0]) if bool((flat != flat[0]).any()) else 1
            flat[[0, other]] = flat[[other, 0]]  # two elements that differ (a norm weight starts all ones)


def skip_first_reduce_scatter(optimizer: Any, stage: int) -> None:
    """skip_rs: the stage's first untied bucket keeps its local gradient shard this step (no reduce-scatter)."""
    buckets = [b for b in getattr(optimizer, "buckets", []) if b.stage == stage and not b.tied]
    if buckets and hasattr(optimizer, "skip_rs"):
        optimizer.skip_rs = {buckets[0].index}


class SkippedWork:
    """Stands for a collective that skip_rs did not issue: waiting on it returns at once."""

    def wait(self) -> bool:
        return True


# --- non-finite loss and gradients ------------------------------------------------------------------------------
def stage_sums(n_stages: int, device: torch.device) -> torch.Tensor:
    """Per-stage squared gradient norms plus one loss slot: what the grad-norm all-reduce sums."""
    return torch.zeros(n_stages + 1, dtype=torch.float64, device=device)


def flag_loss(sums: torch.Tensor, loss_sum: torch.Tensor) -> None:
    """loss * 0 is 0 for a finite loss and NaN otherwise: the loss slot carries the flag through the sum."""
    sums[-1] += loss_sum.detach().double() * 0


def bad_stages(sums: torch.Tensor) -> tuple[float, list[int]]:
    """(global grad norm, non-finite slots) of the all-reduced sums; slot n_stages is the loss."""
    values = sums.tolist()
    bad = [i for i, v in enumerate(values) if not math.isfinite(v)]
    total = 0.0
    for v in values[:-1]:  # plain adds in order, then the root: what mixed_adamw.py takes on the device to clip
        total += v
    return math.sqrt(total), bad


def first_bad(bad: list[int], n_stages: int) -> str:
    """Where it went bad first: the loss (forward), else the last bad stage (backward runs last to first)."""
    return "the loss" if n_stages in bad else f"stage {max(bad)}"


def after_step(job: Any, step: int, metrics: dict, handles: list) -> None:
    """Drop the step's injected hooks; on non-finite gradients either note the skip in `metrics` or stop."""
    for h in handles:
        h.remove()
    _perturb(job, step)
    job.interpreter.swap_next_send = False  # a swap armed but never fired (no send this step) ends with it
    if hasattr(job.optimizer, "skip_rs"):
        job.optimizer.skip_rs = set()
    bad = job.optimizer.nonfinite
    if not bad:
        return
    n = job.coords.pp * job.parallel.virtual_stages
    metrics["skipped"] = True
    metrics["nonfinite_stages"] = [s for s in bad if s < n]
    metrics["nonfinite_loss"] = n in bad
    if job.train.on_nonfinite == "skip":
        return
    fault(
        job,
        f"step {step + 1}: non-finite gradients, first at {first_bad(bad, n)} (bad stages "
        f"{metrics['nonfinite_stages']}, loss {'non-finite' if n in bad else 'finite'}); the update was dropped and "
        "no checkpoint written after it: rerun with train.resume=auto, or train.on_nonfinite=skip to go on",
    )


def fault(job: Any, message: str) -> None:
    """Stop every rank (they all detected the same fault): rank 0 leaves the message for the launcher."""
    if job.coords.rank == 0:
        path = job.run_dir / HEARTBEATS / FAULT_FILE
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(message + "\n")
    raise TrainingFault(message)


# --- replica checksums ------------------------------------------------------------------------------------------
CHECKSUM_CHUNK = 1 << 24  # elements weighted at a time: the int64 weights of a whole embedding would not fit


def checksum(t: torch.Tensor) -> torch.Tensor:
    """sum_i bits_i * (2i + 1) over the flattened tensor, in int64 arithmetic (wrapping, so exact and the same in
    any order): an odd weight is invertible mod 2^64, so any single changed element changes it, and the weights
    differ by position, so swapped or compensating elements change it too (a plain sum of bits misses both)."""
    flat = t.detach().contiguous().view(-1)
    bits = flat.view(INT_OF_SIZE[flat.element_size()])
    total = torch.zeros((), dtype=torch.int64, device=flat.device)
    for start in range(0, bits.numel(), CHECKSUM_CHUNK):
        part = bits[start : start + CHECKSUM_CHUNK].to(torch.int64)
        weights = torch.arange(start, start + part.numel(), dtype=torch.int64, device=flat.device).mul_(2).add_(1)
        total += (part * weights).sum()
    return total


class ReplicaCheck:
    """Compares every copy of every parameter across the world with one MAX all-reduce of [sum, -sum]."""

    def __init__(self, job: Any):
        mine = sorted((name, s) for s, st in job.stages.items() for name in st.params)
        everyone: list = [None] * job.world
        dist.all_gather_object(everyone, mine)  # once: which stage holds which name, on every rank
        self.owner: dict[str, list[int]] = {}
        for held in everyone:
            for name, s in held:
                self.owner.setdefault(name, []).append(s)
        self.names = sorted(self.owner)
        replicated = job.coords.replicas > 1 or any(len(set(v)) > 1 for v in self.owner.values())
        self.enabled = replicated

    def __call__(self, job: Any) -> None:
        job.optimizer.sync_params()  # ZeRO: the last all-gathers have landed
        held = {name: p for st in job.stages.values() for name, p in st.params.items()}
        sums = torch.full((2, len(self.names)), ABSENT, dtype=torch.int64, device=job.device)
        for i, name in enumerate(self.names):
            if name in held:
                c = checksum(held[name])
                sums[0, i], sums[1, i] = c, -c
        dist.all_reduce(sums, op=dist.ReduceOp.MAX)
        high, low = sums[0].tolist(), [-v for v in sums[1].tolist()]
        for i, name in enumerate(self.names):
            if high[i] != low[i]:
                stages = ", ".join(str(s) for s in sorted(set(self.owner[name])))
                fault(
                    job,
                    f"step {job.heartbeat.step + 1}: the copies of {name} on stage {stages} ({len(self.owner[name])} "
                    f"ranks) disagree (bit checksums {low[i]} vs {high[i]}); the replicas went out of step: "
                    "rerun with train.resume=auto from the last checkpoint",
                )


def check_replicas(job: Any, step: int) -> None:
    """After `step`: every `train.check_every` steps, compare all replicas' parameters (collective)."""
    every = job.train.check_every
    if not every or job.world == 1 or (step + 1) % every:
        return
    if getattr(job, "replica_check", None) is None:
        job.replica_check = ReplicaCheck(job)
    if job.replica_check.enabled:
        job.heartbeat.beat("check replicas")
        job.replica_check(job)


# --- heartbeats -------------------------------------------------------------------------------------------------
class Heartbeat:
    """This rank's step and current program action in `<run>/heartbeats/rank-N`, rewritten in place."""

    def __init__(self, run_dir: Path, rank: int):
        self.rank, self.step = rank, 0
        folder = Path(run_dir) / HEARTBEATS
        folder.mkdir(parents=True, exist_ok=True)
        self.fd = os.open(folder / f"rank-{rank}", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        self.kill = {i.step for i in injections() if i.kind == "kill" and i.where == rank}
        self.hang = {i.step for i in injections() if i.kind == "hang" and i.where == rank}
        self.term = {i.step for i in injections() if i.kind == "term" and i.where == rank} - _TERMS_SENT

    def beat(self, action: str) -> None:
        record = json.dumps({"pid": os.getpid(), "step": self.step, "time": time.time(), "action": action})
        os.pwrite(self.fd, record.encode().ljust(BEAT_BYTES)[:BEAT_BYTES], 0)
        if action.startswith("B") and self.step in self.kill:
            os.kill(os.getpid(), signal.SIGKILL)
        if action.startswith("B") and self.step in self.term:
            self.term.discard(self.step)
            _TERMS_SENT.add(self.step)
            os.kill(os.getpid(), signal.SIGTERM)
        while action.startswith("B") and self.step in self.hang:
            time.sleep(1.0)

    def __del__(self) -> None:
        with contextlib.suppress(OSError, AttributeError):
            os.close(self.fd)


def read_heartbeats(run_dirs: list[Path], since: float) -> dict[int, dict]:
    """rank -> its newest heartbeat written after `since` (a launch's start), over `run_dirs`."""
    out: dict[int, dict] = {}
    for run_dir in run_dirs:
        for path in (Path(run_dir) / HEARTBEATS).glob("rank-*"):
            with contextlib.suppress(OSError, ValueError):
                beat = json.loads(path.read_bytes().decode().strip() or "{}")
                rank = int(path.name.removeprefix("rank-"))
                if beat.get("time", 0) >= since and beat["time"] > out.get(rank, {}).get("time", 0):
                    out[rank] = beat
    return out


def _fault_message(run_dirs: list[Path], since: float) -> str | None:
    for run_dir in run_dirs:
        path = Path(run_dir) / HEARTBEATS / FAULT_FILE
        if path.is_file() and path.stat().st_mtime >= since:
            return path.read_text().strip()
    return None


def describe(failures: dict[int, Any], beats: dict[int, dict], ended: float) -> str:
    """One line: the dead rank (killed by a signal) or else the stuck one, and every rank's last action.

    `failures` maps rank -> torch's ProcessFailure (exitcode, signal_name()). A stuck rank never fails by itself:
    the ranks waiting for it do, when their collective times out; of the ranks that did not fail, the one with
    the oldest heartbeat is named."""
    dead = sorted(r for r, f in failures.items() if f.exitcode < 0 and -f.exitcode not in TIMEOUT_SIGNALS)
    quiet = [r for r in beats if r not in failures] or list(beats)
    stuck = min(quiet, key=lambda r: beats[r]["time"]) if quiet else None
    culprit = dead[0] if dead else stuck
    if culprit is None:
        culprit = min(failures)
    beat = beats.get(culprit, {})
    where = f"at step {beat['step'] + 1} during {beat['action']}" if beat else "before its first action"
    if dead:
        what = f"rank {culprit} died ({failures[culprit].signal_name()}) {where}"
    else:
        since = f", {ended - beat['time']:.1f} s before the end" if beat else ""
        failed = ", ".join(f"rank {r} exit {f.exitcode}" for r, f in sorted(failures.items()))
        what = f"rank {culprit} stopped making progress {where}{since} ({failed}: a collective timed out)"
    last = "; ".join(f"rank {r}: step {b['step'] + 1} {b['action']}" for r, b in sorted(beats.items()))
    return f"{what}; last actions: {last}; every rank was stopped: rerun with train.resume=auto"


@contextlib.contextmanager
def explained_failures(run_dirs: list[Path], grace_s: float = 30.0) -> Iterator[None]:
    """Turn torch elastic's ChildFailedError into a TrainingFault with one line saying what happened.

    On a stop signal the launcher's agent passes it to the ranks and kills those still running `grace_s`
    later (TORCH_ELASTIC_SHUTDOWN_TIMEOUT): time for the step and its checkpoint. A second signal to the
    launcher interrupts that wait; the agent's `run` then shuts the ranks down once more, with SIGTERM, which
    ranks asked to stop more than a second before take as the second request (`_on_signal`: exit at once), so
    the launcher ends with an error, no checkpoint (tests/test_faults.py: test_sigint_twice_to_the_launcher...)."""
    from torch.distributed.elastic.multiprocessing import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    started = time.time()
    before = os.environ.get(SHUTDOWN_ENV)
    os.environ[SHUTDOWN_ENV] = before or str(max(1, round(grace_s)))  # read when the launcher is configured
    try:
        yield
    except SignalException as exc:  # the launcher was told to stop; its agent passed the signal to the ranks
        step = stopped_cleanly(run_dirs, started)
        if step is None:
            raise TrainingFault(f"stopped by {exc.sigval.name} before a checkpoint was written") from exc
        print(f"lcgraph: stopped by {exc.sigval.name}: checkpoint at step {step}; go on with train.resume=auto")
    except ChildFailedError as exc:
        message = _fault_message(run_dirs, started)
        if message is None:
            message = describe(exc.failures, read_heartbeats(run_dirs, started), time.time())
        raise TrainingFault(message) from exc
    finally:
        if before is None:
            del os.environ[SHUTDOWN_ENV]


# --- preemption: SIGTERM / SIGINT ------------------------------------------------------------------------------
class _StopState:
    """Process-wide, like signals: when the first stop signal came, and the deadline that follows it."""

    at: float | None = None
    grace_s: float = 600.0
    deadline: threading.Timer | None = None


def _give_up(signum: int) -> None:
    os._exit(128 + signum)  # on a thread: fires even while the main thread is stuck in a collective


def _on_signal(signum: int, frame: Any) -> None:
    now = time.monotonic()
    if _StopState.at is None:
        _StopState.at = now
        _StopState.deadline = threading.Timer(_StopState.grace_s, _give_up, (signum,))
        _StopState.deadline.daemon = True
        _StopState.deadline.start()
    elif now - _StopState.at > SAME_SIGNAL_S:  # asked twice: go now (no checkpoint; published ones are whole)
        _give_up(signum)


@contextlib.contextmanager
def graceful_stop(grace_s: float = 600.0) -> Iterator[None]:
    """While training: SIGTERM / SIGINT ask for a stop at the end of the step instead of killing the rank.

    A rank that has not finished its step and checkpoint `grace_s` after the signal (a stuck one: its
    Python handler may never run) exits anyway, as it would have without the handler."""
    _StopState.at, _StopState.grace_s = None, grace_s
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    before = {sig: signal.signal(sig, _on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for sig, handler in before.items():
            signal.signal(sig, handler)
        if _StopState.deadline is not None:
            _StopState.deadline.cancel()
            _StopState.deadline = None


def stop_requested() -> bool:
    return _StopState.at is not None


def exit_if_stopped() -> None:
    """A spawned rank that stopped on a signal leaves at once: the agent, shutting down, waits for the
    process to end and would never collect a return value."""
    if stop_requested():
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


def stop_flag(device: torch.device) -> torch.Tensor:
    """1.0 when this rank was asked to stop: summed with the step's loss, every rank learns whether any was."""
    return torch.tensor(float(stop_requested()), device=device)


def stopped_cleanly(run_dirs: list[Path], since: float) -> int | None:
    """The step of a checkpoint published after `since` (the ranks' checkpoint on a stop signal), if any."""
    for run_dir in run_dirs:
        done = complete_checkpoints(Path(run_dir) / CHECKPOINTS)
        if done and done[-1][1].stat().st_mtime >= since:
            return done[-1][0]
    return None
