"""Site acoustics: exact SNR, hum and noise spectra, reverb, gain and clipping, seeded draws."""

import math
from types import SimpleNamespace

import pytest
import torch

from cl_fed.data.acoustics import (
    add_noise,
    apply_gain,
    apply_site_acoustics,
    broadband_noise,
    machine_hum,
    reverberate,
)

RATE = 16000


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    # small FFTs and sines run up to 100x slower with 2 intra-op threads on a busy 2-core machine
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def speechlike(seconds: float = 1.0, seed: int = 0) -> torch.Tensor:
    """A 200 Hz harmonic tone with a syllable-rate envelope (deterministic)."""
    t = torch.arange(int(seconds * RATE)) / RATE
    tone = sum(torch.sin(2 * math.pi * 200 * k * t) / k for k in range(1, 6))
    return (0.3 * tone * (0.5 + 0.5 * torch.sin(2 * math.pi * 4 * t + seed))).float()


def snr_db(clean: torch.Tensor, noisy: torch.Tensor) -> float:
    clean, noisy = clean.double(), noisy.double()
    return 10 * math.log10(clean.pow(2).mean().item() / (noisy - clean).pow(2).mean().item())


def conditions(**overrides) -> SimpleNamespace:
    values = dict(noise="none", snr_db=(20.0, 20.0), reverb=0.0, rt60=(0.3, 0.3), gain_db=(0.0, 0.0))
    values.update(overrides)
    return SimpleNamespace(**values)


@pytest.mark.parametrize("target", [-5.0, 0.0, 7.5, 20.0, 40.0])
def test_add_noise_hits_the_snr_exactly(target):
    clean = speechlike()
    noisy = add_noise(clean, broadband_noise(clean.numel(), RATE, gen(1)), target)
    assert snr_db(clean, noisy) == pytest.approx(target, abs=0.01)
    hum_noisy = add_noise(clean, machine_hum(clean.numel(), RATE, gen(2)), target)
    assert snr_db(clean, hum_noisy) == pytest.approx(target, abs=0.01)


def test_add_noise_tiles_a_short_noise_and_keeps_silence_silent():
    clean = speechlike(0.5)
    noisy = add_noise(clean, broadband_noise(1000, RATE, gen(3)), 10.0)
    assert noisy.shape == clean.shape
    assert snr_db(clean, noisy) == pytest.approx(10.0, abs=0.01)
    silent = torch.zeros(800)
    assert torch.equal(add_noise(silent, broadband_noise(800, RATE, gen(4)), 10.0), silent)


def test_machine_hum_is_unit_rms_low_frequency_and_seeded():
    hum = machine_hum(2 * RATE, RATE, gen(5))
    assert hum.pow(2).mean().sqrt().item() == pytest.approx(1.0, abs=1e-4)
    spectrum = torch.fft.rfft(hum.double()).abs()
    peak_hz = torch.argmax(spectrum).item() * RATE / hum.numel()
    assert 50.0 <= peak_hz <= 120.0  # the fundamental is always the strongest component
    assert torch.equal(hum, machine_hum(2 * RATE, RATE, gen(5)))
    assert not torch.equal(hum, machine_hum(2 * RATE, RATE, gen(6)))


def band_energy(wave: torch.Tensor, low: float, high: float) -> float:
    spectrum = torch.fft.rfft(wave.double()).abs().pow(2)
    freqs = torch.fft.rfftfreq(wave.numel(), 1 / RATE)
    return spectrum[(freqs >= low) & (freqs < high)].sum().item()


def test_broadband_noise_colour_follows_the_exponent():
    white = broadband_noise(RATE, RATE, gen(7), exponent=0.0)
    brown = broadband_noise(RATE, RATE, gen(7), exponent=2.0)
    assert white.pow(2).mean().sqrt().item() == pytest.approx(1.0, abs=1e-4)
    # white: equal energy per Hz, so 2-4 kHz holds ~8x the energy of 100-350 Hz; brown reverses that
    assert band_energy(white, 2000, 4000) > 4 * band_energy(white, 100, 350)
    assert band_energy(brown, 100, 350) > 4 * band_energy(brown, 2000, 4000)


def test_reverb_keeps_length_and_rms_and_longer_rt60_rings_longer():
    impulse = torch.zeros(RATE)
    impulse[100] = 1.0
    short = reverberate(impulse, RATE, 0.2, gen(8))
    long = reverberate(impulse, RATE, 1.0, gen(8))
    assert short.shape == impulse.shape
    assert short.pow(2).mean().item() == pytest.approx(impulse.pow(2).mean().item(), rel=1e-4)
    late = slice(100 + int(0.3 * RATE), None)  # 300 ms after the impulse
    assert long[late].pow(2).sum() > 10 * short[late].pow(2).sum()
    with pytest.raises(ValueError, match="rt60"):
        reverberate(impulse, RATE, 0.0, gen(8))


def test_apply_gain_in_db():
    wave = speechlike()
    assert torch.allclose(apply_gain(wave, 20 * math.log10(2)), 2 * wave, atol=1e-6)
    assert torch.allclose(apply_gain(wave, -20.0), wave / 10, atol=1e-7)


def test_site_acoustics_without_effects_is_identity():
    wave = speechlike()
    assert torch.equal(apply_site_acoustics(wave, RATE, conditions(), gen(9)), wave)


@pytest.mark.parametrize("noise", ["hum", "broadband", "mixed"])
def test_site_acoustics_noise_at_the_drawn_snr(noise):
    wave = speechlike()
    out = apply_site_acoustics(wave, RATE, conditions(noise=noise, snr_db=(6.0, 6.0)), gen(10))
    assert snr_db(wave, out) == pytest.approx(6.0, abs=0.01)


def test_site_acoustics_is_seeded_and_never_clips():
    wave = speechlike()
    loud = conditions(noise="mixed", snr_db=(0.0, 5.0), reverb=1.0, rt60=(0.2, 0.8), gain_db=(15.0, 20.0))
    first = apply_site_acoustics(wave, RATE, loud, gen(11))
    assert torch.equal(first, apply_site_acoustics(wave, RATE, loud, gen(11)))
    assert not torch.equal(first, apply_site_acoustics(wave, RATE, loud, gen(12)))
    assert first.abs().max().item() == pytest.approx(0.99, abs=1e-6)
    quiet = apply_site_acoustics(wave, RATE, conditions(gain_db=(-6.0, -6.0)), gen(13))
    assert quiet.abs().max().item() < 0.99 and torch.allclose(quiet, apply_gain(wave, -6.0))
