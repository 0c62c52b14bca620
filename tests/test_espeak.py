"""libespeak-ng through ctypes.

Output format, reproducibility, voice/rate/pitch control, SSML voice switching.
"""

import numpy as np
import pytest

from cl_fed.data import espeak
from cl_fed.data.espeak import ENGINE_SAMPLE_RATE, build_ssml, synthesize

SENTENCE = "the conveyor belt is running at seventy percent"


def median_f0(wave: np.ndarray, rate: int = ENGINE_SAMPLE_RATE) -> float:
    """Median autocorrelation pitch (60..400 Hz) over voiced 50 ms frames."""
    frame, values = 1024, []
    for start in range(0, len(wave) - frame, frame // 2):
        chunk = wave[start : start + frame].astype(np.float64)
        if np.sqrt(np.mean(chunk**2)) < 0.02:
            continue
        corr = np.correlate(chunk, chunk, "full")[frame - 1 :]
        low, high = rate // 400, rate // 60
        values.append(rate / (low + int(np.argmax(corr[low:high]))))
    return float(np.median(values))


def test_engine_rate_and_output_format():
    wave = synthesize(SENTENCE, voice="en-us")
    assert ENGINE_SAMPLE_RATE == 22050
    assert wave.dtype == np.float32 and wave.ndim == 1
    assert 1.0 < len(wave) / ENGINE_SAMPLE_RATE < 6.0  # a short sentence at 175 words/min
    assert 0.05 < np.abs(wave).max() <= 1.0
    assert espeak.engine_version().count(".") >= 1


def test_same_arguments_give_identical_samples_whatever_was_spoken_before():
    first = synthesize(SENTENCE, voice="de", variant="klatt", rate=160, pitch=40)
    synthesize("etwas ganz anderes dazwischen", voice="fr-fr", variant="f2")
    again = synthesize(SENTENCE, voice="de", variant="klatt", rate=160, pitch=40)
    assert np.array_equal(first, again)


def test_rate_controls_duration():
    slow = synthesize(SENTENCE, voice="en-us", rate=110)
    fast = synthesize(SENTENCE, voice="en-us", rate=320)
    assert len(fast) < 0.6 * len(slow)


def test_pitch_and_variant_control_f0():
    low = median_f0(synthesize(SENTENCE, voice="en-us", pitch=10))
    high = median_f0(synthesize(SENTENCE, voice="en-us", pitch=90))
    assert high > 1.3 * low
    male = median_f0(synthesize(SENTENCE, voice="en-us", variant="m3"))
    female = median_f0(synthesize(SENTENCE, voice="en-us", variant="f2"))
    assert female > 1.5 * male


def test_voices_and_variants_listed():
    voices = espeak.available_voices()
    for name in ("en-us", "en-gb", "de", "es", "es-419", "fr-fr", "fr-be"):
        assert name in voices
    assert {"m1", "m3", "f1", "f2", "klatt"} <= espeak.available_variants()
    # language codes resolve to a voice identifier espeak can load
    assert espeak.resolve_voice("en-gb") == "en" and espeak.resolve_voice("fr-fr") == "fr"
    assert len(synthesize("bonjour", voice="fr-fr")) > 0


def test_different_voices_sound_different():
    assert not np.array_equal(synthesize("fünf", voice="de")[:5000], synthesize("fünf", voice="en-us")[:5000])


@pytest.mark.parametrize(
    "kwargs, needle",
    [
        ({"voice": "xx-nowhere"}, "xx-nowhere"),
        ({"voice": "de", "variant": "no-such-variant"}, "no-such-variant"),
        ({"voice": "de", "rate": 20}, "rate 20"),
        ({"voice": "de", "pitch": 150}, "pitch 150"),
    ],
)
def test_bad_arguments_raise_naming_the_value(kwargs, needle):
    with pytest.raises(ValueError, match=needle):
        synthesize("hallo", **kwargs)


def test_ssml_voice_element_switches_voice():
    # Starting in English, <voice name="de"> must produce exactly what starting in German does.
    switched = synthesize(
        build_ssml([("de", "die temperatur liegt bei vierzig grad")]), voice="en-us", ssml=True
    )
    german = synthesize("<speak>die temperatur liegt bei vierzig grad</speak>", voice="de", ssml=True)
    english = synthesize("<speak>die temperatur liegt bei vierzig grad</speak>", voice="en-us", ssml=True)
    assert np.array_equal(switched, german)
    assert not (len(switched) == len(english) and np.array_equal(switched, english))


def test_code_switched_ssml_differs_from_one_voice_and_keeps_the_variant():
    segments = [("es", "la"), ("en-us", "conveyor belt"), ("es", "funciona al setenta por ciento")]
    mixed = synthesize(build_ssml(segments), voice="es", variant="f2", ssml=True)
    spanish_only = synthesize(
        build_ssml([("es", t) for _, t in segments]), voice="es", variant="f2", ssml=True
    )
    assert not (len(mixed) == len(spanish_only) and np.array_equal(mixed, spanish_only))
    # the English segment is spoken by the same (female) speaker as the Spanish ones
    male = synthesize(build_ssml(segments), voice="es", variant="m3", ssml=True)
    assert median_f0(mixed) > 1.5 * median_f0(male)


def test_build_ssml_resolves_language_codes_and_escapes_text():
    ssml = build_ssml([("en-gb", "a < b & c"), ("fr-fr", "l'écart")])
    assert (
        ssml == '<speak><voice name="en">a &lt; b &amp; c</voice> <voice name="fr">l\'écart</voice></speak>'
    )
    with pytest.raises(ValueError, match="klingon"):
        build_ssml([("klingon", "x")])
