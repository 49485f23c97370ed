"""What a run reports: metrics.jsonl, summary.json and the offline W&B run (read back from its .wandb file),
measured timeline and graph pictures in the run directory."""

import json
import math
import os
import struct
import subprocess
import sys
import time
import xml.etree.ElementTree as ET

import pytest

from lcgraph.app.config import typed
from lcgraph.app.testing import TINY, compose
from lcgraph.observability.metrics import RunLogger, metric_key, spread
from lcgraph.observability.timeline import matplotlib_available, write_trace

# --- reading an offline W&B run back -------------------------------------------------------------------------


def wandb_records(run_dir):
    """Protobuf records of the offline run under run_dir/wandb: a LevelDB-style log (7-byte header ':W&B' + magic
    + version, 32 KiB blocks of chunks: crc32 (4), length (2), type (1: full, 2: first, 3: middle, 4: last))."""
    from wandb.proto import wandb_internal_pb2 as pb

    (path,) = (run_dir / "wandb").glob("offline-run-*/run-*.wandb")
    data = path.read_bytes()
    assert data[:4] == b":W&B"
    pos, chunk = 7, b""
    while pos + 7 <= len(data):
        if 32768 - pos % 32768 < 7:  # block trailer too short for a chunk header
            pos += 32768 - pos % 32768
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if pos + 7 + length > len(data):  # still being written
            return
        chunk += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(chunk)
            chunk = b""
            yield record


def offline_run(run_dir, timeout: float = 60.0) -> dict:
    """history (one dict per wandb.log, nested keys joined by '/'), metric definitions, summary updates.

    wandb.finish() can return before W&B's service has written the file out (seen on a loaded machine):
    wait for the run's exit record."""
    deadline = time.monotonic() + timeout
    records = list(wandb_records(run_dir))
    while not any(r.WhichOneof("record_type") == "exit" for r in records) and time.monotonic() < deadline:
        time.sleep(0.2)
        records = list(wandb_records(run_dir))
    run = {"history": [], "metrics": {}, "summary": {}}
    for r in records:
        kind = r.WhichOneof("record_type")
        if kind == "history":
            run["history"].append({i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in r.history.item})
        elif kind == "metric":
            run["metrics"][r.metric.name or r.metric.glob_name] = r.metric.step_metric
        elif kind == "summary":
            run["summary"].update({u.key or "/".join(u.nested_key): json.loads(u.value_json) for u in r.summary.update})
    return run


def series(run, key) -> list:
    return [(h["step"], h[key]) for h in run["history"] if key in h]


# --- the logger --------------------------------------------------------------------------------------------


def test_metric_names_go_to_sections_and_lists_spread_per_stage_and_rank():
    assert [
        metric_key(k)
        for k in (
            "loss",
            "lr",
            "tokens_per_s",
            "mfu",
            "tflops_per_gpu",
            "comm_s",
            "p2p_s",
            "cuda_peak_bytes",
            "custom",
            "perf/x",
        )
    ] == [
        "train/loss",
        "train/lr",
        "perf/tokens_per_s",
        "perf/mfu",
        "perf/tflops_per_gpu",
        "comm/comm_s",
        "comm/p2p_s",
        "memory/cuda_peak_bytes",
        "train/custom",
        "perf/x",
    ]
    assert spread(
        {
            "activation_peak_bytes_per_stage": [1, 2],
            "comm_s_per_rank": [0.5],
            "bubble_fraction": 0.25,
            "flag": True,
            "notes": "x",
        }
    ) == {
        "memory/activation_peak_bytes/stage0": 1,
        "memory/activation_peak_bytes/stage1": 2,
        "comm/comm_s/rank0": 0.5,
        "perf/bubble_fraction": 0.25,
    }


