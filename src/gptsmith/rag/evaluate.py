"""Retrieval evaluation on the user's own documents: question/answer pairs made from the index's chunks
(`gptsmith rag questions`), and hit@k, MRR and nDCG@10 of every retrieval setting on them (`gptsmith rag eval`).

Questions come from a teacher model (an OpenAI-compatible URL, or a local model directory) asked for a question a
user could ask that the passage answers, plus its answer, as JSON. Without a teacher a heuristic writes one query per
chunk so the command works offline:

    What does <the chunk's innermost heading, else its file name> say about <t1>, <t2> and <t3>?

where t1..t3 are the chunk's most distinctive words: highest tf-idf (idf over every chunk in the index), stopwords,
numbers, words under 3 letters and the heading's own words left out; ties go to the word that comes first. A second
question per chunk (--per-chunk 2) takes the next three words, and so on. Its answer is the passage itself. Such
queries share words with their passage, which favours BM25; a teacher's questions are the fairer test.

Every record keeps the chunk it came from (id, source, heading, line or page range, citation); a question's relevant
chunk is that one (`match="chunk"`), or with `match="overlap"` any chunk of the same source whose range overlaps it.

A person can write questions too, without chunk ids (they survive re-chunking): one JSON object per line,

    {"question": "How do I pad a number with zeros?", "source": "formatstrings.rst", "lines": [40, 52],
     "answer": "zero-padding"}

`source` matches an indexed chunk's source path by its end (`string-methods.rst` matches
/x/pydocs/string-methods.rst); a chunk of that source is relevant, narrowed by the optional `lines` (1-based,
inclusive: the chunk overlaps them) and `answer` (the chunk holds the phrase, whitespace and case aside). Other
keys are ignored.

Metrics are tie-aware (McSherry & Najork, 2008): hits with equal scores (common in reciprocal rank fusion, where
rank 1 in one retriever and rank 1 in the other fuse to the same score) count as every order of the tied group
equally likely, so no retriever gains or loses by how its ties happened to be broken.
"""

from __future__ import annotations

import json
import math
import os
import random
import re
import time
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from gptsmith.errors import InputError
from gptsmith.files import atomic_write_text, iter_lines
from gptsmith.rag.types import Chunk, Hit

FORMATS = ("qa", "sft")
MATCHES = ("chunk", "overlap")
KS = (1, 5, 10)
NDCG_AT = 10
TEACHER_KEY_ENV = "GPTSMITH_TEACHER_API_KEY"

# ---------------------------------------------------------------------------------------------- records


@dataclass
class QARecord:
    """One question, its answer and the chunk it was made from."""
    question: str
    answer: str
    chunk_id: str
    source: str
    heading: str
    start: int
    end: int
    unit: str
    citation: str
    generator: str  # "heuristic", "teacher:<url or model dir>", or "hand-written"
    lines: tuple[int, int] | None = None  # hand-written: the relevant line range of `source`, if given
    phrase: str = ""  # hand-written: a relevant chunk holds this phrase, if given

    @property
    def handwritten(self) -> bool:
        """Judged by source (lines, phrase), not by the chunk it was made from."""
        return not self.chunk_id

    @classmethod
    def of(cls, question: str, answer: str, chunk_id: str, chunk: Chunk, generator: str) -> QARecord:
        return cls(question, answer, chunk_id, chunk.source, chunk.heading, chunk.start, chunk.end, chunk.unit,
                   chunk.citation(), generator)

    def sft(self) -> dict:
        """An OpenAI `messages` conversation (user: the question, assistant: the answer and where it comes from);
        the chunk it came from rides along under "source" (conversation readers ignore extra keys)."""
        answer = f"{self.answer}\n\nSource: {self.citation}"
        return {"messages": [{"role": "user", "content": self.question}, {"role": "assistant", "content": answer}],
                "source": {"chunk_id": self.chunk_id, "citation": self.citation, "generator": self.generator}}


_RECORD_FIELDS = {"question": str, "chunk_id": str, "source": str, "start": int, "end": int}
HANDWRITTEN = "hand-written"


def _handwritten(rec: dict, where: str) -> QARecord:
    for key in ("question", "source"):
        if not isinstance(rec.get(key), str) or not rec[key].strip():
            raise InputError(f"{where}: field '{key}' is missing or not a non-empty string; a hand-written question "
                             'is {"question": "...", "source": "file name or path end"} with optional "lines": '
                             '[start, end] and "answer": "a phrase of the passage"')
    lines = rec.get("lines")
    if lines is not None:
        if not (isinstance(lines, list) and len(lines) == 2 and all(type(n) is int for n in lines)
                and 1 <= lines[0] <= lines[1]):
            raise InputError(f"{where}: field 'lines' must be [start, end], whole numbers with 1 <= start <= end "
                             f"(1-based, inclusive); got {json.dumps(lines)}")
        lines = (lines[0], lines[1])
    answer = rec.get("answer")
    if answer is not None and (not isinstance(answer, str) or not answer.strip()):
        raise InputError(f"{where}: field 'answer' must be a non-empty string (a phrase the relevant passage "
                         "holds), or left out")
    start, end = lines or (0, 0)
    return QARecord(rec["question"].strip(), (answer or "").strip(), "", rec["source"].strip(), "", start, end,
                    "line", rec["source"].strip(), HANDWRITTEN, lines, " ".join((answer or "").split()))


