"""Centralization math: hand-computed deltas, and equality with peft's own merges on small models."""

import pytest
import torch
from torch import nn

from cl_fed.adapters import (
    LoraSpec,
    adapter_state,
    attach_lora,
    base_state,
    load_adapter_state,
    load_base_state,
    reset_adapters,
)
from cl_fed.centralize import (
    MERGE_MODES,
    AdapterRejected,
    average_adapters,
    base_key,
    centralize,
    example_weights,
    factors_delta,
    lora_pairs,
    product_delta,
    state_bytes,
    validate_adapter,
)

# ---- hand-computed rank-1, 2x2 example -----------------------------------------------------------
# A1 = [1 2], B1 = [1 0]^T -> B1 A1 = [[1, 2], [0, 0]]
# A2 = [0 1], B2 = [2 1]^T -> B2 A2 = [[0, 2], [0, 1]]
# p = (0.25, 0.75), scale 2
A1, B1 = torch.tensor([[1.0, 2.0]]), torch.tensor([[1.0], [0.0]])
A2, B2 = torch.tensor([[0.0, 1.0]]), torch.tensor([[2.0], [1.0]])
P = [0.25, 0.75]
SCALE = 2.0
# product: 2 * (0.25 [[1,2],[0,0]] + 0.75 [[0,2],[0,1]]) = 2 * [[0.25, 2], [0, 0.75]]
PRODUCT = torch.tensor([[0.5, 4.0], [0.0, 1.5]], dtype=torch.float64)
# factors: mean A = [0.25, 1.25], mean B = [1.75, 0.75]^T
#          2 * [[1.75*0.25, 1.75*1.25], [0.75*0.25, 0.75*1.25]] = 2 * [[0.4375, 2.1875], [0.1875, 0.9375]]
FACTORS = torch.tensor([[0.875, 4.375], [0.375, 1.875]], dtype=torch.float64)


def hand_adapters():
    return [{"m.lora_A": A1, "m.lora_B": B1}, {"m.lora_A": A2, "m.lora_B": B2}]


def test_product_delta_by_hand():
    delta = product_delta([A1, A2], [B1, B2], P, SCALE)
    assert delta.dtype == torch.float64
    assert torch.equal(delta, PRODUCT)


def test_factors_delta_by_hand():
    assert torch.equal(factors_delta([A1, A2], [B1, B2], P, SCALE), FACTORS)


def test_centralize_by_hand_and_inputs_untouched():
    base = {"m.weight": torch.eye(2), "other.weight": torch.ones(3)}
    adapters = hand_adapters()
    before = {k: v.clone() for k, v in base.items()}
    product = centralize(base, adapters, P, SCALE)
    factors = centralize(base, adapters, P, SCALE, mode="factors")
    assert torch.equal(product["m.weight"], torch.tensor([[1.5, 4.0], [0.0, 2.5]]))
    assert torch.equal(factors["m.weight"], torch.tensor([[1.875, 4.375], [0.375, 2.875]]))
    assert torch.equal(product["other.weight"], base["other.weight"])
    assert all(torch.equal(base[k], before[k]) for k in base)
    assert torch.equal(adapters[0]["m.lora_A"], A1)


def test_centralize_keeps_base_dtype_and_rounds_once():
    base = {"m.weight": torch.randn(2, 2, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)}
    merged = centralize(base, hand_adapters(), P, SCALE)
    assert merged["m.weight"].dtype == torch.bfloat16
    expected = (base["m.weight"].double() + PRODUCT).to(torch.bfloat16)
    assert torch.equal(merged["m.weight"], expected)


def test_factor_average_equals_product_when_A_shared():
    g = torch.Generator().manual_seed(1)
    shared_a = torch.randn(3, 5, generator=g)
    Bs = [torch.randn(4, 3, generator=g) for _ in range(3)]
    weights = [0.2, 0.3, 0.5]
    exact = product_delta([shared_a] * 3, Bs, weights, 0.5)
    assert torch.allclose(factors_delta([shared_a] * 3, Bs, weights, 0.5), exact, atol=1e-12)
    # ... and differs once the A's differ (the cross-client covariance term)
    As = [torch.randn(3, 5, generator=g) for _ in range(3)]
    assert not torch.allclose(
        factors_delta(As, Bs, weights, 0.5), product_delta(As, Bs, weights, 0.5), atol=1e-3
    )


def test_average_adapters_by_hand_and_factors_mode_consistency():
    average = average_adapters(hand_adapters(), P)
    assert list(average) == ["m.lora_A", "m.lora_B"]
    assert torch.equal(average["m.lora_A"], torch.tensor([[0.25, 1.25]]))
    assert torch.equal(average["m.lora_B"], torch.tensor([[1.75], [0.75]]))
    base = {"m.weight": torch.eye(2)}
    merged_average = centralize(base, [average], [1.0], SCALE)
    assert torch.equal(
        merged_average["m.weight"], centralize(base, hand_adapters(), P, SCALE, mode="factors")["m.weight"]
    )


