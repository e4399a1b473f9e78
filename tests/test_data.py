"""Data preparation: readers, cleaning, dedup, split, bad input, token shards, the prepare command."""

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from gptsmith.cli import main
from gptsmith.config import load_config
from gptsmith.data.clean import clean_text
from gptsmith.data.pipeline import clean, tokenize
from gptsmith.data.readers import ReadContext, read_source, resolve_inputs
from gptsmith.errors import InputError

LONG = " and this sentence makes it long enough to keep."


def doc(i: int) -> str:
    return f"Document number {i} talks about topic {i * 7 % 13}{LONG}"


def cfg_for(**data):
    overrides = {"data.min_chars": 20, "data.num_workers": 1, "tokenizer.vocab_size": 300}
    overrides.update({f"data.{k}": v for k, v in data.items()})
    return load_config(None, overrides)


def read_all(inputs, **ctx):
    ctx = ReadContext(**ctx)
    return [t for src in resolve_inputs([str(i) for i in inputs]) for t in read_source(src, ctx)], ctx


def lines(path):
    return [json.loads(line) for line in open(path, encoding="utf-8")]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


# ----------------------------------------------------------------------------------------------- readers

def test_each_format_is_read(tmp_path):
    (tmp_path / "a.txt").write_text("plain text file", encoding="utf-8")
    (tmp_path / "b.md").write_text("# markdown\n\nbody", encoding="utf-8")
    write_jsonl(tmp_path / "c.jsonl", [{"text": "jsonl one"}, {"text": "jsonl two", "id": 2}])
    (tmp_path / "d.json").write_text(json.dumps([{"text": "json array one"}, "json array two"]), encoding="utf-8")
    (tmp_path / "e.csv").write_text('id,text\n1,"csv, with comma"\n2,"csv\nmultiline"\n', encoding="utf-8")
    pq.write_table(pa.table({"text": ["parquet one", "parquet two"], "n": [1, 2]}), tmp_path / "f.parquet")
    texts, _ = read_all(sorted(tmp_path.iterdir()))
    assert texts == ["plain text file", "# markdown\n\nbody", "jsonl one", "jsonl two", "json array one",
                     "json array two", "csv, with comma", "csv\nmultiline", "parquet one", "parquet two"]


def test_text_field_is_configurable(tmp_path):
    write_jsonl(tmp_path / "c.jsonl", [{"content": "from content"}])
    pq.write_table(pa.table({"content": ["parquet content"]}), tmp_path / "f.parquet")
    texts, _ = read_all([tmp_path / "c.jsonl", tmp_path / "f.parquet"], text_field="content")
    assert texts == ["from content", "parquet content"]


def test_folder_is_recursive_and_glob_matches(tmp_path):
    (tmp_path / "sub" / "deeper").mkdir(parents=True)
    (tmp_path / "top.txt").write_text("top", encoding="utf-8")
    (tmp_path / "sub" / "deeper" / "deep.md").write_text("deep", encoding="utf-8")
    (tmp_path / "sub" / "ignored.bin").write_bytes(b"\x00\x01")
    texts, _ = read_all([tmp_path])
    assert sorted(texts) == ["deep", "top"]
    texts, _ = read_all([f"{tmp_path}/**/*.md"])
    assert texts == ["deep"]


def test_local_dataset_dir_as_hub_input(tmp_path):
    ds = tmp_path / "my_dataset"
    ds.mkdir()
    write_jsonl(ds / "train.jsonl", [{"text": f"row {i}"} for i in range(3)])
    texts, _ = read_all([f"hub:{ds}"])
    assert texts == ["row 0", "row 1", "row 2"]


def test_missing_input_and_dataset_id_shape(tmp_path):
    with pytest.raises(InputError, match="no such file"):
        resolve_inputs([str(tmp_path / "nope.txt")])
    assert resolve_inputs(["someone/some_dataset"])[0].kind == "hub"


# ----------------------------------------------------------------------------------------------- cleaning

def test_clean_text_normalises_unicode_controls_and_whitespace():
    raw = "Cafe\u0301\r\nline\x00 with\x07 ctrl\ufeff   and   spaces   \n\tindented\tkept\n    code  x\n\n\n\n\n\nend  "
    assert clean_text(raw) == "Café\nline with ctrl and spaces\n\tindented\tkept\n    code x\n\n\nend"


