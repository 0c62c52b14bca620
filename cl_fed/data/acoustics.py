"""Factory-site acoustics in torch: machine hum, broadband noise, reverberation, gain.

Every random choice is drawn from the `torch.Generator` passed in, so a site's sound is
reproducible from the utterance seed. Waves are 1-D float32 tensors.
"""

import math

import torch
import torchaudio.functional as AF

NOISE_TYPES = ("none", "hum", "broadband", "mixed")
_PEAK_LIMIT = 0.99


def _uniform(low: float, high: float, generator: torch.Generator) -> float:
    return low + (high - low) * torch.rand((), generator=generator, dtype=torch.float64).item()


def _fft_size(n: int) -> int:
    """Next power of two: FFTs of awkward (e.g. prime) lengths are many times slower."""
    return 1 << max(0, n - 1).bit_length()


def _unit_rms(wave: torch.Tensor) -> torch.Tensor:
    return wave / wave.pow(2).mean().sqrt().clamp_min(1e-12)


def machine_hum(num_samples: int, sample_rate: int, generator: torch.Generator) -> torch.Tensor:
    """Motor/transformer hum at unit RMS: a fundamental drawn in 50..120 Hz, decaying harmonics
    with random phases, and a slow amplitude modulation (5..20 % at 0.2..2 Hz)."""
    t = torch.arange(num_samples, dtype=torch.float64) / sample_rate
    fundamental = _uniform(50.0, 120.0, generator)
    wave = torch.zeros(num_samples, dtype=torch.float64)
    harmonic = 1
    while harmonic <= 12 and harmonic * fundamental < sample_rate / 2:
        amplitude = _uniform(0.5, 1.0, generator) / harmonic
        phase = _uniform(0.0, 2 * math.pi, generator)
        wave += amplitude * torch.sin(2 * math.pi * harmonic * fundamental * t + phase)
        harmonic += 1
    depth, rate = _uniform(0.05, 0.2, generator), _uniform(0.2, 2.0, generator)
    wave *= 1.0 + depth * torch.sin(2 * math.pi * rate * t + _uniform(0, 2 * math.pi, generator))
    return _unit_rms(wave).float()


def broadband_noise(
    num_samples: int, sample_rate: int, generator: torch.Generator, exponent: float | None = None
) -> torch.Tensor:
    """Coloured noise at unit RMS with power spectrum ~ 1/f**exponent (0 white, 1 pink, 2 brown).

    The exponent is drawn in 0..1.5 (white to between pink and brown) unless given.
    """
    if exponent is None:
        exponent = _uniform(0.0, 1.5, generator)
    size = _fft_size(num_samples)
    spectrum = torch.fft.rfft(torch.randn(size, generator=generator))
    freqs = torch.fft.rfftfreq(size, d=1.0 / sample_rate)
    shaping = freqs.clamp_min(20.0).pow(-exponent / 2)  # flat below 20 Hz, so no DC blow-up
    return _unit_rms(torch.fft.irfft(spectrum * shaping, n=size)[:num_samples])


def add_noise(clean: torch.Tensor, noise: torch.Tensor, snr_db: float) -> torch.Tensor:
    """clean + noise scaled so that 10*log10(P_clean / P_noise) equals snr_db exactly.

    The noise is tiled or cut to the length of `clean`. Silent input is returned unchanged.
    """
    if noise.numel() == 0:
        raise ValueError("add_noise: the noise signal is empty")
    if noise.numel() < clean.numel():
        noise = noise.repeat(math.ceil(clean.numel() / noise.numel()))
    noise = noise[: clean.numel()].to(torch.float64)
    clean64 = clean.to(torch.float64)
    clean_power, noise_power = clean64.pow(2).mean(), noise.pow(2).mean()
    if clean_power == 0 or noise_power == 0:
        return clean.clone()
    scale = torch.sqrt(clean_power / (noise_power * 10 ** (snr_db / 10)))
    return (clean64 + scale * noise).to(clean.dtype)


def reverberate(
    wave: torch.Tensor, sample_rate: int, rt60: float, generator: torch.Generator
) -> torch.Tensor:
    """Convolve with a synthetic room impulse response: a direct path plus exponentially decaying
    noise that falls by 60 dB after rt60 seconds. Output has the input's length and RMS."""
    if rt60 <= 0:
        raise ValueError(f"reverberate: rt60 must be > 0 s, got {rt60}")
    length = max(2, int(rt60 * sample_rate))
    t = torch.arange(length, dtype=torch.float64) / sample_rate
    response = torch.randn(length, generator=generator, dtype=torch.float64) * torch.exp(
        -3 * math.log(10) * t / rt60
    )
    response[0] = 1.0 + abs(response[0].item())  # the direct sound is the strongest arrival
    padded = torch.zeros(_fft_size(wave.numel() + length - 1) - length + 1, dtype=torch.float64)
    padded[: wave.numel()] = wave
    wet = AF.fftconvolve(padded, response)[: wave.numel()]  # full length is a power of two: fast FFT
    dry_rms = wave.to(torch.float64).pow(2).mean().sqrt()
    return (wet * dry_rms / wet.pow(2).mean().sqrt().clamp_min(1e-12)).to(wave.dtype)


def apply_gain(wave: torch.Tensor, gain_db: float) -> torch.Tensor:
    return wave * (10 ** (gain_db / 20))


def site_noise(kind: str, num_samples: int, sample_rate: int, generator: torch.Generator) -> torch.Tensor:
    """Unit-RMS noise of one of NOISE_TYPES except "none"; "mixed" is hum plus broadband noise."""
    if kind == "hum":
        return machine_hum(num_samples, sample_rate, generator)
    if kind == "broadband":
        return broadband_noise(num_samples, sample_rate, generator)
    if kind == "mixed":
        hum_share = _uniform(0.3, 0.7, generator)
        hum = machine_hum(num_samples, sample_rate, generator)
        hiss = broadband_noise(num_samples, sample_rate, generator)
        return _unit_rms(math.sqrt(hum_share) * hum + math.sqrt(1 - hum_share) * hiss)
    raise ValueError(f"unknown noise type {kind!r}; choose one of {', '.join(NOISE_TYPES)}")


def apply_site_acoustics(
    wave: torch.Tensor, sample_rate: int, conditions, generator: torch.Generator
) -> torch.Tensor:
    """Noise at an SNR drawn from conditions.snr_db, then reverb with probability conditions.reverb
    (RT60 from conditions.rt60), then a gain from conditions.gain_db; peak-normalised to 0.99 only
    if it would clip. `conditions` is a cl_fed.data.scenario.Conditions (or anything with those fields).
    """
    snr_db = _uniform(*conditions.snr_db, generator)
    rt60 = _uniform(*conditions.rt60, generator)
    gain_db = _uniform(*conditions.gain_db, generator)
    use_reverb = _uniform(0.0, 1.0, generator) < conditions.reverb
    if conditions.noise != "none":
        wave = add_noise(wave, site_noise(conditions.noise, wave.numel(), sample_rate, generator), snr_db)
    if use_reverb:
        wave = reverberate(wave, sample_rate, rt60, generator)
    wave = apply_gain(wave, gain_db)
    peak = wave.abs().max() if wave.numel() else torch.tensor(0.0)
    if peak > _PEAK_LIMIT:
        wave = wave * (_PEAK_LIMIT / peak)
    return wave