def test_product_allows_different_ranks_factors_does_not():
    A_rank2, B_rank2 = torch.ones(2, 2), torch.ones(2, 2)
    delta = product_delta([A1, A_rank2], [B1, B_rank2], [0.5, 0.5], 1.0)
    assert torch.equal(delta, 0.5 * (B1 @ A1).double() + 0.5 * (B_rank2 @ A_rank2).double())
    with pytest.raises(ValueError, match="rank 2, adapter 0 rank 1"):
        factors_delta([A1, A_rank2], [B1, B_rank2], [0.5, 0.5], 1.0)


def test_centralize_errors():
    base = {"m.weight": torch.eye(2)}
    with pytest.raises(ValueError, match=r"unknown merge mode 'svd'.*'product', 'factors'"):
        centralize(base, hand_adapters(), P, SCALE, mode="svd")
    assert MERGE_MODES == ("product", "factors")
    with pytest.raises(ValueError, match="weights sum to 0.5"):
        centralize(base, hand_adapters(), [0.25, 0.25], SCALE)
    with pytest.raises(ValueError, match="1 weights for 2 adapters"):
        centralize(base, hand_adapters(), [1.0], SCALE)
    with pytest.raises(ValueError, match=r"base state has no 'm.weight'"):
        centralize({"x.weight": torch.eye(2)}, hand_adapters(), P, SCALE)
    with pytest.raises(ValueError, match="update for 'm.weight' is \\(2, 2\\), weight is \\(3, 3\\)"):
        centralize({"m.weight": torch.eye(3)}, hand_adapters(), P, SCALE)
    other = [hand_adapters()[0], {"n.lora_A": A2, "n.lora_B": B2}]
    with pytest.raises(ValueError, match="adapter 1 covers other modules"):
        centralize(base, other, P, SCALE)


def test_lora_pairs_and_base_key():
    pairs = lora_pairs({"b.lora_B": B2, "a.x.lora_A": A1, "a.x.lora_B": B1, "b.lora_A": A2})
    assert list(pairs) == ["a.x", "b"]
    assert pairs["b"][0] is A2 and pairs["b"][1] is B2
    assert base_key("a.x") == "a.x.weight"
    with pytest.raises(ValueError, match="no a.lora_B"):
        lora_pairs({"a.lora_A": A1})
    with pytest.raises(ValueError, match="'a.weight' does not end"):
        lora_pairs({"a.weight": A1})


def test_example_weights():
    assert example_weights([1, 3]) == [0.25, 0.75]
    assert example_weights([1, 3], uniform=True) == [0.5, 0.5]
    assert example_weights([0, 5]) == [0.0, 1.0]
    with pytest.raises(ValueError, match="empty"):
        example_weights([])
    with pytest.raises(ValueError, match="all 2 clients report 0"):
        example_weights([0, 0])
    with pytest.raises(ValueError, match=r"num_examples\[1\] = -2"):
        example_weights([3, -2])


# ---- validate_adapter / state_bytes --------------------------------------------------------------


def good_adapter():
    return {"m.lora_A": torch.full((1, 2), 0.5), "m.lora_B": torch.full((2, 1), 0.5)}  # norms 0.707 each


def test_validate_accepts_good_adapter_with_shape_or_tensor_reference():
    validate_adapter(good_adapter(), good_adapter(), max_norm=1.1)  # total norm 1.0
    validate_adapter(good_adapter(), {k: v.shape for k, v in good_adapter().items()}, max_norm=None)


@pytest.mark.parametrize(
    "change, max_norm, message",
    [
        (lambda s: s.pop("m.lora_B"), None, r"missing 1 keys.*m.lora_B"),
        (lambda s: s.update({"x.lora_A": torch.zeros(1)}), None, r"unexpected keys.*x.lora_A"),
        (
            lambda s: s.update({"m.lora_A": torch.zeros(2, 2)}),
            None,
            r"'m.lora_A' has shape \(2, 2\), expected \(1, 2\)",
        ),
        (lambda s: s["m.lora_B"].__setitem__((0, 0), float("nan")), None, "'m.lora_B' contains NaN or Inf"),
        (lambda s: s["m.lora_A"].__setitem__((0, 1), float("inf")), None, "'m.lora_A' contains NaN or Inf"),
        (
            lambda s: s.update({"m.lora_A": torch.zeros(1, 2, dtype=torch.int64)}),
            None,
            "not a floating-point",
        ),
        (
            lambda s: s.update({"m.lora_A": torch.full((1, 2), 3.0)}),
            2.0,
            r"'m.lora_A' has Frobenius norm 4.24264 > bound 2",
        ),
        (lambda s: None, 0.9, r"total Frobenius norm 1 > bound 0.9"),
    ],
)
def test_validate_rejections(change, max_norm, message):
    state = good_adapter()
    change(state)
    with pytest.raises(AdapterRejected, match=message):
        validate_adapter(state, good_adapter(), max_norm=max_norm)