def read_questions(path: str | os.PathLike) -> list[QARecord]:
    """The records of a `rag questions --format qa` file, or hand-written questions (no chunk_id: see the module
    docstring); a bad line is an InputError naming FILE:LINE and the field."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: no such file; write one with `gptsmith rag questions --index DIR --out {path}`")
    records = []
    for n, raw in iter_lines(path):
        if not raw.strip():
            continue
        where = f"{path}:{n}"
        try:
            rec = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise InputError(f"{where}: not valid JSON ({e}); each line must be one record written by "
                             "`gptsmith rag questions`") from None
        if isinstance(rec, dict) and "messages" in rec:
            raise InputError(f"{where}: this is an SFT conversation (--format sft); evaluation needs the question "
                             "records, written with `gptsmith rag questions --format qa` (the default)")
        if not isinstance(rec, dict):
            raise InputError(f"{where}: expected a JSON object, got {type(rec).__name__}")
        if not rec.get("chunk_id"):  # no chunk id (or an empty placeholder): a question a person wrote
            records.append(_handwritten(rec, where))
            continue
        for key, kind in _RECORD_FIELDS.items():
            if not isinstance(rec.get(key), kind) or (kind is str and not rec[key].strip()):
                wanted = "non-empty string" if kind is str else "whole number"
                raise InputError(f"{where}: field '{key}' is missing or not a {wanted}; records need question, "
                                 "chunk_id, source, start and end")
        records.append(QARecord(rec["question"], str(rec.get("answer") or ""), rec["chunk_id"], rec["source"],
                                str(rec.get("heading") or ""), rec["start"], rec["end"], str(rec.get("unit") or "line"),
                                str(rec.get("citation") or ""), str(rec.get("generator") or "")))
    if not records:
        raise InputError(f"{path}: no question records in the file")
    return records


def _qa_json(r: QARecord) -> dict:
    out = asdict(r)
    lines, phrase = out.pop("lines"), out.pop("phrase")
    if r.handwritten:  # written back in the form a person writes
        return {"question": r.question, "source": r.source, **({"lines": list(lines)} if lines else {}),
                **({"answer": phrase} if phrase else {})}
    return out


def write_questions(records: Sequence[QARecord], out: str | os.PathLike, fmt: str = "qa") -> None:
    if fmt not in FORMATS:
        raise InputError(f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}")
    lines = [json.dumps(_qa_json(r) if fmt == "qa" else r.sft(), ensure_ascii=False) for r in records]
    atomic_write_text(out, "".join(line + "\n" for line in lines))


# ---------------------------------------------------------------------------------------------- heuristic questions

STOPWORDS = frozenset("""
a about above after again against all also an and any are as at be because been before being below between both
but by can could did do does doing done down during each either else etc even ever every few for from further get
gets given gives had has have having here how however if in into is it its itself just last least less let like
made make makes many may might more most much must my need needs new next no none nor not now of off often on once
one only or other others our out over own per rather same see seen several shall should since so some such than
that the their them then there these they this those though through thus to too two under until up upon us use used
uses using very via was way we well were what when where whether which while who whom whose why will with within
without would yet you your e.g i.e example examples following note section value values true false none return
returns returned
""".split())

_WORD = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z_][A-Za-z0-9_]*)*")


def words(text: str) -> list[str]:
    """The words (identifiers like `str.join` kept whole) of a text, in order."""
    return _WORD.findall(text)


def _content_words(text: str) -> list[str]:
    return [w for w in words(text) if len(w) >= 3 and w.lower() not in STOPWORDS]


def document_frequencies(texts: Iterable[str]) -> tuple[Counter, int]:
    """How many of `texts` each lower-cased content word occurs in, and how many texts there were."""
    df, n = Counter(), 0
    for text in texts:
        df.update({w.lower() for w in _content_words(text)})
        n += 1
    return df, n


def distinctive_terms(text: str, df: Counter, n_docs: int, exclude: Iterable[str] = ()) -> list[str]:
    """The chunk's content words by tf-idf, highest first (first occurrence breaks ties), each once, in the form it
    first appears in; words in `exclude` (the heading's) left out."""
    skip = {w.lower() for w in exclude}
    tf, first, shown = Counter(), {}, {}
    for i, w in enumerate(_content_words(text)):
        key = w.lower()
        if key in skip:
            continue
        tf[key] += 1
        first.setdefault(key, i)
        shown.setdefault(key, w)

    def tfidf(key: str) -> float:
        return tf[key] * (math.log((n_docs + 1) / (df.get(key, 0) + 1)) + 1)

    return [shown[k] for k in sorted(tf, key=lambda k: (-tfidf(k), first[k]))]


def heuristic_questions(chunk: Chunk, df: Counter, n_docs: int, n: int = 1) -> list[str]:
    """Up to `n` queries for `chunk` (the module docstring says how); fewer when it has too few distinctive words."""
    leaf = chunk.heading.split(" > ")[-1].strip() if chunk.heading else ""
    where = f'"{leaf}"' if leaf else Path(chunk.source).name
    terms = distinctive_terms(chunk.text, df, n_docs, exclude=words(leaf))
    out = []
    for i in range(n):
        group = terms[3 * i:3 * i + 3]
        if len(group) < 2 and (i or not leaf):  # one word (or none) is no question, unless the heading carries it
            break
        if not group:
            break
        about = group[0] if len(group) == 1 else ", ".join(group[:-1]) + f" and {group[-1]}"
        out.append(f"What does {where} say about {about}?")
    return out


# ---------------------------------------------------------------------------------------------- teachers

# The teacher prompt is written for small local models too (SmolLM2-135M-Instruct, asked for JSON, mostly wrote
# off-topic questions): plain "Answer: / Question:" lines, one worked example as an earlier turn of the
# conversation, the passage's title. The answer comes first, copied from the passage, and the question is asked
# about it: asked for the question first, SmolLM2 then made up answers the passage does not hold (9% of its pairs
# were usable). A local teacher's reply is also started with "Answer:" for it.
TEACHER_ASK = ("Copy {ask} from this passage that answers something a user might want to know, then write the "
               "question the user would ask, in their own words. Do not copy the passage into the question, and do "
               'not mention the passage. Reply with {lines}: "Answer: ..." and "Question: ...".')
TEACHER_EXAMPLE = ("Title: typesseq mutable > Mutable Sequence Types\nPassage:\n"
                   "s.reverse()  reverses the items of s in place\n"
                   "s.pop([i])  retrieves the item at i and also removes it from s")
TEACHER_EXAMPLE_REPLY = ("Answer: s.reverse() reverses the items of s in place.\n"
                         "Question: How can I reverse a list without making a copy of it?")
TEACHER_PREFILL = "Answer:"


def teacher_messages(chunk: Chunk, n: int) -> list[dict]:
    """The prompt asking a teacher for `n` question/answer pairs that `chunk` answers."""
    ask = TEACHER_ASK.format(ask="one sentence" if n == 1 else f"{n} different sentences",
                             lines="two lines" if n == 1 else f"{n} pairs of lines")
    return [{"role": "user", "content": f"{ask}\n\n{TEACHER_EXAMPLE}"},
            {"role": "assistant", "content": TEACHER_EXAMPLE_REPLY},
            {"role": "user", "content": f"{ask}\n\nTitle: {chunk.context()}\nPassage:\n{chunk.text}"}]


_LINE_PAIR_AQ = re.compile(r"(?:^|\n)\W*A(?:nswer)?\s*\d*\s*[:.]\s*(.+?)\s*\n+\W*Q(?:uestion)?\s*\d*\s*[:.]\s*"
                           r"(.+?\?)", re.S | re.I)
_LINE_PAIR = re.compile(r"(?:^|\n)\W*Q(?:uestion)?\s*\d*\s*[:.]\s*(.+?)\s*\n+\W*A(?:nswer)?\s*\d*\s*[:.]\s*(.+?)"
                        r"\s*(?=\n\W*Q(?:uestion)?\s*\d*\s*[:.]|\n\n|$)", re.S | re.I)


def _json_values(text: str) -> Iterable[object]:
    """Every JSON object or array found in `text`, scanning left to right (prose, code fences around it are fine)."""
    decoder, i = json.JSONDecoder(), 0
    while i < len(text):
        if text[i] in "{[":
            try:
                value, end = decoder.raw_decode(text, i)
            except json.JSONDecodeError:
                i += 1
                continue
            yield value
            i = end
        else:
            i += 1


def _pairs_in(value: object) -> list[tuple[str, str]]:
    if isinstance(value, list):
        return [p for item in value for p in _pairs_in(item)]
    if not isinstance(value, dict):
        return []
    keys = {str(k).lower(): v for k, v in value.items()}
    q, a = keys.get("question", keys.get("q")), keys.get("answer", keys.get("a"))
    if isinstance(q, str) and isinstance(a, str) and q.strip() and a.strip():
        return [(q.strip(), a.strip())]
    return [p for v in value.values() if isinstance(v, (list, dict)) for p in _pairs_in(v)]


def parse_pairs(text: str) -> list[tuple[str, str]]:
    """The (question, answer) pairs in a teacher's reply (after any <think> block): "Question: ... / Answer: ..."
    lines, else JSON anywhere in it (one object, a list of them, or a list under any key). ValueError when there is
    none."""
    text = re.sub(r"<think>.*?</think>", "", text, flags=re.S)
    pairs = [(q.strip().strip('"'), " ".join(a.split()).strip('"')) for q, a in _LINE_PAIR.findall(text)]
    if not pairs:  # the order this module's own prompt asks for: the answer, then its question
        pairs = [(q.strip().strip('"'), " ".join(a.split()).strip('"')) for a, q in _LINE_PAIR_AQ.findall(text)]
    pairs = [p for p in pairs if p[0] and p[1]]
    if not pairs:
        pairs = [p for value in _json_values(text) for p in _pairs_in(value)]
    if not pairs:
        raise ValueError("no question and answer in the reply")
    return list(dict.fromkeys(pairs))


NO_PAIR = "reply had no 'Answer: ... Question: ...' lines (nor JSON with a question and an answer)"
_MENTIONS_SOURCE = re.compile(r"\b(?:the|this|that|above|given|following) (?:passage|text|document|excerpt|section|"
                              r"paragraph|article|context)\b", re.I)
COPY_WORDS = 6  # a question sharing a run of this many words with its passage copies it
GROUNDED = 0.5  # share of the answer's content words that must be in the passage


def question_problem(question: str, answer: str, passage: str) -> str | None:
    """Why a teacher's pair is unusable as a test of retrieval in a user's words, or None when it is fine."""
    if "?" not in question:
        return "question without a question mark"
    if _MENTIONS_SOURCE.search(question):
        return "question mentions the passage (makes no sense on its own)"
    said = [w.lower() for w in re.findall(r"\w+", question)]
    text = " " + " ".join(w.lower() for w in re.findall(r"\w+", passage)) + " "
    if any(f" {' '.join(said[i:i + COPY_WORDS])} " in text for i in range(len(said) - COPY_WORDS + 1)):
        return f"question copies {COPY_WORDS}+ words of the passage"
    content = [w for w in _content_words(answer)]
    found = {w.lower() for w in _content_words(passage)}
    if not content or sum(w.lower() in found for w in content) < GROUNDED * len(content):
        return "answer not found in the passage"
    return None


@dataclass
class TeacherReply:
    text: str | None  # the model's reply; None when the request was refused for this chunk
    problem: str = ""  # why it was refused (a prompt too long for the teacher's context, ...)


class HTTPTeacher:
    """Any OpenAI-compatible server: POST {base}/chat/completions. Spec `URL` or `URL#model`; without a model the
    server's first listed model. The API key, if any, from $GPTSMITH_TEACHER_API_KEY."""

    def __init__(self, spec: str, max_tokens: int = 384, temperature: float = 0.0, timeout: float = 300.0,
                 concurrency: int = 4):
        import httpx

        url, _, model = spec.partition("#")
        self.base = url.rstrip("/").removesuffix("/chat/completions")
        if not self.base.endswith("/v1"):
            self.base += "/v1"
        self.name = f"teacher:{spec}"
        key = os.environ.get(TEACHER_KEY_ENV)
        self.client = httpx.Client(timeout=timeout, headers={"Authorization": f"Bearer {key}"} if key else {})
        self.max_tokens, self.temperature, self.concurrency = max_tokens, temperature, concurrency
        self.model = model or self._first_model()

    def _request(self, method: str, path: str, **kwargs):
        import httpx

        try:
            response = self.client.request(method, self.base + path, **kwargs)
        except httpx.HTTPError as e:
            raise InputError(f"teacher {self.base}: cannot reach it ({e}); start the server or fix --teacher") from None
        if response.status_code in (401, 403, 404) or response.status_code >= 500:
            hint = {401: f"set ${TEACHER_KEY_ENV}", 403: f"check ${TEACHER_KEY_ENV}",
                    404: "give the server's OpenAI base URL, e.g. http://host:8000/v1"}.get(response.status_code,
                                                                                          "check the server's log")
            raise InputError(f"teacher {self.base}{path}: HTTP {response.status_code}: {response.text[:300]}; {hint}")
        return response

    def _first_model(self) -> str:
        response = self._request("GET", "/models")
        try:
            return response.json()["data"][0]["id"]
        except (ValueError, KeyError, IndexError, TypeError):
            raise InputError(f"teacher {self.base}: /models lists no model; name one as --teacher URL#MODEL") from None

    def _ask_one(self, messages: list[dict]) -> TeacherReply:
        body = {"model": self.model, "messages": messages, "max_tokens": self.max_tokens,
                "temperature": self.temperature}
        response = self._request("POST", "/chat/completions", json=body)
        if response.status_code >= 400:  # about this prompt (too long for the model, ...): skip this chunk
            return TeacherReply(None, f"HTTP {response.status_code}: {response.text[:200]}")
        try:
            return TeacherReply(response.json()["choices"][0]["message"]["content"] or "")
        except (ValueError, KeyError, IndexError, TypeError):
            return TeacherReply(None, f"not an OpenAI chat completion: {response.text[:200]}")

    def ask(self, prompts: list[list[dict]]) -> list[TeacherReply]:
        with ThreadPoolExecutor(self.concurrency) as pool:
            return list(pool.map(self._ask_one, prompts))

    def close(self) -> None:
        self.client.close()


class LocalTeacher:
    """A local model directory, run by gptsmith's engine (greedy, so the same index gives the same questions)."""

    def __init__(self, model_dir: str | os.PathLike, max_tokens: int = 384, device: str = "auto"):
        from gptsmith.engine import Engine

        self.engine = Engine.load(model_dir, device=device)
        self.name = f"teacher:{model_dir}"
        self.max_tokens = max_tokens
        self.concurrency = 8  # prompts decoded together in one batch

    def ask(self, prompts: list[list[dict]]) -> list[TeacherReply]:
        from gptsmith.engine import SamplingParams

        # Stop where a small model would start a second, unasked pair or ramble on after a blank line.
        params = self.engine.resolve(SamplingParams(max_new_tokens=self.max_tokens, temperature=0.0,
                                                    stop=["\n\n", "\nAnswer:"]))
        prefill = self.engine.encode(TEACHER_PREFILL)
        replies: list[TeacherReply | None] = [None] * len(prompts)
        todo, ids = [], []
        for i, messages in enumerate(prompts):
            try:  # the reply starts with "Answer:": a small model then copies a sentence, not a chat reply
                ids.append(self.engine.encode_chat(messages, self.max_tokens + len(prefill)) + prefill)
                todo.append(i)
            except ValueError as e:  # the passage alone fills the teacher's context
                replies[i] = TeacherReply(None, str(e))
        if todo:  # each answer gets what is left of the context, up to max_tokens
            per_prompt = [replace(params, max_new_tokens=min(self.max_tokens, self.engine.max_context - len(p)))
                          for p in ids]
            for i, completion in zip(todo, self.engine.generate(ids, per_prompt)):
                replies[i] = TeacherReply(TEACHER_PREFILL + completion.text)
        return replies  # type: ignore[return-value]

    def close(self) -> None: ...


def load_teacher(spec: str, max_tokens: int = 384):
    """`spec`: an http(s) URL of an OpenAI-compatible server (optionally `URL#model`), or a local model directory."""
    if re.match(r"https?://", spec):
        return HTTPTeacher(spec, max_tokens=max_tokens)
    if Path(spec).is_dir():
        return LocalTeacher(spec, max_tokens=max_tokens)
    raise InputError(f"--teacher {spec}: neither an http(s):// URL of an OpenAI-compatible server nor a model "
                     "directory")


# ---------------------------------------------------------------------------------------------- generation


@dataclass
class QuestionsReport:
    chunks_in_index: int = 0
    chunks_sampled: int = 0
    records: int = 0
    skipped: Counter = field(default_factory=Counter)  # reason -> chunks that gave no question
    rejected: Counter = field(default_factory=Counter)  # reason -> teacher's pairs filtered out

    @property
    def yield_(self) -> float:
        """Usable questions per chunk sampled."""
        return self.records / self.chunks_sampled if self.chunks_sampled else 0.0
    generator: str = ""
    seconds: float = 0.0


def sample_chunks(chunks: Sequence[tuple[str, Chunk]], max_chunks: int | None, seed: int) -> list[tuple[str, Chunk]]:
    """`max_chunks` of (id, chunk), the same ones for the same index and seed whatever order the index returns."""
    ordered = sorted(chunks, key=lambda c: (c[1].source, c[1].unit, c[1].start, c[1].end, c[0]))
    if max_chunks is None or max_chunks >= len(ordered):
        return ordered
    picked = sorted(random.Random(seed).sample(range(len(ordered)), max_chunks))
    return [ordered[i] for i in picked]


def make_questions(chunks: Sequence[tuple[str, Chunk]], teacher=None, per_chunk: int = 1,
                   max_chunks: int | None = 200, seed: int = 0,
                   on_progress: Callable[[int], None] | None = None) -> tuple[list[QARecord], QuestionsReport]:
    """Question records for a deterministic sample of `chunks` ((id, Chunk) pairs: the whole index, whose word
    statistics the heuristic uses). `teacher`: None (the heuristic), or a load_teacher() object."""
    if per_chunk < 1:
        raise InputError(f"--per-chunk must be at least 1 (got {per_chunk})")
    if max_chunks is not None and max_chunks < 1:
        raise InputError(f"--max-chunks must be positive, or 0 for every chunk (got {max_chunks})")
    t0 = time.perf_counter()
    sample = sample_chunks(chunks, max_chunks, seed)
    report = QuestionsReport(len(chunks), len(sample), generator=teacher.name if teacher else "heuristic")
    records: list[QARecord] = []
    if teacher is None:
        df, n_docs = document_frequencies(c.text for _, c in chunks)
        for cid, chunk in sample:
            questions = heuristic_questions(chunk, df, n_docs, per_chunk)
            if not questions:
                report.skipped["too few distinctive words for a question"] += 1
            records += [QARecord.of(q, chunk.text, cid, chunk, "heuristic") for q in questions]
            if on_progress:
                on_progress(1)
    else:
        step, seen = max(1, teacher.concurrency), set()
        for i in range(0, len(sample), step):
            batch = sample[i:i + step]
            replies = teacher.ask([teacher_messages(chunk, per_chunk) for _, chunk in batch])
            for (cid, chunk), reply in zip(batch, replies):
                if reply.text is None:
                    report.skipped[f"teacher refused the prompt ({reply.problem[:120]})"] += 1
                    continue
                try:
                    pairs = parse_pairs(reply.text)[:per_chunk]
                except ValueError:
                    report.skipped[NO_PAIR] += 1
                    continue
                kept = []
                for q, a in pairs:
                    problem = question_problem(q, a, chunk.searchable())
                    if problem is None and q.lower() not in seen:
                        kept.append((q, a))
                        seen.add(q.lower())
                    elif problem is not None:
                        report.rejected[problem] += 1
                    else:
                        report.rejected["same question as another chunk's"] += 1
                if not kept:
                    report.skipped["no usable question (see rejected)"] += 1
                records += [QARecord.of(q, a, cid, chunk, teacher.name) for q, a in kept]
            if on_progress:
                on_progress(len(batch))
    report.records = len(records)
    report.seconds = time.perf_counter() - t0
    return records, report


# ---------------------------------------------------------------------------------------------- metrics


def ranking_metrics(ranked: Sequence[tuple[bool, float]], n_relevant: int, ks: Sequence[int] = KS,
                    ndcg_at: int = NDCG_AT) -> dict[str, float]:
    """hit@k, reciprocal rank and nDCG@`ndcg_at` of one ranked list of (is it relevant, score), best first, with
    binary relevance; `n_relevant` = relevant items in the whole collection (for the ideal DCG). Items with equal
    scores form a tie group whose every order is equally likely: the metrics are their expected values."""
    groups: list[tuple[int, int, int]] = []  # (first position, size, relevant in it)
    pos = 1
    for _, group in _tie_groups(ranked):
        groups.append((pos, len(group), sum(rel for rel, _ in group)))
        pos += len(group)
    out = {f"hit@{k}": _hit_at(groups, k) for k in ks}
    out["mrr"] = _reciprocal_rank(groups)
    ideal = sum(1 / math.log2(i + 1) for i in range(1, min(max(n_relevant, sum(g[2] for g in groups)), ndcg_at) + 1))
    dcg = sum((r / n) / math.log2(p + 1) for start, n, r in groups for p in range(start, start + n) if p <= ndcg_at)
    out[f"ndcg@{ndcg_at}"] = dcg / ideal if ideal else 0.0
    return out


def _tie_groups(ranked: Sequence[tuple[bool, float]]) -> Iterable[tuple[float, list[tuple[bool, float]]]]:
    group: list[tuple[bool, float]] = []
    for item in ranked:
        if group and not math.isclose(item[1], group[0][1], rel_tol=1e-9, abs_tol=1e-12):
            yield group[0][1], group
            group = []
        group.append(item)
    if group:
        yield group[0][1], group


def _hit_at(groups: list[tuple[int, int, int]], k: int) -> float:
    """P(a relevant item in the top k): decided by the first group holding one."""
    for start, n, r in groups:
        if r == 0:
            continue
        inside = max(0, min(n, k - start + 1))  # how many of the group's positions are within the top k
        return 1 - math.comb(n - r, inside) / math.comb(n, inside) if inside else 0.0
    return 0.0


def _reciprocal_rank(groups: list[tuple[int, int, int]]) -> float:
    """E[1 / rank of the first relevant item], over the orders of the first group that holds one."""
    for start, n, r in groups:
        if r == 0:
            continue
        at_least = [math.comb(n - j, r) / math.comb(n, r) for j in range(n - r + 2)]  # P(first relevant offset >= j)
        return sum((at_least[j] - at_least[j + 1]) / (start + j) for j in range(n - r + 1))
    return 0.0


# ---------------------------------------------------------------------------------------------- evaluation


@dataclass
class ModeResult:
    name: str  # bm25 | vector | hybrid | hybrid+rerank (or a benchmark's own setting names)
    metrics: dict[str, float]  # mean over questions: hit@1, hit@5, hit@10, mrr, ndcg@10
    p50_ms: float
    p95_ms: float
    ci95: dict[str, tuple[float, float]] = field(default_factory=dict)  # bootstrap interval of each mean
    search: dict = field(default_factory=dict)  # the Retriever.search keywords of this setting
    per_question: list[dict[str, float]] = field(default_factory=list, repr=False)


@dataclass
class EvalReport:
    questions: int
    top_k: int
    match: str
    stale: int  # generated questions whose chunk is no longer in the index (its file changed): they count as misses
    generators: list[str]
    modes: list[ModeResult]
    unmatched: list[int] = field(default_factory=list)  # 0-based positions of questions no indexed chunk answers

    def best(self) -> ModeResult:
        """Highest MRR, then nDCG; a tie goes to the faster setting (so a reranker is kept only where it helps)."""
        return max(self.modes, key=lambda m: (round(m.metrics["mrr"], 9), round(m.metrics[f"ndcg@{NDCG_AT}"], 9),
                                              -m.p50_ms))

    def to_json(self) -> dict:
        return {"questions": self.questions, "top_k": self.top_k, "match": self.match, "stale": self.stale,
                "unmatched": len(self.unmatched), "generators": self.generators, "best": self.best().name,
                "chosen": (verdict := choose_setting(self)).chosen.name, "choice_reason": verdict.reason,
                "modes": {m.name: {**m.metrics, "ci95": {k: list(v) for k, v in m.ci95.items()},
                                   "p50_ms": m.p50_ms, "p95_ms": m.p95_ms} for m in self.modes}}


def eval_modes(has_reranker: bool) -> list[tuple[str, dict]]:
    """(row name, Retriever.search keyword arguments) for each setting compared."""
    modes = [("bm25", {"mode": "bm25", "rerank": False}), ("vector", {"mode": "vector", "rerank": False}),
             ("hybrid", {"mode": "hybrid", "rerank": False})]
    return modes + ([("hybrid+rerank", {"mode": "hybrid", "rerank": True})] if has_reranker else [])


def _overlaps(q: QARecord, c: Chunk) -> bool:
    return c.source == q.source and c.unit == q.unit and c.start <= q.end and q.start <= c.end


def source_matches(wanted: str, source: str) -> bool:
    """A hand-written question's `source` names an indexed file by its path's end: `string-methods.rst` and
    `pydocs/string-methods.rst` both match /x/pydocs/string-methods.rst (whole path components only)."""
    wanted = wanted.replace("\\", "/").removeprefix("./")
    return source == wanted or source.endswith("/" + wanted.lstrip("/"))


def _answers(q: QARecord, c: Chunk) -> bool:
    """Is `c` relevant to a hand-written question: its source, overlapping its lines, holding its phrase."""
    if not source_matches(q.source, c.source):
        return False
    if q.lines and not (c.start <= q.lines[1] and q.lines[0] <= c.end):
        return False
    return not q.phrase or q.phrase.lower() in " ".join(c.text.split()).lower()


def relevance(questions: Sequence[QARecord], index_chunks: dict[str, Chunk], match: str
              ) -> list[tuple[Callable[[Hit], bool], int]]:
    """For each question: a test of whether a hit is relevant, and how many chunks of the index are. Hand-written
    questions are judged by source (see the module docstring) whatever `match` says."""
    if match not in MATCHES:
        raise InputError(f"unknown match {match!r}; choose one of {', '.join(MATCHES)}")
    out = []
    for q in questions:
        if q.handwritten:
            out.append(((lambda h, q=q: _answers(q, h.chunk)), sum(_answers(q, c) for c in index_chunks.values())))
        elif match == "chunk":
            out.append(((lambda h, cid=q.chunk_id: h.id == cid), int(q.chunk_id in index_chunks)))
        else:
            n = sum(_overlaps(q, c) for c in index_chunks.values())
            out.append(((lambda h, q=q: _overlaps(q, h.chunk)), n))
    return out


def _percentile(values: Sequence[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(p / 100 * len(ordered)) - 1))] if ordered else 0.0


