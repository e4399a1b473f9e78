"""Retrieval evaluation: metrics on hand-worked rankings, questions tied to their chunks (heuristic and from a teacher
behind a real OpenAI-compatible server), SFT output a conversation reader loads, and the comparison table."""

import json
import math

import pytest

from gptsmith.errors import InputError
from gptsmith.rag.evaluate import (
    NO_PAIR,
    QARecord,
    make_questions,
    parse_pairs,
    ranking_metrics,
    read_questions,
    write_questions,
)
from gptsmith.rag.types import Chunk

# ---------------------------------------------------------------------------------------------- metrics


def approx(d: dict) -> dict:
    return {k: pytest.approx(v, abs=1e-9) for k, v in d.items()}


def test_metrics_relevant_first():
    got = ranking_metrics([(True, 0.9), (False, 0.5), (False, 0.1)], n_relevant=1)
    assert got == approx({"hit@1": 1, "hit@5": 1, "hit@10": 1, "mrr": 1, "ndcg@10": 1})


def test_metrics_relevant_third():
    got = ranking_metrics([(False, 0.9), (False, 0.5), (True, 0.1)], n_relevant=1)
    # DCG = 1/log2(3+1) = 0.5, ideal = 1
    assert got == approx({"hit@1": 0, "hit@5": 1, "hit@10": 1, "mrr": 1 / 3, "ndcg@10": 0.5})


def test_metrics_relevant_beyond_cutoffs():
    ranked = [(False, 1 - i / 100) for i in range(11)] + [(True, 0.5)]  # relevant at rank 12
    got = ranking_metrics(ranked, n_relevant=1)
    assert got == approx({"hit@1": 0, "hit@5": 0, "hit@10": 0, "mrr": 1 / 12, "ndcg@10": 0})


def test_metrics_none_found_and_empty_list():
    zero = {"hit@1": 0, "hit@5": 0, "hit@10": 0, "mrr": 0, "ndcg@10": 0}
    assert ranking_metrics([(False, 0.9), (False, 0.2)], n_relevant=1) == approx(zero)
    assert ranking_metrics([], n_relevant=1) == approx(zero)
    assert ranking_metrics([], n_relevant=0) == approx(zero)  # nothing relevant in the index: no division by zero


def test_metrics_tie_at_the_top_counts_both_orders():
    # two hits fused to the same RRF score, the relevant one second in the list: either order is as likely
    got = ranking_metrics([(False, 1 / 61), (True, 1 / 61), (False, 0.001)], n_relevant=1)
    assert got["hit@1"] == pytest.approx(0.5)
    assert got["mrr"] == pytest.approx((1 + 1 / 2) / 2)
    assert got["ndcg@10"] == pytest.approx(0.5 / math.log2(2) + 0.5 / math.log2(3))
    # and the listed order inside the tie does not matter
    assert ranking_metrics([(True, 1 / 61), (False, 1 / 61), (False, 0.001)], n_relevant=1) == approx(got)


def test_metrics_tie_group_across_the_cutoff():
    # ranks 1-4 distinct misses, then a group of 3 tied at ranks 5-7 holding one relevant: in the top 5 w.p. 1/3
    ranked = [(False, 1.0), (False, 0.9), (False, 0.8), (False, 0.7), (False, 0.5), (True, 0.5), (False, 0.5)]
    got = ranking_metrics(ranked, n_relevant=1)
    assert got["hit@5"] == pytest.approx(1 / 3)
    assert got["hit@1"] == 0 and got["hit@10"] == pytest.approx(1)
    assert got["mrr"] == pytest.approx((1 / 5 + 1 / 6 + 1 / 7) / 3)


def test_metrics_two_relevant_in_a_tie():
    # 3 tied, 2 relevant: first relevant at offset 0 w.p. 2/3, offset 1 w.p. 1/3
    got = ranking_metrics([(True, 0.5), (False, 0.5), (True, 0.5)], n_relevant=2)
    assert got["mrr"] == pytest.approx(2 / 3 + (1 / 3) / 2)
    assert got["hit@1"] == pytest.approx(2 / 3)
    dcg = sum((2 / 3) / math.log2(p + 1) for p in (1, 2, 3))
    assert got["ndcg@10"] == pytest.approx(dcg / (1 + 1 / math.log2(3)))


