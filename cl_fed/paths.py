"""Where cl-fed keeps generated data, pre-trained bases and run outputs.

A source checkout keeps everything inside the project (`.cache/`, `runs/`), whichever directory a
process (for example Flower's SuperLink) was started from. An installed copy falls back to the
user's cache directory. `CL_FED_CACHE` and `CL_FED_RUNS` override both.
"""

import os
from pathlib import Path

_PACKAGE_PARENT = Path(__file__).resolve().parents[1]


def project_root() -> Path | None:
    """The source checkout this package runs from, or None when installed as a wheel."""
    return _PACKAGE_PARENT if (_PACKAGE_PARENT / "pyproject.toml").is_file() else None


def cache_root() -> Path:
    if os.environ.get("CL_FED_CACHE"):
        return Path(os.environ["CL_FED_CACHE"]).expanduser().resolve()
    root = project_root()
    return root / ".cache" if root else Path.home() / ".cache" / "cl-fed"


def runs_root() -> Path:
    if os.environ.get("CL_FED_RUNS"):
        return Path(os.environ["CL_FED_RUNS"]).expanduser().resolve()
    root = project_root()
    return root / "runs" if root else Path.cwd() / "runs"
