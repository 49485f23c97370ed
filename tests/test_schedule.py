"""Pipeline schedules: builders, p2p insertion, validator, chunk lengths, bubble and memory estimates."""

import itertools
import re

import pytest

from lcgraph.schedule.actions import Action, ScheduleError, ScheduleSpec
from lcgraph.schedule.p2p import add_p2p, group_p2p, mirror_groups, unmirrored_pairs, with_transfers
from lcgraph.schedule.programs import build_programs
from lcgraph.schedule.sequence import split_sequence
from lcgraph.schedule.text import format_programs, parse_programs
from lcgraph.schedule.validator import bubble_fraction, peak_inflight, validate

PP = (1, 2, 3, 4)
MICROBATCHES = (1, 2, 3, 4, 8)
CHUNKS = (1, 2, 4)


def programs_for(name, pp, m, k=1, v=1):
    spec = ScheduleSpec(name, pp, m, seq_chunks=k, virtual_stages=v)
    return build_programs(spec), spec


def lines(text):
    return text.splitlines()


# --- tokens and dump ----------------------------------------------------------------------------------


def test_tokens_name_compute_p2p_and_collectives():
    assert Action("F", 2, 3, 1).token(multi_stage=False) == "F3.1"
    assert Action("B", 2, 3, 1).token(multi_stage=True) == "B3.1@2"
    assert Action("SEND_F", 0, 3, 1, peer=1).token(False) == "sF3.1>1"
    assert Action("RECV_F", 1, 3, 1, peer=0).token(False) == "rF3.1<0"
    assert Action("SEND_B", 1, 0, 0, peer=0).token(True) == "sB0.0@1>0"
    assert Action("RECV_B", 0, 0, 0, peer=1).token(False) == "rB0.0<1"
    assert Action("OPT", -1).token(True) == "OPT"
    assert Action("RS", -1, mb=2).token(False) == "RS2"
    assert Action("AG", -1, mb=0).token(False) == "AG0"


def test_only_compute_tokens_start_with_f_or_b_and_a_digit():
    programs, spec = programs_for("interleaved_1f1b", 2, 4, v=2)
    programs[0] += [Action("RS", -1, 0), Action("AG", -1, 0)]
    for program in add_p2p(programs, spec):
        for action in program:
            looks_compute = re.match(r"[FB]\d", action.token(True)) is not None
            assert looks_compute == (action.kind in ("F", "B")), action


def test_format_programs_1f1b_example_line():
    programs, spec = programs_for("1f1b", 4, 8)
    text = format_programs(programs, spec)
    assert lines(text)[0] == (
        "rank 0: F0.0 F1.0 F2.0 F3.0 B0.0 F4.0 B1.0 F5.0 B2.0 F6.0 B3.0 F7.0 B4.0 B5.0 B6.0 B7.0 OPT"
    )
    assert lines(text)[3] == (
        "rank 3: F0.0 B0.0 F1.0 B1.0 F2.0 B2.0 F3.0 B3.0 F4.0 B4.0 F5.0 B5.0 F6.0 B6.0 F7.0 B7.0 OPT"
    )


def test_format_marks_stage_when_a_rank_holds_several():
    programs, spec = programs_for("interleaved_1f1b", 2, 2, v=2)
    first = lines(format_programs(programs, spec))[0]
    assert first.startswith("rank 0: F0.0@0 F1.0@0 F0.0@2 F1.0@2")
    assert "@2" in first and "@1" not in first  # rank 0 holds stages 0 and 2 only


def test_parse_inverts_format_with_p2p_and_collectives():
    for programs, spec in (programs_for("seq1f1b", 3, 4, k=2), programs_for("interleaved_1f1b", 2, 4, v=2)):
        with_p2p = add_p2p(programs, spec)
        with_p2p[0].append(Action("RS", -1, 1))
        assert parse_programs(format_programs(with_p2p, spec)) == with_p2p


def test_parse_rejects_garbage_and_wrong_arrows():
    with pytest.raises(ValueError, match="cannot parse"):
        parse_programs("rank 0: F0.0 X7")
    with pytest.raises(ValueError, match="sends end in"):
        parse_programs("rank 0: sF0.0<1")


