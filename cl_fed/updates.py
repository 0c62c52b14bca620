"""Weight updates as replayable operations: what the server applies to the weights is exactly what
it sends, so every site that replays the same operations holds bit-identical weights.

An operation list maps a weight key to one of
    ("lowrank", U, V)   W <- W + U @ V   (U: out x k, V: k x in; an exact factorisation of the update)
    ("set", T)          W <- T           (dense: when low rank is not smaller, or for a reset)

`compress(weight, delta)` turns a dense float64 update into the smaller of the two: a low-rank
factorisation from its SVD, truncated where singular values fall below the weight's own precision
(a function of the aggregate only: never a site's own factors), or the dense new weight.
`apply_ops` is the one function that server, runner and sites use to apply them: float64
accumulation in a fixed order of rank-8 chunks, rounded to the weight's dtype once, so the bits do
not depend on the thread count.
"""

from __future__ import annotations

import torch

CHUNK = 8  # inner dimension of each matmul: small enough that no BLAS splits (and reorders) the sum


def lowrank_product(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """U @ V in float64, summed over rank-CHUNK blocks in order (bit-stable across thread counts)."""
    out = torch.zeros(u.shape[0], v.shape[1], dtype=torch.float64)
    block = torch.empty_like(out)
    for j in range(0, u.shape[1], CHUNK):
        torch.mm(u[:, j : j + CHUNK].to(torch.float64), v[j : j + CHUNK].to(torch.float64), out=block)
        out.add_(block)
    return out


def add_lowrank(weight: torch.Tensor, u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return (weight.to(torch.float64) + lowrank_product(u, v)).to(weight.dtype)


def compress(weight: torch.Tensor, delta: torch.Tensor) -> tuple:
    """The cheaper exact operation that adds the float64 `delta` to `weight` (None: delta is zero)."""
    if not delta.any():
        return None
    if delta.dim() == 2 and min(delta.shape) > 1:
        u, s, vh = torch.linalg.svd(delta.to(torch.float64), full_matrices=False)
        # components below the weight's own precision are rounding noise (of the cancelling products
        # of close sites, of the fp32 mean factors), not rank: dropping them changes W by less than
        # its dtype can hold, and the factors travel in that dtype anyway
        typical = float(torch.linalg.vector_norm(weight.to(torch.float64))) / min(delta.shape) ** 0.5
        tol = torch.finfo(weight.dtype).eps * max(float(s[0]), typical)
        rank = int((s > tol).sum())
        if rank == 0:
            return None  # below what the weight can hold: adding it would change no bit worth sending
        if rank * (delta.shape[0] + delta.shape[1]) < delta.numel():
            # factors in the weight's dtype: what travels is what is applied, here and at every site
            return (
                "lowrank",
                (u[:, :rank] * s[:rank]).to(weight.dtype),
                vh[:rank].to(weight.dtype).contiguous(),
            )
    return ("set", (weight.to(torch.float64) + delta).to(weight.dtype))


def apply_ops(weights: dict[str, torch.Tensor], ops: dict[str, tuple]) -> dict[str, torch.Tensor]:
    """New weights with `ops` applied; untouched tensors are shared, not copied."""
    out = dict(weights)
    for key, op in ops.items():
        if key not in weights:
            raise ValueError(f"update for {key!r}, which the weights do not have")
        if op[0] == "lowrank":
            out[key] = add_lowrank(weights[key], op[1], op[2])
        elif op[0] == "set":
            if tuple(op[1].shape) != tuple(weights[key].shape):
                raise ValueError(
                    f"update for {key!r} has shape {tuple(op[1].shape)}, weight {tuple(weights[key].shape)}"
                )
            out[key] = op[1].to(weights[key].dtype)
        else:
            raise ValueError(f"unknown update kind {op[0]!r} for {key!r}")
    return out


def fold_ops(weights: dict[str, torch.Tensor], deltas: dict[str, torch.Tensor]) -> dict[str, tuple]:
    """The operations that add float64 `deltas` to `weights` (zero deltas need none)."""
    ops = {}
    for key, delta in deltas.items():
        if key not in weights:
            raise ValueError(f"update for {key!r}, which the weights do not have")
        if tuple(delta.shape) != tuple(weights[key].shape):
            raise ValueError(
                f"update for {key!r} has shape {tuple(delta.shape)}, weight {tuple(weights[key].shape)}"
            )
        op = compress(weights[key], delta.to(torch.float64))
        if op is not None:
            ops[key] = op
    return ops


def to_tensors(steps: list[dict[str, tuple]]) -> dict[str, torch.Tensor]:
    """Operation dicts as flat tensors (an ArrayRecord): '<i>/lowrank/U|V/<key>', '<i>/set/<key>'."""
    out = {}
    for i, ops in enumerate(steps):
        for key, op in ops.items():
            if op[0] == "lowrank":
                out[f"{i}/lowrank/U/{key}"], out[f"{i}/lowrank/V/{key}"] = op[1], op[2]
            else:
                out[f"{i}/set/{key}"] = op[1]
    return out


def from_tensors(tensors: dict[str, torch.Tensor]) -> list[dict[str, tuple]]:
    count = 1 + max((int(k.split("/", 1)[0]) for k in tensors), default=-1)
    steps: list[dict[str, tuple]] = [{} for _ in range(count)]
    for name, tensor in tensors.items():
        index, kind, rest = name.split("/", 2)
        ops = steps[int(index)]
        if kind == "set":
            ops[rest] = ("set", tensor)
        elif kind == "lowrank" and rest.startswith("U/"):
            key = rest[2:]
            ops[key] = ("lowrank", tensor, tensors[f"{index}/lowrank/V/{key}"])
        elif not (kind == "lowrank" and rest.startswith("V/")):
            raise ValueError(
                f"weights update tensor {name!r} is not '<i>/lowrank/U|V/<key>' or '<i>/set/<key>'"
            )
    return steps


def replay(weights: dict[str, torch.Tensor], steps: list[dict[str, tuple]]) -> dict[str, torch.Tensor]:
    for ops in steps:
        weights = apply_ops(weights, ops)
    return weights
