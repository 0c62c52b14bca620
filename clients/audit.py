"""A ClientApp mod that records the shape of every message a site receives and sends.

Enabled by setting CL_FED_AUDIT_DIR (inherited from the SuperLink/SuperNode environment); the
tests use it to check that no raw audio, features or transcripts ever leave or reach a site.
Only names, dtypes and shapes of arrays and the config/metric values are written.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from flwr.app import Context, Message


def describe(msg: Message) -> dict:
    content = msg.content
    out = {"type": msg.metadata.message_type, "arrays": {}, "configs": {}, "metrics": {}}
    if msg.has_error():
        out["error"] = msg.error.reason[:200]
        return out
    for name, record in content.array_records.items():
        out["arrays"][name] = {k: [str(v.dtype), list(v.shape)] for k, v in record.items()}
    for name, record in content.config_records.items():
        out["configs"][name] = {
            k: v if not isinstance(v, bytes) else f"<{len(v)} bytes>" for k, v in record.items()
        }
    for name, record in content.metric_records.items():
        out["metrics"][name] = dict(record)
    return out


def _write(context: Context, direction: str, message: Message) -> None:
    path = Path(os.environ["CL_FED_AUDIT_DIR"]) / f"node-{context.node_id}.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as f:
        row = {"time": time.time(), "direction": direction, **describe(message)}
        f.write(json.dumps(row, default=str) + "\n")


def audit_messages(msg: Message, context: Context, call_next) -> Message:
    if not os.environ.get("CL_FED_AUDIT_DIR"):
        return call_next(msg, context)
    _write(context, "in", msg)
    reply = call_next(msg, context)
    _write(context, "out", reply)
    return reply
