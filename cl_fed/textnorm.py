"""The one text normaliser, used for training targets, vocabulary checks and WER/CER scoring.

Rules (documented in README): Unicode NFC; lower case; every character that is not a letter,
a digit, an apostrophe or whitespace becomes a space; apostrophes not inside a word are dropped;
runs of whitespace collapse to one space; leading and trailing space is stripped.
"""

import re
import unicodedata

_NOT_KEPT = re.compile(r"[^\w\s']|_")
_LOOSE_APOSTROPHE = re.compile(r"(?<!\w)'|'(?!\w)")
_SPACES = re.compile(r"\s+")


def normalize_text(text: str) -> str:
    text = unicodedata.normalize("NFC", text).lower()
    text = _NOT_KEPT.sub(" ", text)
    text = _LOOSE_APOSTROPHE.sub(" ", text)
    return _SPACES.sub(" ", text).strip()
