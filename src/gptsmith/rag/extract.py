"""Read a document into structural blocks that remember where they came from.

`extract(path)` turns one file into a `Document`: a list of `Block`s (a heading, a paragraph, a code block, a list,
a table), each carrying its heading path ("Guide > Install") and its text *line by line with the source line
number of every line* (the page number for a PDF). Keeping the number per line, not per block, is what lets the
chunker cut a long block anywhere and still cite exactly the lines it kept.

Formats and what "a line" means in each:

- .md/.markdown: parsed with markdown-it-py (CommonMark + tables; the parser gives every block its source line
  range). Text is the source lines verbatim (a fenced block keeps its fences); headings are ATX (#) or setext.
  A YAML front matter block (--- ... --- at the top) is skipped.
- .rst: headings are a title line with an underline (and optional overline) of one punctuation character, levels
  in order of first appearance, as docutils does; a directive keeps its body (`.. function:: f(x)` and its
  text), an indented block (literal block, quote) is kept as written; comments and link targets are left out.
- .txt: paragraphs separated by blank lines.
- .html/.htm: BeautifulSoup with Python's own html.parser, which records the line of every tag; the text of each
  h1-h6, p, li, pre, tr, dt/dd... is kept with the source line each piece of text sits on. script/style are dropped.
  (Not html2text: it is GPL-3.0, this project Apache-2.0, and its Markdown output has lost the source lines.)
- .pdf: pypdf's text layer, page by page; the unit is the page (a scanned PDF without a text layer is an error).
  The heading path is the document title (metadata) and the last bookmark (outline entry) starting on or before
  the page.
- .docx: python-docx; "line" n is the n-th paragraph of the body (a table row counts as one), headings from the
  Title / Heading N styles. Headers, footers, footnotes and comments are not read.
- .py: module, class and function docstrings and comments (pragmas such as `# noqa` left out), under the
  qualified name (`module.Class.method`) as heading; the def/class line is kept above its docstring.
- .jsonl: one record per line, its text field ("text" unless told) is one section; the line is the JSONL line.

Errors: a missing, unreadable, empty, corrupt or unsupported file raises `ExtractError` (an `InputError`) naming
the file and the reason, so an indexer can count it and go on. Text that is not valid UTF-8 is decoded with
replacement characters and a warning (one bad byte in a Latin-1 file should not hide the whole document), unless
it looks binary (a NUL byte, or more than 1% of it undecodable): then it is an ExtractError.
"""

from __future__ import annotations

import ast
import io
import json
import logging
import re
import tokenize
from dataclasses import dataclass, field
from pathlib import Path

from gptsmith.errors import InputError

log = logging.getLogger(__name__)

SUPPORTED = frozenset({".md", ".markdown", ".txt", ".rst", ".html", ".htm", ".pdf", ".docx", ".py", ".jsonl"})


class ExtractError(InputError):
    """A document that cannot be read into text: the message names the file and the reason."""

    def __init__(self, path: str | Path, reason: str):
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{path}: {reason}")


@dataclass(frozen=True)
class Block:
    kind: str  # "heading" | "paragraph" | "code" | "list" | "table"
    heading: tuple[str, ...]  # the heading path the block sits under (a heading block's path ends with itself)
    lines: tuple[tuple[int, str], ...]  # (source line, or page, number; the text of that line)
    starts_section: bool = False  # a heading, a PDF page, a JSONL record: the chunker starts a new chunk here

    @property
    def start(self) -> int:
        return self.lines[0][0]

    @property
    def end(self) -> int:
        return self.lines[-1][0]

    @property
    def text(self) -> str:
        return "\n".join(text for _, text in self.lines)


@dataclass
class Document:
    source: str  # absolute POSIX path
    unit: str  # "line" | "page"
    blocks: list[Block]
    warnings: list[str] = field(default_factory=list)  # e.g. invalid UTF-8 replaced