def test_metrics_ideal_dcg_counts_relevant_chunks_not_found():
    # two chunks of the index are relevant, only one retrieved, first: nDCG < 1
    got = ranking_metrics([(True, 0.9), (False, 0.1)], n_relevant=2)
    assert got["ndcg@10"] == pytest.approx(1 / (1 + 1 / math.log2(3)))
    assert got["mrr"] == 1


# ---------------------------------------------------------------------------------------------- heuristic questions

CHUNKS = [
    ("c1", Chunk("Lists are mutable sequences. Use append to add an item; sort orders the list in place.",
                 "/docs/guide.md", "Guide > Lists", 3, 5)),
    ("c2", Chunk("Dictionaries map hashable keys to values. The get method returns a default for a missing key.",
                 "/docs/guide.md", "Guide > Dictionaries", 7, 9)),
    ("c3", Chunk("The with statement wraps a block in a context manager; files close themselves on exit.",
                 "/docs/statements.md", "", 1, 2)),
    ("c4", Chunk("Generators yield values lazily; a generator expression looks like a list comprehension.",
                 "/docs/guide.md", "Guide > Generators", 11, 12)),
]


def test_heuristic_questions_are_deterministic_and_tied_to_their_chunk():
    records, report = make_questions(CHUNKS, per_chunk=1, max_chunks=3, seed=7)
    again, _ = make_questions(list(reversed(CHUNKS)), per_chunk=1, max_chunks=3, seed=7)  # index order is irrelevant
    assert [r.question for r in records] == [r.question for r in again]
    assert report.chunks_in_index == 4 and report.chunks_sampled == 3 and report.records == 3
    by_id = dict(CHUNKS)
    for r in records:
        chunk = by_id[r.chunk_id]
        assert (r.source, r.heading, r.start, r.end, r.unit) == (chunk.source, chunk.heading, chunk.start,
                                                                 chunk.end, chunk.unit)
        assert r.citation == chunk.citation() and r.answer == chunk.text and r.generator == "heuristic"
    lists = next(r for r in make_questions(CHUNKS, max_chunks=None)[0] if r.chunk_id == "c1")
    # the innermost heading, then the chunk's most distinctive words, none of the heading's
    assert lists.question.startswith('What does "Lists" say about ')
    assert "append" in lists.question and "Lists" not in lists.question.removeprefix('What does "Lists"')
    nohead = next(r for r in make_questions(CHUNKS, max_chunks=None)[0] if r.chunk_id == "c3")
    assert nohead.question.startswith("What does statements.md say about ")


def test_heuristic_sample_changes_with_the_seed_and_per_chunk_gives_more():
    picks = {tuple(r.chunk_id for r in make_questions(CHUNKS, max_chunks=2, seed=s)[0]) for s in range(10)}
    assert len(picks) > 1
    two, _ = make_questions(CHUNKS, per_chunk=2, max_chunks=None)
    c1 = [r.question for r in two if r.chunk_id == "c1"]
    assert len(c1) == 2 and c1[0] != c1[1]


def test_chunk_without_words_is_counted_not_a_crash():
    chunks = CHUNKS + [("empty", Chunk("42 == 42 ;; ->", "/docs/x.md", "", 1, 1))]
    records, report = make_questions(chunks, max_chunks=None)
    assert "empty" not in {r.chunk_id for r in records}
    assert sum(report.skipped.values()) == 1
    with pytest.raises(InputError, match="--per-chunk"):
        make_questions(CHUNKS, per_chunk=0)


# ---------------------------------------------------------------------------------------------- files


def test_qa_file_round_trips_and_sft_loads_as_conversations(tmp_path):
    from gptsmith.data.chat_formats import load_conversations

    records, _ = make_questions(CHUNKS, max_chunks=None)
    write_questions(records, tmp_path / "q.jsonl")
    assert read_questions(tmp_path / "q.jsonl") == records
    write_questions(records, tmp_path / "sft.jsonl", fmt="sft")
    loaded = load_conversations(tmp_path / "sft.jsonl")
    assert loaded.format == "messages" and loaded.skipped == 0 and len(loaded.conversations) == len(records)
    first = loaded.conversations[0]
    assert [m["role"] for m in first] == ["user", "assistant"]
    assert first[0]["content"] == records[0].question
    assert records[0].answer in first[1]["content"] and records[0].citation in first[1]["content"]
    with pytest.raises(InputError, match="--format qa"):  # an SFT file given to eval says what to pass instead
        read_questions(tmp_path / "sft.jsonl")


