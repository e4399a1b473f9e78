"""Text cleaning, exact de-duplication keys and the train/validation split rule.

The split is a function of a content hash alone, so it is the same whatever order the inputs come in and
however many workers read them; the same text always lands in the same split. `assign_split` is that rule, for
pretraining text (`data/pipeline.py`) and conversations (`data/chat_formats.py`) alike.

A document longer than SPLIT_PIECE_CHARS is split piece by piece (`split_pieces`): one big text file (a novel,
a manual) then still gives a validation split, with whole pieces of it.
"""

from __future__ import annotations

import bisect
import hashlib
import re
import unicodedata

import numpy as np

# C0/C1 control characters except tab and newline, plus the byte-order mark and zero-width no-break space.
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\ufeff\u200b]")
_UNICODE_SPACE = re.compile(r"[\u00a0\u1680\u2000-\u200a\u202f\u205f\u3000]")
# Runs of spaces after a non-space: leading indentation is kept because it carries meaning in code.
_INNER_SPACES = re.compile(r"(?<=\S) {2,}")
_TRAILING = re.compile(r"[ \t]+(?=\n|$)")
_BLANK_RUNS = re.compile(r"\n{4,}")  # 4 newlines = 3 blank lines; keep at most 2

SPLIT_SEED = 1234  # data.seed's default; conversations (sft) are split with it too
# Documents longer than this are assigned to train/validation piece by piece. 4096 characters is ~1,000 tokens:
# one piece holds a few validation windows, and a single text file of 8 KB or more always gets a validation split.
SPLIT_PIECE_CHARS = 4096


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


def assign_split(key: bytes, val_fraction: float, seed: int = SPLIT_SEED) -> tuple[str, float]:
    """("train" | "val", score) for the item whose content hash is `key`: the one split rule of gptsmith.
    The score is returned too so a caller can move the item ranked closest to the other side when one is empty."""
    score = split_score(key, seed)
    return ("val" if score < val_fraction else "train"), score


def split_pieces(text: str, size: int = SPLIT_PIECE_CHARS) -> list[str]:
    """Cut `text` into pieces of about `size` characters for the split, at a paragraph break in the second half
    of each piece (else a line break, else a space); "".join(pieces) == text. A short last piece joins the one
    before it, so every piece of a long document has at least size/4 characters."""
    pieces, start = [], 0
    while len(text) - start > size:
        lo, hi = start + size // 2, start + size
        for sep in ("\n\n", "\n", " "):
            at = text.rfind(sep, lo, hi)
            if at >= 0:
                cut = at + len(sep)
                break
        else:
            cut = hi
        pieces.append(text[start:cut])
        start = cut
    tail = text[start:]
    if pieces and len(tail) < size // 4:
        pieces[-1] += tail
    else:
        pieces.append(tail)
    return pieces


class SeenDigests:
    """The exact-dedup memory, 8 bytes per kept document: a 64-bit content hash in one sorted numpy array.

    New hashes go to a Python set first (~70 bytes each, at most RECENT of them, ~20 MB), merged into the array
    when it fills. 64 bits make a false "duplicate" unlikely: about n²/2^65, 1 in 3,700 for 100 million documents.
    """

    RECENT = 1 << 18

    def __init__(self) -> None:
        self.merged = np.empty(0, dtype=np.uint64)
        self._view = memoryview(self.merged)  # bisect on it: ~5x faster per lookup than np.searchsorted on a scalar
        self.recent: set[int] = set()

    def __len__(self) -> int:
        return len(self.merged) + len(self.recent)

    def add(self, key: bytes) -> bool:
        """Remember `key` (a content digest); False when it was seen before."""
        h = int.from_bytes(key[:8], "little")
        if h in self.recent:
            return False
        i = bisect.bisect_left(self._view, h)
        if i < len(self._view) and self._view[i] == h:
            return False
        self.recent.add(h)
        if len(self.recent) >= self.RECENT:
            self._merge()
        return True

    def _merge(self) -> None:
        new = np.fromiter(self.recent, dtype=np.uint64, count=len(self.recent))
        new.sort()
        merged = np.concatenate((self.merged, new))
        merged.sort(kind="stable")  # two sorted runs: timsort merges them in linear time
        self._view.release()
        self.merged, self.recent = merged, set()
        self._view = memoryview(merged)
