"""Cut a document into chunks that fit a token budget and can be cited.

`chunk_file(path)` extracts the file (extract.py) and packs its blocks, in order, into chunks of at most
`max_tokens` tokens:

- A section boundary (a heading, a PDF page, a JSONL record) always starts a new chunk, so a chunk never mixes
  two sections and its heading path is exact. A heading stays with what follows it, a sub-heading or the
  start of its text: no chunk holds a bare title (when the text after a heading fills a chunk by itself, the
  heading rides along and the chunk may pass the budget by the heading's few tokens).
- A block that does not fit in what is left of the current chunk starts the next one, so a short paragraph or
  code block is never cut in two. Only a block longer than the whole budget is split: at its lines, a prose
  line at its sentences, a sentence longer than the budget at its words (a word longer than it, at characters).
- Each new chunk of the same section begins with the tail of the previous one (at most `overlap_tokens`, whole
  lines or sentences), so a passage cut at a chunk boundary is still found whole in one of them. Keeping a
  block whole comes first: when the block that opens the next chunk leaves no room for the tail, there is none.
- Every piece of text keeps the source line (or page) it came from, so a chunk's `start`..`end` are exactly the
  first and last lines of the text it holds.

Tokens: pass `count_tokens` (str -> int) to count with the embedder's tokenizer. Count the text alone, without
special tokens, padding or truncation: the packer adds up the counts of lines and sentences, so a fixed cost per
call would be counted many times (the chunk's final `n_tokens` is counted on its whole text).
The default, `approx_tokens`, is a fast estimate made for subword (WordPiece/BPE) tokenizers: a run of letters is
one token plus one per further 5 letters (long or rare words split into pieces), digits go in pairs, every other
non-space character (punctuation, `_`) is one token, and CJK characters one each. Measured against
all-MiniLM-L6-v2's tokenizer on Python's documentation, stdlib docstrings and Markdown, the real count is 0.8-1.0
times the estimate for 80% of chunks (at most 1.2x), so a 256-token chunk rarely overflows that model's window.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from gptsmith.rag.extract import Block, Document, extract
from gptsmith.rag.types import Chunk

# One match per estimated token: a CJK character, up to 5 letters (so a run of letters counts 1 + 1 per further
# 5), up to 2 digits, or any other visible character. Counting matches keeps the loop in C.
_TOKEN = re.compile(r"[\u2e80-\U0002ffff]|[^\W\d_\u2e80-\U0002ffff]{1,5}|\d{1,2}|\S")
_SENTENCE_END = re.compile(r"(?<=[.!?]\s)|(?<=[。！？])")  # after ". " (the space stays with the sentence) or "。"
_WORD_END = re.compile(r"(?<=\s)(?=\S)")


def approx_tokens(text: str) -> int:
    """Estimate of a subword tokenizer's count (see the module docstring for how good it is)."""
    return len(_TOKEN.findall(text))


@dataclass(frozen=True)
class _Piece:
    """The smallest unit the packer moves: a whole line, or a sentence or word run of a long line."""

    line: int  # source line (or page) number
    text: str
    sep: str  # put before it when it follows another piece: "\n\n" new block, "\n" new line, "" same line
    tokens: int
    heading: bool = False  # from a heading block


def chunk_file(path: str | Path, max_tokens: int = 256, overlap_tokens: int = 32,
               count_tokens: Callable[[str], int] | None = None, *, jsonl_field: str = "text") -> list[Chunk]:
    """Extract `path` and cut it into cited chunks; raise ExtractError for an empty, unreadable, corrupt or
    unsupported file."""
    return chunk_document(extract(path, jsonl_field=jsonl_field), max_tokens, overlap_tokens, count_tokens)


def chunk_document(doc: Document, max_tokens: int = 256, overlap_tokens: int = 32,
                   count_tokens: Callable[[str], int] | None = None) -> list[Chunk]:
    if max_tokens < 1 or not 0 <= overlap_tokens < max_tokens:
        raise ValueError(f"need max_tokens >= 1 and 0 <= overlap_tokens < max_tokens, "
                         f"got {max_tokens} and {overlap_tokens}")
    count = count_tokens or approx_tokens
    packer = _Packer(max_tokens, overlap_tokens)
    for block in doc.blocks:
        packer.add_block(block, _block_pieces(block, count, max_tokens, overlap_tokens))
    packer.close(carry=False)
    chunks = []
    for heading, pieces in packer.groups:
        for part in _fit(_trim_blank(pieces), count, max_tokens) if _trim_blank(pieces) else []:
            text = _text(part)
            chunks.append(Chunk(text=text, source=doc.source, heading=" > ".join(heading), start=part[0].line,
                                end=part[-1].line, unit=doc.unit, n_tokens=count(text)))
    return chunks


def _block_pieces(block: Block, count: Callable[[str], int], max_tokens: int, overlap_tokens: int) -> list[_Piece]:
    """A block's lines as pieces. A prose line longer than the overlap is cut at its sentences (so the overlap
    can carry the last sentence or two of a long line); a code or table line only when it exceeds the budget;
    a sentence longer than the budget at its words."""
    split_at = max_tokens if block.kind in ("code", "table") or not overlap_tokens else overlap_tokens
    pieces = []
    for i, (line, text) in enumerate(block.lines):
        sep = "\n\n" if i == 0 else "\n"
        for j, part in enumerate(_split_line(text, count, max_tokens, split_at)):
            sep = sep if j == 0 else ""
            pieces.append(_Piece(line, part, sep, count(sep + part), block.kind == "heading"))
    return pieces