def test_bad_question_file_names_line_and_field(tmp_path):
    good = json.dumps({"question": "q?", "chunk_id": "c1", "source": "/a.md", "start": 1, "end": 2})
    path = tmp_path / "q.jsonl"
    path.write_text(good + "\n" + json.dumps({"question": "q?", "chunk_id": "c2", "source": "/a.md", "end": 2}) + "\n")
    with pytest.raises(InputError, match=r"q.jsonl:2: field 'start'"):
        read_questions(path)
    path.write_text(good + "\n" + json.dumps({"question": "q?", "lines": [1, 2]}) + "\n")
    with pytest.raises(InputError, match=r"q.jsonl:2: field 'source'"):
        read_questions(path)
    path.write_text(json.dumps({"question": "q?", "source": "a.md", "lines": [5, 2]}) + "\n")
    with pytest.raises(InputError, match=r"q.jsonl:1: field 'lines'"):
        read_questions(path)
    path.write_text(json.dumps({"question": "q?", "source": "a.md", "answer": 3}) + "\n")
    with pytest.raises(InputError, match=r"q.jsonl:1: field 'answer'"):
        read_questions(path)
    path.write_text(good + "\n{not json\n")
    with pytest.raises(InputError, match=r"q.jsonl:2: not valid JSON"):
        read_questions(path)
    path.write_text("\n")
    with pytest.raises(InputError, match="no question records"):
        read_questions(path)
    with pytest.raises(InputError, match="no such file"):
        read_questions(tmp_path / "missing.jsonl")


# ---------------------------------------------------------------------------------------------- teacher replies


@pytest.mark.parametrize("reply, pairs", [
    ('{"pairs": [{"question": "What is a list?", "answer": "A mutable sequence."}]}',
     [("What is a list?", "A mutable sequence.")]),
    ('Sure! ```json\n[{"Question": "Q1?", "Answer": "A1"}, {"q": "Q2?", "a": "A2"}]\n``` Hope it helps.',
     [("Q1?", "A1"), ("Q2?", "A2")]),
    ('<think>{"question": "draft?", "answer": "no"}</think>{"question": "Final?", "answer": "yes"}',
     [("Final?", "yes")]),
    ('{"question": "Broken?", "answer": "x" {"question": "Later?", "answer": "ok"}', [("Later?", "ok")]),
])
def test_parse_pairs_finds_json_anywhere(reply, pairs):
    assert parse_pairs(reply) == pairs


@pytest.mark.parametrize("reply", ["", "no json here", '{"question": "", "answer": "x"}', '{"question": "q"}',
                                   "[1, 2, 3]", '{"pairs": []}'])
def test_parse_pairs_rejects_replies_without_a_pair(reply):
    with pytest.raises(ValueError, match="no question and answer"):
        parse_pairs(reply)


def test_record_sft_keeps_the_chunk():
    chunk = Chunk("text", "/a.md", "A", 1, 3)
    rec = QARecord.of("Q?", "A.", "cid", chunk, "heuristic").sft()
    assert rec["source"] == {"chunk_id": "cid", "citation": "/a.md:1-3 (A)", "generator": "heuristic"}


def test_teacher_line_replies_parse_and_unusable_questions_are_filtered():
    from gptsmith.rag.evaluate import question_problem, teacher_messages

    reply = "Question: How do I put an item at the end of a list?\nAnswer: Use append to add an item."
    assert parse_pairs(reply) == [("How do I put an item at the end of a list?", "Use append to add an item.")]
    assert parse_pairs("Q: Why sort?\nA: It orders the list in place.") == [("Why sort?",
                                                                              "It orders the list in place.")]
    # the order the prompt asks for: a sentence copied from the passage, then the question it answers
    assert parse_pairs("Answer: Use append to add an item.\nQuestion: How do I grow a list?") == [
        ("How do I grow a list?", "Use append to add an item.")]
    passage = CHUNKS[0][1].text
    assert question_problem("How do I put an item at the end of a list?", "Use append to add an item.",
                            passage) is None
    assert question_problem("Tell me about lists.", "Use append.", passage) == "question without a question mark"
    assert "mentions the passage" in question_problem("What does the passage say about lists?", "append", passage)
    assert "copies" in question_problem("Why are Lists are mutable sequences. Use append to add?", "append",
                                        passage)
    assert question_problem("How do I reverse a dict?", "Call reversed on its keys view.",
                            passage) == "answer not found in the passage"
    # the prompt gives a small model the passage's title and one worked example as an earlier turn
    messages = teacher_messages(CHUNKS[1][1], 1)
    assert [m["role"] for m in messages] == ["user", "assistant", "user"]
    assert messages[1]["content"].startswith("Answer:") and "guide > Guide > Dictionaries" in messages[2]["content"]


