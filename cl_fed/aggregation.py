"""What a round's replies aggregate to: one pure function per rule (no Flower, no peft).

Adapters are dicts ``{"<path>.lora_A": A (rank x in), "<path>.lora_B": B (out x rank)}`` with
weights p_i summing to 1 and LoRA scale s = alpha / rank. An aggregate is a flat tensor dict, what
a Flower strategy's `aggregate_train` returns. The run-config key `lora-aggregation` picks the rule
of LoRA rounds (cl_fed.plan.rule_for):

- ``exact`` (default): the factor means (A_bar, B_bar) plus, per adapted layer, the residual
  ``residual/<path>.weight`` = s * (sum_i p_i B_i A_i - B_bar A_bar) (float64). Sites fold the
  residual into the frozen weights they train on and continue from (A_bar, B_bar), so the model
  they continue from is W + residual + s B_bar A_bar = W + s sum_i p_i B_i A_i: exactly the
  example-weighted mean of the sites' models, at every round. The residual belongs to the stage's
  update: a merge pools it with the adapter (centralize-every = K averages K such updates).
- ``fedex`` (FedEx-LoRA, Singhal et al., ACL 2025): the same aggregate, but the residual becomes
  part of the frozen weights for good, as the paper folds it into the pretrained weights: at the
  stage's merge it goes into the base at once and only s B_bar A_bar joins the pool. With merges
  every round or every stage (a pool of one) fedex and exact are the same run; with
  centralize-every = K they differ in how much of each stage the pool's averaging dilutes.
- ``fedit`` (also merge=factors): the factor means only (FedIT; Flower's flowertune-llm example),
  which differs from the mean update by a cross-site covariance term.
- ``ffa`` (FFA-LoRA, Sun et al., ICLR 2024): A stays frozen at the fresh adapter's init, drawn from
  the round's seed and so the same at every site; sites train and send only B, and the mean of the
  B_i is exact because sum_i p_i B_i A = B_bar A. Half the traffic of the others both ways
  (`sent_factors`), no residual.
- ``fedsa`` (FedSA-LoRA, Guo et al., ICLR 2025): A is shared, B is personal. Sites send A only and
  get back the mean A; each keeps its own B, its own base and its own merges (`personal`), so every
  site ends with a model of its own, evaluated at the site. Half the traffic both ways; the B_i,
  which carry most of what is site-specific, never leave the sites.
- ``weights`` (full fine-tuning): the example-weighted mean of whole state dicts.

With one site every rule is the identity (the exact residual is exactly zero).
"""

from __future__ import annotations

import torch

from cl_fed.centralize import _check_weights, average_adapters, base_key, lora_pairs, product_delta

RULES = ("exact", "fedex", "fedit", "ffa", "fedsa", "weights")
RESIDUAL_RULES = ("exact", "fedex")  # the rules whose aggregate carries residuals
FROZEN_A_RULES = ("ffa",)  # the rules that train and send B only
SHARED_A_RULES = ("fedsa",)  # the rules that send A only and keep B (and the model) at the site
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


def ffa(adapters: list[dict], weights: list[float], scale: float) -> dict[str, torch.Tensor]:
    """FFA-LoRA: every site's A is the shared frozen one, so the mean of the B_i is the exact mean
    update; raises if the sites' A differ (a site that trained A, or another seed)."""
    _check_weights(weights, len(adapters), "ffa")
    first = adapters[0]
    for index, adapter in enumerate(adapters[1:], start=1):
        for key, tensor in first.items():
            if key.endswith(".lora_A") and not torch.equal(adapter[key], tensor):
                raise ValueError(
                    f"ffa: adapter {index} has another {key} than adapter 0; FFA-LoRA needs the "
                    "frozen A every site was given"
                )
    out = average_adapters(adapters, weights)
    out.update({k: v.clone() for k, v in first.items() if k.endswith(".lora_A")})  # bit for bit
    return out


def fedsa(adapters: list[dict], weights: list[float], scale: float) -> dict[str, torch.Tensor]:
    """FedSA-LoRA: the weighted mean of the sites' A factors, which is all they send; raises on a B."""
    _check_weights(weights, len(adapters), "fedsa")
    for index, adapter in enumerate(adapters):
        sent_b = sorted(k for k in adapter if not k.endswith(".lora_A"))
        if sent_b:
            raise ValueError(f"fedsa: adapter {index} sent {sent_b[0]}; B stays at the site")
    return average_adapters(adapters, weights)


def personal(shared: dict[str, torch.Tensor], own: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A fedsa site's adapter after a round: the shared mean A with its own B."""
    missing = sorted(k for k in own if k.endswith(".lora_A") and k not in shared)
    if missing:
        raise ValueError(f"fedsa: the shared A lacks {missing[0]}")
    return {**own, **{k: v for k, v in shared.items() if k.endswith(".lora_A")}}


def sent_factors(rule: str, adapter: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The part of an adapter that travels (site to server and back): B only for ffa, whose A the
    other side draws itself from the seed; A only for fedsa, whose B stays at the site; the whole
    adapter otherwise."""
    if rule in FROZEN_A_RULES:
        return {k: v for k, v in adapter.items() if not k.endswith(".lora_A")}
    if rule in SHARED_A_RULES:
        return {k: v for k, v in adapter.items() if k.endswith(".lora_A")}
    return dict(adapter)


def with_frozen_factors(rule: str, sent: dict[str, torch.Tensor], start: dict[str, torch.Tensor]) -> dict:
    """An adapter whose A a site did not send (ffa), completed with the round's frozen A from
    `start`; raises if it sent an A (FFA-LoRA never trains A) or `start` lacks one."""
    if rule not in FROZEN_A_RULES or not sent:  # nothing sent (a `local` site): nothing to complete
        return dict(sent)
    sent_a = sorted(k for k in sent if k.endswith(".lora_A"))
    if sent_a:
        raise ValueError(f"lora-aggregation={rule}: A is frozen and never sent, got {sent_a[0]}")
    frozen = {k: v for k, v in start.items() if k.endswith(".lora_A")}
    missing = sorted(k[: -len(".lora_B")] + ".lora_A" for k in sent if k.endswith(".lora_B"))
    missing = [k for k in missing if k not in frozen]
    if missing:
        raise ValueError(f"lora-aggregation={rule}: no frozen A for {missing[0]}")
    return {**frozen, **sent}


def mean_weights(states: list[dict], weights: list[float], scale: float = 1.0) -> dict[str, torch.Tensor]:
    """FedAvg of whole models; integer buffers (BatchNorm's step counters) are rounded back."""
    _check_weights(weights, len(states), "mean_weights")
    average = {}
    for key, like in states[0].items():
        mean = sum(w * s[key].to(torch.float64) for w, s in zip(weights, states))
        average[key] = (mean if like.is_floating_point() else mean.round()).to(like.dtype)
    return average


AGGREGATE = {
    "exact": exact,
    "fedex": exact,
    "fedit": fedit,
    "ffa": ffa,
    "fedsa": fedsa,
    "weights": mean_weights,
}


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
    return with_zero_residual(adapter, weights) if rule in RESIDUAL_RULES else dict(adapter)


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
