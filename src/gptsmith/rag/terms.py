"""What BM25 sees of a text: its words, with code identifiers kept whole and also split into their parts.

LanceDB's default full-text tokenizer cuts at every character that is not a letter or digit, so `__init__` becomes
`init` (and matches every "init" in the documents), `str.join` becomes `str` and `join`, and `KeyError` stays one
word that a question saying "key error" never matches. Both the indexed text and the query go through
`bm25_terms`, and the index splits the result at whitespace only, so:

    bm25_terms("Override __init__ to catch KeyError in str.join()")
    -> "override __init__ init to catch keyerror key error in str.join str join"

An identifier is kept whole (lower-cased) and, when it has inner structure, followed by its parts: the words
between underscores, the words of camelCase/PascalCase, the names between dots. Other words are lower-cased as
they are. Stemming and English stop words are the full-text index's (the same for documents and queries).
"""

from __future__ import annotations

import re

# A dotted identifier (str.join, os.path.join), a plain identifier (__init__, KeyError), a number, or any other run
# of word characters (accented or non-Latin words).
_TOKEN = re.compile(r"[^\W\d]\w*(?:\.[^\W\d]\w*)+|[^\W\d]\w*|\d+(?:\.\d+)?|\w+")
_CAMEL = re.compile(r"[A-Z]+(?=[A-Z][a-z])|[A-Z]?[a-z]+|[A-Z]+|\d+")
MAX_TERM = 40  # the full-text index drops longer tokens; a longer identifier is still found by its parts


def identifier_parts(word: str) -> list[str]:
    """The lower-cased parts of an identifier that has structure (`__init__` -> [init], `KeyError` -> [key,
    error], `os.path.join` -> [os, path, join]); [] for a plain word."""
    parts = []
    for name in word.split("."):
        for piece in name.split("_"):
            camel = _CAMEL.findall(piece)
            parts += [c.lower() for c in camel] if len(camel) > 1 else ([piece.lower()] if piece else [])
    return parts if parts != [word.lower()] else []


def bm25_terms(text: str) -> str:
    out = []
    for word in _TOKEN.findall(text):
        whole = word.lower()
        if len(whole) <= MAX_TERM:
            out.append(whole)
        if not word[0].isdigit():
            out += identifier_parts(word)
    return " ".join(out)
