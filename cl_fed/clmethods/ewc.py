"""Online EWC (Kirkpatrick et al., 2017; Schwarz et al., 2018), federated.

At the end of a stage each site estimates the diagonal Fisher of its model on that stage's data
(`diagonal_fisher`; only the statistic is kept, never audio), the server averages the sites' estimates
by examples and adds them to the run's running Fisher (`accumulate`: F <- decay * F + F_stage), and
every later round adds `penalty` = lambda/2 * sum F (theta - theta*)^2, theta* = the model the site
started the stage from. With LoRA, theta - theta* of an adapted layer is the merged weight's change
(the weights trained on minus theta*, plus s * B A), so the penalty acts on what the adapter changes.
"""

from __future__ import annotations

import random

import torch

from cl_fed.data.utterance import Utterance


def penalty(deltas: dict[str, torch.Tensor], fisher: dict[str, torch.Tensor], lam: float) -> torch.Tensor:
    """lam/2 * sum_k sum F_k * delta_k^2 over the keys of `fisher` (each delta_k: theta_k - theta*_k)."""
    missing = sorted(set(fisher) - set(deltas))
    if missing:
        raise ValueError(f"ewc penalty: no parameter change for Fisher keys {missing[:3]}")
    total = None
    for key, f in fisher.items():
        d = deltas[key]
        term = (f.to(d.device, d.dtype) * d.pow(2)).sum()
        total = term if total is None else total + term
    if total is None:
        return torch.zeros(())
    return 0.5 * lam * total


def accumulate(
    previous: dict[str, torch.Tensor] | None,
    site_fishers: list[dict[str, torch.Tensor]],
    examples: list[int],
    decay: float = 1.0,
) -> dict[str, torch.Tensor]:
    """decay * previous + the example-weighted mean of the sites' Fisher estimates (float32)."""
    if not site_fishers:
        raise ValueError("ewc accumulate: no site Fisher to add")
    if len(site_fishers) != len(examples) or min(examples) <= 0:
        raise ValueError(f"ewc accumulate: one positive example count per site, got {examples}")
    keys = set(site_fishers[0])
    for f in site_fishers[1:]:
        if set(f) != keys:
            raise ValueError(f"ewc accumulate: the sites' Fisher keys differ: {sorted(set(f) ^ keys)[:3]}")
    if previous is not None and set(previous) != keys:
        raise ValueError(
            f"ewc accumulate: the running Fisher's keys differ: {sorted(set(previous) ^ keys)[:3]}"
        )
    total = sum(examples)
    out = {}
    for key in sorted(keys):
        mean = sum(f[key].to(torch.float64) * (n / total) for f, n in zip(site_fishers, examples))
        if previous is not None:
            mean = mean + decay * previous[key].to(torch.float64)
        out[key] = mean.to(torch.float32)
    return out


def fisher_sample(rows: list[Utterance], size: int, seed: int) -> list[Utterance]:
    """The `size` rows (all if fewer) a Fisher is estimated on, drawn with `seed`, in the rows' order."""
    if size >= len(rows):
        return list(rows)
    chosen = set(random.Random(seed).sample(range(len(rows)), size))
    return [u for i, u in enumerate(rows) if i in chosen]


def diagonal_fisher(
    model: torch.nn.Module,
    params: dict[str, torch.nn.Parameter],
    loss_of,
    utterances: list[Utterance],
) -> dict[str, torch.Tensor]:
    """The empirical diagonal Fisher: mean over utterances of (d loss(u) / d theta)^2, one utterance per
    backward pass, for the tensors in `params` ({key: parameter of `model`}); `loss_of(u)` is the
    utterance's loss (the model in eval mode: no dropout). Returns float32 CPU tensors."""
    if not utterances:
        raise ValueError("diagonal_fisher needs at least one utterance")
    was_training = model.training
    flags = {id(p): p.requires_grad for p in model.parameters()}
    for p in model.parameters():
        p.requires_grad_(False)
    for p in params.values():
        p.requires_grad_(True)
    sums = {k: torch.zeros_like(p, dtype=torch.float32, device="cpu") for k, p in params.items()}
    model.eval()
    try:
        for u in utterances:
            model.zero_grad(set_to_none=True)
            loss = loss_of(u)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"diagonal_fisher: non-finite loss on utterance {u.id!r}")
            loss.backward()
            for k, p in params.items():
                if p.grad is not None:
                    sums[k] += p.grad.detach().to("cpu", torch.float32).pow(2)
    finally:
        model.zero_grad(set_to_none=True)
        for p in model.parameters():
            p.requires_grad_(flags[id(p)])
        model.train(was_training)
    return {k: v / len(utterances) for k, v in sums.items()}