def _split_line(text: str, count: Callable[[str], int], max_tokens: int, split_at: int) -> list[str]:
    if count(text) <= split_at:
        return [text]
    parts = []
    for sentence in filter(None, _SENTENCE_END.split(text)):
        if count(sentence) <= max_tokens:
            parts.append(sentence)
        else:
            parts += _word_runs(sentence, count, max_tokens)
    return parts


def _word_runs(text: str, count: Callable[[str], int], max_tokens: int) -> list[str]:
    """Greedy runs of whole words under the budget; a word longer than the budget (a URL, a line of CJK text
    without spaces) is cut between characters."""
    runs, run, used = [], "", 0
    for word in _WORD_END.split(text):
        for part in _cut_word(word, count, max_tokens):
            n = count(part)
            if run and used + n > max_tokens:
                runs.append(run)
                run, used = "", 0
            run, used = run + part, used + n
    return runs + [run] if run else runs


def _cut_word(word: str, count: Callable[[str], int], max_tokens: int) -> list[str]:
    parts = []
    while count(word) > max_tokens and len(word) > 1:
        size = max(1, len(word) * max_tokens // count(word))
        while size > 1 and count(word[:size]) > max_tokens:
            size = size * 3 // 4
        parts.append(word[:size])
        word = word[size:]
    return parts + [word]


class _Packer:
    """Fills chunks with pieces in order; `groups` collects (heading path, pieces) of each finished chunk."""

    def __init__(self, max_tokens: int, overlap_tokens: int):
        self.max_tokens, self.overlap_tokens = max_tokens, overlap_tokens
        self.groups: list[tuple[tuple[str, ...], list[_Piece]]] = []
        self.pieces: list[_Piece] = []
        self.fresh = 0  # pieces added since the carried-over overlap: a chunk of overlap alone is not kept
        self.used = 0  # tokens in self.pieces
        self.heading: tuple[str, ...] = ()

    def add_block(self, block: Block, pieces: list[_Piece]) -> None:
        if self._starts_new_section(block):
            self.close(carry=False)
        self.heading = block.heading
        size = sum(p.tokens for p in pieces)
        if self.used + size <= self.max_tokens:
            self._add(pieces)
        elif size <= self.max_tokens:  # fits in a chunk of its own: move it whole to the next chunk
            self.close(carry=True, room=self.max_tokens - size)
            self._add(pieces)
        else:  # longer than a chunk: it must be cut, at piece boundaries
            for piece in pieces:
                if self.used + piece.tokens > self.max_tokens:
                    self.close(carry=True, room=self.max_tokens - piece.tokens)
                self._add([piece])

    def _starts_new_section(self, block: Block) -> bool:
        if not self.pieces:
            return False
        if self.fresh and block.kind == "heading" and all(p.heading for p in self.pieces):
            return False  # a title followed by its first sub-heading: keep them together
        return block.starts_section or block.heading != self.heading  # (an overlap never crosses sections)

    def _add(self, pieces: list[_Piece]) -> None:
        self.pieces += pieces
        self.fresh += len(pieces)
        self.used += sum(p.tokens for p in pieces)

    def close(self, carry: bool, room: int = 0) -> None:
        """Finish the current chunk; with `carry`, start the next with its tail (within the overlap and `room`).
        A chunk of headings alone is not finished: its headings open the next chunk (a title's words belong with
        the text under it)."""
        if carry and self.fresh and all(p.heading for p in self.pieces):
            return
        if self.fresh:
            self.groups.append((self.heading, self.pieces))
        tail = self._tail(min(self.overlap_tokens, room)) if carry and self.fresh else []
        self.pieces, self.fresh, self.used = tail, 0, sum(p.tokens for p in tail)

    def _tail(self, budget: int) -> list[_Piece]:
        tail, used = [], 0
        for piece in reversed(self.pieces):
            if used + piece.tokens > budget:
                break
            tail.insert(0, piece)
            used += piece.tokens
        return tail


def _trim_blank(pieces: list[_Piece]) -> list[_Piece]:
    """Drop blank lines (kept inside code blocks) at the chunk's ends, so start and end are lines with text."""
    filled = [i for i, p in enumerate(pieces) if p.text.strip()]
    return pieces[filled[0]: filled[-1] + 1] if filled else []


def _fit(pieces: list[_Piece], count: Callable[[str], int], max_tokens: int) -> list[list[_Piece]]:
    """Pieces are packed by the sum of their counts; a real tokenizer may count the joined text a little
    differently, so a chunk it finds over the budget is packed again by counting the joined text."""
    if len(pieces) == 1 or count(_text(pieces)) <= max_tokens:
        return [pieces]
    groups, current = [], []
    for piece in pieces:
        if current and not all(p.heading for p in current) and count(_text(current + [piece])) > max_tokens:
            groups.append(current)
            current = []
        current.append(piece)
    return groups + [current]


def _text(pieces: list[_Piece]) -> str:
    joined = pieces[0].text + "".join(p.sep + p.text for p in pieces[1:])
    return "\n".join(line.rstrip() for line in joined.split("\n")).strip("\n")
