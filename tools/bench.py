"""Single-GPU benchmark: lcgraph against the peers a practical user would run, same model shape, same tokens.

    python3 tools/bench.py --seq 16384 32768 --compile on --json out/bench.json
    python3 tools/bench.py --seq 262144 --peers liger --variant chunked --chunks 32 --recompute keep_attention \\
        --compile on --steps 1 --warmup 1
    python3 tools/bench.py --seq 16384 --peers liger --compile on --fuse on off   # fused RMSNorm/SwiGLU/rotary
    python3 tools/bench.py --seq 524288 --peers --variant chunked --chunks 64 --recompute keep_attention --steps 1 --warmup 0
    python3 tools/bench.py --seq 262144 --peers liger --hf-checkpointing always --variant chunked --chunks 16 \
        --recompute keep_attention --offload none attention --steps 1 --warmup 1

Sides, each in a fresh process so that its memory peak is its own:
  liger    HF transformers + Liger kernels (RoPE, RMSNorm, SwiGLU, fused linear cross-entropy), SDPA, bf16
           parameters, fused torch AdamW: the peer to beat. If it runs out of memory it is retried with HF gradient
           checkpointing (`--hf-checkpointing auto`), and the table says so.
  hf       HF eager + SDPA, otherwise the same (same checkpointing policy).
  lcgraph  one side per variant x compile x fuse x recompute mode x offload mode x chunk count (chunks:
           `--variant chunked` only).
A side that runs out of memory, fails or passes `--side-timeout` is reported as such; the others still run.

MFU is lcgraph's one definition (lcgraph.planner.mfu, docs/observability.md): model FLOPs per token
(6*N + 6*L*h*S) x tokens/s / the GPU's dense bf16 datasheet peak, read from the device profile its name
matches (989.4 TFLOP/s on an H100 or H200 SXM); --peak-tflops overrides the peak.
Targets, when given, are checked per lcgraph row against the HF + Liger row of the same length:
`--target-speed X` (tokens/s >= X times the peer's), `--target-mfu Y`, and always memory (peak <= the peer's
peak plus `--extra-bytes` per parameter, default 8: what fp32 master weights and moments cost over bf16
AdamW); the table says `ok` or `MISSED` for each. `held GiB` is what a
side still holds after its last step (weights, optimizer state, gradients if it keeps them), so peak minus
held is what one step adds on top: mostly activations.
"""

from __future__ import annotations

import argparse
import gc
import itertools
import json
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from lcgraph.ops.fp8 import RECIPES  # noqa: E402
from lcgraph.planner import mfu  # noqa: E402
from lcgraph.planner.devices import match_profile  # noqa: E402
from lcgraph.planner.profile import load_profile  # noqa: E402

os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")  # every side: less fragmentation

PEERS = {"liger": "HF+Liger", "hf": "HF eager"}
VARIANTS = {  # lcgraph variants: config overrides ({chunks} filled per side)
    "default": [],
    "chunked": ["parallel.schedule=seq1f1b", "parallel.seq_chunks={chunks}", "parallel.chunk_split=even"],
}
RECOMPUTE_MODES = ("none", "full", "keep_attention")
OFFLOAD_MODES = ("none", "attention", "all", "auto")


@dataclass(frozen=True)
class Targets:
    """What an lcgraph row must reach against the HF + Liger row of the same length (None: not checked)."""

    speed: float | None = None  # lcgraph / HF+Liger tokens/s
    mfu: float | None = None
    extra_bytes: float = 8.0  # per parameter over the peer's peak: fp32 masters + moments (16 B) over bf16 AdamW (8 B)


