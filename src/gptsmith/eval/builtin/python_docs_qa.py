"""python-docs-qa: questions a Python programmer asks ("What does str.casefold() do?", "What is the "with"
statement for?"), each with four answers to choose from, made from CPython's embedded documentation
(`pydoc_data.topics`, the same text `gptsmith quickstart` indexes). It measures an ASSISTANT: the right answer is the
documented one, word for word, and the three others are what the documentation says of neighbouring entries (other
string methods for a string method), so a model that is shown the right passage can recognise its answer, and one
that is not must know it. A random pick is right a quarter of the time.

Where an item comes from is part of it (`meta.source`, `meta.lines`: the topic's file as the quickstart writes it,
`TOPIC.rst`, and the 1-based lines of the entry), so the same items are a retrieval question set (`rag eval`
reads "source" + "lines": see `retrieval_records`).

Two kinds of entries, read off the plain-text rendering of the reference manual:
- a documented callable: an unindented signature line (`str.center(width[, fillchar])`, `object.__len__(self)`)
  followed by an indented paragraph; the answer is that paragraph's first sentence;
- a statement's page (`The "try" statement`): the answer is the first sentence of its first prose paragraph.

Items are the same for the same topics (string-seeded random.Random), and `split_of` gives each a fixed split:
"examples" (few-shot examples and fine-tuning data), "dev" (choosing settings) or "test" (the held-out report), so
what is tuned on is never what is reported.
"""

from __future__ import annotations

import builtins
import hashlib
import json
import random
import re
from pathlib import Path

from gptsmith.eval.builtin.python_docs import _stem, cache_dir, topics
from gptsmith.files import atomic_write_text

GENERATOR_VERSION = 1  # bump whenever the code below would write different items from the same topics
N_CHOICES = 4
MIN_ANSWER, MAX_ANSWER = 25, 240  # characters of an answer sentence: says something, short enough to read
SKIP_TOPICS = {"debugger"}  # pdb's commands are written "w(here)": not callables a question can name
# A signature line: a dotted name, then its parameters (`str.split(sep=None, maxsplit=-1)`, `object.__len__(self)`)
_SIGNATURE = re.compile(r"^(?:class |classmethod |staticmethod |awaitable )?([A-Za-z_][\w.]*)\(.*\)\s*$")
_STATEMENT = re.compile(r'^The "([^"]+)" statement\s*$')
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z\"'(])")
_ABBREVIATION = re.compile(r"\b(?:e\.g|i\.e|etc|vs|cf)\.$")
_BUILTIN_NAMES = set(dir(builtins))
SPLITS = (("examples", 0.2), ("dev", 0.3), ("test", 0.5))  # shares by hash of the item's id
CALLABLE_QUESTIONS = ("What does {name} do?", "What is {name} for?", "Can you explain what {name} does?")
STATEMENT_QUESTIONS = ('What is the "{name}" statement for?', 'What does the "{name}" statement do?')


def first_sentence(lines: list[str]) -> str:
    """The first sentence of a paragraph given as lines (joined with single spaces; "e.g." does not end it)."""
    text = " ".join(line.strip() for line in lines)
    start = 0
    for m in _SENTENCE_END.finditer(text):
        if not _ABBREVIATION.search(text[start:m.start()]):
            return text[:m.start()]
    return text


def _paragraph(lines: list[str], i: int) -> tuple[list[str], int]:
    """The lines of the paragraph starting at lines[i] (up to a blank line) and the index after it."""
    j = i
    while j < len(lines) and lines[j].strip():
        j += 1
    return lines[i:j], j


def _statement_answer(name: str, sentence: str) -> str:
    """The page's first sentence with the statement's own name replaced ("It specifies ..."), so the right choice
    is not the only one naming the statement asked about; a sentence leading into a grammar block ends with "."."""
    sentence = re.sub(rf'^The "{re.escape(name)}" statement\b', "It", sentence)
    return sentence[:-1] + "." if sentence.endswith(":") else sentence