BOOTSTRAP = 2000  # resamples for the 95% intervals


def bootstrap_ci(values: Sequence[float], resamples: int = BOOTSTRAP, seed: int = 0) -> tuple[float, float]:
    """95% percentile-bootstrap interval of the mean of per-question values (questions resampled with
    replacement; a fixed seed, so the same results give the same interval)."""
    import numpy as np

    if not values:
        return (0.0, 0.0)
    data = np.asarray(values, dtype=np.float64)
    idx = np.random.default_rng(seed).integers(0, len(data), size=(resamples, len(data)))
    means = data[idx].mean(axis=1)
    return (float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5)))


METRICS = [f"hit@{k}" for k in KS] + ["mrr", f"ndcg@{NDCG_AT}"]


def evaluate(retriever, questions: Sequence[QARecord], index_chunks: dict[str, Chunk], top_k: int = 10,
             match: str = "chunk", has_reranker: bool = False,
             on_progress: Callable[[int], None] | None = None,
             settings: Sequence[tuple[str, dict]] | None = None) -> EvalReport:
    """Run every question through every retrieval setting of `retriever` (a gptsmith.rag.retrieve.Retriever) and
    average the metrics, with bootstrap 95% intervals; `index_chunks` = id -> Chunk of the whole index (to find
    questions whose chunk is gone, and the relevant chunks under match="overlap" or of hand-written questions).
    `settings`: (name, Retriever.search keywords) to compare instead of eval_modes(). Latency is per query, after
    one warm-up query per setting."""
    if top_k < 1:
        raise InputError(f"--top-k must be at least 1 (got {top_k})")
    if not questions:
        raise InputError("no questions to evaluate; write some with `gptsmith rag questions`")
    judges = relevance(questions, index_chunks, match)
    results = []
    for name, kwargs in settings or eval_modes(has_reranker):
        retriever.search(questions[0].question, top_k=top_k, **kwargs)  # warm-up: loads models, opens the table
        retriever.clear_cache()  # each setting pays for embedding its queries, as a new question does
        per_question, latencies = [], []
        for q, (is_relevant, n_relevant) in zip(questions, judges):
            t0 = time.perf_counter()
            hits = retriever.search(q.question, top_k=top_k, **kwargs)
            latencies.append((time.perf_counter() - t0) * 1000)
            per_question.append(ranking_metrics([(is_relevant(h), h.score) for h in hits], n_relevant))
            if on_progress:
                on_progress(1)
        metrics = {k: sum(m[k] for m in per_question) / len(questions) for k in METRICS}
        ci95 = {k: bootstrap_ci([m[k] for m in per_question]) for k in METRICS}
        results.append(ModeResult(name, metrics, _percentile(latencies, 50), _percentile(latencies, 95), ci95,
                                  dict(kwargs), per_question))
    stale = sum(not q.handwritten and q.chunk_id not in index_chunks for q in questions) if match == "chunk" \
        else sum(not q.handwritten and n == 0 for q, (_, n) in zip(questions, judges))
    unmatched = [i for i, (q, (_, n)) in enumerate(zip(questions, judges)) if q.handwritten and n == 0]
    generators = sorted({q.generator for q in questions if q.generator})
    return EvalReport(len(questions), top_k, match, stale, generators, results, unmatched)