# ---------------------------------------------------------------------------------------------- teachers over HTTP


def _store(tmp_path) -> dict:
    return {"serve.db": f"sqlite:///{tmp_path / 'store.db'}", "serve.rate_limit_per_minute": 0}


def test_teacher_json_replies_from_a_real_server_become_records(tmp_path):
    """A real gptsmith server whose backend answers with a JSON pair: every sampled chunk gets a record tied to it,
    the same pair parsed out of the HTTP reply."""
    from serve_helpers import ScriptedBackend, running

    from gptsmith.config import load_config
    from gptsmith.rag.evaluate import HTTPTeacher
    from gptsmith.serve.app import create_app

    backend = ScriptedBackend(pieces=['Here you are: {"pairs": [{"question": "How do I add an item to a list?", ',
                                      '"answer": "Call append."}]}'])
    backend.release()  # every answer ends after its pieces
    with running(create_app(load_config(None, _store(tmp_path)), backend=backend)) as url:
        teacher = HTTPTeacher(url + "/v1", max_tokens=64)
        records, report = make_questions(CHUNKS, teacher=teacher, max_chunks=3, seed=1)
        teacher.close()
    assert report.generator == f"teacher:{url}/v1"
    sampled = {r.chunk_id for r in make_questions(CHUNKS, max_chunks=3, seed=1)[0]}
    # the one answer is grounded only in the chunk about lists; the other sampled chunks' pairs are filtered out
    assert [r.chunk_id for r in records] == ["c1"] and "c1" in sampled
    assert report.rejected == {"answer not found in the passage": 2}
    assert {(r.question, r.answer) for r in records} == {("How do I add an item to a list?", "Call append.")}
    assert all(r.citation == dict(CHUNKS)[r.chunk_id].citation() for r in records)


def test_teacher_garbage_from_a_tiny_model_server_is_skipped_and_counted(tmp_path, tokenizer_dir):
    """A real gptsmith server over a random tiny model: its replies are no JSON, so no record, each chunk counted."""
    from serve_helpers import long_context_model, running

    from gptsmith.config import load_config
    from gptsmith.rag.evaluate import HTTPTeacher
    from gptsmith.serve.app import create_app

    model = long_context_model(tmp_path / "model", tokenizer_dir, max_seq_len=1024)
    with running(create_app(load_config(None, _store(tmp_path)), model)) as url:
        teacher = HTTPTeacher(url, max_tokens=24)  # the bare server URL: /v1 is added, the model found on /models
        records, report = make_questions(CHUNKS, teacher=teacher, max_chunks=None)
        teacher.close()
    assert teacher.model == "model"
    assert records == [] and report.records == 0
    assert report.skipped == {NO_PAIR: len(CHUNKS)}


def test_teacher_that_cannot_be_reached_is_a_clear_error():
    from serve_helpers import free_port

    from gptsmith.rag.evaluate import load_teacher

    with pytest.raises(InputError, match="cannot reach it"):
        load_teacher(f"http://127.0.0.1:{free_port()}/v1")
    with pytest.raises(InputError, match="neither an http"):
        load_teacher("/no/such/model")


def test_local_model_teacher_skips_what_it_cannot_parse(tmp_path, tokenizer_dir):
    from serve_helpers import long_context_model

    from gptsmith.rag.evaluate import LocalTeacher

    model = long_context_model(tmp_path / "model", tokenizer_dir, max_seq_len=512)
    long = ("c9", Chunk("word " * 600, "/docs/long.md", "Long", 1, 40))  # longer than the model's context
    records, report = make_questions(CHUNKS[:2] + [long], teacher=LocalTeacher(model, max_tokens=16),
                                     max_chunks=None)
    assert records == [] and report.records == 0
    assert report.skipped[NO_PAIR] == 2
    refused = [reason for reason in report.skipped if reason.startswith("teacher refused")]
    assert len(refused) == 1 and report.skipped[refused[0]] == 1


