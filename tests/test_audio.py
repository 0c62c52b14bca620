"""Audio I/O: mono mixdown, resampling, header info, and clear errors for bad files."""

import os

import numpy as np
import pytest
import soundfile as sf
import torch

from cl_fed.data.audio import AudioError, audio_info, load_audio


def tone(seconds: float, rate: int, freq: float = 440.0) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    return (0.3 * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def peak_hz(wave: torch.Tensor, rate: int) -> float:
    spectrum = torch.fft.rfft(wave).abs()
    return float(torch.argmax(spectrum)) * rate / wave.numel()


def test_load_flac_16k_mono_matches_written_samples(tmp_path):
    path = tmp_path / "a.flac"
    written = tone(0.5, 16000)
    sf.write(path, written, 16000)
    wave = load_audio(path)
    assert wave.dtype == torch.float32 and wave.dim() == 1 and wave.numel() == 8000
    # FLAC stores 16-bit PCM: agreement to within one quantisation step
    assert torch.allclose(wave, torch.from_numpy(written), atol=1 / 2**15 + 1e-6)


def test_stereo_is_mixed_down_to_the_mean_of_channels(tmp_path):
    path = tmp_path / "stereo.wav"
    left = tone(0.25, 16000)
    sf.write(path, np.stack([left, -0.5 * left], axis=1), 16000, subtype="FLOAT")
    wave = load_audio(path)
    assert wave.shape == (4000,)
    assert torch.allclose(wave, torch.from_numpy(0.25 * left), atol=1e-6)


@pytest.mark.parametrize("rate", [8000, 44100])
def test_other_rates_are_resampled_and_keep_their_pitch(tmp_path, rate):
    path = tmp_path / f"r{rate}.wav"
    sf.write(path, tone(1.0, rate, freq=1000.0), rate)
    wave = load_audio(path, sample_rate=16000)
    assert wave.numel() == 16000
    assert abs(peak_hz(wave, 16000) - 1000.0) <= 2.0


def test_audio_info_reads_duration_rate_and_channels(tmp_path):
    path = tmp_path / "s.flac"
    sf.write(path, np.zeros((22050 * 3 // 2, 2), dtype=np.float32) + 0.1, 22050)
    seconds, rate, channels = audio_info(path)
    assert (rate, channels) == (22050, 2)
    assert seconds == pytest.approx(1.5)


def _good_wav_bytes(tmp_path) -> bytes:
    sf.write(tmp_path / "good.wav", tone(1.0, 16000), 16000)
    return (tmp_path / "good.wav").read_bytes()


def _good_flac_bytes(tmp_path) -> bytes:
    sf.write(tmp_path / "good.flac", tone(1.0, 16000), 16000)
    return (tmp_path / "good.flac").read_bytes()


BAD_FILES = {
    # name: (bytes factory, expected reason, expected words in the message)
    "random.wav": (lambda tmp: np.random.default_rng(0).bytes(3000), "corrupt", "unreadable"),
    "truncated.wav": (lambda tmp: _good_wav_bytes(tmp)[:16000], "corrupt", "truncated"),
    "headerless.wav": (lambda tmp: _good_wav_bytes(tmp)[:30], "corrupt", "unreadable"),
    "truncated.flac": (
        lambda tmp: _good_flac_bytes(tmp)[: len(_good_flac_bytes(tmp)) // 2],
        "corrupt",
        "corrupt",
    ),
    "empty_file.wav": (lambda tmp: b"", "empty", "zero-length"),
}


@pytest.mark.parametrize("name", sorted(BAD_FILES))
def test_bad_files_raise_audio_error_naming_the_file(tmp_path, name):
    make, reason, words = BAD_FILES[name]
    path = tmp_path / name
    path.write_bytes(make(tmp_path))
    for read in (audio_info, load_audio):
        with pytest.raises(AudioError) as caught:
            read(path)
        assert caught.value.reason == reason
        assert str(path) in str(caught.value) and words in str(caught.value)


def test_zero_frame_wav_is_zero_length(tmp_path):
    path = tmp_path / "zero.wav"
    sf.write(path, np.zeros(0, dtype=np.float32), 16000)
    assert os.path.getsize(path) > 0  # a valid header, no samples
    for read in (audio_info, load_audio):
        with pytest.raises(AudioError, match="zero-length") as caught:
            read(path)
        assert caught.value.reason == "empty"


def test_missing_file_is_an_audio_error_and_a_value_error(tmp_path):
    path = tmp_path / "nowhere.flac"
    with pytest.raises(ValueError, match="not found") as caught:
        audio_info(path)
    assert isinstance(caught.value, AudioError) and caught.value.reason == "missing"
    assert str(path) in str(caught.value)
    with pytest.raises(AudioError, match="not found"):
        load_audio(path)