def render_report(report: EvalReport, console=None, questions: Sequence[QARecord] = ()) -> None:
    """The comparison table (rich), best value of each column in bold, and which setting to serve."""
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    kinds = "hand-written questions" if report.generators == [HANDWRITTEN] else "questions"
    table = Table(title=f"Retrieval on {report.questions} {kinds} (top-k {report.top_k}, relevant = "
                        f"{'the source chunk' if report.match == 'chunk' else 'chunks overlapping the source'}"
                        f"{'; hand-written: by source' if HANDWRITTEN in report.generators else ''}; "
                        "95% intervals below)")
    table.add_column("setting", no_wrap=True, min_width=max(len(m.name) for m in report.modes))
    for c in METRICS:
        table.add_column(c.upper() if c == "mrr" else c, justify="right")
    table.add_column("p50 ms", justify="right")
    table.add_column("p95 ms", justify="right")
    best = {c: max(m.metrics[c] for m in report.modes) for c in METRICS}
    for m in report.modes:
        cells = [(f"[bold]{m.metrics[c]:.3f}[/bold]" if m.metrics[c] == best[c] else f"{m.metrics[c]:.3f}")
                 for c in METRICS]
        table.add_row(m.name, *cells, f"{m.p50_ms:.1f}", f"{m.p95_ms:.1f}")
    console.print(table)
    # Intervals on lines of their own: inside the table they would not fit an 80-column terminal.
    for m in report.modes:
        if "mrr" in m.ci95:
            console.print(f"  95% intervals, {m.name}: hit@5 {m.ci95['hit@5'][0]:.2f}-{m.ci95['hit@5'][1]:.2f}, "
                          f"MRR {m.ci95['mrr'][0]:.2f}-{m.ci95['mrr'][1]:.2f}, nDCG@{NDCG_AT} "
                          f"{m.ci95[f'ndcg@{NDCG_AT}'][0]:.2f}-{m.ci95[f'ndcg@{NDCG_AT}'][1]:.2f}", highlight=False)
    top = report.best()
    console.print(f"Best on these questions: {top.name} (MRR {top.metrics['mrr']:.3f}). {choose_setting(report).reason}"
                  f". `gptsmith rag eval --save` records that choice in the index; `rag query`, `ask` and `serve` "
                  "then use it unless told otherwise", highlight=False)
    if report.stale:
        console.print(f"[yellow]{report.stale} question(s) come from chunks no longer in the index (their file "
                      "changed since `rag questions`); they count as misses. Re-run `rag questions`"
                      + (", or pass --match overlap." if report.match == "chunk" else ".") + "[/yellow]")
    if report.unmatched:
        shown = "; ".join(f"{questions[i].source}: {questions[i].question[:60]}" for i in report.unmatched[:5]
                          if i < len(questions))
        console.print(f"[yellow]{len(report.unmatched)} hand-written question(s) match no indexed chunk (source "
                      "not indexed, lines outside it, or no chunk holds the answer phrase); they count as misses"
                      + (f": {shown}" if shown else "") + "[/yellow]")
    if report.generators == ["heuristic"]:
        console.print("Questions from the heuristic share words with their passage, which favours bm25; questions "
                      "from a teacher (--teacher) are the fairer test.")