# --- builders ------------------------------------------------------------------------------------------


def test_seq1f1b_with_one_chunk_equals_1f1b():
    for pp, m in itertools.product(PP, MICROBATCHES):
        assert programs_for("seq1f1b", pp, m, k=1)[0] == programs_for("1f1b", pp, m)[0], (pp, m)


def test_seq1f1b_runs_chunks_forward_in_order_and_backward_in_reverse():
    programs, spec = programs_for("seq1f1b", 2, 2, k=2)
    assert lines(format_programs(programs, spec)) == [
        "rank 0: F0.0 F0.1 F1.0 B0.1 F1.1 B0.0 B1.1 B1.0 OPT",  # warm-up (2-0-1)+(2-1) = 2
        "rank 1: F0.0 F0.1 B0.1 F1.0 B0.0 F1.1 B1.1 B1.0 OPT",  # warm-up (2-1-1)+(2-1) = 1
    ]


def test_gpipe_runs_all_forwards_before_any_backward():
    programs, _ = programs_for("gpipe", 3, 4, k=2)
    for program in programs:
        kinds = "".join(a.kind[0] for a in program)
        assert kinds == "F" * 8 + "B" * 8 + "O"


@pytest.mark.parametrize("name", ["gpipe", "seq1f1b"])
def test_chunked_builders_pass_validator_over_grid(name):
    for pp, m, k in itertools.product(PP, MICROBATCHES, CHUNKS):  # includes m < p and k > m
        programs, spec = programs_for(name, pp, m, k)
        validate(programs, spec)
        validate(add_p2p(programs, spec), spec)


def test_1f1b_passes_validator_over_grid_and_refuses_chunks():
    for pp, m in itertools.product(PP, MICROBATCHES):
        programs, spec = programs_for("1f1b", pp, m)
        validate(programs, spec)
        validate(add_p2p(programs, spec), spec)
    with pytest.raises(ValueError, match="seq1f1b"):
        programs_for("1f1b", 2, 4, k=2)


def test_interleaved_passes_validator_or_explains_the_microbatch_rule():
    for pp, m, v in itertools.product(PP, MICROBATCHES, (1, 2, 3)):
        if v > 1 and m % pp and m > pp:
            with pytest.raises(ValueError, match=f"microbatches={m}, pp={pp}"):
                programs_for("interleaved_1f1b", pp, m, v=v)
            continue
        programs, spec = programs_for("interleaved_1f1b", pp, m, v=v)
        validate(programs, spec)
        validate(add_p2p(programs, spec), spec)


def test_interleaved_with_one_stage_per_rank_is_plain_1f1b():
    for pp, m in itertools.product(PP, MICROBATCHES):
        assert programs_for("interleaved_1f1b", pp, m, v=1)[0] == programs_for("1f1b", pp, m)[0]


def test_interleaved_v2_places_stage_s_on_rank_s_mod_p():
    programs, spec = programs_for("interleaved_1f1b", 2, 4, v=2)
    for rank, program in enumerate(programs):
        stages = {a.stage for a in program if a.kind in ("F", "B")}
        assert stages == {rank, rank + 2}


def test_unknown_schedule_names_the_valid_ones():
    with pytest.raises(ValueError, match="gpipe, 1f1b, seq1f1b, interleaved_1f1b"):
        build_programs(ScheduleSpec("zb-h1", 2, 4))


def test_virtual_stages_only_for_interleaved():
    with pytest.raises(ValueError, match="interleaved_1f1b"):
        build_programs(ScheduleSpec("1f1b", 2, 4, virtual_stages=2))


# --- p2p -----------------------------------------------------------------------------------------------


def test_add_p2p_wraps_each_compute_in_its_transfers():
    programs, spec = programs_for("1f1b", 2, 2)
    assert lines(format_programs(add_p2p(programs, spec), spec)) == [
        "rank 0: F0.0 sF0.0>1 F1.0 [sF1.0>1 rB0.0<1] B0.0 rB1.0<1 B1.0 OPT",
        "rank 1: rF0.0<0 F0.0 B0.0 [sB0.0>0 rF1.0<0] F1.0 B1.0 sB1.0>0 OPT",
    ]


