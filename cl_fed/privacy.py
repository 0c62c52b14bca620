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
import random
import secrets

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


def noise_std(noise_multiplier: float, clip: float, num_updates: float) -> float:
    """Standard deviation of the noise on the mean of `num_updates` clipped updates: z * C / n
    (n may be the expected count of a Poisson sample, below 1)."""
    if not num_updates > 0:
        raise ValueError(f"noise_std: num_updates={num_updates!r} must be > 0")
    return noise_multiplier * clip / num_updates


SECRET_BYTES = 32  # the server's noise secret: 256 bits from the OS (secrets.token_hex)


def new_secret() -> str:
    """A fresh secret for a run's noise, drawn by the server from the OS at run start."""
    return secrets.token_hex(SECRET_BYTES)


def _seed(purpose: str, round_seed: int, secret: str) -> int:
    if len(secret) < 2 * SECRET_BYTES:
        raise ValueError(
            f"DP {purpose}: the server's secret is missing or short ({len(secret)} hex digits); a noise "
            "anyone can redraw can be subtracted"
        )
    digest = hashlib.sha256(f"cl-fed dp {purpose}|{round_seed}|{secret}".encode()).digest()
    return int.from_bytes(digest[:8], "little") % 2**63


def noise_seed(round_seed: int, secret: str) -> int:
    """The seed of one round's noise: the round's seed (cl_fed.continual.round_seed) hashed with the
    server's secret, so that no site can redraw (and subtract) it from what it receives, while the
    server and a run resumed from its checkpoint (which keeps the secret) draw the same noise."""
    return _seed("noise", round_seed, secret)


def poisson_sample(nodes: list[int], rate: float, round_seed: int, secret: str) -> list[int]:
    """Each node independently with probability `rate` (Poisson sampling, which the RDP accountant
    assumes), drawn from the server's secret: a site cannot tell who else was sampled."""
    rng = random.Random(_seed("sample", round_seed, secret))
    return [node for node in sorted(nodes) if rng.random() < rate]


def noised_mean(
    adapters: list[dict[str, torch.Tensor]],
    std: float,
    seed: int,
    start: dict[str, torch.Tensor] | None = None,
    denominator: float | None = None,
) -> dict[str, torch.Tensor]:
    """The mean of the (clipped) adapters plus N(0, std^2) noise on every coordinate.

    Plain (start and denominator None): the uniform mean over the adapters. With Poisson sampling the
    mean is over the expected number of sites instead (a fixed denominator, so one site's presence
    moves it by at most C / denominator): start + sum_i (adapter_i - start) / denominator, which with
    no adapters at all is start plus noise. The noise is drawn in float64 from a generator seeded
    with `seed`, key by key in sorted order, so a run and its resumed twin add the very same noise;
    the result is float32, keys sorted."""
    if denominator is None and not adapters:
        raise ValueError("noised_mean: no adapters given")
    if denominator is not None and (start is None or not denominator > 0):
        raise ValueError("noised_mean: a fixed denominator needs the round's start and must be > 0")
    generator = torch.Generator().manual_seed(seed)
    out = {}
    for key in sorted(start if denominator is not None else adapters[0]):
        if denominator is None:
            mean = sum(a[key].to(torch.float64) for a in adapters) / len(adapters)
        else:
            begin = start[key].to(torch.float64)
            mean = (
                begin
                + sum((a[key].to(torch.float64) - begin for a in adapters), torch.zeros_like(begin))
                / denominator
            )
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


NOISE_SEED = (
    "the round's seed hashed with a 256-bit secret the server drew from the OS at run start "
    "(secrets.token_hex), kept only in the server's checkpoint (file mode 0600), never sent: no site can "
    "redraw the noise"
)


def privacy_report(
    noise_multiplier: float, clip: float, delta: float, sample_rate: float, steps: int
) -> dict:
    """The results.json "privacy" object after `steps` noised aggregations."""
    sampling = (
        "every site every round (no amplification by sampling)"
        if sample_rate == 1.0
        else f"Poisson sampling: each site independently with probability fraction-train={sample_rate} "
        "each round (drawn from the server's secret), the mean over the expected number of sites; "
        "accounted as such"
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
        "noise_seed": NOISE_SEED,
        "covers": "the adapters and every base the server merges and sends; not the training losses, "
        "example counts or federated-evaluation error counts the sites report",
    }