def extract(path: str | Path, *, jsonl_field: str = "text") -> Document:
    """Read one file into a Document; raise ExtractError when it is missing, unreadable, empty or unsupported."""
    path = Path(path)
    suffix = path.suffix.lower()
    if path.is_dir():
        raise ExtractError(path, "is a directory, not a file")
    if suffix not in SUPPORTED:
        raise ExtractError(path, f"unsupported file type {suffix or '(no extension)'!r}; "
                                 f"supported: {', '.join(sorted(SUPPORTED))}")
    data = _read_bytes(path)
    doc = Document(source=path.resolve().as_posix(), unit="page" if suffix == ".pdf" else "line", blocks=[])
    if suffix == ".pdf":
        doc.blocks = _pdf_blocks(path, data)
    elif suffix == ".docx":
        doc.blocks = _docx_blocks(path, data)
    else:
        text = _decode(path, data, doc.warnings, html=suffix in (".html", ".htm"))
        doc.blocks = _TEXT_PARSERS[suffix](path, text, jsonl_field)
    doc.blocks = [b for b in doc.blocks if any(t.strip() for _, t in b.lines)]
    if not doc.blocks:
        raise ExtractError(path, "no text found in the document (nothing to index)")
    return doc


# ---- reading -------------------------------------------------------------------------------------------------


def _read_bytes(path: Path) -> bytes:
    if not path.exists():
        raise ExtractError(path, "file not found")
    try:
        data = path.read_bytes()
    except OSError as e:
        raise ExtractError(path, f"cannot read the file: {e.strerror or e}") from e
    if not data.strip():
        raise ExtractError(path, "the file is empty")
    return data


def _decode(path: Path, data: bytes, warnings: list[str], html: bool = False) -> str:
    """UTF-8 (a BOM is dropped), or for HTML the charset its <meta> declares; a few bad bytes become U+FFFD with a
    warning, a binary file is an error. Line ends become "\n"; lines are counted at "\n" only, as editors and
    Python do (not at form feeds)."""
    declared = _declared_charset(data) if html else None
    text = data.decode(declared, errors="replace") if declared else _decode_utf8(path, data, warnings)
    return text.replace("\r\n", "\n").replace("\r", "\n")


def _declared_charset(data: bytes) -> str | None:
    """The <meta charset> of an HTML page when it names a known encoding other than UTF-8."""
    import codecs

    from bs4.dammit import EncodingDetector

    name = EncodingDetector.find_declared_encoding(data, is_html=True)
    try:
        return None if not name or codecs.lookup(name).name == "utf-8" else name
    except LookupError:
        return None


