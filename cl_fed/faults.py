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

Broken data (what a microphone fault or a transcription bug looks like to the server):
    "shuffle-transcripts"                   the site trains on its rows with their transcripts
                                            permuted among them ("round": "all" for every round)
The same fault can be named in the run config, so that a drill is part of the run's name and
reproducible from it (quality rows, sweeps): `drill="shuffle-transcripts:factory-b"`.

`stop-after-round` makes the ServerApp exit right after that round's checkpoint, as a crash would.
"""

from __future__ import annotations

import json
import os
import random
from dataclasses import replace
from pathlib import Path

DRILLS = ("shuffle-transcripts",)


def _faults() -> dict:
    path = os.environ.get("CL_FED_FAULTS_FILE")
    if not path or not Path(path).is_file():
        return {}
    return json.loads(Path(path).read_text(encoding="utf-8"))


def client_fault(site: str, server_round: int) -> dict | None:
    for fault in _faults().get("client", []):
        if fault.get("site") == site and str(fault.get("round", -1)) in ("all", str(server_round)):
            return fault
    return None


def stop_after_round() -> int | None:
    value = _faults().get("stop-after-round")
    return int(value) if value is not None else None


class InjectedCrash(RuntimeError):
    pass


def parse_drill(text: str) -> tuple[str, str]:
    """`drill` = "<fault>:<site>" -> (fault, site); the error names the value and what is allowed."""
    kind, colon, site = str(text).partition(":")
    if not colon or kind not in DRILLS or not site:
        raise ValueError(f"drill={text!r}: expected '<fault>:<site>' with fault one of {', '.join(DRILLS)}")
    return kind, site


def shuffle_transcripts(rows: list, seed: int) -> list:
    """The rows with their transcripts permuted among them (seeded): every row gets another's text."""
    if len(rows) < 2:
        return list(rows)
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    texts = {order[i]: rows[order[(i + 1) % len(order)]].text for i in range(len(order))}  # a cycle
    return [replace(row, text=texts[i]) for i, row in enumerate(rows)]


def faulty_rows(site: str, server_round: int, rows: list, drill: str, seed: int) -> list:
    """A site's training rows as its fault (the run's `drill`, or the faults file) makes them."""
    kind = parse_drill(drill) if drill else None
    fault = client_fault(site, server_round)
    if (kind and kind[1] == site and kind[0] == "shuffle-transcripts") or (
        fault and fault["fault"] == "shuffle-transcripts"
    ):
        return shuffle_transcripts(rows, seed)
    return rows
