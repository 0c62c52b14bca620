"""Character vocabulary of the embedded CTC model: blank, space, apostrophe, a-z and the accented
letters of German, Spanish, French, Italian and Portuguese.

Texts reaching `encode` are already normalised (`cl_fed.textnorm.normalize_text`), so there is no
upper case and no punctuation besides the in-word apostrophe.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

BLANK = "<blank>"
VOCAB_FILE = "char_vocab.json"

# German ä ö ü ß; Spanish á é í ó ú ñ; French à â æ ç è é ê ë î ï ô œ ù û ÿ;
# Italian à è é ì í î ò ó ù ú; Portuguese á â ã à ç é ê í ó ô õ ú.
ACCENTED = "àáâãäæçèéêëìíîïñòóôõöùúûüÿœß"
DEFAULT_CHARACTERS = " '" + "abcdefghijklmnopqrstuvwxyz" + ACCENTED


class VocabError(ValueError):
    """A text holds a character the vocabulary cannot spell."""


class CharVocab:
    """Index 0 is the CTC blank; every other index is one character."""

    def __init__(self, characters: str = DEFAULT_CHARACTERS):
        if len(set(characters)) != len(characters):
            raise VocabError(f"duplicate characters in vocabulary: {characters!r}")
        self.tokens: list[str] = [BLANK, *characters]
        self._index = {token: i for i, token in enumerate(self.tokens)}
        self.blank_id = 0

    def __len__(self) -> int:
        return len(self.tokens)

    def __contains__(self, character: str) -> bool:
        return character != BLANK and character in self._index

    @property
    def characters(self) -> frozenset[str]:
        return frozenset(self.tokens[1:])

    def unknown_characters(self, text: str) -> list[str]:
        """Characters of `text` the vocabulary lacks, in order of first appearance."""
        return list(dict.fromkeys(c for c in text if c not in self._index or c == BLANK))

    def encode(self, text: str) -> list[int]:
        unknown = self.unknown_characters(text)
        if unknown:
            raise VocabError(f"characters {unknown} not in the model vocabulary (text: {text!r})")
        return [self._index[c] for c in text]

    def decode_ctc(self, ids: torch.Tensor | list[int]) -> str:
        """Greedy CTC: collapse repeats, then drop blanks."""
        ids = ids.tolist() if isinstance(ids, torch.Tensor) else list(ids)
        out, previous = [], None
        for i in ids:
            if i != previous and i != self.blank_id:
                out.append(self.tokens[i])
            previous = i
        return "".join(out)

    def save(self, directory: str | os.PathLike) -> None:
        path = Path(directory) / VOCAB_FILE
        path.write_text(
            json.dumps({"blank": BLANK, "tokens": self.tokens}, ensure_ascii=False, indent=1) + "\n"
        )

    @classmethod
    def load(cls, directory: str | os.PathLike) -> CharVocab:
        path = Path(directory) / VOCAB_FILE
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            tokens = data["tokens"]
        except (OSError, ValueError, KeyError) as error:
            raise VocabError(f"{path}: cannot read vocabulary ({error})") from error
        if not tokens or tokens[0] != BLANK or any(len(t) != 1 for t in tokens[1:]):
            raise VocabError(
                f"{path}: 'tokens' must be {BLANK!r} followed by single characters, got {tokens[:5]}..."
            )
        return cls("".join(tokens[1:]))