DEFAULT_SETTING = "hybrid"  # what an index serves until a measurement shows something better: hybrid, no rerank
# A challenger replaces the default only when the paired bootstrap interval of its per-question reciprocal-rank
# difference excludes zero at this confidence (90%: the choice is reversible and cheap to re-measure, so a 1-in-10
# chance of keeping a tie's winner is acceptable), and only over at least MIN_CHOICE_QUESTIONS questions: below
# ~10 a bootstrap interval is itself too unstable to trust (few distinct resamples; one question moves MRR by 0.1).
CHOICE_CONFIDENCE = 0.90
MIN_CHOICE_QUESTIONS = 10


@dataclass
class Verdict:
    """Which setting to record and why: the default unless a challenger's difference is measured."""

    chosen: ModeResult
    default: ModeResult
    challenger: ModeResult | None  # the point-best other setting (None when the default measured best)
    diff: tuple[float, float, float] | None  # MRR(challenger) - MRR(default) over the same questions, lo, hi
    decided: bool  # True when the challenger replaced the default
    reason: str


def _default_row(report: EvalReport) -> ModeResult | None:
    for m in report.modes:
        if m.name == DEFAULT_SETTING or (m.search.get("mode") == DEFAULT_SETTING and not m.search.get("rerank")
                                         and not set(m.search) - {"mode", "rerank"}):
            return m
    return None


