"""The several-GPU commands are ready to run as written: every config the GPU tests and tools/multi_gpu.py pass
composes and validates with today's schema (on CPU: train.device=cpu, oversubscribed), the link fit recovers a
known bandwidth and marks it measured, and the NCCL replay and link benchmark run end to end on gloo ranks."""

from __future__ import annotations

import importlib.util
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from lcgraph.app.config import compose_config
from lcgraph.app.validate import validate_plan
from lcgraph.planner.profile import load_profile

ROOT = Path(__file__).resolve().parents[1]


def _module(path: str):
    spec = importlib.util.spec_from_file_location(Path(path).stem, ROOT / path)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _valid_on_cpu(overrides: list[str]) -> None:
    """Compose as lcgraph-train does, then validate with the CPU standing in for the GPUs."""
    cfg = compose_config(overrides)
    cfg.train.device, cfg.train.allow_oversubscribe = "cpu", True
    validate_plan(cfg, env={})


def test_every_gpu_test_config_composes_and_validates():
    gm = _module("tests/test_gpu_multi.py")
    lists = [gm.PP_1F1B, gm.SP_OWN, gm.ONE_GPU]
    lists += [[*gm.FAMILY_BASE, *f] for f in gm.FAMILIES.values()]
    lists += [[*o, "train.steps=5"] for o, _ in [*gm.EXACT.values(), *gm.BROKEN.values()]]
    lists += [[*o, "train.steps=5"] for o, _ in gm.WIDE.values()]
    for overrides in lists:
        _valid_on_cpu([*gm.SHAPE, gm.TIMEOUT, *overrides])
    assert all(f.split(":")[0] in ("swap", "skip_rs") for _, f in gm.BROKEN.values())


@pytest.mark.parametrize("gpus", [2, 4, 8])
def test_every_multi_gpu_run_composes_and_validates(gpus):
    mg = _module("tools/multi_gpu.py")
    runs = [o for rows in mg.experiments(gpus).values() for _, o in rows]
    widths = set()
    for overrides in runs:
        _valid_on_cpu([*mg.MODEL, *overrides, "train.steps=4"])
        cfg = compose_config([*mg.MODEL, *overrides])
        widths.add(cfg.parallel.pp * cfg.parallel.sp * cfg.parallel.dp)
    assert max(widths) == gpus and 1 in widths or gpus == 2 and widths == {1, 2}


def test_link_fit_recovers_a_known_bandwidth_and_marks_it_measured(tmp_path):
    fl = _module("tools/fit_links.py")
    bw = {"p2p": 3.1e11, "all_to_all": 1.7e11}
    rows = [
        {"kind": k, "moved_bytes": b, "seconds": 25e-6 + b / bw[k]} for k in bw for b in (2**22, 2**24, 2**26, 2**28)
    ]
    path = tmp_path / "links.json"
    path.write_text(json.dumps({"meta": {"date": "2026-12-04", "gpus": 2, "device": "NVIDIA H200"}, "rows": rows}))
    fl.main([str(path), "--profile", "h200", "--out", str(tmp_path / "h200.json")])
    fitted = load_profile(str(tmp_path / "h200.json"))
    for kind, want in bw.items():
        assert fitted.link_bw(2, kind) == pytest.approx(want, rel=1e-3)
        assert fitted.status(f"{kind}_bw")[0] == "measured"
    assert fitted.link_bw(2) == load_profile("h200").intra_node_bw  # reduce-scatter / all-gather keep theirs
    assert fitted.link_bw(16, "p2p") == fitted.inter_node_bw  # across nodes: the network figure


def test_link_bench_and_nccl_replay_run_on_gloo(tmp_path):
    out = tmp_path / "links.json"
    cmd = [sys.executable, "tools/link_bench.py", "--gpus", "2", "--mib", "1", "4", "--iters", "2", "--json", str(out)]
    subprocess.run(cmd, cwd=ROOT, check=True, timeout=180, capture_output=True)
    rows = json.loads(out.read_text())["rows"]
    assert {r["kind"] for r in rows} == {"p2p", "all_to_all"} and all(r["seconds"] > 0 for r in rows)
    replay = tmp_path / "replay.json"
    cmd = [
        sys.executable,
        "tools/nccl_replay.py",
        "--schedules",
        "seq1f1b:4",
        "--forms",
        "built,ungrouped",
        "--timeout",
        "120",
    ]
    done = subprocess.run([*cmd, "--json", str(replay)], cwd=ROOT, timeout=180, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    cases = json.loads(replay.read_text())
    assert [(c["form"], c["k"], c["hardware"]) for c in cases] == [("built", 4, "ok"), ("ungrouped", 4, "ok")]
    assert cases[0]["agrees"] and not cases[1]["agrees"]  # gloo never hangs: the model rejects what NCCL would
    assert "model agrees with the hardware on 1 of 2 cases" in done.stdout


def test_lease_scripts_parse_and_their_overlap_configs_validate():
    """Each tools/lease script is valid bash; the overrides its tools/overlap.py lines pass validate on CPU."""
    scripts = sorted((ROOT / "tools" / "lease").glob("call*.sh"))
    assert [s.name for s in scripts] == ["call1.sh", "call2.sh", "call3.sh", "call4.sh"]
    checked = 0
    for script in scripts:
        subprocess.run(["bash", "-n", str(script)], check=True)
        text = script.read_text()
        assert "source tools/lease/common.sh" in text and text.rstrip().endswith("pack")
        env = dict(re.findall(r'^(\w+)="([^"]*)"', text, re.M))
        for line in text.splitlines():
            if "tools/overlap.py" in line:
                line = re.sub(r"\$(\w+)", lambda m: env.get(m.group(1), m.group(0)), line)
                _valid_on_cpu(
                    [w for w in line.split() if "=" in w and not w.startswith(("--", '"'))] + ["train.steps=4"]
                )
                checked += 1
    assert checked == 2


def test_the_exactness_order_covers_every_clean_and_broken_layout():
    gm = _module("tests/test_gpu_multi.py")
    assert sorted(gm.ORDER) == sorted([*gm.EXACT, *gm.BROKEN])


def test_multi_gpu_ratios_and_targets_on_hand_made_rows():
    mg = _module("tools/multi_gpu.py")

    def row(label, tps, peaks, pred_tps):
        measured = {"tokens_per_s": tps, "peak_gib_per_gpu": peaks, "final_loss": 11.0}
        return {
            "label": label,
            "measured": measured,
            "predicted": {"tokens_per_s": pred_tps, "peak_gib_per_gpu": [60.0]},
        }

    pipe = [row("1f1b", 40000.0, [80.0, 40.0], 44000.0), row("seq1f1b", 44000.0, [60.0, 45.0], 66000.0)]
    verdict = mg.compare("pipeline32k", pipe)
    assert pipe[1]["vs_baseline"] == pytest.approx({"tokens_per_s": 1.1, "stage0_peak": 0.75})
    assert pipe[1]["pred_over_meas"] == pytest.approx({"tokens_per_s": 1.5, "stage0_peak": 1.0})
    assert verdict == {"target_met": True}
    pipe[1]["measured"]["peak_gib_per_gpu"][0] = 70.0  # 0.875x the memory: not the target
    assert mg.compare("pipeline32k", pipe) == {"target_met": False}
    uly = [row("1 GPU", 6000.0, [60.0], 6000.0), row("sp=2", 10200.0, [35.0, 35.0], 12000.0)]
    verdict = mg.compare("ulysses", uly)
    assert verdict["scaling_efficiency"] == pytest.approx(0.85) and not verdict["target_met"]
    assert "0.85" in mg.table("ulysses", uly, verdict)