def test_the_logger_sends_trainer_metrics_by_section_against_step_and_pictures_and_plan_at_the_end(
    tmp_path, monkeypatch
):
    monkeypatch.setenv("WANDB_SILENT", "true")
    cfg = compose("logging.wandb.mode=offline", "train.steps=2")
    (tmp_path / "graphs").mkdir()
    (tmp_path / "graphs" / "02_partition_stage0.html").write_text("<html><body><svg></svg></body></html>")
    (tmp_path / "plan.json").write_text(
        json.dumps(
            {
                "stages": [
                    {"stage": 0, "layers": [0, 1], "total_bytes": 10},
                    {"stage": 1, "layers": [2, 3], "total_bytes": 9},
                ],
                "alternatives": [
                    {"label": "gpipe", "step_time_s": 1.0},
                    {"label": "1f1b k=9", "error": "too many chunks"},
                ],
                "summary": {"step_time_s": 1.0, "bubble": 0.2},
            }
        )
    )
    run = typed(cfg)
    logger = RunLogger(run.logging, tmp_path, run.train.steps, run.train.progress, run.composed)
    for step in (1, 2):
        logger.log(
            {
                "step": step,
                "loss": 5.0 - step,
                "tokens": 64,
                "step_time_s": 0.5,
                "tokens_per_s": 128.0,
                "lr": 1e-3,
                "grad_norm": 1.5,
                "tflops_per_gpu": 0.01,
                "mfu": 0.001,
                "comm_s": 0.1,
                "p2p_s": 0.1,
            }
        )
    summary = logger.finish(
        extra={"activation_peak_bytes_per_stage": [100, 200], "bubble_fraction": 0.25, "comm_s_per_rank": [0.1, 0.2]}
    )
    assert summary["bubble_fraction"] == 0.25 and summary["final_loss"] == 3.0
    assert json.loads((tmp_path / "summary.json").read_text())["activation_peak_bytes_per_stage"] == [100, 200]
    assert [json.loads(line)["mfu"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [0.001] * 2

    run = offline_run(tmp_path)
    for section in ("train", "perf", "memory", "comm", "graphs", "timeline", "plan"):
        assert run["metrics"][f"{section}/*"] == "step"
    for key in (
        "train/loss",
        "train/lr",
        "train/grad_norm",
        "perf/tokens_per_s",
        "perf/step_time_s",
        "perf/tflops_per_gpu",
        "perf/mfu",
        "comm/comm_s",
        "comm/p2p_s",
    ):
        assert [s for s, _ in series(run, key)] == [1, 2], key
    assert series(run, "train/loss") == [(1, 4.0), (2, 3.0)]
    assert series(run, "perf/bubble_fraction") == [(2, 0.25)]
    assert series(run, "memory/activation_peak_bytes/stage1") == [(2, 200)]
    assert series(run, "comm/comm_s/rank1") == [(2, 0.2)]
    assert series(run, "graphs/02_partition_stage0/_type") == [(2, "html-file")]
    assert {k for h in run["history"] for k, v in h.items() if v == "table-file"} == {
        "plan/stages/_type",
        "plan/alternatives/_type",
        "plan/summary/_type",
    }
    assert run["summary"]["final_loss"] == 3.0


# --- a real run ----------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_a_two_stage_run_writes_graph_pictures_the_gathered_timeline_and_an_offline_wandb_run(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "plan.json").write_text(json.dumps({"stages": [{"stage": 0}, {"stage": 1}]}))
    write_trace([(0, "F0.0", 0.0, 1.0), (1, "F0.0", 1.0, 2.0)], run_dir / "timeline.json")  # lcgraph-plan's
    tiny = [o for o in TINY if not o.startswith(("train.steps", "model.num_hidden_layers", "logging.wandb.mode"))]
    env = {k: v for k, v in os.environ.items() if k not in ("HYDRA_FULL_ERROR", "WORLD_SIZE", "LOCAL_RANK", "RANK")}
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "lcgraph",
            *tiny,
            "model.num_hidden_layers=2",
            "train.steps=3",
            "logging.wandb.mode=offline",
            "dump.graphs=true",
            "parallel.pp=2",
            "parallel.schedule=seq1f1b",
            "parallel.seq_chunks=2",
            "parallel.microbatches=2",
            "parallel.dp=2",
            "parallel.bucket_mb=0.05",
            "train.recompute=full",
            "train.recompute_layers=1",
            f"hydra.run.dir={run_dir}",
        ],
        capture_output=True,
        text=True,
        env={**env, "WANDB_SILENT": "true", "OMP_NUM_THREADS": "1"},
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]

    graphs = run_dir / "graphs"
    for name in ("01_retarget_device", "02_partition_stage0", "02_partition_stage1", "03_kv_relay_stage1"):
        ET.parse(graphs / f"{name}.svg")
        assert (graphs / f"{name}.txt").is_file() and "<details" in (graphs / f"{name}.html").read_text()
    assert "KV 1" in (graphs / "03_kv_relay_stage1.svg").read_text()
    gathers = (graphs / "08_gather_waits_stage1.txt").read_text()
    assert gathers.count("all_gather_wait") >= 2  # ZeRO over dp=2: a wait per bucket, where it is first read
    segments = (graphs / "09_segment_layers_stage1.txt").read_text()  # stage 1 holds layer 1: embed-less
    assert "layer_1" in segments and "head" in segments and "layer_0" not in segments

    trace = json.loads((run_dir / "timeline.json").read_text())
    assert trace["otherData"]["source"] == "measured"
    names = {(e["pid"], e["name"]) for e in trace["traceEvents"] if e["ph"] == "X"}
    for rank in range(4):  # the last step of every rank (2 stages x dp 2): 2 micro-batches x 2 chunks, F and B
        assert {(rank, f"{kind}{mb}.{c}") for kind in "FB" for mb in (0, 1) for c in (0, 1)} <= names
        assert (rank, "OPT") in names
    assert "otherData" not in json.loads((run_dir / "timeline_predicted.json").read_text())
    assert (run_dir / "timeline.png").is_file() == matplotlib_available()

    summary = json.loads((run_dir / "summary.json").read_text())
    assert 0.0 < summary["bubble_fraction"] < 1.0  # two stages: some idle time is unavoidable
    assert len(summary["comm_s_per_rank"]) == 4 and len(summary["activation_peak_bytes_per_stage"]) == 2
    steps = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in steps] == [1, 2, 3] and all(m["comm_s"] >= m["p2p_s"] > 0 for m in steps)
    assert all(m["grad_sync_s"] > 0 for m in steps)  # RS and AG actions of the ZeRO buckets

    run = offline_run(run_dir)
    for key in ("train/loss", "train/lr", "train/grad_norm", "perf/tokens_per_s", "perf/step_time_s", "comm/comm_s"):
        assert [s for s, _ in series(run, key)] == [1, 2, 3], key
    assert all(math.isfinite(v) for _, v in series(run, "train/loss"))
    assert series(run, "perf/bubble_fraction") == [(3, summary["bubble_fraction"])]
    assert sorted({k for h in run["history"] for k in h if k.startswith("memory/activation_peak_bytes/")}) == [
        "memory/activation_peak_bytes/stage0",
        "memory/activation_peak_bytes/stage1",
    ]  # record order varies
    media = {k.removesuffix("/_type"): v for h in run["history"] for k, v in h.items() if k.endswith("/_type")}
    assert media["graphs/03_kv_relay_stage1"] == "html-file" and media["plan/stages"] == "table-file"
    if matplotlib_available():
        assert media["timeline/measured"] == "image-file"
