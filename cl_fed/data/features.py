"""Acoustic features of the embedded model: normalised log-mel filterbanks and SpecAugment.

`LogMel` turns a 16 kHz mono wave into (frames, n_mels) log-mel features with per-utterance,
per-bin mean/variance normalisation (cepstral mean and variance normalisation on the filterbank),
which removes a fixed channel colouring such as a site's microphone. `spec_augment` masks bands of
frequency and time with the normalised mean (0) and is deterministic given a torch.Generator.
"""

from __future__ import annotations

import torch
import torchaudio


class LogMel(torch.nn.Module):
    """Wave (samples,) -> normalised log-mel features (frames, n_mels); frames = 1 + samples // hop."""

    def __init__(self, sample_rate: int = 16000, n_mels: int = 80, win_ms: float = 25, hop_ms: float = 10):
        super().__init__()
        self.sample_rate = sample_rate
        self.n_mels = n_mels
        self.win_length = round(sample_rate * win_ms / 1000)
        self.hop_length = round(sample_rate * hop_ms / 1000)
        self.n_fft = 1 << (self.win_length - 1).bit_length()  # next power of two
        self.mel = torchaudio.transforms.MelSpectrogram(
            sample_rate=sample_rate,
            n_fft=self.n_fft,
            win_length=self.win_length,
            hop_length=self.hop_length,
            n_mels=n_mels,
            power=2.0,
            center=True,
        )

    def num_frames(self, num_samples: int) -> int:
        return 1 + max(num_samples, self.n_fft) // self.hop_length

    @torch.no_grad()
    def log_mel(self, wave: torch.Tensor) -> torch.Tensor:
        """Un-normalised log-mel energies (frames, n_mels)."""
        if wave.dim() != 1:
            raise ValueError(f"LogMel expects a 1-D mono wave, got shape {tuple(wave.shape)}")
        wave = wave.to(torch.float32)
        if wave.numel() < self.n_fft:  # reflect padding needs at least one FFT window of samples
            wave = torch.nn.functional.pad(wave, (0, self.n_fft - wave.numel()))
        return torch.log(self.mel(wave) + 1e-6).transpose(0, 1).contiguous()

    @torch.no_grad()
    def forward(self, wave: torch.Tensor) -> torch.Tensor:
        features = self.log_mel(wave)
        mean = features.mean(dim=0, keepdim=True)
        std = features.std(dim=0, unbiased=False, keepdim=True).clamp_min(1e-5)
        return (features - mean) / std


def spec_augment(
    features: torch.Tensor,
    generator: torch.Generator | None = None,
    freq_masks: int = 2,
    freq_width: int = 15,
    time_masks: int = 2,
    time_width_ratio: float = 0.05,
) -> torch.Tensor:
    """Mask `freq_masks` bands of up to `freq_width` bins and `time_masks` spans of up to
    `time_width_ratio` of the frames in features (frames, n_mels); returns a new tensor.

    torchaudio's masking draws from the global RNG, so with a generator the draws run in a forked
    RNG seeded from it: same generator state -> same masks, and the caller's global RNG is untouched.
    """
    if features.dim() != 2:
        raise ValueError(f"spec_augment expects (frames, n_mels), got shape {tuple(features.shape)}")
    frames, n_mels = features.shape
    spectrogram = features.transpose(0, 1)  # torchaudio wants (freq, time)
    time_width = min(frames, max(1, int(time_width_ratio * frames)))
    freq_width = min(n_mels, freq_width)

    def apply() -> torch.Tensor:
        masked = spectrogram
        for _ in range(freq_masks):
            masked = torchaudio.functional.mask_along_axis(masked, freq_width, 0.0, axis=0)
        for _ in range(time_masks):
            masked = torchaudio.functional.mask_along_axis(masked, time_width, 0.0, axis=1)
        return masked

    if generator is None:
        masked = apply()
    else:
        seed = int(torch.randint(0, 2**62, (1,), generator=generator))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            masked = apply()
    return masked.transpose(0, 1).contiguous()
