"""Longest tests first: `-n 2` hands tests to its two workers in collection order, so a multi-minute launch
collected last would run alone at the end. Order from `--durations` of a CI-like run (2 cores); the rest keep
their order."""

LONGEST_FIRST = (
    "test_plan.py::test_llama70b",
    "test_pipeline.py::test_every_schedule",
    "test_reference.py::test_four_rank",
    "test_documents.py::test_one_process",
    "test_documents.py::test_four_rank",
    "test_ring.py::test_four_rank",
    "test_reference.py::test_two_rank_layouts",
    "test_sequence_parallel.py::test_ulysses",
    "test_ring.py::test_two_rank",
    "test_ring.py::test_llama70b_1m_80gb",
    "test_ring_op.py::test_ring_ranks",
    "test_recipes.py::test_every_recipe",
    "test_reference.py::test_two_rank_checkpoint",
    "test_cli.py::test_the_default_plan",
    "test_logging.py::test_a_two_stage_run",
    "test_overlap.py",
    "test_pipeline.py::test_seq1f1b_stage0",
    "test_faults.py",
    "test_mutations.py",
    "test_cli.py::test_torchrun",
)


def _rank(item) -> int:
    for i, prefix in enumerate(LONGEST_FIRST):
        if prefix in item.nodeid:
            return i
    return len(LONGEST_FIRST)


def pytest_collection_modifyitems(config, items):
    items.sort(key=_rank)  # stable: ties keep collection order