@dataclass(frozen=True)
class Side:
    """One measured configuration: a peer (`liger`, `hf`) or an lcgraph run."""

    kind: str
    variant: str = "default"
    chunks: int = 1
    recompute: str | None = None  # None: lcgraph's own default
    compile: bool = False
    checkpointing: bool = False  # peers only: HF gradient checkpointing
    fuse: str = "auto"  # train.fuse (auto: lcgraph's default, on for CUDA)
    offload: str | None = None  # train.offload (None: lcgraph's own default)
    budget: float | None = None  # train.activation_budget (None: lcgraph's own default)
    documents: str | None = None  # packed documents under a document mask: a mean length (synthetic) or a corpus
    fp8: str | None = None  # train.fp8 recipe (None: bf16 matmuls)

    @property
    def label(self) -> str:
        if self.kind in PEERS:
            return PEERS[self.kind] + (" +ckpt" if self.checkpointing else "")
        parts = ["lcgraph"]
        if self.variant == "chunked":
            parts.append(f"seq1f1b/{self.chunks}")
        if self.recompute:
            parts.append(f"rc={self.recompute}")
        if self.compile:
            parts.append("compile")
        if self.fuse != "auto":
            parts.append(f"fuse={self.fuse}")
        if self.offload:
            parts.append(f"offload={self.offload}")
        if self.budget is not None:
            parts.append(f"budget={self.budget:g}")
        if self.documents:
            parts.append(f"documents={self.documents}")
        if self.fp8:
            parts.append(f"fp8={self.fp8}")
        return " ".join(parts)

    def overrides(self, extra: list[str]) -> list[str]:
        out = [o.format(chunks=self.chunks) for o in VARIANTS[self.variant]]
        if self.recompute:
            out.append(f"train.recompute={self.recompute}")
        if self.compile:
            out.append("train.compile=true")
        if self.fuse != "auto":
            out.append(f"train.fuse={self.fuse}")
        if self.offload:
            out.append(f"train.offload={self.offload}")
        if self.budget is not None:
            out.append(f"train.activation_budget={self.budget}")
        if self.fp8:
            out.append(f"train.fp8={self.fp8}")
        if self.documents:
            out.append("data.cross_document_attention=false")
            mean = self.documents.isdigit()
            out += (
                [f"data.mean_document_tokens={self.documents}"]
                if mean
                else ["data.synthetic=false", f"data.path={self.documents}"]
            )
        return out + list(extra)


def sides_from_args(args) -> list[Side]:
    """Peers first (the lcgraph rows' ratios need them), then every lcgraph combination asked for."""
    peers = [Side(p) for p in args.peers]
    lcgraph = []
    grid = itertools.product(
        args.variant,
        args.compile,
        args.fuse,
        args.recompute or [None],
        args.offload or [None],
        args.activation_budget or [None],
        _document_rows(args),
        [None if f == "false" else f for f in args.fp8],
    )
    for variant, comp, fuse, rc, off, budget, docs, fp8 in grid:
        for chunks in args.chunks if variant == "chunked" else [1]:
            side = Side(
                "lcgraph",
                variant,
                chunks,
                rc,
                comp == "on",
                fuse=fuse,
                offload=off,
                budget=budget,
                documents=docs,
                fp8=fp8,
            )
            lcgraph.append(side)
    return peers + lcgraph


def _document_rows(args) -> list[str | None]:
    """The masked row beside the unmasked row of its layout; `--masked-only` drops the unmasked one (a fit check at
    a length where the unmasked step takes minutes)."""
    if not args.documents:
        return [None]
    return [args.documents] if args.masked_only else [None, args.documents]