# ---------------------------------------------------------------------------------------------- evaluation


class CannedRetriever:
    """Answers each (mode, rerank) with fixed rankings of chunk ids: checks the averaging, not a search engine."""

    def __init__(self, rankings: dict[tuple[str, bool], dict[str, list[str]]]):
        self.rankings, self.calls = rankings, []

    def clear_cache(self):
        pass

    def search(self, query, top_k=5, mode="hybrid", rerank=False, **_):
        from gptsmith.rag.types import Hit

        self.calls.append((query, top_k, mode, rerank))
        ids = self.rankings[(mode, rerank)].get(query, [])[:top_k]
        by_id = dict(CHUNKS)
        return [Hit(by_id[i], 1 / (r + 1), r + 1, {}, i) for r, i in enumerate(ids)]


def test_evaluate_averages_each_setting_over_the_questions():
    from gptsmith.rag.evaluate import evaluate

    questions = [QARecord.of("q1", "", "c1", dict(CHUNKS)["c1"], "heuristic"),
                 QARecord.of("q2", "", "c2", dict(CHUNKS)["c2"], "heuristic")]
    rankings = {("bm25", False): {"q1": ["c1", "c2"], "q2": ["c1", "c3"]},  # 1st, then not found
                ("vector", False): {"q1": ["c2", "c1"], "q2": ["c2"]},  # 2nd, 1st
                ("hybrid", False): {"q1": ["c1"], "q2": ["c2"]},
                ("hybrid", True): {"q1": ["c3", "c4", "c2", "c1"], "q2": []}}  # 4th, none
    retriever = CannedRetriever(rankings)
    report = evaluate(retriever, questions, dict(CHUNKS), top_k=3, has_reranker=True)
    rows = {m.name: m.metrics for m in report.modes}
    assert list(rows) == ["bm25", "vector", "hybrid", "hybrid+rerank"]
    assert rows["bm25"]["hit@1"] == 0.5 and rows["bm25"]["mrr"] == 0.5
    assert rows["vector"]["hit@1"] == 0.5 and rows["vector"]["mrr"] == pytest.approx(0.75)
    assert rows["hybrid"] == {"hit@1": 1, "hit@5": 1, "hit@10": 1, "mrr": 1, "ndcg@10": 1}
    assert rows["hybrid+rerank"]["hit@10"] == 0  # top_k 3 cut the 4th-ranked chunk
    assert report.best().name == "hybrid" and report.stale == 0
    assert {c[1] for c in retriever.calls} == {3}
    # without a reranker there is no rerank row, and a question whose chunk left the index is stale
    gone = questions + [QARecord.of("q3", "", "old", dict(CHUNKS)["c1"], "heuristic")]
    report = evaluate(CannedRetriever(rankings), gone, dict(CHUNKS), top_k=3)
    assert [m.name for m in report.modes] == ["bm25", "vector", "hybrid"] and report.stale == 1


def test_handwritten_questions_are_judged_by_source_lines_and_answer(tmp_path):
    """A person's questions name a file (by its path's end), optionally a line range or an answer phrase; no chunk
    ids, and no warning about chunks that left the index."""
    from rich.console import Console

    from gptsmith.rag.evaluate import evaluate, render_report, write_questions

    path = tmp_path / "mine.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in [
        {"question": "q1", "source": "guide.md", "answer": "the GET  method", "note": "extra keys are ignored"},
        {"question": "q2", "source": "docs/guide.md", "lines": [10, 20]},
        {"question": "q3", "source": "statements.md"},
        {"question": "q4", "source": "missing.md"},
        {"question": "q5", "source": "ide.md"},  # not a whole file name: matches nothing
    ]) + "\n")
    questions = read_questions(path)
    assert all(q.handwritten and q.generator == "hand-written" for q in questions)
    rankings = {"q1": ["c1", "c2"], "q2": ["c2", "c4"], "q3": ["c1", "c3"], "q4": ["c1"], "q5": ["c1"]}
    retriever = CannedRetriever({("hybrid", False): rankings})
    report = evaluate(retriever, questions, dict(CHUNKS), settings=[("hybrid", {"mode": "hybrid", "rerank": False})])
    per_q = report.modes[0].per_question
    assert [m["mrr"] for m in per_q] == [0.5, 0.5, 0.5, 0.0, 0.0]  # q2: c4 (lines 11-12) is relevant, c2 (7-9) not
    assert report.stale == 0 and report.unmatched == [3, 4]
    lo, hi = report.modes[0].ci95["mrr"]
    assert lo <= report.modes[0].metrics["mrr"] <= hi
    console = Console(record=True, width=200)
    render_report(report, console, questions)
    out = console.export_text()
    assert "no longer in the index" not in out and "2 hand-written question(s) match no indexed chunk" in out
    write_questions(questions[:2], tmp_path / "again.jsonl")  # written back as a person writes them
    assert [json.loads(line) for line in (tmp_path / "again.jsonl").read_text().splitlines()] == [
        {"question": "q1", "source": "guide.md", "answer": "the GET method"},
        {"question": "q2", "source": "docs/guide.md", "lines": [10, 20]}]


