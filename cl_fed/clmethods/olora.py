"""O-LoRA-style orthogonal adapters (Wang et al., 2023, "Orthogonal Subspace Learning for Language
Model Continual Learning"), federated: each stage's adapter is kept orthogonal to the subspaces that
earlier stages' merged updates act on.

O-LoRA keeps every earlier task's A (r x in) and adds lambda * sum_i sum |A_i A_t^T| to the loss.
Here the server keeps, per adapted layer, an orthonormal basis Q (rows) of the input directions of
what it has merged: after each committing merge, the top-`rank` right singular vectors of the merged
update (`subspace`) are added to the layer's basis (`extend`). That is the span of the A of a rank-r
adapter trained on the stage, and it works whatever the aggregation (the exact mean of B_i A_i spans
up to n_sites x r directions; its top r carry the most). Sites add `penalty` = lambda * sum |Q A^T|.
Centralization differs: it merges the stages' updates into one base without constraining where they
act; O-LoRA steers each new update away from the directions earlier ones used.
"""

from __future__ import annotations

import torch


def subspace(delta: torch.Tensor, rank: int, tolerance: float = 1e-6) -> torch.Tensor:
    """The top-`rank` right singular vectors (rows, float32) of a layer's update delta (out x in);
    directions whose singular value is below `tolerance` x the largest are left out (a zero update:
    none)."""
    if delta.dim() != 2:
        raise ValueError(f"olora subspace: a 2-D weight update, got shape {tuple(delta.shape)}")
    _, s, vh = torch.linalg.svd(delta.to(torch.float64), full_matrices=False)
    if s.numel() == 0 or float(s[0]) == 0.0:
        return torch.zeros(0, delta.shape[1])
    keep = int((s[:rank] > tolerance * s[0]).sum())
    return vh[:keep].to(torch.float32)


def extend(basis: torch.Tensor | None, rows: torch.Tensor, tolerance: float = 1e-6) -> torch.Tensor:
    """An orthonormal basis (rows) of span(basis) + span(rows); at most `in` rows."""
    stacked = rows if basis is None or basis.numel() == 0 else torch.cat([basis, rows])
    if stacked.numel() == 0:
        return stacked.to(torch.float32)
    q, r = torch.linalg.qr(stacked.to(torch.float64).T)  # columns of q span the rows
    diag = r.diagonal().abs()
    keep = diag > tolerance * max(float(diag.max()), 1e-30)
    return q[:, keep].T.contiguous().to(torch.float32)


def penalty(bases: dict[str, torch.Tensor], factors_a: dict[str, torch.Tensor], lam: float) -> torch.Tensor:
    """lam * sum over layers of sum |Q A^T| (Q: the layer's basis rows, A: its adapter's r x in)."""
    total = None
    for path, q in bases.items():
        if q.numel() == 0:
            continue
        if path not in factors_a:
            raise ValueError(f"olora penalty: no adapter A for the layer {path!r} of the basis")
        a = factors_a[path]
        term = (q.to(a.device, a.dtype) @ a.T).abs().sum()
        total = term if total is None else total + term
    return lam * total if total is not None else torch.zeros(())
