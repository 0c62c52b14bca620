"""Atomic file writes: a crash mid-write never leaves a half file where a good one was."""

import fcntl
import hashlib
import json
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any


@contextmanager
def file_lock(lock_path: str | os.PathLike):
    """An advisory lock: concurrent builders of one cache entry wait, then reuse it."""
    with open(lock_path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, ensure_ascii=False, sort_keys=False) + "\n")


def content_digest(tensors: dict, meta_json: str) -> str:
    """sha256 over the metadata JSON and every tensor's name, dtype, shape and bytes, in key order."""
    import torch

    digest = hashlib.sha256(meta_json.encode("utf-8"))
    for key in sorted(tensors):
        tensor = tensors[key].detach().to("cpu").contiguous()
        digest.update(f"|{key}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        if tensor.numel():
            digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def atomic_save_tensors(path: str | os.PathLike, tensors: dict, meta: dict | None = None) -> None:
    """Tensors in safetensors (no pickle: loading runs no code) plus JSON metadata and a checksum of
    both, in one atomic file (mode 0600: it may hold the server's DP secret)."""
    import torch
    from safetensors.torch import save

    plain = {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}
    meta_json = json.dumps(meta or {}, sort_keys=True)
    header = {"meta": meta_json, "sha256": content_digest(plain, meta_json)}
    data = save(plain, metadata=header) if plain else save({"_empty": torch.zeros(0)}, metadata=header)
    atomic_write_bytes(path, data)


def read_tensors_meta(path: str | os.PathLike) -> dict:
    """The JSON metadata of a file written by `atomic_save_tensors`, without reading its tensors."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        return json.loads((handle.metadata() or {}).get("meta", "{}"))


def load_tensors(path: str | os.PathLike) -> tuple[dict, dict]:
    """(tensors, metadata) of a file written by `atomic_save_tensors`. A truncated, corrupted or
    edited file is an error naming the file and what failed (its checksum covers tensors and
    metadata); nothing is unpickled, so a tampered file cannot run code."""
    from safetensors import safe_open
    from safetensors.torch import load

    try:
        data = Path(path).read_bytes()
        tensors = load(data)
        with safe_open(str(path), framework="pt") as handle:
            header = handle.metadata() or {}
        meta_json = header.get("meta", "{}")
        meta = json.loads(meta_json)
    except Exception as error:  # noqa: BLE001 - safetensors raises several kinds
        raise ValueError(
            f"{path}: not a readable cl-fed state file, truncated or corrupted ({error})"
        ) from error
    tensors.pop("_empty", None)
    if "sha256" not in header:
        raise ValueError(
            f"{path}: has no checksum (not written by this cl-fed version, or edited); refusing it"
        )
    if content_digest(tensors, meta_json) != header["sha256"]:
        raise ValueError(
            f"{path}: its checksum does not match its contents (tensors or metadata were altered or "
            "corrupted); refusing it"
        )
    return tensors, meta