def test_overlap_match_counts_neighbouring_chunks_of_the_same_source():
    from gptsmith.rag.evaluate import evaluate

    chunks = dict(CHUNKS) | {"c1b": Chunk("more about lists", "/docs/guide.md", "Guide > Lists", 5, 6)}
    q = QARecord.of("q1", "", "c1", chunks["c1"], "heuristic")  # lines 3-5: c1b (5-6) overlaps, c2 (7-9) does not
    rankings = {(m, False): {"q1": ["c1b", "c2"]} for m in ("bm25", "vector", "hybrid")}

    class Retriever(CannedRetriever):
        def search(self, query, top_k=5, mode="hybrid", rerank=False, **_):
            from gptsmith.rag.types import Hit

            ids = self.rankings[(mode, rerank)][query]
            return [Hit(chunks[i], 1 / (r + 1), r + 1, {}, i) for r, i in enumerate(ids)]

    by_chunk = evaluate(Retriever(rankings), [q], chunks, match="chunk")
    by_overlap = evaluate(Retriever(rankings), [q], chunks, match="overlap")
    assert by_chunk.modes[0].metrics["mrr"] == 0
    assert by_overlap.modes[0].metrics["mrr"] == 1
    assert by_overlap.modes[0].metrics["ndcg@10"] == pytest.approx(1 / (1 + 1 / math.log2(3)))  # 2 relevant, 1 found
    with pytest.raises(InputError, match="unknown match"):
        evaluate(Retriever(rankings), [q], chunks, match="fuzzy")


# ---------------------------------------------------------------------------------------------- the commands


DOCS = {
    "lists.md": "# Lists\n\nLists are mutable sequences. Use append to add an item and sort to order them in place.\n"
                "\n## Slicing\n\nA slice such as items[1:3] copies part of a list into a new list.\n",
    "dicts.md": "# Dictionaries\n\nDictionaries map hashable keys to values. The get method returns a default "
                "when a key is missing.\n\n## Views\n\nkeys, values and items return dynamic views of the mapping.\n",
    "files.txt": "Reading files\n\nThe open function returns a file object; the with statement closes it on exit.\n"
                 "\nBinary mode reads bytes instead of text, for images and archives.\n",
    "loops.rst": "Loops\n=====\n\nA for loop walks over any iterable; break leaves it early and continue skips "
                 "to the next element.\n\nWhile loops\n-----------\n\nA while loop repeats as long as its "
                 "condition holds.\n",
}


@pytest.fixture(scope="module")
def tiny_index(tmp_path_factory):
    from gptsmith.config import RagConfig
    from gptsmith.rag.index import build_index

    root = tmp_path_factory.mktemp("rag")
    for name, text in DOCS.items():
        (root / "docs" / name).parent.mkdir(exist_ok=True)
        (root / "docs" / name).write_text(text)
    build_index([str(root / "docs")], root / "index", RagConfig(chunk_tokens=32, chunk_overlap=0), progress=False)
    return root / "index"


@pytest.fixture(scope="module")
def cross_encoder_dir(tmp_path_factory):
    """A 2-layer, 32-wide BERT cross-encoder with random weights (MiniLM's tokenizer), saved like a real one."""
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    from gptsmith.rag.embed import default_model_dir

    out = tmp_path_factory.mktemp("ce") / "cross-encoder"
    tok = AutoTokenizer.from_pretrained(str(default_model_dir()))
    cfg = BertConfig(vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=64, num_labels=1)
    BertForSequenceClassification(cfg).save_pretrained(out)
    tok.save_pretrained(out)
    return out


