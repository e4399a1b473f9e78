"""Token ids -> text pieces for streaming: whole UTF-8 characters only, and never part of a stop string."""

from __future__ import annotations


class IncrementalDecoder:
    """Decode a growing list of token ids into text pieces.

    A byte-level BPE splits one character (an emoji, an accented letter) over several tokens, and decoding
    an incomplete byte sequence gives U+FFFD. So we hold text back while it ends in U+FFFD and re-decode a
    short window of recent tokens (the `prefix_offset`/`read_offset` scheme of HF's TextStreamer and vLLM),
    which also keeps decoders that treat a leading space specially (SentencePiece) correct.
    """

    def __init__(self, tokenizer, skip_special_tokens: bool = True):
        backend = getattr(tokenizer, "backend_tokenizer", None)  # the Rust tokenizer: no Python overhead per call
        if backend is not None:
            decode = lambda ids: backend.decode(ids, skip_special_tokens=skip_special_tokens)  # noqa: E731
        else:
            decode = lambda ids: tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)  # noqa: E731
        # A byte-level model can generate the byte 0; no terminal, JSON consumer or database (PostgreSQL) wants a
        # NUL, so it becomes U+FFFD here, once, and a client, the terminal and the store all see the same text.
        self._decode = lambda ids: decode(ids).replace("\x00", "\ufffd")
        self.ids: list[int] = []
        self.prefix_offset = 0
        self.read_offset = 0

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        prefix_text = self._decode(self.ids[self.prefix_offset:self.read_offset])
        new_text = self._decode(self.ids[self.prefix_offset:])
        if len(new_text) > len(prefix_text) and not new_text.endswith("\ufffd"):
            piece = new_text[len(prefix_text):]
            self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
            return piece
        return ""

    def flush(self) -> str:
        """Whatever is still held back at the end (an incomplete character decodes as U+FFFD)."""
        prefix_text = self._decode(self.ids[self.prefix_offset:self.read_offset])
        new_text = self._decode(self.ids[self.prefix_offset:])
        self.prefix_offset = self.read_offset = len(self.ids)
        return new_text[len(prefix_text):]


class StopMatcher:
    """Cut the output at the first stop string, never emitting any part of one.

    Text that could still grow into a stop string (the longest suffix that is a prefix of one) is held back
    until the next piece shows whether it does. A stop string can therefore span any number of tokens.
    """

    def __init__(self, stops: list[str]):
        self.stops = [s for s in stops if s]
        self.pending = ""

    def push(self, piece: str) -> tuple[str, bool]:
        """Returns (text safe to emit now, whether a stop string was hit)."""
        if not self.stops:
            return piece, False
        text = self.pending + piece
        hits = [i for i in (text.find(s) for s in self.stops) if i >= 0]
        if hits:
            self.pending = ""
            return text[:min(hits)], True
        hold = 0
        for s in self.stops:
            for k in range(min(len(s) - 1, len(text)), hold, -1):
                if text.endswith(s[:k]):
                    hold = k
                    break
        self.pending = text[len(text) - hold:] if hold else ""
        return text[:len(text) - hold], False

    def flush(self) -> str:
        text, self.pending = self.pending, ""
        return text
