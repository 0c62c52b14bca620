"""LogMel features and SpecAugment: frame counts, tone placement, normalisation, determinism."""

import math

import numpy as np
import pytest
import soundfile as sf
import torch

from cl_fed.data.audio import load_audio
from cl_fed.data.features import LogMel, spec_augment

SR = 16000


def tone(freq: float, seconds: float = 1.0, amplitude: float = 0.5) -> torch.Tensor:
    t = torch.arange(int(SR * seconds)) / SR
    return amplitude * torch.sin(2 * math.pi * freq * t)


def htk_mel(f: float) -> float:
    return 2595.0 * math.log10(1.0 + f / 700.0)


def expected_bin(freq: float, n_mels: int = 80) -> int:
    """Mel bin whose triangular filter is centred nearest `freq` (HTK scale, 0..Nyquist)."""
    points = np.linspace(htk_mel(0.0), htk_mel(SR / 2), n_mels + 2)
    centres = 700.0 * (10 ** (points[1:-1] / 2595.0) - 1.0)
    return int(np.argmin(np.abs(centres - freq)))


def test_round_trip_through_wav_file_gives_expected_frames(tmp_path):
    wave = 0.1 * torch.randn(SR * 2 + 123, generator=torch.Generator().manual_seed(0))
    path = tmp_path / "noise.wav"
    sf.write(path, wave.numpy(), SR, subtype="PCM_16")
    loaded = load_audio(path, sample_rate=SR)
    features = LogMel()(loaded)
    assert features.shape == (1 + loaded.numel() // 160, 80)
    assert features.shape[0] == LogMel().num_frames(loaded.numel())
    assert torch.isfinite(features).all()


@pytest.mark.parametrize("freq", [300.0, 1000.0, 3000.0])
def test_pure_tone_peaks_in_the_right_mel_bin(freq):
    log_mel = LogMel().log_mel(tone(freq))
    peak = int(log_mel[5:-5].mean(dim=0).argmax())  # skip edge frames (reflect padding)
    assert abs(peak - expected_bin(freq)) <= 1


def test_features_are_normalised_per_bin():
    wave = tone(700.0) + 0.05 * torch.randn(SR, generator=torch.Generator().manual_seed(1))
    features = LogMel()(wave)
    assert torch.allclose(features.mean(dim=0), torch.zeros(80), atol=1e-4)
    assert torch.allclose(features.std(dim=0, unbiased=False), torch.ones(80), atol=1e-3)


def test_channel_gain_is_removed_by_normalisation():
    wave = tone(440.0) + 0.05 * torch.randn(SR, generator=torch.Generator().manual_seed(2))
    assert torch.allclose(LogMel()(wave), LogMel()(8.0 * wave), atol=1e-3)


def test_short_and_silent_waves_give_finite_features():
    assert torch.isfinite(LogMel()(torch.zeros(100))).all()
    assert LogMel()(torch.zeros(100)).shape == (LogMel().num_frames(100), 80)


def test_non_mono_wave_is_rejected():
    with pytest.raises(ValueError, match="1-D mono"):
        LogMel()(torch.zeros(2, SR))


def test_spec_augment_is_deterministic_given_the_generator():
    features = torch.randn(300, 80, generator=torch.Generator().manual_seed(0)) + 5.0
    before = features.clone()
    global_state = torch.random.get_rng_state()
    a = spec_augment(features, torch.Generator().manual_seed(7))
    b = spec_augment(features, torch.Generator().manual_seed(7))
    c = spec_augment(features, torch.Generator().manual_seed(8))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert torch.equal(features, before)  # input untouched
    assert torch.equal(torch.random.get_rng_state(), global_state)  # caller's RNG untouched


def test_spec_augment_masks_whole_bands_with_zero():
    features = torch.ones(400, 80)
    masked = spec_augment(
        features,
        torch.Generator().manual_seed(3),
        freq_masks=2,
        freq_width=15,
        time_masks=2,
        time_width_ratio=0.05,
    )
    zero = masked == 0
    assert zero.any()
    masked_bins = zero.all(dim=0)  # a frequency mask zeroes a bin in every frame
    masked_frames = zero.all(dim=1)
    assert bool((zero == (masked_bins[None, :] | masked_frames[:, None])).all())
    assert int(masked_bins.sum()) <= 2 * 15
    assert int(masked_frames.sum()) <= 2 * int(0.05 * 400)
