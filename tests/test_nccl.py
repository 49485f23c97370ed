"""NCCL's rules: every built schedule passes the NCCL model; known-bad programs are rejected by name;
the runtime issues exactly the p2p groups that programs.txt shows."""

import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lcgraph.schedule import nccl
from lcgraph.schedule.actions import Action, ScheduleError, ScheduleSpec
from lcgraph.schedule.buckets import add_bucket_actions
from lcgraph.schedule.p2p import add_p2p, group_p2p, receive_ahead, ungroup_p2p, with_transfers
from lcgraph.schedule.programs import build_programs
from lcgraph.schedule.text import format_programs, parse_programs
from lcgraph.schedule.validator import validate


def built(spec):
    return add_p2p(build_programs(spec), spec)


def with_buckets(programs, spec, per_stage=2):
    """RS/AG actions as the distributed optimizer adds them: two buckets per stage, the embedding's
    (first and last stage's bucket 0) tied."""
    actions = {
        s: (
            [Action("RS", s, per_stage * s + b) for b in range(per_stage)],
            [Action("AG", s, per_stage * s + b) for b in reversed(range(per_stage))],
        )
        for s in range(spec.num_stages)
    }
    tied = frozenset({(0, 0), (spec.num_stages - 1, per_stage * (spec.num_stages - 1))})
    return [add_bucket_actions(p, actions) for p in programs], tied


@st.composite
def specs(draw):
    name = draw(st.sampled_from(["gpipe", "1f1b", "seq1f1b", "interleaved_1f1b"]))
    pp = draw(st.sampled_from([2, 3, 4, 8]))
    if name == "interleaved_1f1b":
        v = draw(st.integers(2, 3))
        m = draw(st.sampled_from([pp, 2 * pp, 3 * pp] + list(range(1, pp))))
        return ScheduleSpec(name, pp, m, 1, v)
    m = draw(st.integers(1, 10))
    k = draw(st.integers(1, 4)) if name in ("gpipe", "seq1f1b") else 1
    return ScheduleSpec(name, pp, m, k)


@settings(max_examples=150, deadline=None)
@given(
    spec=specs(),
    dp=st.integers(1, 2),
    sp=st.integers(1, 2),
    zero=st.booleans(),
    streams=st.sampled_from(["pair", "rank"]),
)
def test_every_built_schedule_passes_the_nccl_model(spec, dp, sp, zero, streams):
    programs = built(spec)
    tied: frozenset = frozenset()
    if zero and dp * sp > 1:
        programs, tied = with_buckets(programs, spec)
    validate(programs, spec)
    nccl.check(programs, spec, nccl.Comms(dp, sp, tied=spec.num_stages > 1, zero=zero, tied_buckets=tied), streams)


@pytest.mark.parametrize(
    "name,pp,m,k,v",
    [
        ("1f1b", 2, 4, 1, 1),
        ("1f1b", 4, 8, 1, 1),
        ("seq1f1b", 2, 2, 2, 1),
        ("seq1f1b", 4, 4, 4, 1),
        ("interleaved_1f1b", 2, 4, 1, 2),
    ],
)
def test_ungrouped_programs_deadlock_and_the_message_names_ranks_and_actions(name, pp, m, k, v):
    spec = ScheduleSpec(name, pp, m, k, v)
    ungrouped = [ungroup_p2p(p) for p in built(spec)]
    validate(ungrouped, spec)  # an ideal network (gloo) runs them
    with pytest.raises(ScheduleError, match="deadlock under NCCL") as error:
        nccl.check(ungrouped, spec)
    stuck = re.findall(r"rank (\d+) waits in (\S+)", str(error.value))
    assert len(stuck) >= 2, str(error.value)


def test_the_classic_1f1b_hang_is_reported_as_it_happens():
    spec = ScheduleSpec("1f1b", 2, 4)
    ungrouped = [ungroup_p2p(p) for p in built(spec)]
    with pytest.raises(ScheduleError) as error:
        nccl.check(ungrouped, spec)
    text = str(error.value)
    assert "rank 0 waits in B0.0 (waiting for rB0.0<1): rB0.0<1 is queued behind sF1.0>1" in text
    assert "rank 1 waits in F1.0 (waiting for rF1.0<0): rF1.0<0 is queued behind sB0.0>0" in text


def test_grouped_1f1b_pairs_each_send_with_the_receive_beside_it():
    spec = ScheduleSpec("1f1b", 2, 4)
    text = format_programs(built(spec), spec)
    assert "[sF1.0>1 rB0.0<1]" in text.splitlines()[0]
    assert "[sB0.0>0 rF1.0<0]" in text.splitlines()[1]
    nccl.check(parse_programs(text), spec)