def _decode_utf8(path: Path, data: bytes, warnings: list[str]) -> str:
    if b"\x00" in data:
        raise ExtractError(path, "looks binary (contains NUL bytes), not a text file")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        text = data.decode("utf-8-sig", errors="replace")
        if text.count("\ufffd") > max(1, len(text) // 100):
            raise ExtractError(path, f"not UTF-8 text (first bad byte on line {line}); convert it to UTF-8") from e
        message = f"{path}: invalid UTF-8 (first bad byte on line {line}) replaced with U+FFFD"
        warnings.append(message)
        log.warning(message)
        return text


def _numbered(text: str) -> list[tuple[int, str]]:
    """Source lines with 1-based numbers, trailing whitespace dropped."""
    return [(i, line.rstrip()) for i, line in enumerate(text.split("\n"), start=1)]


def _under(stack: list[tuple[int, str]], level: int, title: str) -> tuple[str, ...]:
    """Put a heading of `level` on the heading stack (closing deeper or equal ones) and return the new path."""
    while stack and stack[-1][0] >= level:
        stack.pop()
    stack.append((level, title))
    return tuple(t for _, t in stack)


def _paragraphs(lines: list[tuple[int, str]], heading: tuple[str, ...] = (), kind: str = "paragraph") -> list[Block]:
    """Split numbered lines into blocks at blank lines."""
    blocks, current = [], []
    for number, text in lines + [(0, "")]:
        if text.strip():
            current.append((number, text))
        elif current:
            blocks.append(Block(kind, heading, tuple(current)))
            current = []
    return blocks


# ---- plain text, Markdown, reStructuredText -------------------------------------------------------------------


def _txt_blocks(path: Path, text: str, _field: str) -> list[Block]:
    return _paragraphs(_numbered(text))


def _strip_front_matter(lines: list[str]) -> list[str]:
    """Blank a leading YAML front matter block (keeping the line count, so numbers stay right)."""
    if not lines or lines[0].strip() != "---":
        return lines
    for i in range(1, len(lines)):
        if lines[i].strip() in ("---", "..."):
            return [""] * (i + 1) + lines[i + 1:]
    return lines


_MD_KIND = {"fence": "code", "code_block": "code", "bullet_list_open": "list", "ordered_list_open": "list",
            "table_open": "table", "paragraph_open": "paragraph", "blockquote_open": "paragraph",
            "html_block": "paragraph"}


def _md_blocks(path: Path, text: str, _field: str) -> list[Block]:
    from markdown_it import MarkdownIt

    lines = _strip_front_matter(text.split("\n"))
    tokens = MarkdownIt("commonmark").enable("table").parse("\n".join(lines))
    blocks, stack, path_now = [], [], ()
    for i, token in enumerate(tokens):
        if token.level != 0 or token.map is None:
            continue  # only top-level blocks: a list or a quote is kept whole, with its own lines
        first, stop = token.map  # 0-based, stop exclusive
        if token.type == "heading_open":
            title = tokens[i + 1].content.strip()
            path_now = _under(stack, int(token.tag[1]), title)
            blocks.append(Block("heading", path_now, ((first + 1, title),), starts_section=True))
        elif token.type in _MD_KIND:
            kind = _MD_KIND[token.type]
            numbered = [(n + 1, lines[n].rstrip()) for n in range(first, min(stop, len(lines)))]
            if kind != "code":
                numbered = [(n, t) for n, t in numbered if t.strip()]
            while numbered and not numbered[-1][1].strip():
                numbered.pop()
            if numbered and (token.type != "html_block" or _visible(numbered)):
                blocks.append(Block(kind, path_now, tuple(numbered)))
    return blocks


def _visible(numbered: list[tuple[int, str]]) -> bool:
    """Whether raw HTML in Markdown shows any text (an <img>, a <br> or a comment alone is left out)."""
    markup = "\n".join(text for _, text in numbered)
    return bool(re.sub(r"<!--.*?-->|<[^>]*>", "", markup, flags=re.S).strip())


_ADORNMENT = re.compile(r"([!-/:-@\[-`{-~])\1{2,}\s*")  # 3+ of one punctuation character: an RST under/overline


def _is_adornment(line: str) -> bool:
    return bool(_ADORNMENT.fullmatch(line))


def _rst_heading_at(lines: list[str], i: int) -> tuple[str, tuple[str, bool], int, int] | None:
    """A section title starting at line i: (title, style, index of the title line, index after it) or None."""
    n = len(lines)
    if _is_adornment(lines[i]) and i + 2 < n and lines[i + 1].strip() and _is_adornment(lines[i + 2]) \
            and lines[i + 2][0] == lines[i][0]:
        return lines[i + 1].strip(), (lines[i][0], True), i + 1, i + 3
    if lines[i].strip() and not lines[i][0].isspace() and not _is_adornment(lines[i]) and i + 1 < n \
            and _is_adornment(lines[i + 1]):
        return lines[i].strip(), (lines[i + 1][0], False), i, i + 2
    return None


_RST_DIRECTIVE = re.compile(r"\.\. ([\w:-]+)::")  # `.. note::`, `.. function:: dumps(obj)`, `.. code-block:: py`
_RST_EXPLICIT = re.compile(r"\.\.(\s|$)")  # any explicit markup start: a directive, a comment, a link target
_RST_CODE_DIRECTIVES = {"code-block", "code", "sourcecode", "literalinclude", "doctest", "testcode", "productionlist"}


def _rst_blocks(path: Path, text: str, _field: str) -> list[Block]:
    lines = [line.rstrip() for line in text.split("\n")]
    blocks, stack, styles, path_now, i = [], [], [], (), 0
    while i < len(lines):
        if not lines[i].strip():
            i += 1
            continue
        heading = _rst_heading_at(lines, i)
        if heading:
            title, style, at, i = heading
            styles += [style] if style not in styles else []
            path_now = _under(stack, styles.index(style) + 1, title)
            blocks.append(Block("heading", path_now, ((at + 1, title),), starts_section=True))
            continue
        kind, j = _rst_block_at(lines, i)
        numbered = [(n + 1, lines[n]) for n in range(i, j) if kind == "code" or lines[n].strip()]
        if kind:
            blocks.append(Block(kind, path_now, tuple(numbered)))
        i = j
    return blocks


def _rst_block_at(lines: list[str], i: int) -> tuple[str, int]:
    """(kind, end) of the block starting at line i; kind "" for markup that is not text (a comment, a target).
    A directive keeps its indented body with it: `.. function:: dumps(obj)` and the text that describes it."""
    if lines[i][0].isspace():  # a literal block, a quote, a definition: kept as written, cut only at lines
        return "code", _indented_end(lines, i)
    if _RST_EXPLICIT.match(lines[i]):
        directive = _RST_DIRECTIVE.match(lines[i])
        end = _indented_end(lines, i + 1)
        if not directive:
            return "", end
        return ("code" if directive.group(1) in _RST_CODE_DIRECTIVES else "paragraph"), end
    j = i + 1
    while j < len(lines) and lines[j].strip() and not lines[j][0].isspace() and not _rst_heading_at(lines, j):
        j += 1
    return "paragraph", j


def _indented_end(lines: list[str], j: int) -> int:
    """The end of the run of indented (or blank) lines from j, trailing blank lines left out."""
    start = j
    while j < len(lines) and (not lines[j].strip() or lines[j][0].isspace()):
        j += 1
    while j > start and not lines[j - 1].strip():
        j -= 1
    return j


# ---- HTML -----------------------------------------------------------------------------------------------------

_HTML_HEADINGS = {f"h{n}": n for n in range(1, 7)}
# Elements whose text is one block; containers (div, section, ul, table, ...) are walked into instead.
_HTML_LEAVES = {"p", "li", "pre", "tr", "dt", "dd", "caption", "figcaption", "blockquote", "address", *_HTML_HEADINGS}
_HTML_DROPPED = {"script", "style", "noscript", "template", "head", "svg", "iframe"}
# Text-level elements: with the text around them in a container they make one paragraph, as a browser shows it.
_HTML_INLINE = {"a", "abbr", "b", "bdi", "bdo", "br", "cite", "code", "data", "del", "dfn", "em", "font", "i", "img",
                "ins", "kbd", "label", "mark", "q", "s", "samp", "small", "span", "strong", "sub", "sup", "time",
                "tt", "u", "var", "wbr"}
_HTML_ANCHOR = re.compile(r"[\s#¶§]+$")  # the permalink mark docs generators put after a heading
_HTML_CELLS = {"td", "th"}
_HTML_INLINE_BREAKS = {"br", "p", "div", "li", "dt", "dd"}  # inside a leaf block: a space, so words do not merge


def _html_blocks(path: Path, text: str, _field: str) -> list[Block]:
    from bs4 import BeautifulSoup

    soup = BeautifulSoup(text, "html.parser")  # html.parser records where every tag starts
    source = text.split("\n")
    blocks, stack, path_now = [], [], ()
    for name, lines in _html_leaves(soup, source):
        if name in _HTML_HEADINGS:
            title = _HTML_ANCHOR.sub("", " ".join(t for _, t in lines)) or lines[0][1]
            path_now = _under(stack, _HTML_HEADINGS[name], title)
            blocks.append(Block("heading", path_now, tuple(lines), starts_section=True))
        else:
            kind = {"pre": "code", "li": "list", "tr": "table"}.get(name, "paragraph")
            blocks.append(Block(kind, path_now, tuple(lines)))
    return blocks


def _html_leaves(node, source: list[str]):
    """Yield (tag name, numbered lines) for each leaf block in document order; text and text-level elements
    directly in a container are one paragraph (name "")."""
    from bs4 import NavigableString, Tag

    run = []
    for child in [*node.children, None]:
        if isinstance(child, NavigableString) and type(child) is not NavigableString:
            continue  # a comment, CDATA, a doctype
        if type(child) is NavigableString or isinstance(child, Tag) and child.name in _HTML_INLINE:
            run.append(child)
            continue
        if run and (lines := _html_lines(run, source, keep_space=False)):
            yield "", lines
        run = []
        if isinstance(child, Tag) and child.name in _HTML_LEAVES:
            if lines := _html_lines([child], source, keep_space=child.name == "pre"):
                yield child.name, lines
        elif isinstance(child, Tag) and child.name not in _HTML_DROPPED:
            yield from _html_leaves(child, source)


def _text_line(tag, source: list[str]) -> int:
    """The line where a tag's content begins: where its start tag ends, since attributes may span lines."""
    number, column, quote = tag.sourceline or 1, tag.sourcepos or 0, ""
    for number in range(number, len(source) + 1):
        for char in source[number - 1][column:]:
            if quote:
                quote = "" if char == quote else quote
            elif char in "\"'":
                quote = char
            elif char == ">":
                return number
        column = 0
    return tag.sourceline or 1


def _line_of(string, source: list[str]) -> int:
    """The source line a loose string starts on: the closest tag before it, plus the newlines of the text
    between that tag and the string."""
    from bs4 import Tag

    count, element = 0, string.previous_element
    while element is not None and not isinstance(element, Tag):
        count += str(element).count("\n")
        element = element.previous_element
    return (_text_line(element, source) if element is not None and element.sourceline else 1) + count


def _html_lines(nodes: list, source: list[str], keep_space: bool) -> list[tuple[int, str]]:
    """The text of some nodes (tags or strings), line by line, each with its source line."""
    from bs4 import Tag

    parts: list[tuple[int, str]] = []
    filled: set[int] = set()  # lines that already hold some text
    for node in nodes:
        if isinstance(node, Tag):
            _tag_parts(node, source, parts, filled)
        else:
            _add_text(parts, filled, _line_of(node, source), str(node))
    return _merge_parts(parts, keep_space)


def _tag_parts(tag, source: list[str], parts: list[tuple[int, str]], filled: set[int]) -> None:
    """Every tag inside resets the line to where its start tag ends, and the newlines in the text move it on.
    Script/style text is skipped (its newlines counted). Cells of a table row on one line are joined by " | "."""
    from bs4 import NavigableString, Tag

    line = _text_line(tag, source)
    for element in tag.descendants:
        if isinstance(element, Tag):
            line = _text_line(element, source) if element.sourceline else line
            if line in filled and element.name in _HTML_CELLS | _HTML_INLINE_BREAKS:
                parts.append((line, " | " if element.name in _HTML_CELLS else " "))
        elif isinstance(element, NavigableString):
            if type(element) is NavigableString and element.parent.name not in _HTML_DROPPED:
                line = _add_text(parts, filled, line, str(element))  # not a comment, CDATA or doctype, nor script
            else:
                line += str(element).count("\n")


def _add_text(parts: list[tuple[int, str]], filled: set[int], line: int, text: str) -> int:
    """Add text that starts on `line`; return the line it ends on."""
    pieces = text.split("\n")
    parts.append((line, text))
    filled.update(line + i for i, piece in enumerate(pieces) if piece.strip())
    return line + len(pieces) - 1


def _merge_parts(parts: list[tuple[int, str]], keep_space: bool) -> list[tuple[int, str]]:
    """Join text pieces that sit on one source line; collapse runs of spaces unless the text is preformatted."""
    by_line: dict[int, str] = {}
    for line, text in parts:
        for offset, piece in enumerate(text.split("\n")):
            by_line[line + offset] = by_line.get(line + offset, "") + piece
    result = []
    for line in sorted(by_line):
        text = by_line[line].rstrip() if keep_space else " ".join(by_line[line].split())
        if text.strip() or (keep_space and result):
            result.append((line, text))
    while result and not result[-1][1].strip():
        result.pop()
    return result


# ---- PDF and Word ---------------------------------------------------------------------------------------------


def _pdf_blocks(path: Path, data: bytes) -> list[Block]:
    from pypdf import PdfReader

    try:  # a damaged file can raise almost anything inside the parser; for the indexer it is one bad file
        reader = PdfReader(io.BytesIO(data))
        if reader.is_encrypted and not reader.decrypt(""):
            raise ExtractError(path, "the PDF is encrypted with a password; decrypt it first")
        title = str((reader.metadata or {}).get("/Title") or "").strip()
        pages = [page.extract_text() or "" for page in reader.pages]
    except ExtractError:
        raise
    except Exception as e:  # noqa: BLE001
        raise ExtractError(path, f"cannot read the PDF ({type(e).__name__}: {e}); is the file complete?") from e
    if not any(p.strip() for p in pages):
        raise ExtractError(path, "the PDF has no text layer (a scan?); run OCR on it first")
    outline, root = _pdf_outline(reader), (title,) if title else ()
    blocks = []
    for number, page_text in enumerate(pages, start=1):
        heading = root + _page_heading(outline, number)
        page_blocks = _paragraphs([(number, line.rstrip()) for line in page_text.splitlines()], heading)
        if page_blocks:  # each page begins a new chunk, so a citation's page range stays small
            page_blocks[0] = Block(page_blocks[0].kind, heading, page_blocks[0].lines, starts_section=True)
        blocks += page_blocks
    return blocks


def _pdf_outline(reader) -> list[tuple[int, tuple[str, ...]]]:
    """(first page, heading path) of each bookmark, in page order; [] when the PDF has none or a broken one."""

    def walk(items, path):
        parent = None
        for item in items:
            if isinstance(item, list):  # the children of the bookmark just before
                yield from walk(item, path + (parent,) if parent else path)
                continue
            parent = str(item.title).strip()
            page = reader.get_destination_page_number(item)
            if page is not None and page >= 0:
                yield page + 1, path + (parent,)

    try:
        return sorted(walk(reader.outline, ()), key=lambda entry: entry[0])
    except Exception:  # noqa: BLE001 - bookmarks only add headings; the text is still worth indexing
        return []


def _page_heading(outline: list[tuple[int, tuple[str, ...]]], page: int) -> tuple[str, ...]:
    """The heading path of the last bookmark that starts on or before `page`."""
    heading = ()
    for first, path in outline:
        if first > page:
            break
        heading = path
    return heading


_DOCX_LEVEL = re.compile(r"heading (\d)", re.I)


def _docx_items(data: bytes) -> list[tuple[str, str]]:
    """(style name, text) for each body paragraph and table row, in order: the docx's "lines"."""
    import docx
    from docx.table import Table

    items = []
    for item in docx.Document(io.BytesIO(data)).iter_inner_content():
        if isinstance(item, Table):
            for row in item.rows:
                items.append(("Table", " | ".join(cell.text.strip() for cell in row.cells)))
        else:
            items.append((item.style.name if item.style is not None else "", item.text.rstrip()))
    return items


def _docx_blocks(path: Path, data: bytes) -> list[Block]:
    try:  # a damaged or mislabelled file fails deep inside the zip/XML readers
        items = _docx_items(data)
    except Exception as e:  # noqa: BLE001
        raise ExtractError(path, f"cannot read the Word document ({type(e).__name__}: {e}); "
                                 "is it a .docx (not an old .doc) and complete?") from e
    blocks, stack, path_now, body, previous = [], [], (), [], ""
    for number, (style, text) in enumerate(items + [("", "")], start=1):
        level = 0 if style == "Title" else int(m.group(1)) if (m := _DOCX_LEVEL.fullmatch(style)) else None
        if level is not None and text.strip():
            blocks += _paragraphs(body, path_now)
            body = []
            path_now = _under(stack, level, text.strip())
            blocks.append(Block("heading", path_now, ((number, text.strip()),), starts_section=True))
        elif text.strip():
            if not (style == "Table" == previous):  # a paragraph is a block of its own; a table's rows stay together
                body.append((number, ""))
            body.append((number, ("- " if style.lower().startswith("list") else "") + text))
        previous = style
    return blocks + _paragraphs(body, path_now)


# ---- Python ---------------------------------------------------------------------------------------------------

_PRAGMA = re.compile(r"#\s*(noqa|type:|pragma|fmt:|pylint:|mypy:|isort:|-\*-|!)", re.I)


def _py_scopes(tree: ast.Module, module: str) -> list[tuple[str, ast.AST]]:
    """(qualified name, node) for the module and every class and function in it, outermost first."""
    scopes = [(module, tree)]
    for qualname, node in scopes:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                scopes.append((f"{qualname}.{child.name}", child))
    return scopes


def _py_comments(path: Path, text: str) -> list[tuple[int, str]]:
    """(line, text) of every comment that says something (not a pragma, not a shebang)."""
    comments = []
    try:
        for token in tokenize.generate_tokens(io.StringIO(text).readline):
            if token.type == tokenize.COMMENT and not _PRAGMA.match(token.string):
                body = token.string.lstrip("#").strip()
                if body:
                    comments.append((token.start[0], body))
    except (tokenize.TokenError, IndentationError, SyntaxError):
        pass  # the AST pass below already reported the syntax error
    return comments


def _segment(source: list[str], node: ast.expr) -> str:
    """The node's source text (ast offsets are UTF-8 byte columns)."""
    lines = [line.encode() for line in source[node.lineno - 1: node.end_lineno]]
    lines[-1] = lines[-1][: node.end_col_offset]
    lines[0] = lines[0][node.col_offset:]
    return b"\n".join(lines).decode(errors="replace")


def _docstring_lines(node: ast.AST, source: list[str]) -> list[tuple[int, str]]:
    """The docstring as written in the source (escapes such as \\n left as they are, so the text is found on
    the lines it cites), numbered from the line of its opening quotes, quotes and indentation removed."""
    body = getattr(node, "body", [])
    if not (body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant)
            and isinstance(body[0].value.value, str)):
        return []
    literal = _segment(source, body[0].value)
    literal = re.sub(r"""^[rRuU]*(\"\"\"|'''|"|')""", "", literal)
    literal = re.sub(r"""(\"\"\"|'''|"|')$""", "", literal)
    raw = literal.expandtabs().split("\n")
    indents = [len(line) - len(line.lstrip()) for line in raw[1:] if line.strip()]
    cut = min(indents, default=0)
    first = body[0].value.lineno
    return [(first + i, (line if i == 0 else line[cut:]).rstrip()) for i, line in enumerate(raw)]