def choose_setting(report: EvalReport) -> Verdict:
    """The setting `--save` records: the default (hybrid, no rerank) unless the point-best challenger beats it by
    a paired interval that excludes zero (CHOICE_CONFIDENCE) over at least MIN_CHOICE_QUESTIONS questions. One
    challenger is tested (the best by MRR), not each in turn, so the confidence is not spent on several tries."""
    from gptsmith.eval.stats import paired_diff_ci, significant  # a leaf module (numpy, scipy): no upward coupling

    default = _default_row(report)
    top = report.best()
    if default is None:  # a comparison without the default row (a benchmark's own settings): nothing to keep
        return Verdict(top, top, None, None, True, f"chose {top.name}: the default {DEFAULT_SETTING} was not "
                       f"measured (MRR {top.metrics['mrr']:.3f} over {report.questions} questions)")
    challengers = [m for m in report.modes if m is not default]
    if not challengers or top is default:
        return Verdict(default, default, None, None, False, f"kept {default.name}: it measured best (MRR "
                       f"{default.metrics['mrr']:.3f} over {report.questions} questions)")
    challenger = top
    a = [q["mrr"] for q in default.per_question]
    b = [q["mrr"] for q in challenger.per_question]
    n = len(a)
    if not n or len(b) != n:
        return Verdict(default, default, challenger, None, False, f"kept {default.name}: {challenger.name} has no "
                       f"per-question results to compare with")
    diff = paired_diff_ci(a, b, confidence=CHOICE_CONFIDENCE)
    evidence = (f"{challenger.name} {diff[0]:+.3f} MRR [{diff[1]:+.3f}, {diff[2]:+.3f}] "
                f"({CHOICE_CONFIDENCE:.0%} paired bootstrap) over {n} questions")
    if n < MIN_CHOICE_QUESTIONS:
        return Verdict(default, default, challenger, diff, False, f"kept {default.name}: {evidence}; fewer than "
                       f"{MIN_CHOICE_QUESTIONS} questions decide nothing (write more, then --save again)")
    if not significant(diff[1], diff[2]) or diff[0] <= 0:
        return Verdict(default, default, challenger, diff, False,
                       f"kept {default.name}: {evidence} is not a measured difference")
    return Verdict(challenger, default, challenger, diff, True, f"chose {challenger.name} over {default.name}: "
                   f"{evidence}")


