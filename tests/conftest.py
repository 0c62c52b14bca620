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
