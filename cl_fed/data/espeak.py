"""Text-to-speech with libespeak-ng through ctypes: no subprocess, no system package, no files.

The library and its voice data come from the `espeakng_loader` wheel. Synthesis runs in espeak's
synchronous mode with a callback that collects the int16 samples in memory.

Reproducibility: libespeak-ng keeps synthesis state in C statics that `espeak_Initialize` does not
reset (the pitch-flutter phase, the automatic gain, the echo buffer), so the same text comes out
slightly different depending on what was spoken before in the process. Every `synthesize` call
therefore loads a fresh copy of the library, initialises it, speaks, and unloads it again (about
3 ms). The output then depends only on the arguments, which is what makes generated datasets
byte-identical whatever the number of worker processes. A process-wide lock serialises calls,
because espeak is process-global.

Voice names are espeak's voice identifiers ("en-us", "de", "es-419", "fr-be") or language codes
espeak lists for a voice ("en-gb", "fr-fr"); a variant ("m3", "f2", "klatt") is appended as
"voice+variant".
"""

import _ctypes
import ctypes
import os
import threading
import warnings
from functools import lru_cache
from pathlib import Path
from xml.sax.saxutils import escape

import espeakng_loader
import numpy as np

ENGINE_SAMPLE_RATE = 22050  # what espeak_Initialize returns for every espeak-ng voice

# Constants from espeak-ng's speak_lib.h.
_AUDIO_OUTPUT_SYNCHRONOUS = 2
_INITIALIZE_DONT_EXIT = 0x8000  # report a missing data path instead of calling exit()
_CHARS_UTF8 = 1
_SSML = 0x10
_PARAM_RATE, _PARAM_PITCH = 1, 3
_EE_OK = 0
_BUFFER_MS = 200

_RATE_RANGE = (80, 450)  # words per minute espeak accepts
_PITCH_RANGE = (0, 99)

_SYNTH_CALLBACK = ctypes.CFUNCTYPE(
    ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int, ctypes.c_void_p
)


class _Voice(ctypes.Structure):
    _fields_ = [
        ("name", ctypes.c_char_p),
        ("languages", ctypes.c_void_p),  # packed: (priority byte, NUL-terminated code)*, then NUL
        ("identifier", ctypes.c_char_p),
        ("gender", ctypes.c_ubyte),
        ("age", ctypes.c_ubyte),
        ("variant", ctypes.c_ubyte),
        ("xx1", ctypes.c_ubyte),
        ("score", ctypes.c_int),
        ("spare", ctypes.c_void_p),
    ]


_lock = threading.RLock()
_samples: list[np.ndarray] = []  # filled by the callback during one synthesis (under _lock)


@_SYNTH_CALLBACK
def _collect(wav, num_samples, events):  # noqa: ARG001 - signature fixed by espeak
    if num_samples > 0:
        _samples.append(np.ctypeslib.as_array(wav, shape=(num_samples,)).copy())
    return 0  # 0 = continue synthesis


def _open_engine() -> ctypes.CDLL:
    lib = ctypes.CDLL(espeakng_loader.get_library_path())
    lib.espeak_Initialize.restype = ctypes.c_int
    lib.espeak_Initialize.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_char_p, ctypes.c_int]
    lib.espeak_SetVoiceByName.argtypes = [ctypes.c_char_p]
    lib.espeak_SetParameter.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int]
    lib.espeak_ng_SetRandSeed.argtypes = [ctypes.c_long]
    lib.espeak_Synth.argtypes = [
        ctypes.c_char_p,
        ctypes.c_size_t,
        ctypes.c_uint,
        ctypes.c_int,
        ctypes.c_uint,
        ctypes.c_uint,
        ctypes.c_void_p,
        ctypes.c_void_p,
    ]
    lib.espeak_ListVoices.restype = ctypes.POINTER(ctypes.POINTER(_Voice))
    lib.espeak_ListVoices.argtypes = [ctypes.c_void_p]
    lib.espeak_Info.restype = ctypes.c_char_p
    lib.espeak_Info.argtypes = [ctypes.c_void_p]
    rate = lib.espeak_Initialize(
        _AUDIO_OUTPUT_SYNCHRONOUS, _BUFFER_MS, espeakng_loader.get_data_path().encode(), _INITIALIZE_DONT_EXIT
    )
    if rate != ENGINE_SAMPLE_RATE:
        _close_engine(lib)
        raise RuntimeError(
            f"espeak_Initialize returned {rate} (expected {ENGINE_SAMPLE_RATE} Hz); "
            f"check the espeak-ng data at {espeakng_loader.get_data_path()}"
        )
    lib.espeak_SetSynthCallback(_collect)
    return lib


def _close_engine(lib: ctypes.CDLL) -> None:
    lib.espeak_Terminate()
    _ctypes.dlclose(lib._handle)
    try:  # RTLD_NOLOAD only succeeds if something else still holds the library
        other = ctypes.CDLL(espeakng_loader.get_library_path(), mode=os.RTLD_NOLOAD)
    except OSError:
        return
    _ctypes.dlclose(other._handle)
    warnings.warn(
        "libespeak-ng stays loaded by other code in this process, so its synthesis state is not "
        "reset between utterances and generated audio is not bit-reproducible",
        RuntimeWarning,
        stacklevel=3,
    )


