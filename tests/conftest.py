"""Test-session setup: a private cache (generated data, pre-trained bases), never the user's."""

import os
import tempfile
from pathlib import Path

# Set before any cl_fed import reads it; Flower processes started by the tests inherit it.
_SESSION_CACHE = Path(tempfile.mkdtemp(prefix="cl-fed-test-cache-"))
os.environ.setdefault("CL_FED_CACHE", str(_SESSION_CACHE))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

# The files that wait longest on real Flower processes, longest first: `make test`'s workers
# (pytest-xdist, --dist loadfile --no-loadscope-reorder) take files in collection order, so these
# start at once and the short files fill in around them. Without --no-loadscope-reorder, xdist
# (>= 3.7) sorts files by their number of tests instead and this order is ignored.
SLOW_FIRST = (
    "test_deployment.py",
    "test_deployment_faults.py",
    "test_sweep.py",
    "test_flower_e2e.py",
    "test_local_flwr.py",
    "test_gate_runs.py",
)


def pytest_collection_modifyitems(config, items):
    rank = {name: index for index, name in enumerate(SLOW_FIRST)}
    items.sort(
        key=lambda item: rank.get(item.path.name, len(SLOW_FIRST))
    )  # stable: the rest keep their order
