"""Audio file I/O: read any soundfile-supported file as a mono float32 tensor, and a cheap header check.

`torchaudio.load` needs torchcodec, which cl-fed does not depend on, so all reading goes through
soundfile (libsndfile). `audio_info` is what manifest loading uses to vet thousands of files quickly:
it reads headers only, plus one short read at the end of the file, which is enough to catch random
bytes, empty files and truncated files without decoding the whole clip.
"""

from pathlib import Path

import soundfile as sf
import torch
import torchaudio.functional as AF

# Reasons an AudioError can carry; manifest loading counts skipped rows by them.
MISSING, CORRUPT, EMPTY = "missing", "corrupt", "empty"
_TAIL_FRAMES = 64  # decoded at the end of the file to prove the data really reaches there


class AudioError(ValueError):
    """An audio file that cannot be used: missing, unreadable/corrupt/truncated, or zero-length."""

    def __init__(self, path: str | Path, problem: str, reason: str):
        super().__init__(f"{path}: {problem}")
        self.path = str(path)
        self.problem = problem
        self.reason = reason  # one of MISSING, CORRUPT, EMPTY


def _require_file(path: Path) -> None:
    if not path.is_file():
        raise AudioError(path, "audio file not found", MISSING)
    if path.stat().st_size == 0:
        raise AudioError(path, "zero-length audio (empty file, 0 bytes)", EMPTY)


def _check_wav_complete(path: Path) -> None:
    """Raise if a RIFF/WAVE file holds fewer data bytes than its header declares.

    libsndfile silently shortens a truncated WAV to the bytes present, so truncation is only
    visible by comparing the declared 'data' chunk size with what the file really holds.
    """
    with open(path, "rb") as f:
        head = f.read(12)
        if len(head) < 12 or head[:4] != b"RIFF" or head[8:12] != b"WAVE":
            return  # not a plain RIFF WAV (RF64, W64, FLAC, ...): nothing to compare
        while True:
            chunk = f.read(8)
            if len(chunk) < 8:
                return
            size = int.from_bytes(chunk[4:8], "little")
            if chunk[:4] == b"data":
                break
            f.seek(size + (size & 1), 1)  # chunks are padded to even length
        present = path.stat().st_size - f.tell()
    # 0 and 0xFFFFFFFF are written by streaming encoders that never patch the header
    if size not in (0, 0xFFFFFFFF) and present < size:
        raise AudioError(
            path, f"truncated WAV: header declares {size} data bytes, file holds {present}", CORRUPT
        )


def audio_info(path: str | Path) -> tuple[float, int, int]:
    """(seconds, sample_rate, channels) from the header; raises AudioError for missing/corrupt/empty files."""
    path = Path(path)
    _require_file(path)
    try:
        with sf.SoundFile(path) as f:
            frames, rate, channels = f.frames, f.samplerate, f.channels
            tail = min(frames, _TAIL_FRAMES)
            if tail > 0:
                # decoding the last few frames fails on truncated compressed files (FLAC, OGG)
                f.seek(frames - tail)
                got = len(f.read(tail, dtype="float32"))
    except (sf.LibsndfileError, RuntimeError, ValueError, OSError) as err:
        raise AudioError(path, f"unreadable or corrupt audio ({err})", CORRUPT) from err
    if frames <= 0 or rate <= 0:
        raise AudioError(path, "zero-length audio", EMPTY)
    if got < tail:
        raise AudioError(path, f"truncated audio: header says {frames} frames, data ends early", CORRUPT)
    _check_wav_complete(path)
    return frames / rate, rate, channels


def load_audio(path: str | Path, sample_rate: int = 16000) -> torch.Tensor:
    """The whole file as a mono float32 1-D tensor at `sample_rate`.

    Channels are averaged; the audio is resampled if needed.
    """
    path = Path(path)
    _require_file(path)
    _check_wav_complete(path)
    try:
        data, rate = sf.read(path, dtype="float32", always_2d=True)
    except (sf.LibsndfileError, RuntimeError, ValueError, OSError) as err:
        raise AudioError(path, f"unreadable or corrupt audio ({err})", CORRUPT) from err
    if data.shape[0] == 0:
        raise AudioError(path, "zero-length audio", EMPTY)
    wave = torch.from_numpy(data).mean(dim=1)
    if rate != sample_rate:
        wave = AF.resample(wave, orig_freq=rate, new_freq=sample_rate)
    return wave.contiguous()
