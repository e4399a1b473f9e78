"""Text cleaning, exact de-duplication keys and the train/validation split rule.

The split is a function of a document's content hash alone, so it is the same whatever order the inputs
come in and however many workers read them; the same text always lands in the same split.
"""

from __future__ import annotations

import hashlib
import re
import unicodedata

# C0/C1 control characters except tab and newline, plus the byte-order mark and zero-width no-break space.
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\ufeff\u200b]")
_UNICODE_SPACE = re.compile(r"[\u00a0\u1680\u2000-\u200a\u202f\u205f\u3000]")
# Runs of spaces after a non-space: leading indentation is kept because it carries meaning in code.
_INNER_SPACES = re.compile(r"(?<=\S) {2,}")
_TRAILING = re.compile(r"[ \t]+(?=\n|$)")
_BLANK_RUNS = re.compile(r"\n{4,}")  # 4 newlines = 3 blank lines; keep at most 2


def clean_text(text: str) -> str:
    text = unicodedata.normalize("NFC", text)
    text = text.replace("\r\n", "\n").replace("\r", "\n").replace("\u2028", "\n").replace("\u2029", "\n\n")
    text = _CONTROL.sub("", text)
    text = _UNICODE_SPACE.sub(" ", text)
    text = _INNER_SPACES.sub(" ", text)
    text = _TRAILING.sub("", text)
    text = _BLANK_RUNS.sub("\n\n\n", text)
    return text.strip("\n")


def split_long(text: str, max_chars: int) -> list[str]:
    """Cut a document into pieces of at most `max_chars`, at a line break when one is in the second half."""
    if max_chars <= 0 or len(text) <= max_chars:
        return [text]
    pieces = []
    while len(text) > max_chars:
        cut = text.rfind("\n", max_chars // 2, max_chars)
        cut = cut + 1 if cut > 0 else max_chars
        pieces.append(text[:cut].strip("\n"))
        text = text[cut:]
    if text.strip():
        pieces.append(text.strip("\n"))
    return [p for p in pieces if p]


def digest(text: str) -> bytes:
    """16-byte content hash: the exact-duplicate key and the split key."""
    return hashlib.blake2b(text.encode("utf-8"), digest_size=16).digest()


def split_score(key: bytes, seed: int) -> float:
    """A uniform number in [0, 1) from the content hash and the seed; below val_fraction means validation."""
    h = hashlib.blake2b(key, digest_size=8, key=seed.to_bytes(8, "little", signed=True)).digest()
    return int.from_bytes(h, "little") / 2**64