def test_questions_command_writes_records_tied_to_index_chunks(tiny_index, tmp_path, capsys):
    from gptsmith.cli import main
    from gptsmith.rag.evaluate import index_chunks

    out = tmp_path / "q.jsonl"
    assert main(["rag", "questions", "--index", str(tiny_index), "--out", str(out), "--seed", "3"]) == 0
    assert "wrote" in capsys.readouterr().out
    records = read_questions(out)
    chunks = index_chunks(tiny_index)
    assert len(records) == len(chunks)  # fewer chunks than --max-chunks: every one, one question each
    for r in records:
        assert r.chunk_id in chunks and r.citation == chunks[r.chunk_id].citation()
    sft = tmp_path / "sft.jsonl"
    assert main(["rag", "questions", "--index", str(tiny_index), "--out", str(sft), "--seed", "3",
                 "--format", "sft", "--max-chunks", "2"]) == 0
    from gptsmith.data.chat_formats import load_conversations

    assert len(load_conversations(sft).conversations) == 2


def test_eval_command_table_has_every_setting(tiny_index, cross_encoder_dir, tmp_path, capsys):
    from gptsmith.cli import main

    q = tmp_path / "q.jsonl"
    main(["rag", "questions", "--index", str(tiny_index), "--out", str(q)])
    capsys.readouterr()
    report = tmp_path / "eval.json"
    assert main(["rag", "eval", "--index", str(tiny_index), "--questions", str(q), "--json", str(report)]) == 0
    table = capsys.readouterr().out
    assert all(name in table for name in ("bm25", "vector", "hybrid", "MRR", "ndcg@10", "p50 ms"))
    assert "hybrid+rerank" not in table
    got = json.loads(report.read_text())
    assert list(got["modes"]) == ["bm25", "vector", "hybrid"] and got["questions"] == len(read_questions(q))
    assert got["modes"]["bm25"]["hit@10"] > 0.5  # heuristic questions share words with their passage
    assert main(["rag", "eval", "--index", str(tiny_index), "--questions", str(q), "--rerank",
                 str(cross_encoder_dir), "--json", str(report), "--top-k", "5"]) == 0
    assert "hybrid+rerank" in capsys.readouterr().out
    got = json.loads(report.read_text())
    assert list(got["modes"]) == ["bm25", "vector", "hybrid", "hybrid+rerank"] and got["top_k"] == 5


def test_eval_command_bad_inputs_are_clear_errors(tiny_index, tmp_path, capsys):
    from gptsmith.cli import main

    assert main(["rag", "eval", "--index", str(tiny_index), "--questions", str(tmp_path / "none.jsonl")]) == 2
    assert "no such file" in capsys.readouterr().err
    assert main(["rag", "questions", "--index", str(tmp_path / "noindex"), "--out", str(tmp_path / "q.jsonl")]) == 2
    assert "no gptsmith index" in capsys.readouterr().err
    assert main(["rag", "questions", "--index", str(tiny_index), "--out", str(tmp_path / "q.jsonl"),
                 "--per-chunk", "0"]) == 2
    assert "--per-chunk" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------- rag eval --save


# Twelve printer codes, one document each. Every question names its code (BM25 ranks its document first) and the
# decoy embedder below puts the question next to the following code's document and farthest from its own, so the
# vector list misleads and drags hybrid down: bm25 is the clearly better setting, on every question.
CODES = [f"E{1001 + i}" for i in range(12)]
PARTS = ["tray", "toner", "fuser", "drum", "roller", "door", "belt", "fan", "lamp", "sensor", "gear", "cable"]


def decoy_embedder():
    import numpy as np

    from gptsmith.rag.embed import Embedder

    def encode(texts):
        out = np.zeros((len(texts), len(CODES)), dtype=np.float32)
        for row, text in zip(out, texts):
            i = next(i for i, code in enumerate(CODES) if code in text)
            if text.startswith("Printer code"):  # a question: close to the next code, far from its own
                row[:] = 0.5
                row[(i + 1) % len(CODES)], row[i] = 1.0, -1.0
            else:
                row[i] = 1.0
        return out

    return Embedder(name="decoy", dim=len(CODES), encode=encode)