def retrieval_choice(report: EvalReport, retriever, questions_path: str | os.PathLike | None = None) -> dict:
    """The `retrieval` record `--save` writes into gptsmith_index.json: the chosen setting's search parameters
    (choose_setting: the default unless a challenger's difference is measured) and the evidence for it (metric,
    interval, questions, the paired difference, the reason)."""
    from datetime import datetime, timezone

    verdict = choose_setting(report)
    top = verdict.chosen
    s = retriever.settings
    mode = top.search.get("mode") or s.mode
    rerank = bool(top.search.get("rerank", s.rerank)) and retriever.rerank_model is not None
    paired = None
    if verdict.diff is not None:
        paired = {"challenger": verdict.challenger.name, "default": verdict.default.name, "metric": "mrr",
                  "diff": round(verdict.diff[0], 4), "interval": [round(v, 4) for v in verdict.diff[1:]],
                  "confidence": CHOICE_CONFIDENCE, "min_questions": MIN_CHOICE_QUESTIONS}
    return {
        "mode": mode, "rerank": rerank,
        "rerank_model": str(Path(retriever.rerank_model).resolve()) if rerank else None,
        "rrf_k": int(top.search.get("rrf_k") or s.rrf_k),
        "candidates": int(top.search.get("candidates") or s.candidates),
        "vector_weight": float(top.search.get("vector_weight") or s.vector_weight),
        "evidence": {
            "setting": top.name, "decided": verdict.decided, "reason": verdict.reason, "paired": paired,
            "best_measured": report.best().name, "metric": "mrr", "value": round(top.metrics["mrr"], 4),
            "ci95": [round(v, 4) for v in top.ci95.get("mrr", (0.0, 0.0))],
            "hit@5": round(top.metrics["hit@5"], 4),
            "questions": report.questions, "unmatched": len(report.unmatched), "generators": report.generators,
            "questions_file": str(Path(questions_path).resolve()) if questions_path else None,
            "compared": {m.name: round(m.metrics["mrr"], 4) for m in report.modes},
            "measured": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        },
    }