def test_dedup_and_min_length(tmp_path):
    write_jsonl(tmp_path / "a.jsonl", [{"text": doc(1)}, {"text": doc(1) + "  "}, {"text": "short"}, {"text": doc(2)}])
    report = clean([str(tmp_path / "a.jsonl")], tmp_path / "w", cfg_for())
    assert report["dropped"] == {"too_short": 1, "duplicate": 1}
    assert report["documents"]["kept"] == 2
    report = clean([str(tmp_path / "a.jsonl")], tmp_path / "w", cfg_for(dedup=False))
    assert report["dropped"]["duplicate"] == 0 and report["documents"]["kept"] == 3


def test_split_is_independent_of_input_order_and_val_never_empty(tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", [{"text": doc(i)} for i in range(0, 60)])
    b = write_jsonl(tmp_path / "b.jsonl", [{"text": doc(i)} for i in range(60, 120)])
    clean([str(a), str(b)], tmp_path / "w1", cfg_for(val_fraction=0.2))
    clean([str(b), str(a)], tmp_path / "w2", cfg_for(val_fraction=0.2))
    for split in ("train", "val"):
        assert (tmp_path / "w1/clean" / f"{split}.jsonl").read_bytes() == (tmp_path / "w2/clean" / f"{split}.jsonl").read_bytes()
    val = {d["text"] for d in lines(tmp_path / "w1/clean/val.jsonl")}
    assert 8 <= len(val) <= 40  # ~20% of 120
    # the split of a document is decided by its content alone: a subset keeps the same assignment
    clean([str(a)], tmp_path / "w3", cfg_for(val_fraction=0.2))
    assert {d["text"] for d in lines(tmp_path / "w3/clean/val.jsonl")} == {t for t in val if t in {doc(i) for i in range(60)}}
    two = write_jsonl(tmp_path / "two.jsonl", [{"text": doc(1)}, {"text": doc(2)}])
    report = clean([str(two)], tmp_path / "w4", cfg_for(val_fraction=0.0))
    assert report["documents"]["train"] == 1 and report["documents"]["val"] == 1


# ----------------------------------------------------------------------------------------------- bad input

BAD_CASES = {
    "bad_json": ("x.jsonl", lambda: (json.dumps({"text": doc(1)}) + "\n{\"text\": oops\n").encode(), "x.jsonl:2"),
    "invalid_utf8": ("x.jsonl", lambda: (json.dumps({"text": doc(1)}) + "\n").encode() * 2 + b'{"text": "\xff"}\n',
                     "x.jsonl:3"),
    "missing_field": ("x.jsonl", lambda: (json.dumps({"text": doc(1)}) + "\n" + json.dumps({"body": "x"}) + "\n").encode(),
                      "x.jsonl:2"),
    "invalid_utf8_txt": ("x.txt", lambda: b"fine line\nsecond line\nbad \xc3\x28 byte\n", "x.txt:3"),
    "missing_column": ("x.csv", lambda: b"id,body\n1,hello\n", "x.csv:1"),
    "invalid_utf8_csv": ("x.csv", lambda: f"text\n{doc(90)}\nbad \xff\n{doc(91)}\n".encode("latin-1"), "x.csv:3"),
    "unreadable": ("x.parquet", lambda: b"this is not parquet", "x.parquet"),
}
REASON = {"invalid_utf8_txt": "invalid_utf8", "invalid_utf8_csv": "invalid_utf8", "missing_column": "missing_field"}


@pytest.mark.parametrize("case", sorted(BAD_CASES))
def test_bad_input_names_file_and_line_or_is_skipped_and_counted(tmp_path, case):
    name, content, where = BAD_CASES[case]
    bad = tmp_path / name
    bad.write_bytes(content())
    good = write_jsonl(tmp_path / "good.jsonl", [{"text": doc(i)} for i in range(5)])
    with pytest.raises(InputError) as err:
        clean([str(good), str(bad)], tmp_path / "w", cfg_for())
    assert where in str(err.value) and "--on-error skip" in str(err.value)
    report = clean([str(good), str(bad)], tmp_path / "w", cfg_for(on_error="skip"))
    assert report["skipped"][REASON.get(case, case)] == 1
    assert sum(report["skipped"].values()) == 1
    assert report["documents"]["kept"] >= 5
    if case == "invalid_utf8_csv":  # the rows after the bad line are still read
        assert report["documents"]["kept"] == 7


def test_bad_input_via_cli_exits_2_with_message(tmp_path, capsys):
    bad = tmp_path / "x.jsonl"
    bad.write_text('{"text": "ok"}\nnot json\n', encoding="utf-8")
    assert main(["data", "clean", str(bad), "--out", str(tmp_path / "w")]) == 2
    assert "x.jsonl:2: not valid JSON" in capsys.readouterr().err


def test_empty_corpus_says_how_many_were_dropped_and_why(tmp_path):
    write_jsonl(tmp_path / "a.jsonl", [{"text": "tiny"}, {"text": "small"}])
    with pytest.raises(InputError, match=r"read 2.*2 shorter than data.min_chars=20"):
        clean([str(tmp_path / "a.jsonl")], tmp_path / "w", cfg_for())
    assert not (tmp_path / "w" / "clean").exists()
    assert not [p for p in (tmp_path / "w").iterdir() if p.name.startswith(".")]


# ----------------------------------------------------------------------------------------------- shards

def test_shards_decode_back_to_clean_text_and_counts_add_up(tmp_path, tokenizer_dir):
    from gptsmith.tokenizer import load_tokenizer

    texts = [doc(i) + "\n\n" + "é ünïcode " * (i % 5) for i in range(40)]
    write_jsonl(tmp_path / "a.jsonl", [{"text": t} for t in texts] + [{"text": texts[0]}, {"text": "short"}])
    work = tmp_path / "w"
    report = clean([str(tmp_path / "a.jsonl")], work, cfg_for(val_fraction=0.25))
    manifest = tokenize(work, cfg_for(shard_tokens=400), tokenizer_dir=tokenizer_dir)
    tok = load_tokenizer(tokenizer_dir)
    assert manifest["dtype"] == "uint16" and manifest["bos_token_id"] == tok.bos_token_id == 0
    assert manifest["vocab_size"] == len(tok)
    assert (work / manifest["tokenizer"]).resolve() == tokenizer_dir.resolve()
    assert manifest["dropped"] == {"too_short": 1, "duplicate": 1}
    assert sum(s["documents"] for s in manifest["splits"].values()) == report["documents"]["kept"] == 40
    for split, info in manifest["splits"].items():
        assert len(info["files"]) > 1 or split == "val"  # 400-token shards force several train files
        arrays = [np.memmap(work / "tokens" / f, dtype=np.uint16, mode="r") for f in info["files"]]
        assert all(a[0] == 0 for a in arrays)  # no document is cut across files
        assert all(len(a) <= 400 for a in arrays)
        flat = np.concatenate(arrays)
        assert len(flat) == info["tokens"]
        starts = np.flatnonzero(flat == 0)
        assert len(starts) == info["documents"]
        docs = [tok.decode(p[1:].tolist()) for p in np.split(flat, starts[1:])]
        cleaned = [d["text"] for d in lines(work / "clean" / f"{split}.jsonl")]
        assert docs == cleaned
        assert info["bytes"] == sum(len(t.encode()) for t in cleaned)


def test_worker_pool_gives_identical_shards(tmp_path, tokenizer_dir, monkeypatch):
    import gptsmith.data.shards as shards

    monkeypatch.setattr(shards, "CHUNK_BYTES", 2000)  # several chunks, so both workers get work
    write_jsonl(tmp_path / "a.jsonl", [{"text": doc(i) * 3} for i in range(80)])
    clean([str(tmp_path / "a.jsonl")], tmp_path / "w", cfg_for())
    one = tokenize(tmp_path / "w", cfg_for(num_workers=1), tokenizer_dir=tokenizer_dir)
    a = (tmp_path / "w/tokens/train_00000.bin").read_bytes()
    two = tokenize(tmp_path / "w", cfg_for(num_workers=2), tokenizer_dir=tokenizer_dir)
    assert (tmp_path / "w/tokens/train_00000.bin").read_bytes() == a
    assert one["splits"] == two["splits"]


# ----------------------------------------------------------------------------------------------- end to end

def test_prepare_cli_end_to_end_and_rerun_overwrites(tmp_path, capsys):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(12):
        (corpus / f"note{i}.md").write_text(f"# Note {i}\n\n" + doc(i) * 4, encoding="utf-8")
    write_jsonl(corpus / "rows.jsonl", [{"text": doc(100 + i) * 2} for i in range(20)])
    work = tmp_path / "work"
    argv = ["prepare", str(corpus), "--out", str(work), "--vocab-size", "320", "--data.min_chars", "20",
            "--data.num_workers", "1"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "bytes per token" in out and "kept 32" in out
    manifest = json.loads((work / "tokens" / "manifest.json").read_text())
    assert manifest["format"] == "gptsmith.tokens.v1" and manifest["tokenizer"] == "tokenizer"
    assert manifest["splits"]["val"]["documents"] >= 1
    assert manifest["splits"]["train"]["documents"] + manifest["splits"]["val"]["documents"] == 32
    assert len(manifest["sources"]) == 13 and all(len(s["sha256"]) == 64 for s in manifest["sources"])
    assert (work / "gptsmith.yaml").exists() and (work / "tokenizer" / "tokenizer.json").exists()
    report = json.loads((work / "clean" / "report.json").read_text())
    assert report["documents"]["kept"] == 32
    first = (work / "tokens" / "train_00000.bin").read_bytes()
    assert main(argv) == 0  # rerun: same result, nothing left behind
    assert (work / "tokens" / "train_00000.bin").read_bytes() == first
    assert sorted(p.name for p in work.iterdir()) == ["clean", "gptsmith.yaml", "tokenizer", "tokens"]


def test_python_docs_has_topics_and_stdlib_docstrings():
    from gptsmith.data.embedded import python_docs

    docs = list(python_docs())
    assert len(docs) > 100
    heads = {d.split("\n", 1)[0] for d in docs}
    assert {"# json", "# collections", "# email.message"} <= heads
    json_doc = next(d for d in docs if d.startswith("# json\n"))
    assert "## dumps(" in json_doc and "Serialize" in json_doc
    assert not any(h in heads for h in ("# antigravity", "# this", "# tkinter", "# idlelib"))
    assert docs == list(python_docs())  # deterministic


def test_max_chars_cuts_long_documents_at_line_breaks(tmp_path):
    long = "\n".join(f"line {i} of a long document" for i in range(100))
    write_jsonl(tmp_path / "a.jsonl", [{"text": long}])
    clean([str(tmp_path / "a.jsonl")], tmp_path / "w", cfg_for(max_chars=300))
    pieces = [d["text"] for split in ("train", "val") for d in lines(tmp_path / "w/clean" / f"{split}.jsonl")]
    assert len(pieces) > 5 and all(len(p) <= 300 for p in pieces)
    assert all(p.startswith("line ") and p.endswith("document") for p in pieces)
    assert sorted(sum((p.split("\n") for p in pieces), [])) == sorted(long.split("\n"))


def test_max_documents_takes_a_sample_and_stops_reading(tmp_path):
    write_jsonl(tmp_path / "a.jsonl", [{"text": doc(i)} for i in range(50)])
    write_jsonl(tmp_path / "b.jsonl", [{"text": doc(100 + i)} for i in range(50)])
    report = clean([str(tmp_path / "a.jsonl"), str(tmp_path / "b.jsonl")], tmp_path / "w", cfg_for(max_documents=30))
    assert report["documents"]["kept"] == 30 and report["documents"]["read"] == 30


# ----------------------------------------------------------------------------------------------- one long text

def long_text(paragraphs: int = 120) -> str:
    """~30 KB of prose in paragraphs of a few lines, like a book saved as one .txt file."""
    words = "the king and his daughter walked by the river while the night came over the hills".split()
    paras = []
    for p in range(paragraphs):
        lines = [" ".join(words[(p + k + j) % len(words)] for j in range(8 + (p + k) % 5)).capitalize() + "."
                 for k in range(3)]
        paras.append(f"Part {p}.\n" + "\n".join(lines))
    return "\n\n".join(paras)


def nonblank_lines(texts: list[str]) -> list[str]:
    return sorted(line for t in texts for line in t.split("\n") if line)


def test_one_big_text_file_gets_a_validation_split(tmp_path, capsys):
    text = long_text()
    assert 20_000 < len(text) < 50_000
    book = tmp_path / "book.txt"
    book.write_text(text, encoding="utf-8")
    work = tmp_path / "w"
    assert main(["prepare", str(book), "--out", str(work), "--vocab-size", "300", "--data.num_workers", "1"]) == 0
    out = capsys.readouterr().out
    manifest = json.loads((work / "tokens" / "manifest.json").read_text())
    assert manifest["splits"]["val"]["documents"] >= 1 and manifest["splits"]["val"]["tokens"] > 256
    assert manifest["splits"]["train"]["tokens"] > manifest["splits"]["val"]["tokens"]
    report = json.loads((work / "clean" / "report.json").read_text())
    assert report["split"] == {"piece_chars": 4096, "documents_split_in_pieces": 1}
    assert "1 document(s) longer than 4,096 characters were split" in out
    # nothing is lost or repeated: every line of the book is in exactly one split, pieces end at paragraph breaks
    pieces = [d["text"] for split in ("train", "val") for d in lines(work / "clean" / f"{split}.jsonl")]
    assert nonblank_lines(pieces) == nonblank_lines([text])
    assert all(p.startswith("Part ") and p.endswith(".") for p in pieces)
    assert report["bytes"]["train"] + report["bytes"]["val"] == sum(len(p.encode()) for p in pieces)
    # one rule for counting (data.shards.corpus_counts): the terminal, the splits and the source all say the
    # same number of documents, the pieces as written; the report card reads the same function
    from gptsmith.data.shards import corpus_counts
    counts = corpus_counts(manifest)
    assert counts["kept"] == len(pieces) == report["documents"]["kept"] == manifest["sources"][0]["documents"]
    assert counts["read"] == 1 and f"documents  kept {len(pieces):,} (" in out
    text_tokens = {k: s["tokens"] - s["documents"] for k, s in manifest["splits"].items()}
    assert f"tokens     train {text_tokens['train']:,}, val {text_tokens['val']:,} without separators" in out


def test_validation_piece_is_taken_from_the_middle_when_no_piece_hashes_into_it(tmp_path):
    text = long_text()
    (tmp_path / "book.txt").write_text(text, encoding="utf-8")
    report = clean([str(tmp_path / "book.txt")], tmp_path / "w", cfg_for(val_fraction=0.0))
    val = [d["text"] for d in lines(tmp_path / "w/clean/val.jsonl")]
    train = [d["text"] for d in lines(tmp_path / "w/clean/train.jsonl")]
    assert len(val) == 1 and 1_000 < len(val[0]) <= 4096 and 1 <= len(train) <= 2
    assert report["documents"] == {"read": 1, "kept": len(train) + 1, "train": len(train), "val": 1}
    assert report["sources"][0]["documents"] == len(train) + 1  # the moved piece counts for its source too
    assert report["bytes"] == {"train": sum(len(t.encode()) for t in train), "val": len(val[0].encode())}
    assert nonblank_lines(train + val) == nonblank_lines([text])


def test_split_pieces_cut_at_paragraphs_and_join_back():
    from gptsmith.data.clean import split_pieces

    text = long_text()
    pieces = split_pieces(text, 4096)
    assert "".join(pieces) == text
    assert all(1024 <= len(p) <= 4096 + 1024 for p in pieces) and len(pieces) >= 5
    assert all(p.endswith("\n\n") for p in pieces[:-1])
    assert split_pieces("short", 4096) == ["short"]
    unbroken = "x" * 10_000  # no break at all: cut at the size
    assert [len(p) for p in split_pieces(unbroken, 4096)] == [4096, 4096, 1808]


# ----------------------------------------------------------------------------------------------- one split rule

def test_pretraining_text_and_conversations_share_one_hash_split(tmp_path, monkeypatch):
    import gptsmith.data.clean as cleaning
    from gptsmith.data.chat_formats import conversation_key, split_conversations
    from gptsmith.data.clean import assign_split, digest

    asked = []
    real = cleaning.split_score
    monkeypatch.setattr(cleaning, "split_score", lambda key, seed: asked.append(key) or real(key, seed))
    texts = [doc(i) for i in range(60)]
    write_jsonl(tmp_path / "a.jsonl", [{"text": t} for t in texts])
    clean([str(tmp_path / "a.jsonl")], tmp_path / "w", cfg_for(val_fraction=0.2))
    assert set(asked) == {digest(t) for t in texts}
    val = {d["text"] for d in lines(tmp_path / "w/clean/val.jsonl")}
    assert val == {t for t in texts if assign_split(digest(t), 0.2, 1234)[0] == "val"} and val

    asked.clear()
    convs = [[{"role": "user", "content": t}, {"role": "assistant", "content": "ok"}] for t in texts]
    train, val_convs = split_conversations(list(reversed(convs)), 0.2)
    assert set(asked) == {conversation_key(c) for c in convs}
    assert val_convs and {c[0]["content"] for c in val_convs} == {
        c[0]["content"] for c in convs if assign_split(conversation_key(c), 0.2)[0] == "val"}


# ----------------------------------------------------------------------------------------------- memory bounds

def test_json_array_is_read_record_by_record(tmp_path):
    path = tmp_path / "x.json"
    path.write_text('[{"text": "first record"}, "second record",\n {"text": "third" oops}, {"text": "never"}]',
                    encoding="utf-8")
    src = resolve_inputs([str(path)])[0]
    records = read_source(src, ReadContext())
    assert next(records) == "first record"  # out before the parser has reached the broken tail
    assert next(records) == "second record"
    with pytest.raises(InputError, match=r"x\.json: item \[2\]: not valid JSON .*the 2 records before it were read"):
        next(records)
    good = write_jsonl(tmp_path / "good.jsonl", [{"text": doc(i)} for i in range(3)])
    path.write_text(json.dumps([{"text": doc(10)}, {"text": doc(11)}, {"text": doc(10)}])[:-1] + ", {\"te",
                    encoding="utf-8")
    report = clean([str(good), str(path)], tmp_path / "w", cfg_for(on_error="skip"))
    assert report["skipped"]["bad_json"] == 1 and report["dropped"]["duplicate"] == 1
    assert report["documents"]["kept"] == 5


def test_json_array_with_invalid_utf8_names_the_record(tmp_path):
    path = tmp_path / "x.json"
    path.write_bytes(b'[{"text": "fine"}, {"text": "bad \xff byte"}]')
    with pytest.raises(InputError, match=r"x\.json: item \[1\]: not valid UTF-8"):
        read_all([path])
    texts, ctx = read_all([path], on_error="skip")
    assert texts == ["fine"] and ctx.skipped["invalid_utf8"] == 1


def test_dedup_keeps_8_bytes_per_document_and_still_finds_duplicates(tmp_path, monkeypatch):
    from gptsmith.data.clean import SeenDigests, digest

    monkeypatch.setattr(SeenDigests, "RECENT", 4)  # merge into the sorted array every 4 new documents
    seen = SeenDigests()
    keys = [digest(doc(i)) for i in range(50)]
    assert all(seen.add(k) for k in keys) and not any(seen.add(k) for k in reversed(keys))
    assert len(seen) == 50 and seen.merged.dtype.itemsize == 8 and len(seen.recent) < 4
    write_jsonl(tmp_path / "a.jsonl", [{"text": doc(i % 30)} for i in range(90)])
    report = clean([str(tmp_path / "a.jsonl")], tmp_path / "w", cfg_for())
    assert report["documents"]["kept"] == 30 and report["dropped"]["duplicate"] == 60


# ----------------------------------------------------------------------------------------------- JSONL lines

def test_jsonl_lines_end_only_at_newline(tmp_path):
    from gptsmith.data.pipeline import iter_texts
    from gptsmith.files import iter_lines

    odd = doc(1) + " line\u2028separator, next\u0085line, para\u2029sep, \x1c group"
    path = tmp_path / "x.jsonl"
    path.write_bytes((json.dumps({"text": odd}, ensure_ascii=False) + "\r\n" + json.dumps({"text": doc(2)}) + "\n"
                      ).encode("utf-8"))
    assert [n for n, _ in iter_lines(path)] == [1, 2]
    texts, _ = read_all([path])
    assert texts == [odd, doc(2)]
    clean([str(path)], tmp_path / "w", cfg_for(val_fraction=0.0))
    cleaned = list(iter_texts(tmp_path / "w/clean/train.jsonl")) + list(iter_texts(tmp_path / "w/clean/val.jsonl"))
    assert sorted(cleaned) == sorted([doc(2), doc(1) + " line\nseparator, nextline, para\n\nsep, group"])


def test_sse_lines_end_only_at_newline():
    import asyncio

    from gptsmith.files import aiter_lines

    async def chunks():
        for c in ['data: {"t": "a\u2028b\u0085', 'c"}\r\n\r\ndata: [DO', "NE]\n"]:
            yield c

    async def collect():
        return [line async for line in aiter_lines(chunks())]

    assert asyncio.run(collect()) == ['data: {"t": "a\u2028b\u0085c"}', "", "data: [DONE]"]


def test_external_backend_stream_keeps_line_separators_in_tokens():
    import asyncio

    import httpx

    from gptsmith.serve.backends import ExternalBackend

    events = [{"choices": [{"delta": {"content": "one\u2028two"}}]},
              {"choices": [{"delta": {"content": "\u0085three"}, "finish_reason": "stop"}]}]
    body = "".join(f"data: {json.dumps(e, ensure_ascii=False)}\n\n" for e in events) + "data: [DONE]\n\n"
    resp = httpx.Response(200, content=body.encode("utf-8"))

    async def collect():
        return [c.text async for c in ExternalBackend._events(resp) if c.text]

    assert "".join(asyncio.run(collect())) == "one\u2028two\u0085three"


# ----------------------------------------------------------------------------------------------- files not read

def test_empty_input_file_error_names_the_file(tmp_path):
    good = write_jsonl(tmp_path / "good.jsonl", [{"text": doc(i)} for i in range(4)])
    for name, content in [("empty.txt", b""), ("empty.jsonl", b"\n\n"), ("empty.json", b"[]"),
                          ("header.csv", b"text\n")]:
        empty = tmp_path / name
        empty.write_bytes(content)
        with pytest.raises(InputError, match=rf"{empty}: the file (is empty|holds no records).*--on-error skip"):
            clean([str(good), str(empty)], tmp_path / "w", cfg_for())
        report = clean([str(good), str(empty)], tmp_path / "w", cfg_for(on_error="skip"))
        assert report["skipped"]["empty"] == 1 and report["documents"]["kept"] == 4
    with pytest.raises(InputError, match=rf"{tmp_path / 'empty.txt'}: the file is empty"):
        clean([str(tmp_path / "empty.txt")], tmp_path / "w", cfg_for())


def test_files_not_read_in_a_folder_are_counted_with_the_reason(tmp_path, capsys):
    corpus = tmp_path / "corpus"
    (corpus / ".git").mkdir(parents=True)
    write_jsonl(corpus / "rows.jsonl", [{"text": doc(i)} for i in range(5)])
    (corpus / "a.xyz").write_text("x")
    (corpus / "b.xyz").write_text("x")
    (corpus / "README").write_text("x")
    (corpus / ".git" / "config").write_text("x")
    report = clean([str(corpus)], tmp_path / "w", cfg_for())
    assert report["ignored_files"] == {"unsupported extension .xyz": 2, "unsupported extension (none)": 1,
                                       "hidden path": 1}
    assert "files not read: 1 (hidden path), 1 (unsupported extension (none)), 2 (unsupported extension .xyz)" \
        in capsys.readouterr().out
    report = clean([f"{corpus}/*"], tmp_path / "w", cfg_for())  # a glob too
    assert report["ignored_files"] == {"unsupported extension .xyz": 2, "unsupported extension (none)": 1}
    only_other = tmp_path / "other"
    only_other.mkdir()
    (only_other / "c.xyz").write_text("x")
    with pytest.raises(InputError, match=r"folder has no .* files; not read: 1 \(unsupported extension \.xyz\)"):
        clean([str(only_other)], tmp_path / "w", cfg_for())