def test_interleaved_needs_receive_ahead():
    spec = ScheduleSpec("interleaved_1f1b", 2, 4, 1, 2)
    runs_only = [group_p2p(with_transfers(p, spec)) for p in build_programs(spec)]  # no receive_ahead
    validate(runs_only, spec)
    with pytest.raises(ScheduleError, match="queued behind sB0.0@2>1"):
        nccl.check(runs_only, spec)
    nccl.check(built(spec), spec)


@pytest.mark.parametrize("name,v", [("gpipe", 1), ("interleaved_1f1b", 2)])
def test_batches_that_do_not_mirror_are_rejected_as_the_two_h200s_hung_on_them(name, v):
    """Grouped but not mirrored (how gpipe and interleaved 1F1B hung on 2 H200s, 2026-11-30)."""
    spec = ScheduleSpec(name, 2, 4, 1, v)
    unmirrored = [group_p2p(with_transfers(p, spec)) for p in build_programs(spec)]
    if v > 1:
        unmirrored = [receive_ahead(p) for p in unmirrored]
    validate(unmirrored, spec)
    with pytest.raises(ScheduleError, match=r"batches that do not mirror[\s\S]*rank 0 and rank 1"):
        nccl.check(unmirrored, spec)
    nccl.check(built(spec), spec)


def test_messages_out_of_order_are_a_mismatch_not_a_silent_swap():
    spec = ScheduleSpec("gpipe", 2, 2)
    programs = built(spec)
    sends = [i for i, a in enumerate(programs[0]) if a.kind == "SEND_F"]
    programs[0][sends[0]], programs[0][sends[1]] = programs[0][sends[1]], programs[0][sends[0]]
    with pytest.raises(ScheduleError, match="message 0 is sF1.0>1 but the receiver expects rF0.0<0"):
        nccl.check(programs, spec)


def test_a_tied_sum_at_the_rs_action_would_deadlock_interleaved():
    # Summing the tied embedding across the pipeline's ends at its RS action stalls the last stage's rank
    # while rank 0 still needs that rank's backwards for stage 0: a wait cycle across two communicators.
    spec = ScheduleSpec("interleaved_1f1b", 2, 2, 1, 2)
    programs, tied = with_buckets(built(spec), spec)
    at_rs = nccl.Comms(dp=2, tied=True, zero=True, tied_buckets=tied, tied_sum_at="rs")
    per_stage = []
    for program in programs:  # RS right after each stage's own last backward
        rs = [a for a in program if a.kind == "RS"]
        rest = [a for a in program if a.kind != "RS"]
        for a in rs:
            last_b = max(i for i, x in enumerate(rest) if x.kind == "B" and x.stage == a.stage)
            rest.insert(last_b + 1, a)
        per_stage.append(rest)
    with pytest.raises(ScheduleError, match="tied-embedding gradient all-reduce"):
        nccl.check(per_stage, spec, at_rs)
    nccl.check(programs, spec, nccl.Comms(dp=2, tied=True, zero=True, tied_buckets=tied))


def test_stricter_single_stream_reading_also_holds():
    for spec in (ScheduleSpec("seq1f1b", 4, 4, 4), ScheduleSpec("interleaved_1f1b", 4, 8, 1, 2)):
        nccl.check(built(spec), spec, streams="rank")


def test_format_brackets_groups_and_parse_keeps_them():
    spec = ScheduleSpec("seq1f1b", 3, 2, 2)
    programs = built(spec)
    text = format_programs(programs, spec)
    assert parse_programs(text) == programs
    assert parse_programs(text.replace("[", "").replace("]", "")) != programs  # groups are part of a program
    with pytest.raises(ValueError, match="unbalanced"):
        parse_programs("rank 0: F0.0 sF0.0>1]")


@pytest.mark.slow
def test_runtime_issues_exactly_the_groups_that_programs_txt_shows():
    from lcgraph.app.testing import compose, train_spawned

    cfgs = [
        compose(
            "parallel.pp=2",
            "parallel.schedule=1f1b",
            "parallel.microbatches=4",
            "parallel.seq_chunks=1",
            "train.steps=1",
        ),
        compose(
            "parallel.pp=2",
            "parallel.schedule=interleaved_1f1b",
            "parallel.virtual_stages=2",
            "parallel.microbatches=4",
            "parallel.seq_chunks=1",
            "train.steps=1",
        ),
    ]
    for result in train_spawned(cfgs, world=2):
        for rank, record in enumerate(result["ranks"]):
            line = record["programs_txt"].splitlines()[rank]
            shown = re.findall(r"\[[^\]]+\]|\b[sr][FB]\S+", line.partition(":")[2])
            assert record["issued"] == shown, (line, record["issued"])
            assert any(g.startswith("[") for g in shown)