def entries(topic: str, text: str) -> list[dict]:
    """The question-worthy entries of one topic: {"kind", "name", "answer", "lines": [first, last]} (1-based).
    Methods documented inside a class block (`class dict(**kwargs)`, then an indented `clear()`) are named with the
    class (`dict.clear()`)."""
    lines = text.replace("\r\n", "\n").split("\n")
    out = []
    m = _STATEMENT.match(lines[0].strip()) if lines else None
    if m:
        i = 1
        while i < len(lines) and (not lines[i].strip() or set(lines[i].strip()) <= set("*=-~^")):
            i += 1
        para, end = _paragraph(lines, i)
        if para and not para[0].startswith((" ", "\t")):
            answer = _statement_answer(m.group(1), first_sentence(para))
            if m.group(1) not in answer:
                out.append({"kind": "statement", "name": m.group(1), "answer": answer, "lines": [1, end]})
    owner = None  # the class whose indented method entries follow
    for i, line in enumerate(lines[:-2]):
        indent = len(line) - len(line.lstrip(" "))
        sig = _SIGNATURE.match(line.strip())
        if indent == 0 and line.strip():
            owner = sig.group(1) if sig and line.startswith("class ") else None
        if not sig or indent not in (0, 3) or lines[i + 1].strip():
            continue
        body = lines[i + 2]
        if len(body) - len(body.lstrip(" ")) != indent + 3 or not body.strip():
            continue
        name = sig.group(1)
        if name in _BUILTIN_NAMES and not line.startswith("class "):
            continue  # a builtin applied to the topic's object ("iter(dictview)", "len(d)"): not its own entry
        if indent == 3:  # a method of the class block above
            if owner is None or "." in name:
                continue
            name = f"{owner}.{name}"
        para, end = _paragraph(lines, i + 2)
        answer = first_sentence(para)
        if answer.endswith(":"):  # leads into a list or an example: not an answer on its own
            continue
        out.append({"kind": "callable", "name": name + "()", "answer": answer, "lines": [i + 1, end]})
    return [e for e in out if MIN_ANSWER <= len(e["answer"]) <= MAX_ANSWER]


def split_of(item_id: str) -> str:
    """The item's split ("examples", "dev" or "test") from the hash of its id: fixed, and independent of which
    other items exist."""
    x = int(hashlib.sha256(f"python-docs-qa/{item_id}".encode()).hexdigest()[:8], 16) / 16**8
    edge = 0.0
    for name, share in SPLITS:
        edge += share
        if x < edge:
            return name
    return SPLITS[-1][0]


def build_items(docs: dict[str, str]) -> list[dict]:
    """Every item, in topic order. Wrong choices come from the same topic when it has enough entries of the same
    kind (other string methods for a string method: the model cannot tell them apart by topic alone), else from
    every topic."""
    found = [(topic, e) for topic in sorted(docs) if topic not in SKIP_TOPICS for e in entries(topic, docs[topic])]
    seen_answers: set[str] = set()
    unique = []
    for topic, e in found:  # a sentence shared by two entries could not tell them apart
        if e["answer"] not in seen_answers:
            seen_answers.add(e["answer"])
            unique.append((topic, e))
    items = []
    for topic, e in unique:
        item_id = f"{topic}/{e['name']}"
        rng = random.Random(f"python-docs-qa/{GENERATOR_VERSION}/{item_id}")
        same_topic = [x["answer"] for t, x in unique if t == topic and x["kind"] == e["kind"] and x is not e]
        pool = same_topic if len(same_topic) >= N_CHOICES - 1 else [
            x["answer"] for _, x in unique if x["kind"] == e["kind"] and x is not e]
        wrong = rng.sample(pool, N_CHOICES - 1)
        answer = rng.randrange(N_CHOICES)
        choices = wrong[:answer] + [e["answer"]] + wrong[answer:]
        form = rng.choice(CALLABLE_QUESTIONS if e["kind"] == "callable" else STATEMENT_QUESTIONS)
        items.append({"id": item_id, "question": form.format(name=e["name"]), "choices": choices, "answer": answer,
                      "meta": {"source": f"{topic}.rst", "lines": e["lines"], "split": split_of(item_id)}})
    return items


def path(docs: dict[str, str] | None = None) -> Path:
    """The python-docs-qa JSONL (every split), generated into the cache on first use."""
    docs = topics() if docs is None else docs
    out = cache_dir() / f"{_stem('python-docs-qa', docs)}-q{GENERATOR_VERSION}.jsonl"
    if not out.is_file():
        atomic_write_text(out, "".join(json.dumps(it, ensure_ascii=False) + "\n" for it in build_items(docs)))
    return out


def retrieval_records(items: list[dict]) -> list[dict]:
    """The items as a `rag eval` question set: relevant = a chunk of the entry's file overlapping its lines."""
    return [{"question": it["question"], "source": it["meta"]["source"], "lines": it["meta"]["lines"],
             "id": it["id"]} for it in items]