@pytest.fixture(scope="module")
def decoy_index(tmp_path_factory):
    from gptsmith.config import RagConfig
    from gptsmith.rag.index import build_index

    root = tmp_path_factory.mktemp("decoy")
    (root / "docs").mkdir()
    for code, part in zip(CODES, PARTS):
        (root / "docs" / f"{code}.md").write_text(f"Printer code {code} means the {part} needs service.\n")
    build_index([str(root / "docs")], root / "index", RagConfig(), embedder=decoy_embedder(), progress=False)
    return root


def _eval_and_save(root, n, monkeypatch, capsys):
    from gptsmith.rag import retrieve as rag_retrieve
    from gptsmith.rag.evaluate import run_eval
    from gptsmith.rag.index import read_manifest

    monkeypatch.setattr(rag_retrieve, "load_embedder", lambda spec: decoy_embedder())
    questions = root / f"q{n}.jsonl"
    questions.write_text("".join(json.dumps({"question": f"Printer code {code}: what is wrong?",
                                             "source": f"{code}.md"}) + "\n" for code in CODES[:n]))
    report = run_eval(root / "index", questions, save=True)
    return report, read_manifest(root / "index")["retrieval"], capsys.readouterr().out


def test_save_records_a_setting_that_measured_better_on_enough_questions(decoy_index, monkeypatch, capsys):
    from gptsmith.rag.evaluate import MIN_CHOICE_QUESTIONS
    from gptsmith.rag.retrieve import Retriever

    report, recorded, out = _eval_and_save(decoy_index, 12, monkeypatch, capsys)
    assert 12 >= MIN_CHOICE_QUESTIONS
    mrr = {m.name: m.metrics["mrr"] for m in report.modes}
    assert mrr["bm25"] == 1.0 and mrr["hybrid"] < 0.5  # the setup does what it says
    assert recorded["mode"] == "bm25" and recorded["evidence"]["decided"]
    paired = recorded["evidence"]["paired"]
    assert paired["challenger"] == "bm25" and paired["default"] == "hybrid" and paired["confidence"] == 0.9
    assert paired["interval"][0] > 0 and recorded["evidence"]["questions"] == 12
    assert "chose bm25 over hybrid" in out and "over 12 questions" in out
    assert Retriever.open(decoy_index / "index", embedder=decoy_embedder()).settings.mode == "bm25"


def test_save_keeps_the_default_when_too_few_questions_measured_it(decoy_index, monkeypatch, capsys):
    report, recorded, out = _eval_and_save(decoy_index, 6, monkeypatch, capsys)
    assert report.best().name == "bm25"  # the point-best setting ...
    assert recorded["mode"] == "hybrid" and not recorded["rerank"]  # ... is not recorded on 6 questions
    ev = recorded["evidence"]
    assert not ev["decided"] and ev["setting"] == "hybrid" and ev["best_measured"] == "bm25"
    assert ev["paired"]["challenger"] == "bm25" and ev["questions"] == 6
    assert "kept hybrid: bm25 +" in out and "over 6 questions" in out and "fewer than 10" in out


def test_choice_needs_an_interval_that_excludes_zero():
    """Enough questions, but the challenger's lead rests on one of them: not a measured difference."""
    from gptsmith.rag.evaluate import EvalReport, ModeResult, choose_setting

    def row(name, mrrs):
        return ModeResult(name, {"mrr": sum(mrrs) / len(mrrs), "ndcg@10": 0.5, "hit@5": 1.0}, 1.0, 1.0,
                          search={"mode": name, "rerank": False}, per_question=[{"mrr": v} for v in mrrs])

    noisy = EvalReport(12, 10, "chunk", 0, [], [row("hybrid", [0.5] * 12), row("bm25", [1.0] + [0.5] * 11)])
    verdict = choose_setting(noisy)
    assert verdict.chosen.name == "hybrid" and not verdict.decided and verdict.diff[1] <= 0 < verdict.diff[0]
    assert verdict.reason.startswith("kept hybrid: bm25 +0.042 MRR [") and "not a measured difference" in verdict.reason
    steady = EvalReport(12, 10, "chunk", 0, [], [row("hybrid", [0.5] * 12), row("vector", [1.0] * 6 + [0.5] * 6)])
    assert choose_setting(steady).chosen.name == "vector"
    best = EvalReport(12, 10, "chunk", 0, [], [row("hybrid", [1.0] * 12), row("bm25", [0.5] * 12)])
    assert choose_setting(best).reason.startswith("kept hybrid: it measured best")
