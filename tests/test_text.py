"""Number words against hand-written values, and the utterance generator's invariants."""

import random

import pytest

from cl_fed.data.text import (
    ALL_LANGUAGE_CODES,
    CODE_SWITCHED,
    DOMAINS,
    LANGUAGES,
    TEMPLATES,
    VOCABULARY,
    count_words,
    make_utterance,
    number_to_words,
)
from cl_fed.textnorm import normalize_text

NUMBERS = {
    "en": {
        0: "zero",
        7: "seven",
        13: "thirteen",
        21: "twenty-one",
        70: "seventy",
        99: "ninety-nine",
        100: "one hundred",
        101: "one hundred one",
        340: "three hundred forty",
        1000: "one thousand",
        2024: "two thousand twenty-four",
        9999: "nine thousand nine hundred ninety-nine",
    },
    "de": {
        0: "null",
        1: "eins",
        16: "sechzehn",
        17: "siebzehn",
        21: "einundzwanzig",
        30: "dreißig",
        60: "sechzig",
        71: "einundsiebzig",
        100: "einhundert",
        101: "einhunderteins",
        1000: "eintausend",
        1234: "eintausendzweihundertvierunddreißig",
        2001: "zweitausendeins",
        9999: "neuntausendneunhundertneunundneunzig",
    },
    "es": {
        0: "cero",
        1: "uno",
        15: "quince",
        16: "dieciséis",
        21: "veintiuno",
        22: "veintidós",
        31: "treinta y uno",
        100: "cien",
        101: "ciento uno",
        500: "quinientos",
        700: "setecientos",
        999: "novecientos noventa y nueve",
        1000: "mil",
        2021: "dos mil veintiuno",
        9100: "nueve mil cien",
    },
    "fr": {
        0: "zéro",
        16: "seize",
        17: "dix-sept",
        21: "vingt et un",
        22: "vingt-deux",
        70: "soixante-dix",
        71: "soixante et onze",
        77: "soixante-dix-sept",
        80: "quatre-vingts",
        81: "quatre-vingt-un",
        90: "quatre-vingt-dix",
        91: "quatre-vingt-onze",
        100: "cent",
        101: "cent un",
        200: "deux cents",
        280: "deux cent quatre-vingts",
        1000: "mille",
        1080: "mille quatre-vingts",
        2200: "deux mille deux cents",
        9999: "neuf mille neuf cent quatre-vingt-dix-neuf",
    },
}


@pytest.mark.parametrize("lang", LANGUAGES)
def test_number_words_match_hand_written_values(lang):
    for n, words in NUMBERS[lang].items():
        assert number_to_words(n, lang) == words, (lang, n)


def test_number_words_normalise_hyphens_to_spaces():
    assert normalize_text(number_to_words(90, "fr")) == "quatre vingt dix"
    assert normalize_text(number_to_words(21, "en")) == "twenty one"


def test_every_number_is_spelled_and_normalisable():
    for lang in LANGUAGES:
        spelled = {number_to_words(n, lang) for n in range(10000)}
        assert len(spelled) == 10000  # no two numbers read the same
        assert all(normalize_text(w) and not any(c.isdigit() for c in w) for w in spelled)


@pytest.mark.parametrize(
    "n, lang, gender, words",
    [
        (21, "es", "m", "veintiún"),
        (21, "es", "f", "veintiuna"),
        (31, "es", "m", "treinta y un"),
        (221, "es", "f", "doscientas veintiuna"),
        (500, "es", "f", "quinientas"),
        (22, "es", "f", "veintidós"),
        (21, "fr", "f", "vingt et une"),
        (81, "fr", "f", "quatre-vingt-une"),
        (21, "fr", "m", "vingt et un"),
        (21, "de", "f", "einundzwanzig"),
    ],
)
def test_counts_agree_with_the_noun(n, lang, gender, words):
    assert count_words(n, lang, gender) == words


@pytest.mark.parametrize("n, lang", [(10000, "en"), (-1, "de"), (3.0, "es"), (True, "fr"), (5, "it")])
def test_number_words_reject_bad_input(n, lang):
    with pytest.raises(ValueError):
        number_to_words(n, lang)


def test_vocabulary_domains_are_aligned_over_languages():
    assert len(DOMAINS) >= 4
    for domain in DOMAINS:
        for kind in ("machines", "parts"):
            concepts = VOCABULARY[domain][kind]
            assert len(concepts) >= 4
            for concept in concepts:
                assert set(concept) == set(LANGUAGES)
                for lang in ("de", "es", "fr"):
                    assert concept[lang][2] in ("m", "f", "n")
    assert all(len(TEMPLATES[lang]) >= 15 for lang in LANGUAGES)


def test_utterances_are_normalised_and_segments_well_formed():
    rng = random.Random(1)
    for _ in range(3000):
        language, domain = rng.choice(ALL_LANGUAGE_CODES), rng.choice(DOMAINS)
        segments = make_utterance(rng, language, domain)
        joined = " ".join(text for _, text in segments)
        assert normalize_text(joined) == joined
        assert all(text for _, text in segments)
        assert all(a[0] != b[0] for a, b in zip(segments, segments[1:]))  # neighbours differ in language
        assert not any(c.isdigit() for c in joined)
        if language in CODE_SWITCHED:
            matrix = language.split("-")[0]
            assert {lang for lang, _ in segments} == {matrix, "en"}
        else:
            assert len(segments) == 1 and segments[0][0] == language


def test_code_switched_english_is_machine_and_part_names():
    english_names = {
        normalize_text(c["en"][i])
        for d in DOMAINS
        for kind in ("machines", "parts")
        for c in VOCABULARY[d][kind]
        for i in (0, 1)
    }
    rng = random.Random(2)
    for _ in range(300):
        for lang, text in make_utterance(rng, rng.choice(CODE_SWITCHED), rng.choice(DOMAINS)):
            if lang == "en":
                assert text in english_names


def test_deterministic_for_a_seed_and_varied_across_draws():
    def draw(seed):
        rng = random.Random(seed)
        return [make_utterance(rng, lang, dom) for lang in ALL_LANGUAGE_CODES for dom in DOMAINS]

    assert draw(5) == draw(5)
    assert draw(5) != draw(6)
    rng = random.Random(3)
    texts = {make_utterance(rng, "de", "welding")[0][1] for _ in range(200)}
    assert len(texts) > 150


def test_utterances_use_their_domain_vocabulary():
    rng = random.Random(4)
    welding_words = {
        c["de"][i] for kind in ("machines", "parts") for c in VOCABULARY["welding"][kind] for i in (0, 1)
    }
    hits = sum(
        any(w in make_utterance(rng, "de", "welding")[0][1] for w in welding_words) for _ in range(200)
    )
    assert hits > 100  # most templates name a machine or part


@pytest.mark.parametrize(
    "language, domain, needle", [("it", "welding", "'it'"), ("en", "baking", "'baking'")]
)
def test_make_utterance_rejects_unknown_language_and_domain(language, domain, needle):
    with pytest.raises(ValueError, match=needle):
        make_utterance(random.Random(0), language, domain)