@lru_cache(maxsize=1)
def _catalog() -> tuple[dict[str, str], str]:
    """({accepted voice name: voice identifier basename}, engine version), read once per process."""
    with _lock:
        lib = _open_engine()
        try:
            version = lib.espeak_Info(None).decode()
            listed = lib.espeak_ListVoices(None)
            by_name: dict[str, str] = {}
            by_language: dict[str, tuple[int, int, str]] = {}  # code -> (priority, list order, identifier)
            i = 0
            while listed[i]:
                voice = listed[i].contents
                ident = voice.identifier.decode().rsplit("/", 1)[-1]
                by_name[ident.lower()] = ident
                packed = ctypes.string_at(voice.languages, 256)
                pos = 0
                while packed[pos] != 0:
                    priority, end = packed[pos], packed.index(b"\0", pos + 1)
                    code = packed[pos + 1 : end].decode().lower()
                    by_language[code] = min(by_language.get(code, (priority, i, ident)), (priority, i, ident))
                    pos = end + 1
                i += 1
        finally:
            _close_engine(lib)
    # A language code names the voice espeak ranks best for it, unless a voice has that very name.
    names = {code: ident for code, (_, _, ident) in by_language.items()}
    names.update(by_name)
    return names, version


def available_voices() -> set[str]:
    """Every voice name `synthesize` accepts (lower case): voice identifiers and language codes."""
    return set(_catalog()[0])


@lru_cache(maxsize=1)
def _variants() -> frozenset[str]:
    return frozenset(
        p.name for p in (Path(espeakng_loader.get_data_path()) / "voices" / "!v").iterdir() if p.is_file()
    )


def available_variants() -> set[str]:
    """Voice variants (espeak-ng-data/voices/!v), appended to a voice as "voice+variant"."""
    return set(_variants())


def engine_version() -> str:
    """The libespeak-ng version string, e.g. "1.52.0" (part of the dataset fingerprint)."""
    return _catalog()[1]


def resolve_voice(voice: str) -> str:
    """The espeak voice identifier for a voice name or language code; ValueError if unknown."""
    names = _catalog()[0]
    ident = names.get(voice.lower())
    if ident is None:
        raise ValueError(
            f"unknown espeak voice {voice!r}; choose one of available_voices(), "
            f"e.g. {', '.join(sorted(n for n in names if n[:2] in ('en', 'de', 'es', 'fr')))}"
        )
    return ident


def _check_variant(variant: str | None) -> None:
    if variant is not None and variant not in _variants():
        raise ValueError(
            f"unknown espeak voice variant {variant!r}; choose one of "
            f"{', '.join(sorted(available_variants()))}"
        )


def build_ssml(parts: list[tuple[str, str]]) -> str:
    """SSML that speaks each (voice, text) part in its own voice, for code-switched utterances.

    Voice names are resolved to espeak identifiers here, because espeak's SSML `<voice name=...>`
    does not accept language codes such as "en-gb". The variant is not part of the SSML: espeak
    carries the variant of the voice passed to `synthesize` over to every `<voice>` element, so
    one speaker keeps one timbre across languages.
    """
    body = " ".join(f'<voice name="{resolve_voice(voice)}">{escape(text)}</voice>' for voice, text in parts)
    return f"<speak>{body}</speak>"


def synthesize(
    text: str,
    voice: str = "en",
    variant: str | None = None,
    rate: int = 175,
    pitch: int = 50,
    ssml: bool = False,
) -> np.ndarray:
    """Speak `text` and return float32 samples in [-1, 1] at ENGINE_SAMPLE_RATE.

    With ssml=True, `text` is SSML; `<voice name="...">` elements switch voice inside the utterance
    (see build_ssml) and `voice`/`variant` set the starting voice and the variant of all of them.
    """
    ident = resolve_voice(voice)
    _check_variant(variant)
    if not _RATE_RANGE[0] <= rate <= _RATE_RANGE[1]:
        raise ValueError(f"rate {rate} words/min is outside {_RATE_RANGE[0]}..{_RATE_RANGE[1]}")
    if not _PITCH_RANGE[0] <= pitch <= _PITCH_RANGE[1]:
        raise ValueError(f"pitch {pitch} is outside {_PITCH_RANGE[0]}..{_PITCH_RANGE[1]}")
    name = f"{ident}+{variant}" if variant else ident
    data = text.encode("utf-8") + b"\0"
    with _lock:
        lib = _open_engine()
        try:
            if lib.espeak_SetVoiceByName(name.encode()) != _EE_OK:
                raise ValueError(f"espeak could not load voice {name!r} (from voice {voice!r})")
            lib.espeak_SetParameter(_PARAM_RATE, int(rate), 0)
            lib.espeak_SetParameter(_PARAM_PITCH, int(pitch), 0)
            lib.espeak_ng_SetRandSeed(0)  # klatt and breathy variants draw noise from espeak's RNG
            _samples.clear()
            flags = _CHARS_UTF8 | (_SSML if ssml else 0)
            status = lib.espeak_Synth(data, len(data), 0, 0, 0, flags, None, None)
            lib.espeak_Synchronize()
            if status != _EE_OK:
                raise RuntimeError(f"espeak_Synth failed with status {status} for text {text[:80]!r}")
            pcm = np.concatenate(_samples) if _samples else np.zeros(0, dtype=np.int16)
            _samples.clear()
        finally:
            _close_engine(lib)
    return pcm.astype(np.float32) / 32768.0