def _innermost_scope(scopes: list[tuple[str, ast.AST]], line: int) -> str:
    best = scopes[0][0]
    for qualname, node in scopes[1:]:
        if node.lineno <= line <= node.end_lineno:
            best = qualname  # scopes are listed outermost first, so the last match is the innermost
    return best


def _py_blocks(path: Path, text: str, _field: str) -> list[Block]:
    try:
        tree = ast.parse(text, filename=str(path))
    except SyntaxError as e:
        raise ExtractError(path, f"Python syntax error on line {e.lineno}: {e.msg}") from e
    source = text.split("\n")
    module = path.parent.name if path.stem == "__init__" else path.stem  # a package's __init__ is the package
    scopes = _py_scopes(tree, module)
    comments: dict[str, list[tuple[int, str]]] = {}
    for line, comment in _py_comments(path, text):
        comments.setdefault(_innermost_scope(scopes, line), []).append((line, comment))
    blocks = []
    for qualname, node in scopes:
        blocks += _py_scope_blocks(qualname, node, source, comments.get(qualname, []))
    return sorted(blocks, key=lambda b: b.start)


def _py_scope_blocks(qualname: str, node: ast.AST, source: list[str], comments: list[tuple[int, str]]) -> list[Block]:
    """A scope's def/class line(s), docstring and comments, under its qualified name; nothing if it has neither."""
    heading = (qualname,)
    doc = _docstring_lines(node, source)
    if not doc and not comments:
        return []
    blocks = []
    if not isinstance(node, ast.Module):  # the signature, verbatim: it says what the docstring is about
        last = _header_end(node, source, (doc[0][0] if doc else node.body[0].lineno) - 1)
        header = [(n, source[n - 1].rstrip()) for n in range(node.lineno, last + 1)]
        blocks.append(Block("code", heading, tuple(header), starts_section=True))
    blocks += _paragraphs(doc, heading)
    blocks += _paragraphs(_runs(comments), heading)
    if isinstance(node, ast.Module) and blocks:
        blocks[0] = Block(blocks[0].kind, heading, blocks[0].lines, starts_section=True)
    return blocks


