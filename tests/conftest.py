import os

# Tests never touch the network: model hubs are unreachable here and in CI.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("MPLBACKEND", "Agg")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


# The longest test files first: `make test` spreads files over two xdist workers (--dist loadfile),
# and a long file started last would run alone at the end (longest-processing-time-first order).
LONGEST_FIRST = ("test_end_to_end.py", "test_unlabelled.py", "test_runs.py", "test_run_folder.py",
                 "test_guidance_sweep.py", "test_scaleout.py", "test_schedule.py",
                 "test_families_stages.py", "test_reliability_kill.py", "test_study.py",
                 "test_evidence_off.py")


def pytest_collection_modifyitems(items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: the rest keep their order
