"""Where cl-fed keeps generated data, pre-trained bases and run outputs.

A source checkout keeps everything inside the project (`.cache/`, `runs/`), whichever directory a
process (for example Flower's SuperLink) was started from. An installed copy falls back to the
user's cache directory. `CL_FED_CACHE` and `CL_FED_RUNS` override both.

Flower runs the apps from a copy of the app unpacked under FLWR_HOME, so "the project" is found
through the editable install's record (`pip install -e .`), not through `__file__`.
"""

import functools
import json
import os
from importlib import metadata
from pathlib import Path
from urllib.parse import unquote, urlparse


@functools.cache
def _editable_checkout() -> Path | None:
    for dist in metadata.distributions(name="cl-fed"):
        record = dist.read_text("direct_url.json")
        if not record:
            continue
        info = json.loads(record)
        if info.get("dir_info", {}).get("editable") and info.get("url", "").startswith("file://"):
            path = Path(unquote(urlparse(info["url"]).path))
            if (path / "pyproject.toml").is_file():
                return path
    return None


def project_root() -> Path | None:
    """The source checkout cl-fed is installed from (editable), or the one this file lies in."""
    checkout = _editable_checkout()
    if checkout:
        return checkout
    here = Path(__file__).resolve().parents[1]
    return here if (here / "pyproject.toml").is_file() and (here / ".git").exists() else None


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
