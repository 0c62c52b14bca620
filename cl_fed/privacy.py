"""Site-level differential privacy for adapter updates, in the style of DP-FedAvg (McMahan et al.,
ICLR 2018): the math only (no Flower here; the glue is in clients/client_app.py and
server/strategies.py).

Each round, every site's update (its returned LoRA factors minus the adapter it started from, all
factors together as one vector) is clipped to L2 norm C = `dp-clip`, so one site moves the mean of
n updates by at most C / n. The server adds N(0, (z * C / n)^2) to every coordinate of that mean
(z = `dp-noise`), and only the noised mean is ever averaged, pooled, merged or sent out. One round
is then one Gaussian mechanism with noise multiplier z on a site's whole contribution; a run of
R such rounds is accounted with the RDP accountant of Opacus (Mironov 2017; Balle et al. 2020 for
the conversion to (epsilon, delta)).
"""

from __future__ import annotations

import hashlib
import math

import torch

ACCOUNTANT = "opacus.accountants.RDPAccountant"
MECHANISM = "Gaussian (DP-FedAvg: per-site L2 clipping of the adapter update, noise on the mean)"
UNIT = "site: everything one site contributes over the whole run"


def update_norm(adapter: dict[str, torch.Tensor], start: dict[str, torch.Tensor]) -> float:
    """L2 norm of adapter - start over all factors together (float64)."""
    if set(adapter) != set(start):
        differ = sorted(set(adapter) ^ set(start))
        raise ValueError(f"update_norm: the adapter and its start differ in keys, e.g. {differ[:3]}")
    squares = sum(
        float(torch.sum((adapter[k].to(torch.float64) - start[k].to(torch.float64)) ** 2)) for k in start
    )
    return math.sqrt(squares)


def clip_update(
    adapter: dict[str, torch.Tensor], start: dict[str, torch.Tensor], clip: float
) -> dict[str, torch.Tensor]:
    """start + (adapter - start) * min(1, clip / norm): the update scaled down to L2 norm `clip`
    when it is longer, untouched otherwise (computed in float64, returned in the adapter's dtype)."""
    if not clip > 0:
        raise ValueError(f"clip_update: clipping norm {clip!r} must be > 0")
    norm = update_norm(adapter, start)
    if norm <= clip:
        return {k: adapter[k].clone() for k in sorted(adapter)}
    factor = clip / norm
    out = {}
    for k in sorted(adapter):
        begin = start[k].to(torch.float64)
        out[k] = (begin + (adapter[k].to(torch.float64) - begin) * factor).to(adapter[k].dtype)
    return out


def noise_std(noise_multiplier: float, clip: float, num_updates: int) -> float:
    """Standard deviation of the noise on the mean of `num_updates` clipped updates: z * C / n."""
    if num_updates < 1:
        raise ValueError(f"noise_std: num_updates={num_updates!r} must be >= 1")
    return noise_multiplier * clip / num_updates


def noise_seed(round_seed: int, secret: str = "") -> int:
    """The seed of one round's noise, from the run's round seed (cl_fed.continual.round_seed).

    Hashed, so that it shares no stream with the adapter init drawn from the same round seed. A
    noise that anyone can redraw can be subtracted: `secret` (kept by the server only) makes the
    noise unpredictable to whoever knows the run config, and stays reproducible for the server."""
    digest = hashlib.sha256(f"cl-fed dp noise|{round_seed}|{secret}".encode()).digest()
    return int.from_bytes(digest[:8], "little") % 2**63


def noised_mean(adapters: list[dict[str, torch.Tensor]], std: float, seed: int) -> dict[str, torch.Tensor]:
    """The uniform mean of the (clipped) adapters plus N(0, std^2) noise on every coordinate.

    The noise is drawn in float64 from a generator seeded with `seed`, key by key in sorted order,
    so a run and its resumed twin add the very same noise; the result is float32, keys sorted."""
    if not adapters:
        raise ValueError("noised_mean: no adapters given")
    generator = torch.Generator().manual_seed(seed)
    out = {}
    for key in sorted(adapters[0]):
        mean = sum(a[key].to(torch.float64) for a in adapters) / len(adapters)
        noise = torch.randn(mean.shape, generator=generator, dtype=torch.float64) * std
        out[key] = (mean + noise).to(torch.float32)
    return out


def epsilon(noise_multiplier: float, sample_rate: float, steps: int, delta: float) -> float:
    """Epsilon at `delta` after `steps` Gaussian releases with noise multiplier z, each taking a
    site with probability `sample_rate` (Opacus RDP accountant; 1.0 = no amplification by sampling).
    0 steps: nothing was released; z = 0: no privacy (inf)."""
    if not 0 < delta < 1:
        raise ValueError(f"epsilon: delta={delta!r} must be in (0, 1)")
    if not 0 < sample_rate <= 1:
        raise ValueError(f"epsilon: sample_rate={sample_rate!r} must be in (0, 1]")
    if steps == 0:
        return 0.0
    if noise_multiplier <= 0:
        return math.inf
    from opacus.accountants import (
        RDPAccountant,
    )  # imported here: Opacus loads in seconds, only DP runs need it

    accountant = RDPAccountant()
    for _ in range(steps):
        accountant.step(noise_multiplier=noise_multiplier, sample_rate=sample_rate)
    return float(accountant.get_epsilon(delta))


def accountant_version() -> str:
    from importlib.metadata import version

    return f"{ACCOUNTANT} (opacus {version('opacus')})"


def privacy_report(
    noise_multiplier: float, clip: float, delta: float, sample_rate: float, steps: int, noise_seed_source: str
) -> dict:
    """The results.json "privacy" object after `steps` noised aggregations."""
    sampling = (
        "every site every round (no amplification by sampling)"
        if sample_rate == 1.0
        else f"a fixed-size sample of fraction-train={sample_rate} of the sites each round, accounted as "
        "Poisson sampling at that rate (the DP-FedAvg convention)"
    )
    return {
        "mechanism": MECHANISM,
        "unit": UNIT,
        "noise_multiplier": noise_multiplier,
        "clipping_norm": clip,
        "delta": delta,
        "epsilon": epsilon(noise_multiplier, sample_rate, steps, delta),
        "rounds": steps,
        "sample_rate": sample_rate,
        "sampling": sampling,
        "accountant": accountant_version(),
        "noise_seed": noise_seed_source,
        "covers": "the adapters and every base the server merges and sends; not the training losses, "
        "example counts or federated-evaluation error counts the sites report",
    }
