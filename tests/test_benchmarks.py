"""Smoke tests of the server-side benchmarks at their smallest settings: they run the real code
paths, print their tables, and the figures they compute are sane. No timing is asserted."""

import math
import re

import pytest
from torch import nn

from benchmarks import bytes_per_round, centralize_speed
from cl_fed.models.tiny import LORA_TARGETS, build_tiny

NUMBER = r"[-+0-9.e]+"


def test_centralize_speed_prints_rows_with_finite_ratios(capsys):
    rows = centralize_speed.main(["--models", "tiny", "--clients", "2", "--repeats", "1"])
    out = capsys.readouterr().out
    printed = re.findall(
        rf"^tiny-fastconformer-ctc\s+(product|factors)\s+2\s+({NUMBER})\s+({NUMBER})\s+"
        rf"({NUMBER})\s+({NUMBER})\s+(memory|compute)\s+({NUMBER})$",
        out,
        re.MULTILINE,
    )
    assert [row[0] for row in printed] == ["product", "factors"], out
    for _, seconds, memory, compute, ratio, _bound, per_client in printed:
        values = [float(v) for v in (seconds, memory, compute, ratio, per_client)]
        assert all(math.isfinite(v) and v > 0 for v in values), printed
        assert float(per_client) <= float(seconds)  # 2 clients: half the merge's time
    assert "within 3x of the floor, linear in clients" in out
    assert [(r["mode"], r["clients"]) for r in rows] == [("product", 2), ("factors", 2)]


def test_bytes_per_round_counts_the_lora_factors_and_the_operations_sent(capsys):
    sites = 3
    ratios = bytes_per_round.main(["--models", "tiny", "--sites", str(sites)])
    out = capsys.readouterr().out
    # counted independently here: LoRA up = rank x (in + out) fp32 numbers per targeted Linear (so is
    # the merge's s * B_bar, A_bar); the round's residual = k x (in + out) for its rank k; the
    # changed dense layers = that Linear's (out x in) fp32 weight; fedavg = the state dict
    speech = build_tiny(seed=0)
    model, rank = speech.model, speech.lora_rank
    targeted = [
        m
        for name, m in model.named_modules()
        if isinstance(m, nn.Linear) and name.rsplit(".", 1)[-1] in LORA_TARGETS
    ]
    factors = sum(4 * rank * (m.in_features + m.out_features) for m in targeted)
    layers = sum(4 * m.in_features * m.out_features for m in targeted)
    everything = sum(v.numel() * v.element_size() for v in model.state_dict().values())
    found = re.search(
        rf"the residual: rank ([0-9]+) on each of the {len(targeted)} adapted layers .*?, 0 dense;", out
    )
    assert found, out
    k = int(found.group(1))
    assert (sites - 1) * rank <= k <= (sites + 1) * rank  # the sites' spans (and the mean factors' rounding)
    residual = sum(4 * k * (m.in_features + m.out_features) for m in targeted)
    assert f"the merge: s * B_bar and A_bar, rank {rank}:" in out

    def row(label: str) -> tuple[int, int]:
        found = re.search(rf"{label} .*? up\s+([0-9,]+) B .*? down\s+([0-9,]+) B", out)
        assert found, out
        return tuple(int(g.replace(",", "")) for g in found.groups())

    assert row("fedavg, full weights") == (everything, everything)  # the tiny model freezes no parameter
    # the last round's residual and the merged factors; no adapter: the round starts a fresh one
    assert row("round after a merge") == (factors, residual + factors)
    assert row("later round of a stage") == (factors, factors + residual)  # the adapter + the residual
    assert residual < layers  # the factors are smaller than the dense layers they change
    close_up, close_down = row("later round, sites' factors within")
    # close sites: residuals below the weights' precision are not sent, the rest at most densely
    assert close_up == factors and factors <= close_down <= factors + layers
    assert "target: >= 20x smaller" in out
    printed = re.search(
        rf"ratio full / LoRA: up ({NUMBER})x, down after a merge ({NUMBER})x, "
        rf"down over a stage ({NUMBER})x, total over a stage ({NUMBER})x",
        out,
    )
    assert printed, out
    values = [float(v) for v in printed.groups()]
    assert all(math.isfinite(v) and v > 1 for v in values), values  # LoRA is smaller in every case
    assert values[:3] == [round(r, 1) for r in ratios["tiny"]]
    assert ratios["tiny"][1] == pytest.approx(everything / (residual + factors))