def _layer_params(config) -> int:
    h = config.hidden_size
    kv = config.num_key_value_heads * (h // config.num_attention_heads)
    return h * (2 * h + 2 * kv) + 3 * h * config.intermediate_size


def param_count(config) -> int:
    """Every parameter once (a tied LM head is the embedding): what the optimizer holds state for."""
    h, v = config.hidden_size, config.vocab_size
    norms = (2 * config.num_hidden_layers + 1) * h
    head = 0 if config.tie_word_embeddings else h * v
    return config.num_hidden_layers * _layer_params(config) + h * v + head + norms


# ---------------------------------------------------------------- one side, in its own process


def _free():
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()


def _tokens(vocab: int, seq: int, steps: int):
    g = torch.Generator().manual_seed(0)
    return [torch.randint(0, vocab, (1, seq + 1), generator=g) for _ in range(steps)]


def _timed_steps(step_fn, steps: int, warmup: int) -> dict:
    """Run warmup + steps calls of step_fn(i) -> loss; tokens/s over the timed ones, memory peak over all."""
    losses, times, start = [], [], time.perf_counter()
    for i in range(warmup + steps):
        if i == warmup:
            torch.cuda.synchronize()
            start = time.perf_counter()
        t0 = time.perf_counter()
        losses.append(step_fn(i))
        torch.cuda.synchronize()
        times.append(round(time.perf_counter() - t0, 3))
    elapsed = time.perf_counter() - start
    stats = torch.cuda.memory_stats()
    return {
        "seconds": elapsed,
        "peak_gib": torch.cuda.max_memory_allocated() / 2**30,
        # what the side keeps between steps (weights, optimizer state, gradients if it keeps them): the peak
        # minus this is what a step adds, activations (and gradients where a side frees them)
        "held_gib": torch.cuda.memory_allocated() / 2**30,
        "reserved_gib": stats.get("reserved_bytes.all.peak", 0) / 2**30,
        "alloc_retries": stats.get("num_alloc_retries"),
        "loss_first": losses[0],
        "step_times": times,
    }


def bench_peer(config, side: Side, seq: int, steps: int, warmup: int) -> dict:
    """HF LlamaForCausalLM, bf16 parameters, SDPA, fused AdamW; with Liger's kernels patched in for `liger`."""
    import transformers
    from transformers import LlamaForCausalLM

    info = {"transformers": transformers.__version__}
    if side.kind == "liger":  # patches the modeling module's classes: must come before the model is built
        from importlib.metadata import version

        from liger_kernel.transformers import apply_liger_kernel_to_llama

        apply_liger_kernel_to_llama(rope=True, rms_norm=True, swiglu=True, fused_linear_cross_entropy=True)
        info["liger_kernel"] = version("liger-kernel")
    _free()
    torch.manual_seed(0)
    config._attn_implementation = "sdpa"
    with torch.device("cuda"):
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.train()  # Liger's fused loss skips the logits only in training mode
    if side.checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    data = _tokens(config.vocab_size, seq, warmup + steps + 1)

    def step(i: int) -> float:
        window = data[i].cuda()
        out = model(input_ids=window[:, :-1], labels=window[:, :-1])  # HF shifts the labels itself
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(out.loss)

    result = info | _timed_steps(step, steps, warmup)
    if PROFILE_DIR:  # the same kernel table as lcgraph's, so the two can be read side by side
        _profile(lambda: step(warmup + steps), Path(PROFILE_DIR) / f"profile_{_file_label(side)}_{seq}.txt")
    return result


def _recompute_override(overrides: list[str]) -> list[str]:
    """`train.recompute=<mode>` for an lcgraph whose config still has the boolean flag: none/full map to it."""
    from lcgraph.app.config import TrainConfig

    if not isinstance(TrainConfig().recompute, bool):
        return overrides
    legacy = {"none": "false", "full": "true"}
    out = []
    for o in overrides:
        key, _, mode = o.partition("=")
        if key == "train.recompute" and mode in RECOMPUTE_MODES:
            if mode not in legacy:
                raise SystemExit(f"this lcgraph's train.recompute is a boolean: it has no mode {mode!r}")
            o = f"{key}={legacy[mode]}"
        out.append(o)
    return out


def _job(job_class, cfg, run_dir: Path):
    """A Job of the composed config: typed first (lcgraph.app.config.typed), or as it is for an lcgraph whose Job
    took the composed config itself."""
    try:
        from lcgraph.app.config import typed
    except ImportError:
        return job_class(cfg, run_dir, 0, 1)
    return job_class(typed(cfg), run_dir, 0, 1)


def bench_lcgraph(side: Side, seq: int, steps: int, warmup: int, model_name: str, extra: list[str]) -> dict:
    from lcgraph.app.job import Job
    from lcgraph.app.testing import compose

    _free()
    cfg = compose(
        "parallel=single",
        f"model={model_name}",
        f"data.seq_len={seq}",
        "data.synthetic=true",
        "train.dtype=bf16",
        "train.device=cuda",
        f"train.steps={warmup + steps + (1 if PROFILE_DIR else 0)}",
        "logging.wandb.mode=disabled",
        "train.progress=false",
        "optim.warmup_steps=1",
        *_recompute_override(side.overrides(extra)),
        tiny=False,
    )
    job = _job(Job, cfg, Path("/tmp/lcgraph-bench"))
    result = _timed_steps(lambda i: job.run_step(i)["loss"], steps, warmup)
    if job.attention_kept is not None:  # under a document mask MFU counts the pairs it left (planner/mfu.py)
        result["attention_kept"] = job.attention_kept
    if PROFILE_DIR:  # after the timed steps: the profiled step must not count in tokens/s
        _profile(lambda: job.run_step(warmup + steps), Path(PROFILE_DIR) / f"profile_{_file_label(side)}_{seq}.txt")
    return result


def _file_label(side: Side) -> str:
    return side.label.replace(" ", "_").replace("/", "-").replace("=", "").replace("+", "_")


PROFILE_DIR = None


def _profile(step_fn, path: Path) -> None:
    """One more step under torch.profiler; the kernels by GPU time go to `path`."""
    from torch.profiler import ProfilerActivity, profile

    path.parent.mkdir(parents=True, exist_ok=True)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        step_fn()
        torch.cuda.synchronize()
    path.write_text(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=45))


