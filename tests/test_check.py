"""`lcgraph-check` end to end on gloo ranks: it passes on 2 CPU processes, writes a profile the planner reads, reports
FAIL with a non-zero exit when one rank's numbers differ (LCGRAPH_FAULT=perturb), refuses a request it cannot run in
one line before any process starts; the link fit recovers known bandwidths. On a GPU: the one-GPU checks on NCCL."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from lcgraph.app import check, links
from lcgraph.app.testing import cli_env, compose, planned
from lcgraph.errors import PlanError
from lcgraph.planner.plan import build_plan
from lcgraph.planner.profile import load_profile, profile_json
from lcgraph.runtime.faults import FAULT_ENV

ROOT = Path(__file__).resolve().parents[1]
PLAN = ["parallel.pp=2", "parallel.sp=2", "+plan.alternatives=false", "+plan.timeline=false"]


def _check(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "lcgraph.app.check", *args]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600, env=cli_env(env))


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory) -> tuple[subprocess.CompletedProcess, Path, float]:
    out = tmp_path_factory.mktemp("check")
    start = time.perf_counter()
    done = _check("--gpus", "2", "--backend", "gloo", "--out", str(out))
    return done, out, time.perf_counter() - start


@pytest.mark.slow
def test_the_check_passes_on_two_gloo_ranks_and_writes_every_result(two_ranks):
    done, out, seconds = two_ranks
    assert done.returncode == 0, done.stdout + done.stderr
    assert "lcgraph-check: PASS" in done.stdout and "exactness: PASS" in done.stdout
    result = json.loads((out / "check.json").read_text())
    assert result["passed"] and result["meta"]["backend"] == "gloo" and result["meta"]["ranks"] == 2
    names = [r["layout"] for r in result["exactness"]["rows"]]
    assert names == ["pp=2 1f1b", "pp=2 seq1f1b k=2", "sp=2 (Ulysses)", "dp=2 (ZeRO-1)", "cp=2 (ring)"]
    assert result["exactness"]["max_rel_diff"] <= 1e-4
    replayed = json.loads((out / "replay.json").read_text())
    assert [r["case"] for r in replayed] == [c.label for c in check.replay.cases_for(2)]
    assert all(r["hardware"] == "ok" and r["agrees"] for r in replayed)
    assert {r["kind"] for r in json.loads((out / "links.json").read_text())["rows"]} == {"p2p", "all_to_all"}
    assert (out / "nccl.png").stat().st_size > 0
    print(f"lcgraph-check --gpus 2 on gloo: {seconds:.1f} s")


@pytest.mark.slow
def test_the_fitted_profile_is_what_lcgraph_plan_plans_with(two_ranks):
    _, out, _ = two_ranks
    path = out / "profile.json"
    profile = load_profile(str(path))
    fits = json.loads((out / "check.json").read_text())["links"]["fits"]
    for kind in ("p2p", "all_to_all"):
        assert getattr(profile, f"{kind}_bw") == pytest.approx(fits[kind]["bandwidth"], rel=1e-3)
        measured, how = profile.status(f"{kind}_bw")
        assert measured == "measured" and how.startswith("lcgraph-check") and "2 x cpu, gloo" in how
    assert profile.status("host_bandwidth")[0] == "measured" and profile.host_bandwidth > 0
    fitted = build_plan(planned(*PLAN, f"+plan.profile={path}", tiny=False)).main
    default = build_plan(planned(*PLAN, tiny=False)).main
    assert fitted.cost.profile.p2p_bw == profile.p2p_bw and fitted.cost.profile.name == "h100-checked"
    # CPU processes move bytes 100x slower than NVLink: the pipeline's sends and Ulysses' all-to-alls cost more
    assert fitted.summary()["step_time_s"] > default.summary()["step_time_s"]


@pytest.mark.slow
def test_one_rank_whose_numbers_differ_fails_the_check(tmp_path):
    """perturb:1:1 swaps two weights of rank 1 after step 2's update: every layout's rank 1 now differs."""
    argv = ["--gpus", "2", "--backend", "gloo", "--only", "exactness", "--out", str(tmp_path)]
    done = _check(*argv, env={FAULT_ENV: "perturb:1:1"})
    assert done.returncode == 1, done.stdout + done.stderr
    assert "exactness: FAIL" in done.stdout and "lcgraph-check: FAIL" in done.stdout
    rows = json.loads((tmp_path / "check.json").read_text())["exactness"]["rows"]
    pp = next(r for r in rows if r["layout"] == "pp=2 1f1b")
    assert not pp["passed"] and pp["weights"] > 1e-4 and pp["loss"] > 0  # stage 1's weights, then step 3's loss
    assert sum(not r["passed"] for r in rows) >= 2  # Seq1F1B's stage 1 too; replicas differ less (sp: 8e-5)


@pytest.mark.parametrize(
    "argv, words",
    [
        (["--gpus", "0"], ["--gpus 0", "1 or more"]),
        (["--gpus", "1", "--only", "replay"], ["--gpus 1", "2 GPUs", "--gpus 2 or more"]),
        (["--gpus", "8", "--backend", "nccl"], ["--gpus 8", "this machine has 2 CUDA GPUs", "--gpus 2 or fewer"]),
    ],
)
def test_a_request_that_cannot_run_is_one_line_before_anything_starts(argv, words, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # a machine with 2 GPUs
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(check, "run_checks", lambda *a: pytest.fail("a process would start"))
    assert check.main([*argv, "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("lcgraph-check: error: ")
    assert all(w in err for w in words), err
    assert not (tmp_path / "out").exists()


def test_nccl_without_cuda_is_refused_in_one_line(capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert check.main(["--gpus", "2", "--backend", "nccl"]) == 2
    err = capsys.readouterr().err
    assert "torch sees none" in err and "--backend gloo" in err


def test_layouts_grow_with_the_gpus():
    assert [n for n, _, _ in check.layouts_for(1)] == ["1 rank, launched"]
    assert len(check.layouts_for(2)) == 5 and len(check.layouts_for(4)) == 7 and len(check.layouts_for(8)) == 8
    for name, ranks, overrides in check.layouts_for(8):
        cfg = compose(*overrides)
        width = cfg.parallel.pp * cfg.parallel.sp * cfg.parallel.dp * cfg.parallel.cp
        assert width == ranks and cfg.parallel.dp * cfg.parallel.microbatches == 4, name


def test_link_fit_recovers_a_known_bandwidth_and_marks_it_measured(tmp_path):
    bw = {"p2p": 3.1e11, "all_to_all": 1.7e11}
    rows = [
        {"kind": k, "moved_bytes": b, "seconds": 25e-6 + b / bw[k]} for k in bw for b in (2**22, 2**24, 2**26, 2**28)
    ]
    host = {"host_bandwidth": 5.5e10, "mib": 1024, "d2h_bytes_per_s": 5.5e10, "h2d_bytes_per_s": 5.6e10}
    host["duplex_bytes_per_s"] = 5.0e10
    meta = {"date": "2026-12-07", "ranks": 2, "device": "NVIDIA H200", "backend": "nccl", "torch": "2.13"}
    fits = links.fit(rows)
    assert fits["p2p"]["latency_s"] == pytest.approx(25e-6, rel=1e-3)
    path = tmp_path / "profile.json"
    path.write_text(profile_json(links.fitted_profile(load_profile("h200"), fits, host, meta).to_dict()))
    fitted = load_profile(str(path))
    for kind, want in bw.items():
        assert fitted.link_bw(2, kind) == pytest.approx(want, rel=1e-3)
        assert fitted.status(f"{kind}_bw")[0] == "measured"
    assert fitted.host_bandwidth == 5.5e10 and fitted.status("host_bandwidth")[0] == "measured"
    assert fitted.link_bw(2) == load_profile("h200").intra_node_bw  # reduce-scatter / all-gather keep theirs
    assert fitted.link_bw(16, "p2p") == fitted.inter_node_bw  # across nodes: the network figure
    # times that do not grow with size (noise): the largest message's rate, not a negative bandwidth
    assert links.fit_line([(1e6, 2e-3), (4e6, 1e-3)]) == (0.0, 4e9)
    assert links.fit_line([(1e6, 1e-4), (2e6, 4e-4)])[0] == 0.0  # a negative latency: through the origin


def test_plan_profile_names_a_file_and_excludes_plan_device(tmp_path):
    fits = {"p2p": {"bandwidth": 1e9, "latency_s": 0.0, "points": 2}}  # 1 GB/s: a pipeline send costs
    slow = links.fitted_profile(load_profile("h100"), fits, None, {})
    path = tmp_path / "slow.json"
    path.write_text(profile_json(slow.to_dict()))
    fitted = build_plan(planned(*PLAN, f"+plan.profile={path}", tiny=False)).main
    assert fitted.cost.profile.p2p_bw == 1e9
    assert fitted.summary()["step_time_s"] > build_plan(planned(*PLAN, tiny=False)).main.summary()["step_time_s"]
    with pytest.raises(PlanError, match="not both"):
        build_plan(planned(*PLAN, f"+plan.profile={path}", "+plan.device=h200", tiny=False))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_the_one_gpu_checks_pass_on_nccl(tmp_path, capsys):
    """--gpus 1 on a GPU: the tiny model on one NCCL rank launched as lcgraph launches ranks (its own GPU, CUDA
    tensors in the collectives) against the same run in this process, and the pinned host link in the profile."""
    assert check.main(["--gpus", "1", "--out", str(tmp_path)]) == 0, capsys.readouterr().out
    result = json.loads((tmp_path / "check.json").read_text())
    assert result["meta"]["backend"] == "nccl" and result["checks"] == ["exactness", "links"]
    assert [r["layout"] for r in result["exactness"]["rows"]] == ["1 rank, launched"]
    assert result["exactness"]["max_rel_diff"] <= check.RTOL["nccl"]
    profile = load_profile(str(tmp_path / "profile.json"))
    props = torch.cuda.get_device_properties(0)
    assert profile.memory_bytes == pytest.approx(props.total_memory, rel=1e-3)  # 4 digits in the JSON
    assert profile.name.endswith("-checked")
    assert profile.host_bandwidth > 10e9 and profile.status("host_bandwidth")[0] == "measured"  # pinned: PCIe Gen4+
