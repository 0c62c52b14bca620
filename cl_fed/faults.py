"""Fault injection for tests and drills: what a crashing, slow or corrupt site looks like.

Off unless CL_FED_FAULTS_FILE names a JSON file (read at every use, so one long-lived SuperLink
can serve runs with different faults):

    {"client": [{"site": "factory-b", "round": 2, "fault": "raise" | "nan" | "sleep", "seconds": 30}],
     "stop-after-round": 3}

Scripted attackers (clients/client_app.py `attack`; the server's limits in server/strategies.py):
    "claim-examples" (with "examples": N)   reports N training examples (default 10^9)
    "scale-update" (with "factor": F)       sends start + F * (its update - start) (default 100)
    "claim-site" (with "as": NAME)          answers as another site
    "record", then "replay"                 keeps that round's reply, then sends it again later

`stop-after-round` makes the ServerApp exit right after that round's checkpoint, as a crash would.
"""

from __future__ import annotations

import json
import os
from pathlib import Path


def _faults() -> dict:
    path = os.environ.get("CL_FED_FAULTS_FILE")
    if not path or not Path(path).is_file():
        return {}
    return json.loads(Path(path).read_text(encoding="utf-8"))


def client_fault(site: str, server_round: int) -> dict | None:
    for fault in _faults().get("client", []):
        if fault.get("site") == site and int(fault.get("round", -1)) == server_round:
            return fault
    return None


def stop_after_round() -> int | None:
    value = _faults().get("stop-after-round")
    return int(value) if value is not None else None


class InjectedCrash(RuntimeError):
    pass
