"""What a round's replies aggregate to: one pure function per rule (no Flower, no peft).

Adapters are dicts ``{"<path>.lora_A": A (rank x in), "<path>.lora_B": B (out x rank)}`` with
weights p_i summing to 1 and LoRA scale s = alpha / rank. An aggregate is a flat tensor dict, what
a Flower strategy's `aggregate_train` returns:

- ``exact`` (merge=product): the factor means (A_bar, B_bar) plus, per adapted layer, the residual
  ``residual/<path>.weight`` = s * (sum_i p_i B_i A_i - B_bar A_bar) (float64). Sites fold the
  residual into the frozen weights they train on (FedEx-LoRA) and continue from (A_bar, B_bar),
  so the model they continue from is W + residual + s B_bar A_bar = W + s sum_i p_i B_i A_i:
  exactly the example-weighted mean of the sites' models, at every round.
- ``fedit`` (merge=factors): the factor means only (FedIT; Flower's flowertune-llm example), which
  differs from the mean update by a cross-site covariance term.
- ``weights`` (full fine-tuning): the example-weighted mean of whole state dicts.

With one site every rule is the identity (the exact residual is exactly zero).
"""

from __future__ import annotations

import torch

from cl_fed.centralize import _check_weights, average_adapters, base_key, lora_pairs, product_delta

RULES = ("exact", "fedit", "weights")
RESIDUAL = "residual/"  # key prefix of the exact rule's residuals: "residual/<base weight key>"


def fedit(adapters: list[dict], weights: list[float], scale: float) -> dict[str, torch.Tensor]:
    return average_adapters(adapters, weights)


def exact(adapters: list[dict], weights: list[float], scale: float) -> dict[str, torch.Tensor]:
    mean = average_adapters(adapters, weights)
    pairs = [lora_pairs(a) for a in adapters]
    out = dict(mean)
    for path, (mean_a, mean_b) in lora_pairs(mean).items():
        exact_update = product_delta([p[path][0] for p in pairs], [p[path][1] for p in pairs], weights, scale)
        factored = product_delta([mean_a], [mean_b], [1.0], scale)
        out[RESIDUAL + base_key(path)] = exact_update.sub_(factored)
    return out


def mean_weights(states: list[dict], weights: list[float], scale: float = 1.0) -> dict[str, torch.Tensor]:
    """FedAvg of whole models; integer buffers (BatchNorm's step counters) are rounded back."""
    _check_weights(weights, len(states), "mean_weights")
    average = {}
    for key, like in states[0].items():
        mean = sum(w * s[key].to(torch.float64) for w, s in zip(weights, states))
        average[key] = (mean if like.is_floating_point() else mean.round()).to(like.dtype)
    return average


AGGREGATE = {"exact": exact, "fedit": fedit, "weights": mean_weights}


def aggregate(rule: str, updates: list[dict], weights: list[float], scale: float) -> dict[str, torch.Tensor]:
    if rule not in AGGREGATE:
        raise ValueError(f"unknown aggregation rule {rule!r}; choose one of {', '.join(RULES)}")
    return AGGREGATE[rule](updates, weights, scale)


def split(aggregated: dict[str, torch.Tensor]) -> tuple[dict, dict]:
    """(adapter factors, {base weight key: residual}) of an aggregate."""
    factors = {k: v for k, v in aggregated.items() if not k.startswith(RESIDUAL)}
    residual = {k[len(RESIDUAL) :]: v for k, v in aggregated.items() if k.startswith(RESIDUAL)}
    return factors, residual


def with_zero_residual(adapter: dict[str, torch.Tensor], weights: dict[str, torch.Tensor]) -> dict:
    """A round's starting point in the exact rule's key space (what a Flower optimiser measures the
    aggregate against): the adapter and a zero residual per adapted layer."""
    out = dict(adapter)
    for path in lora_pairs(adapter):
        key = base_key(path)
        out[RESIDUAL + key] = torch.zeros(weights[key].shape, dtype=torch.float64)
    return out


def start_arrays(rule: str, adapter: dict[str, torch.Tensor], weights: dict[str, torch.Tensor]) -> dict:
    """A round's starting point in the key space of `rule`'s aggregate (what a Flower optimiser
    measures the aggregate against)."""
    return with_zero_residual(adapter, weights) if rule == "exact" else dict(adapter)


def fold(weights: dict[str, torch.Tensor], residual: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Weights with each residual added (in float64, rounded to the weight's dtype once). Unchanged
    tensors are shared, not copied; a zero residual leaves the weight bit for bit as it was."""
    out = dict(weights)
    for key, update in residual.items():
        if key not in weights:
            raise ValueError(f"residual for {key!r}, which the weights do not have")
        if tuple(update.shape) != tuple(weights[key].shape):
            raise ValueError(
                f"residual for {key!r} has shape {tuple(update.shape)}, weight {tuple(weights[key].shape)}"
            )
        out[key] = (weights[key].to(torch.float64) + update.to(torch.float64)).to(weights[key].dtype)
    return out