def test_state_bytes():
    assert (
        state_bytes({"a": torch.zeros(2, 3), "b": torch.zeros(4, dtype=torch.float16)}) == 2 * 3 * 4 + 4 * 2
    )


# ---- equality with peft's own merges -------------------------------------------------------------


class Block(nn.Module):
    def __init__(self, width: int = 8):
        super().__init__()
        self.q_proj = nn.Linear(width, width)
        self.v_proj = nn.Linear(width, width, bias=False)
        self.ff = nn.Linear(width, width)

    def forward(self, x):
        return x + self.ff(torch.relu(self.q_proj(x) + self.v_proj(x)))


class TinyNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList([Block(), Block()])
        self.head = nn.Linear(8, 5)

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return self.head(x)


SPEC = LoraSpec(rank=2, alpha=6.0, dropout=0.0, target_modules=("q_proj", "v_proj"))


def tiny_peft(seed: int = 0):
    torch.manual_seed(seed)
    return attach_lora(TinyNet().eval(), SPEC, seed=seed)


def randomize_adapter(peft_model, adapter_name: str, seed: int) -> None:
    """Trained-looking factors: random A and nonzero B, different per seed."""
    g = torch.Generator().manual_seed(seed)
    state = adapter_state(peft_model, adapter_name)
    new = {k: torch.randn(v.shape, generator=g) * 0.3 for k, v in state.items()}
    load_adapter_state(peft_model, new, adapter_name)


def merged_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_one_adapter_product_equals_factors_equals_peft_merge():
    pm = tiny_peft()
    randomize_adapter(pm, "default", seed=11)
    base, adapter = base_state(pm), adapter_state(pm)
    product = centralize(base, [adapter], [1.0], SPEC.scale)
    factors = centralize(base, [adapter], [1.0], SPEC.scale, mode="factors")
    peft_merged = merged_weights(pm.merge_and_unload())
    assert set(product) == set(peft_merged)
    for key in peft_merged:
        assert torch.allclose(product[key], peft_merged[key], atol=1e-6), key
        assert torch.allclose(factors[key], peft_merged[key], atol=1e-6), key
    assert not torch.allclose(product["layers.0.q_proj.weight"], base["layers.0.q_proj.weight"], atol=1e-3)


def three_adapter_model():
    """A tiny model with three trained-looking adapters of different A's, plus their states."""
    pm = tiny_peft()
    names = ["c0", "c1", "c2"]
    for index, name in enumerate(names):
        pm.add_adapter(name, pm.peft_config["default"])
        randomize_adapter(pm, name, seed=100 + index)
    states = [adapter_state(pm, name) for name in names]
    assert not torch.allclose(states[0]["layers.0.q_proj.lora_A"], states[1]["layers.0.q_proj.lora_A"])
    return pm, names, states


WEIGHTS = [0.5, 0.3, 0.2]


def test_product_equals_peft_cat_combination():
    pm, names, states = three_adapter_model()
    ours = centralize(base_state(pm), states, WEIGHTS, SPEC.scale, mode="product")
    pm.add_weighted_adapter(adapters=names, weights=WEIGHTS, adapter_name="m", combination_type="cat")
    peft_merged = merged_weights(pm.merge_and_unload(adapter_names=["m"]))
    for key in peft_merged:
        assert torch.allclose(ours[key], peft_merged[key], atol=1e-6), key


def test_factors_equals_peft_linear_combination_with_squared_weights():
    pm, names, states = three_adapter_model()
    ours = centralize(base_state(pm), states, WEIGHTS, SPEC.scale, mode="factors")
    exact = centralize(base_state(pm), states, WEIGHTS, SPEC.scale, mode="product")
    squared = [w**2 for w in WEIGHTS]  # peft scales each factor by sqrt(weight)
    pm.add_weighted_adapter(adapters=names, weights=squared, adapter_name="m", combination_type="linear")
    peft_merged = merged_weights(pm.merge_and_unload(adapter_names=["m"]))
    for key in peft_merged:
        assert torch.allclose(ours[key], peft_merged[key], atol=1e-6), key
    # with different A's the factor average is not the exact mean update
    assert not torch.allclose(ours["layers.0.q_proj.weight"], exact["layers.0.q_proj.weight"], atol=1e-4)


def test_merged_model_reproduces_adapter_model_and_reset_restores_base():
    pm = tiny_peft()
    randomize_adapter(pm, "default", seed=7)
    x = torch.randn(4, 8, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        with pm.disable_adapter():
            y_old_base = pm(x)
        y_adapter = pm(x)
    assert not torch.allclose(y_adapter, y_old_base, atol=1e-3)  # the adapter does something
    load_base_state(pm, centralize(base_state(pm), [adapter_state(pm)], [1.0], SPEC.scale))
    reset_adapters(pm, seed=1)
    with torch.no_grad():
        with pm.disable_adapter():
            y_merged_base = pm(x)
        y_fresh_adapter = pm(x)
    assert torch.allclose(y_merged_base, y_adapter, atol=1e-5)
    assert torch.allclose(y_fresh_adapter, y_merged_base, atol=1e-6)
