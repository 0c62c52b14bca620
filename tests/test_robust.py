"""Weight caps and robust aggregation (cl_fed/robust.py) against hand-computed values, numpy's median
and Flower's trim_mean."""

import numpy as np
import pytest
import torch
from flwr.serverapp.strategy.fedtrimmedavg import trim_mean

from cl_fed.aggregation import RESIDUAL, aggregate, split
from cl_fed.centralize import product_delta
from cl_fed.robust import capped_weights, robust_aggregate


def test_capped_weights_by_hand():
    # 10^9 claimed examples against 100 and 300: the liar gets the cap, the rest share 0.5 as 1:3
    weights, held = capped_weights([1e9, 100, 300], cap=0.5)
    assert held == [0]
    assert weights == pytest.approx([0.5, 0.125, 0.375])
    # nobody above the cap: plain example weights
    assert capped_weights([1, 1, 2], cap=0.5) == ([0.25, 0.25, 0.5], [])
    # a second site pushed over the cap by the redistribution is held too
    weights, held = capped_weights([100, 60, 1], cap=0.4)
    assert held == [0, 1] and weights == pytest.approx([0.4, 0.4, 0.2])
    # cap * N <= 1: nobody may weigh more than anyone else
    weights, held = capped_weights([5, 1], cap=0.5)
    assert weights == [0.5, 0.5] and held == [0]
    assert capped_weights([7], cap=0.3) == ([1.0], [])
    for bad in (0, -1, 1.5):
        with pytest.raises(ValueError, match="cap"):
            capped_weights([1, 2], cap=bad)


def _adapter(seed: int, scale: float = 1.0) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {
        "layer.lora_A": torch.randn(2, 4, generator=g) * scale,
        "layer.lora_B": torch.randn(3, 2, generator=g) * scale,
    }


def test_median_and_trimmed_mean_match_numpy_and_flower():
    updates = [_adapter(s) for s in range(5)]
    for aggregation, reference in (
        ("median", lambda stack: np.median(stack, axis=0)),
        ("trimmed-mean", lambda stack: trim_mean(stack, 0.2)),
    ):
        got = robust_aggregate("fedit", updates, 1.0, aggregation, trim=0.2)
        for key in updates[0]:
            stack = np.stack([u[key].numpy().astype(np.float64) for u in updates])
            np.testing.assert_allclose(got[key].numpy(), reference(stack), rtol=1e-6)


def test_exact_median_is_the_median_of_the_products_and_ignores_one_huge_site():
    scale = 2.0
    updates = [_adapter(s) for s in range(4)] + [_adapter(9, scale=100.0)]
    got = robust_aggregate("exact", updates, scale, "median")
    factors, residual = split(got)
    model = residual["layer.weight"] + product_delta(
        [factors["layer.lora_A"]], [factors["layer.lora_B"]], [1.0], scale
    )
    products = np.stack(
        [(scale * u["layer.lora_B"].double() @ u["layer.lora_A"].double()).numpy() for u in updates]
    )
    np.testing.assert_allclose(model.numpy(), np.median(products, axis=0), rtol=1e-10, atol=1e-12)
    # each coordinate stays within the honest sites' range; the mean follows the attacker out of it
    honest = torch.from_numpy(products[:4])
    assert bool(
        (model >= honest.min(0).values - 1e-12).all() and (model <= honest.max(0).values + 1e-12).all()
    )
    factors, residual = split(aggregate("exact", updates, [0.2] * 5, scale))
    mean_model = residual["layer.weight"] + product_delta(
        [factors["layer.lora_A"]], [factors["layer.lora_B"]], [1.0], scale
    )
    assert float(mean_model.abs().max()) > 10 * float(honest.abs().max())
    assert set(got) == {"layer.lora_A", "layer.lora_B", RESIDUAL + "layer.weight"}


def test_weights_rule_rounds_integer_buffers_and_bad_trim_is_an_error():
    states = [{"w": torch.tensor([1.0, 2.0]), "steps": torch.tensor(n)} for n in (1, 2, 10)]
    got = robust_aggregate("weights", states, 1.0, "median")
    assert got["w"].tolist() == [1.0, 2.0] and got["steps"].item() == 2 and got["steps"].dtype == torch.int64
    with pytest.raises(ValueError, match="trim-fraction"):
        robust_aggregate("fedit", [_adapter(0)], 1.0, "trimmed-mean", trim=0.6)
    with pytest.raises(ValueError, match="median or trimmed-mean"):
        robust_aggregate("fedit", [_adapter(0)], 1.0, "mean")