def _header_end(node: ast.AST, source: list[str], stop: int) -> int:
    """The line that ends a def/class header: the first one whose code ends with ':' (a signature may span
    several lines)."""
    for number in range(node.lineno, stop + 1):
        if source[number - 1].split("#")[0].rstrip().endswith(":"):
            return number
    return node.lineno


def _runs(numbered: list[tuple[int, str]]) -> list[tuple[int, str]]:
    """Insert a blank between lines that are not consecutive, so comments on adjacent lines form one paragraph."""
    result = []
    for number, text in numbered:
        if result and number != result[-1][0] + 1:
            result.append((result[-1][0], ""))
        result.append((number, text))
    return result


# ---- JSONL ----------------------------------------------------------------------------------------------------


def _jsonl_blocks(path: Path, text: str, field_name: str) -> list[Block]:
    blocks, skipped = [], []
    for number, line in _numbered(text):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            value = record[field_name] if isinstance(record, dict) else None
        except (json.JSONDecodeError, KeyError):
            value = None
        if not isinstance(value, str) or not value.strip():
            skipped.append(number)
            continue
        title = record.get("title") if isinstance(record.get("title"), str) else f"line {number}"
        record_lines = [(number, part.rstrip()) for part in value.splitlines()]
        record_blocks = _paragraphs(record_lines, (title,))
        record_blocks[0] = Block(record_blocks[0].kind, (title,), record_blocks[0].lines, starts_section=True)
        blocks += record_blocks
    if skipped:
        log.warning("%s: %d line(s) without a string field %r skipped (first: line %d)",
                    path, len(skipped), field_name, skipped[0])
    if not blocks:
        raise ExtractError(path, f"no line is a JSON object with a non-empty string field {field_name!r} "
                                 "(name the field that holds the text)")
    return blocks


_TEXT_PARSERS = {".md": _md_blocks, ".markdown": _md_blocks, ".txt": _txt_blocks, ".rst": _rst_blocks,
                 ".html": _html_blocks, ".htm": _html_blocks, ".py": _py_blocks, ".jsonl": _jsonl_blocks}