def save_choice(index_dir: str | os.PathLike, choice: dict) -> None:
    """Record `choice` (retrieval_choice) in the index's manifest; re-indexing keeps it."""
    from gptsmith.files import atomic_write_json
    from gptsmith.rag.index import MANIFEST, read_manifest

    manifest = read_manifest(index_dir)
    if manifest is None:
        raise InputError(f"{index_dir} holds no gptsmith index; nothing to record the choice in")
    manifest["retrieval"] = choice
    atomic_write_json(Path(index_dir) / MANIFEST, manifest)


# ---------------------------------------------------------------------------------------------- the commands


def index_chunks(index_dir: str | os.PathLike) -> dict[str, Chunk]:
    """id -> Chunk of every chunk in an index built by `gptsmith rag index`, read without loading the embedder
    (Retriever.chunks() gives the same from an open retriever)."""
    from gptsmith.rag.index import open_table, read_manifest
    from gptsmith.rag.retrieve import COLUMNS, row_chunk

    if read_manifest(index_dir) is None:  # checked first: opening the table of a folder that is none creates it
        raise InputError(f"{index_dir} holds no gptsmith index; build one with `gptsmith rag index DOCS... "
                         f"--index {index_dir}`")
    table = open_table(index_dir)
    if table.count_rows() == 0:
        return {}
    return {r["id"]: row_chunk(r) for r in table.search().select(COLUMNS).limit(None).to_arrow().to_pylist()}


def _progress():
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                    transient=True)


def run_questions(index_dir: str | os.PathLike, out: str | os.PathLike, teacher: str | None = None,
                  per_chunk: int = 1, max_chunks: int | None = 200, fmt: str = "qa", seed: int = 0,
                  max_tokens: int = 160) -> QuestionsReport:
    """`gptsmith rag questions`: write question records (or SFT conversations) for a sample of the index's chunks."""
    if fmt not in FORMATS:
        raise InputError(f"--format {fmt}: choose one of {', '.join(FORMATS)}")
    chunks = list(index_chunks(index_dir).items())
    if not chunks:
        raise InputError(f"the index {index_dir} holds no chunks; add documents with `gptsmith rag index DOCS... "
                         f"--index {index_dir}`")
    model = load_teacher(teacher, max_tokens=max_tokens) if teacher else None
    try:
        with _progress() as bar:
            task = bar.add_task("questions", total=min(len(chunks), max_chunks or len(chunks)))
            records, report = make_questions(chunks, model, per_chunk, max_chunks, seed,
                                             on_progress=lambda n: bar.advance(task, n))
    finally:
        if model is not None:
            model.close()
    if not records:
        reasons = "; ".join(f"{n} {why}" for why, n in report.skipped.items())
        raise InputError(f"no question could be made from {report.chunks_sampled} chunks ({reasons}); "
                         "try another --teacher, or none for the heuristic questions")
    write_questions(records, out, fmt)
    print(f"wrote {report.records} {'questions' if fmt == 'qa' else 'SFT conversations'} to {out} from "
          f"{report.chunks_sampled} of {report.chunks_in_index} chunks ({report.generator}, "
          f"{report.seconds:.1f} s)")
    if report.generator != "heuristic":
        print(f"  yield: {report.records} usable of {report.chunks_sampled} chunks ({report.yield_:.0%})")
    for why, n in report.skipped.items():
        print(f"  skipped {n} chunk(s): {why}")
    for why, n in report.rejected.most_common():
        print(f"  rejected {n} question(s): {why}")
    return report


def run_eval(index_dir: str | os.PathLike, questions_path: str | os.PathLike, rerank: str | None = None,
             top_k: int = 10, match: str = "chunk", json_out: str | os.PathLike | None = None,
             cfg=None, save: bool = False) -> EvalReport:
    """`gptsmith rag eval`: the comparison table of every retrieval setting on a questions file (generated by
    `rag questions`, or written by a person). `cfg`: the RagConfig whose rrf_k and candidates the retriever uses
    (as serving would). `save`: record choose_setting's choice (hybrid unless a challenger's paired MRR difference
    excludes zero over enough questions) and its evidence in the index's gptsmith_index.json, so `rag query`, `ask`
    and `serve` use it where the user did not choose."""
    from gptsmith.files import atomic_write_json
    from gptsmith.rag.retrieve import Retriever

    questions = read_questions(questions_path)
    retriever = Retriever.open(index_dir, rerank=rerank, cfg=cfg)
    chunks = dict(retriever.chunks())
    has_reranker = retriever.rerank_model is not None
    with _progress() as bar:
        modes = len(eval_modes(has_reranker))
        task = bar.add_task("retrieving", total=modes * len(questions))
        report = evaluate(retriever, questions, chunks, top_k, match, has_reranker=has_reranker,
                          on_progress=lambda n: bar.advance(task, n))
    render_report(report, questions=questions)
    choice = retrieval_choice(report, retriever, questions_path)
    if save:
        save_choice(index_dir, choice)
        ev = choice["evidence"]
        print(f"recorded in {Path(index_dir) / 'gptsmith_index.json'}: mode={choice['mode']} rerank="
              f"{'on' if choice['rerank'] else 'off'} (MRR {ev['value']:.3f}, 95% {ev['ci95'][0]:.3f}-"
              f"{ev['ci95'][1]:.3f}, {ev['questions']} questions)\n  {ev['reason']}")
    if json_out:
        atomic_write_json(json_out, {"index": str(index_dir), "questions_file": str(questions_path),
                                     "rerank": retriever.rerank_model, **report.to_json(),
                                     "choice": choice, "saved": save})
    return report