def test_groups_mirror_at_the_peer_so_gpipe_sends_and_receives_apart():
    """One micro-batch: rank 1 computes between receiving F0 and sending B0, so rank 0's run of
    `sF0.0>1 rB0.0<1` must be two batches, as on rank 1 (one batch against two hangs on NCCL)."""
    programs, spec = programs_for("1f1b", 2, 1)
    grouped = [group_p2p(with_transfers(p, spec)) for p in programs]
    assert unmirrored_pairs(grouped) and not unmirrored_pairs(mirror_groups(grouped))
    assert lines(format_programs(add_p2p(programs, spec), spec)) == [
        "rank 0: F0.0 sF0.0>1 rB0.0<1 B0.0 OPT",
        "rank 1: rF0.0<0 F0.0 B0.0 sB0.0>0 OPT",
    ]


def test_add_p2p_sends_around_the_ring_for_interleaved_and_skips_local_handoffs():
    programs, spec = programs_for("interleaved_1f1b", 2, 2, v=2)
    rank1 = add_p2p(programs, spec)[1]
    assert ("SEND_F", 1, 0, 0, 0) in [(a.kind, a.stage, a.mb, a.chunk, a.peer) for a in rank1]  # stage 2: rank 0
    single = ScheduleSpec("interleaved_1f1b", 1, 2, virtual_stages=2)
    assert add_p2p(build_programs(single), single) == build_programs(single)


# --- validator -----------------------------------------------------------------------------------------


def test_validator_rejects_backward_before_its_forward():
    spec = ScheduleSpec("1f1b", 1, 1)
    with pytest.raises(ScheduleError, match="B0.0@0 comes before its dependency F0.0@0"):
        validate([[Action("B", 0), Action("F", 0), Action("OPT", -1)]], spec)


def test_validator_rejects_chunks_out_of_order():
    spec = ScheduleSpec("seq1f1b", 1, 1, seq_chunks=2)
    forward_swapped = [
        Action("F", 0, 0, 1),
        Action("F", 0, 0, 0),
        Action("B", 0, 0, 1),
        Action("B", 0, 0, 0),
        Action("OPT", -1),
    ]
    with pytest.raises(ScheduleError, match="F0.1@0 comes before its dependency F0.0@0"):
        validate([forward_swapped], spec)
    backward_fifo = [
        Action("F", 0, 0, 0),
        Action("F", 0, 0, 1),
        Action("B", 0, 0, 0),
        Action("B", 0, 0, 1),
        Action("OPT", -1),
    ]
    with pytest.raises(ScheduleError, match="B0.0@0 comes before its dependency B0.1@0"):
        validate([backward_fifo], spec)


def test_validator_rejects_missing_duplicate_and_misplaced_compute():
    programs, spec = programs_for("1f1b", 2, 2)
    missing = [program[:] for program in programs]
    missing[1].remove(Action("B", 1, 1))
    with pytest.raises(ScheduleError, match="B1.0@1 appears 0 times"):
        validate(missing, spec)
    doubled = [program[:] for program in programs]
    doubled[0].insert(0, Action("F", 0, 0))
    with pytest.raises(ScheduleError, match="F0.0@0 appears 2 times"):
        validate(doubled, spec)
    misplaced = [program[:] for program in programs]
    misplaced[0].insert(0, misplaced[1].pop(0))
    with pytest.raises(ScheduleError, match="belongs on rank 1"):
        validate(misplaced, spec)


def test_validator_requires_one_final_opt_per_rank():
    programs, spec = programs_for("1f1b", 2, 2)
    programs[0].insert(0, programs[0].pop())  # OPT first
    with pytest.raises(ScheduleError, match="rank 0: must end its compute with exactly one OPT"):
        validate(programs, spec)


