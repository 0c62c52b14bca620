"""Limits on what one site can do to an aggregate (pure math, no Flower): a cap on a site's weight,
and robust statistics of the sites' updates instead of their mean.

- `capped_weights`: example weights p_i = n_i / sum n, no site above `cap` (the excess is shared
  among the others in proportion to their examples), so a site claiming 10^9 examples gets `cap`.
- `robust_aggregate`: `aggregation=median|trimmed-mean` in a rule's key space
  (cl_fed.aggregation). Flower's FedMedian and FedTrimmedAvg take the coordinate-wise median (or
  trimmed mean, Flower's `trim_mean`) of each array they are given; given LoRA factors, that is the
  inexact FedIT average again. So here the statistic is taken over what each site's update does to
  the model: for `exact`, over the sites' products s * B_i A_i of every adapted layer (returned as
  the factor means plus the residual that makes W + residual + s B_bar A_bar equal W plus the robust
  update); for `fedit`, over the factors; for `weights` (fedavg), over the whole weights, as FedMedian.
  Like Flower's, these statistics are unweighted (every site counts once). tests/test_robust.py
  checks them against numpy's median and Flower's trim_mean.
"""

from __future__ import annotations

import math

import torch

from cl_fed.centralize import average_adapters, base_key, lora_pairs, product_delta


def capped_weights(num_examples: list[float], cap: float) -> tuple[list[float], list[int]]:
    """(weights summing to 1, indices of the sites held at `cap`). With cap * N <= 1 no site can be
    above another: uniform weights. cap >= 1 leaves the example weights as they are."""
    if not num_examples:
        raise ValueError("capped_weights: no sites given")
    if not 0 < cap <= 1:
        raise ValueError(f"capped_weights: cap={cap!r} must be in (0, 1]")
    total = float(sum(num_examples))
    if total <= 0:
        raise ValueError(f"capped_weights: all {len(num_examples)} sites report 0 examples")
    n = len(num_examples)
    if cap * n <= 1 + 1e-12:
        uniform = 1.0 / n
        return [uniform] * n, [i for i, c in enumerate(num_examples) if c / total > uniform + 1e-12]
    held: set[int] = set()
    while True:  # water-filling: fix the sites above the cap, share the rest by examples
        free = [i for i in range(n) if i not in held]
        mass = 1.0 - cap * len(held)
        free_total = float(sum(num_examples[i] for i in free))
        weights = [
            cap if i in held else (mass * num_examples[i] / free_total if free_total else mass / len(free))
            for i in range(n)
        ]
        over = [i for i in free if weights[i] > cap * (1 + 1e-12)]
        if not over:
            return weights, sorted(held)
        held.update(over)


def _stack_stat(tensors: list[torch.Tensor], aggregation: str, trim: float) -> torch.Tensor:
    """Coordinate-wise statistic over the sites (float64): numpy's median (the mean of the two middle
    values for an even count), or the mean after cutting int(trim * N) values at each end."""
    stack = torch.stack([t.to(torch.float64) for t in tensors])
    if aggregation == "median":
        return stack.quantile(0.5, dim=0) if stack.numel() else stack.sum(0)
    cut = int(trim * len(tensors))
    if 2 * cut >= len(tensors):
        raise ValueError(f"trim-fraction={trim} cuts all {len(tensors)} updates")
    ordered = stack.sort(dim=0).values
    return ordered[cut : len(tensors) - cut].mean(dim=0)


def robust_aggregate(
    rule: str, updates: list[dict], scale: float, aggregation: str, trim: float = 0.2
) -> dict[str, torch.Tensor]:
    """The robust aggregate of `updates` in the key space of `rule` (see the module docstring)."""
    if aggregation not in ("median", "trimmed-mean"):
        raise ValueError(f"robust_aggregate: aggregation={aggregation!r}; choose median or trimmed-mean")
    if not 0 <= trim < 0.5 or not math.isfinite(trim):
        raise ValueError(f"trim-fraction={trim!r} must be in [0, 0.5)")
    if not updates:
        raise ValueError("robust_aggregate: no updates given")
    uniform = [1.0 / len(updates)] * len(updates)
    if rule == "weights":
        out = {}
        for key, like in updates[0].items():
            value = _stack_stat([u[key] for u in updates], aggregation, trim)
            out[key] = (value if like.is_floating_point() else value.round()).to(like.dtype)
        return out
    if rule == "fedit":
        return {
            k: _stack_stat([u[k] for u in updates], aggregation, trim).to(torch.float32)
            for k in sorted(updates[0])
        }
    if rule not in ("exact", "fedex"):  # ffa: refused by the config (a median of B is not of B A)
        raise ValueError(f"robust_aggregate: unknown rule {rule!r}")
    from cl_fed.aggregation import RESIDUAL  # the exact rule's key space

    mean = average_adapters(updates, uniform)
    pairs = [lora_pairs(u) for u in updates]
    out = dict(mean)
    for path, (mean_a, mean_b) in lora_pairs(mean).items():
        products = [product_delta([p[path][0]], [p[path][1]], [1.0], scale) for p in pairs]
        robust = _stack_stat(products, aggregation, trim)
        out[RESIDUAL + base_key(path)] = robust.sub_(product_delta([mean_a], [mean_b], [1.0], scale))
    return out