def _run_one(args) -> None:
    from lcgraph.app.testing import compose
    from lcgraph.runtime.model import build_config

    side = Side(**json.loads(args.one))
    seq = args.seq[0]
    try:
        if side.kind in PEERS:
            config = build_config(compose(f"model={args.model}", tiny=False).model)
            result = bench_peer(config, side, seq, args.steps, args.warmup)
        else:
            result = bench_lcgraph(side, seq, args.steps, args.warmup, args.model, args.set)
        result["tokens_per_s"] = seq * args.steps / result.pop("seconds")
    except torch.OutOfMemoryError as e:
        result = {"oom": True, "detail": str(e).splitlines()[0][:200]}
    print("RESULT " + json.dumps(result), flush=True)


# ---------------------------------------------------------------- the driver


def isolated(side: Side, seq: int, args) -> dict:
    """One measurement in a fresh process, so no side inherits another's GPU memory."""
    cmd = [sys.executable, __file__, "--one", json.dumps(asdict(side)), "--seq", str(seq), "--model", args.model]
    cmd += ["--steps", str(args.steps), "--warmup", str(args.warmup), "--set", *args.set]
    if args.profile:
        cmd += ["--profile", args.profile]
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=args.side_timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timeout after {args.side_timeout} s"}
    lines = [ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")]
    if lines:
        return json.loads(lines[-1][len("RESULT ") :])
    tail = (out.stderr or out.stdout).strip().splitlines()[-3:]
    if any("out of memory" in ln.lower() for ln in tail):  # e.g. raised inside a compiled kernel's launcher
        return {"oom": True, "detail": tail[-1][:200]}
    return {"error": " | ".join(tail)[-400:] or f"exit code {out.returncode}"}


def measure(side: Side, seq: int, args) -> tuple[Side, dict]:
    """A peer that runs out of memory is rerun with HF gradient checkpointing (policy `auto`)."""
    if side.kind in PEERS and args.hf_checkpointing == "always":
        side = Side(side.kind, checkpointing=True)
    result = isolated(side, seq, args)
    if side.kind in PEERS and result.get("oom") and args.hf_checkpointing == "auto" and not side.checkpointing:
        side = Side(side.kind, checkpointing=True)
        result = isolated(side, seq, args) | {"plain_oom": True}
    return side, result


def summarize(rows: list[dict], config, peak_tflops: float, targets: Targets = Targets()) -> None:
    """Fill in TFLOP/s, MFU, speed ratios against each peer and the targets (in place)."""
    extra_gib = targets.extra_bytes * param_count(config) / 2**30
    for seq in sorted({r["seq"] for r in rows}):
        same = [r for r in rows if r["seq"] == seq]
        for r in same:
            res = r["result"]
            flops = mfu.model_flops_per_token(config, seq, res.get("attention_kept", 1.0))
            if "tokens_per_s" in res:
                res["tflops"] = res["tokens_per_s"] * flops / 1e12
                res["mfu"] = mfu.utilisation(flops, res["tokens_per_s"], peak_tflops * 1e12)
        peers = {r["side"]["kind"]: r["result"] for r in same if r["side"]["kind"] in PEERS}
        liger = peers.get("liger", {})
        for r in same:
            if r["side"]["kind"] in PEERS:
                continue
            res = r["result"]
            r["speed_x"] = {
                kind: res["tokens_per_s"] / p["tokens_per_s"]
                for kind, p in peers.items()
                if "tokens_per_s" in res and "tokens_per_s" in p
            }
            r["memory_target_gib"] = liger["peak_gib"] + extra_gib if "peak_gib" in liger else None
            r["targets"] = _targets(targets, res, r["speed_x"].get("liger"), r["memory_target_gib"])
            if r["side"].get("documents"):
                r["vs_unmasked"] = _vs_unmasked(r, same)


def _vs_unmasked(row: dict, same: list[dict]) -> dict:
    """A document-masked row against the unmasked row of the same layout and length: tokens/s and peak ratios."""
    plain = {**row["side"], "documents": None}
    base = next((r["result"] for r in same if r["side"] == plain), {})
    res = row["result"]
    return {key: res[key] / base[key] for key in ("tokens_per_s", "peak_gib") if key in res and base.get(key)}


def _targets(targets: Targets, res: dict, speed: float | None, mem_target: float | None) -> dict:
    """Each target asked for: True (met), False (missed), None (not measured)."""
    out: dict[str, bool | None] = {}
    if targets.speed is not None:
        out[f"speed>={targets.speed}x"] = None if speed is None else speed >= targets.speed
    if targets.mfu is not None:
        out[f"MFU>={targets.mfu}"] = res["mfu"] >= targets.mfu if "mfu" in res else None
    out["memory"] = None if mem_target is None or "peak_gib" not in res else res["peak_gib"] <= mem_target
    return out


def _fmt(res: dict, key: str, f: str = "{:,.0f}") -> str:
    if res.get("oom"):
        return "OOM"
    if "error" in res:
        return "error"
    return f.format(res[key]) if key in res else "-"


def _fmt_targets(targets: dict) -> str:
    word = {True: "ok", False: "MISSED", None: "?"}
    return ", ".join(f"{k} {word[v]}" for k, v in targets.items())


def render(rows: list[dict], title: str):
    from rich.table import Table

    table = Table(title=title)
    cols = (
        "seq",
        "side",
        "tok/s",
        "MFU",
        "peak GiB",
        "held GiB",
        "x HF+Liger",
        "x HF eager",
        "mem target GiB",
        "targets",
    )
    for col in cols:
        table.add_column(col, justify="left" if col in ("side", "targets") else "right")
    for r in rows:
        res, ratios = r["result"], r.get("speed_x", {})
        note = "plain OOM, " if res.get("plain_oom") else ""
        if r.get("vs_unmasked"):
            note += ", ".join(f"{k} x{v:.2f} unmasked" for k, v in r["vs_unmasked"].items()) + ", "
        target = r.get("memory_target_gib")
        table.add_row(
            f"{r['seq'] // 1024}k",
            r["label"],
            _fmt(res, "tokens_per_s"),
            _fmt(res, "mfu", "{:.2f}"),
            _fmt(res, "peak_gib", "{:.1f}"),
            _fmt(res, "held_gib", "{:.1f}"),
            *(f"{ratios[k]:.2f}" if k in ratios else "-" for k in ("liger", "hf")),
            "-" if target is None else f"{target:.1f}",
            note + _fmt_targets(r.get("targets", {})) if r["side"]["kind"] == "lcgraph" else note.rstrip(", "),
        )
    return table


def longest(side: Side, args, start: int, limit: int) -> int:
    """Largest power-of-two multiple of `start` (then bisected to 4k granularity) that trains one step."""

    def fits(seq: int) -> bool:
        return "tokens_per_s" in isolated(side, seq, args)

    ok, seq = 0, start
    while seq <= limit and fits(seq):
        ok, seq = seq, seq * 2
    lo, hi = ok, min(seq, limit + 1)
    while hi - lo > 4096:
        mid = (lo + hi) // 2 // 4096 * 4096
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo


def targets_from_args(args) -> Targets:
    return Targets(args.target_speed, args.target_mfu, args.extra_bytes)


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seq", type=int, nargs="+", default=[16384])
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--peers", nargs="*", default=list(PEERS), choices=list(PEERS), help="none: lcgraph only")
    ap.add_argument("--variant", nargs="*", default=["default"], choices=sorted(VARIANTS), help="none: peers only")
    ap.add_argument("--chunks", type=int, nargs="+", default=[8], help="sequence chunks of the 'chunked' variant")
    ap.add_argument("--recompute", nargs="+", choices=RECOMPUTE_MODES, help="train.recompute (default: lcgraph's)")
    ap.add_argument("--offload", nargs="+", choices=OFFLOAD_MODES, help="train.offload (default: lcgraph's)")
    ap.add_argument("--compile", nargs="+", default=["off"], choices=["off", "on"], help="train.compile")
    ap.add_argument("--fuse", nargs="+", default=["auto"], choices=["auto", "on", "off"], help="train.fuse")
    ap.add_argument("--activation-budget", type=float, nargs="+", help="train.activation_budget (with --compile on)")
    ap.add_argument("--fp8", nargs="+", default=["false"], choices=["false", *RECIPES], help="train.fp8 rows")
    ap.add_argument(
        "--documents",
        help="MEAN: synthetic documents of log-normal lengths (sigma 1) with this mean, or PATH: a corpus; packed "
        "under a document mask, each row beside the unmasked row of the same layout",
    )
    ap.add_argument(
        "--masked-only", action="store_true", help="with --documents: no unmasked rows (a fit check at a long length)"
    )
    ap.add_argument("--set", nargs="*", default=[], help="more lcgraph overrides, e.g. train.attention=cudnn")
    ap.add_argument("--hf-checkpointing", default="auto", choices=["auto", "never", "always"])
    ap.add_argument("--side-timeout", type=float, default=None, help="seconds before a side counts as failed")
    ap.add_argument("--model", default="llama3_1b", help="a conf/model group (default: Llama-3.2-1B shape)")
    ap.add_argument("--peak-tflops", type=float, default=None, help="MFU denominator (default: the GPU's datasheet)")
    ap.add_argument("--target-speed", type=float, help="lcgraph tokens/s at least this times HF+Liger's")
    ap.add_argument("--target-mfu", type=float, help="lcgraph MFU at least this")
    ap.add_argument("--extra-bytes", type=float, default=8.0, help="memory target: HF+Liger's peak + this per param")
    ap.add_argument("--max-seq", action="store_true", help="bisect the longest trainable sequence of each side")
    ap.add_argument("--max-limit", type=int, default=1 << 20)
    ap.add_argument("--json", default="bench.json", help="written after every side, so a cut-short run keeps rows")
    ap.add_argument("--one", help=argparse.SUPPRESS)  # internal: one isolated side (a JSON Side)
    ap.add_argument("--profile", default=None, help="directory for a torch.profiler kernel table per side (peers too)")
    return ap


def datasheet_tflops(device_name: str) -> float:
    """The dense bf16 datasheet peak (TFLOP/s) of the profile this GPU's name matches: lcgraph-train's denominator."""
    name = match_profile(device_name)
    peak = mfu.datasheet_peak(load_profile(name), "bf16") if name else None
    if peak is None:
        raise SystemExit(f"bench: no datasheet peak for {device_name!r} in lcgraph's profiles; pass --peak-tflops")
    return peak / 1e12


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)
    global PROFILE_DIR
    PROFILE_DIR = args.profile
    if args.one:
        return _run_one(args)

    from rich.console import Console

    from lcgraph.app.testing import compose
    from lcgraph.runtime.model import build_config

    config = build_config(compose(f"model={args.model}", tiny=False).model)
    args.peak_tflops = args.peak_tflops or datasheet_tflops(torch.cuda.get_device_name())
    title = (
        f"{args.model}, bf16, batch 1, {torch.cuda.get_device_name()}; MFU = (6N + 6*L*h*S) * tok/s / "
        f"{args.peak_tflops:.1f} TFLOP/s (datasheet dense bf16); mem target = HF+Liger peak + {args.extra_bytes:g} B/param"
    )
    out = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "argv": sys.argv[1:], "rows": []}
    rows = out["rows"]
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    for seq in args.seq:
        for side in sides_from_args(args):
            side, result = measure(side, seq, args)
            rows.append({"seq": seq, "label": side.label, "side": asdict(side), "result": result})
            print(json.dumps(rows[-1]), flush=True)
            summarize(rows, config, args.peak_tflops, targets_from_args(args))
            Path(args.json).write_text(json.dumps(out, indent=2))
    if args.max_seq:
        out["max_seq"] = {s.label: longest(s, args, 8192, args.max_limit) for s in sides_from_args(args)}
        print(f"longest trainable sequence: {out['max_seq']}")
    Path(args.json).write_text(json.dumps(out, indent=2))
    Console(width=200).print(render(rows, title))


if __name__ == "__main__":
    main()