def test_ideal_validator_lets_a_receive_be_posted_early():
    # On an ideal network a receive posted before a send is harmless (NCCL's rules: tests/test_nccl.py).
    validate(
        parse_programs("rank 0: rB0.0<1 F0.0 sF0.0>1 B0.0 OPT\nrank 1: rF0.0<0 F0.0 B0.0 sB0.0>0 OPT"),
        ScheduleSpec("1f1b", 2, 1),
    )


def test_validator_rejects_a_backward_before_its_forward_with_p2p():
    text = "rank 0: rB0.0<1 B0.0 F0.0 sF0.0>1 OPT\nrank 1: rF0.0<0 F0.0 B0.0 sB0.0>0 OPT"
    with pytest.raises(ScheduleError, match="B0.0@0 comes before its dependency F0.0@0"):
        validate(parse_programs(text), ScheduleSpec("1f1b", 2, 1))


def test_validator_finds_deadlock_in_compute_only_programs():
    # Rank 1 wants micro-batch 1 first, but rank 0 only sends it after B0, which needs rank 1's B0.
    spec = ScheduleSpec("1f1b", 2, 2)
    rank0 = [Action("F", 0, 0), Action("B", 0, 0), Action("F", 0, 1), Action("B", 0, 1), Action("OPT", -1)]
    rank1 = [Action("F", 1, 1), Action("F", 1, 0), Action("B", 1, 0), Action("B", 1, 1), Action("OPT", -1)]
    with pytest.raises(ScheduleError, match="rank 1: stuck at F1.0@1 waiting for F1.0@0"):
        validate([rank0, rank1], spec)


def test_validator_requires_every_transfer_once():
    programs, spec = programs_for("seq1f1b", 2, 2, k=2)
    with_p2p = add_p2p(programs, spec)
    with_p2p[0] = [a for a in with_p2p[0] if (a.kind, a.stage, a.mb, a.chunk) != ("SEND_F", 0, 1, 1)]
    with pytest.raises(ScheduleError, match="rank 0: missing sF1.1@0>1"):
        validate(with_p2p, spec)
    wrong_peer = add_p2p(programs, spec)
    wrong_peer[1][0] = Action("RECV_F", 1, 0, 0, peer=1, group=0)
    with pytest.raises(ScheduleError, match="unexpected rF0.0@1<1"):
        validate(wrong_peer, spec)


# --- chunk lengths -------------------------------------------------------------------------------------

LLAMA_7B_PER_TOKEN = 2 * 6.5e9  # forward FLOPs of the linear layers per token
LLAMA_7B_PER_PAIR = 4 * 32 * 4096  # QK^T and AV per (query, key) pair, all layers


def chunk_costs(lengths, per_token, per_pair):
    costs, end = [], 0
    for s in lengths:
        end += s
        costs.append(per_token * s + per_pair * (s * (end - s) + s * (s + 1) / 2))
    return costs


def test_even_split_and_its_error():
    assert split_sequence(4096, 4, "even") == [1024] * 4
    with pytest.raises(ValueError, match="4\\*128 = 512"):
        split_sequence(1000, 4, "even", align=128)


def test_uniform_comp_gives_the_first_chunk_most_tokens_at_equal_cost():
    lengths = split_sequence(32768, 4, "uniform_comp", LLAMA_7B_PER_TOKEN, LLAMA_7B_PER_PAIR)
    assert sum(lengths) == 32768
    assert all(a > b for a, b in zip(lengths, lengths[1:]))
    costs = chunk_costs(lengths, LLAMA_7B_PER_TOKEN, LLAMA_7B_PER_PAIR)
    assert max(costs) / min(costs) < 1.001
    for got, brief in zip(lengths, [11021, 8421, 7087, 6239]):  # the brief's 7B figures
        assert abs(got - brief) / brief < 0.02


def test_uniform_comp_respects_alignment():
    lengths = split_sequence(32768, 4, "uniform_comp", LLAMA_7B_PER_TOKEN, LLAMA_7B_PER_PAIR, align=128)
    assert sum(lengths) == 32768 and all(s % 128 == 0 for s in lengths)
    assert all(a > b for a, b in zip(lengths, lengths[1:]))
    costs = chunk_costs(lengths, LLAMA_7B_PER_TOKEN, LLAMA_7B_PER_PAIR)
    assert max(costs) / min(costs) < 1.03


def test_uniform_comp_without_attention_cost_is_even():
    assert split_sequence(4096, 4, "uniform_comp", flops_per_token=1.0) == [1024] * 4


def test_uniform_comp_keeps_every_chunk_at_least_align():
    lengths = split_sequence(512, 4, "uniform_comp", 1.0, 1.0, align=128)
    assert lengths == [128] * 4


def test_split_rejects_unknown_mode_and_too_short_sequences():
    with pytest.raises(ValueError, match="even, uniform_comp"):
        split_sequence(4096, 4, "zigzag")
    with pytest.raises(ValueError, match="k\\*align=512"):
        split_sequence(256, 4, "uniform_comp", align=128)


# --- estimates -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("pp, m", [(2, 4), (4, 4), (4, 8), (3, 5)])
def test_bubble_matches_closed_forms(pp, m):
    closed = (pp - 1) / (m + pp - 1)
    for name in ("gpipe", "1f1b"):
        programs, spec = programs_for(name, pp, m)
        assert bubble_fraction(programs, spec) == pytest.approx(closed)
    for k in (2, 4):
        programs, spec = programs_for("seq1f1b", pp, m, k)
        assert bubble_fraction(programs, spec) == pytest.approx((pp - 1) / (k * m + pp - 1))
    if m % pp == 0:
        programs, spec = programs_for("interleaved_1f1b", pp, m, v=2)
        assert bubble_fraction(programs, spec) == pytest.approx((pp - 1) / (2 * m + pp - 1))


def test_bubble_ignores_explicit_p2p_and_depends_on_backward_cost():
    programs, spec = programs_for("seq1f1b", 4, 8, k=2)
    assert bubble_fraction(add_p2p(programs, spec), spec) == pytest.approx(bubble_fraction(programs, spec))
    assert bubble_fraction(programs, spec, f_time=1.0, b_time=1.0) == pytest.approx(3 / 19)
    assert bubble_fraction([[Action("F", 0), Action("B", 0), Action("OPT", -1)]], ScheduleSpec("1f1b", 1, 1)) == 0.0


def test_peak_inflight_1f1b_holds_p_microbatches_on_stage_0():
    for pp, m in itertools.product(PP, MICROBATCHES):
        programs, spec = programs_for("1f1b", pp, m)
        assert peak_inflight(programs, spec)[0] == min(pp, m)
        assert peak_inflight(programs, spec)[-1] == 1


def test_peak_inflight_gpipe_holds_every_unit():
    programs, spec = programs_for("gpipe", 4, 8, k=2)
    assert peak_inflight(programs, spec) == [16] * 4


def test_peak_inflight_seq1f1b_holds_p_plus_k_minus_1_chunks_on_stage_0():
    for pp, m, k in itertools.product(PP, MICROBATCHES, CHUNKS):
        programs, spec = programs_for("seq1f1b", pp, m, k)
        peaks = peak_inflight(programs, spec)
        assert peaks[0] == min(pp + k - 1, m * k), (pp, m, k)
        assert peaks[-1] == k  # the last stage starts backward as soon as a micro-batch is complete


def test_peak_inflight_interleaved_matches_megatron_memory_formula():
    # Megatron's interleaved schedule (arXiv 2104.04473): stage 0 holds about p*M*(1 + (p-1)/(p*v)); one stage unit is M/v, so v*p + p - 1 units.
    for pp, v in itertools.product((2, 4), (2, 3)):
        for m in (pp, 2 * pp, 4 * pp):
            programs, spec = programs_for("interleaved_1f1b", pp, m, v=v)
            units = peak_inflight(programs, spec)[0]
            assert units == min(v * pp + pp - 1, v * m), (pp, m, v)
            if units < v * m:
                assert units / v == pytest.approx(pp * (1 + (pp - 1) / (pp * v)))
