"""Suites that ship with gptsmith, made from data on every machine: `gptsmith eval --suite python-docs` works
offline right after `pip install gptsmith`.

    resolve("python-docs")      -> Path of its JSONL (generated into ~/.cache/gptsmith/eval/ on first use)
    resolve("python-docs-qa")   -> Path of its JSONL (questions with documented answers; generated likewise)
    resolve("python-docs-text") -> Path of a folder of .txt files (a text suite: bits-per-byte)
    resolve("chat-sanity")      -> Path of the JSONL shipped in this package
    resolve("anything else")    -> None (not built in)

A suite's version in a result file is the hash of what resolve() returns (gptsmith.eval.run.suite_version); the
generated files are named by their inputs (see python_docs), so a changed suite is a new file with a new version.
"""

from __future__ import annotations

from pathlib import Path

HERE = Path(__file__).parent

BUILTIN = {
    "python-docs": "multiple choice: which section of Python's docs an excerpt comes from (a few hundred items)",
    "python-docs-text": "bits-per-byte on the documentation topics `gptsmith prepare` holds out for validation",
    "python-docs-qa": "multiple choice: what a documented method or statement does, four documented answers "
                      "(~110 items; measures an assistant over the docs)",
    "chat-sanity": "generation: replies end by themselves, stay on topic and keep a system prompt (24 items)",
}


def resolve(name: str) -> Path | None:
    """The file (or, for a text suite, folder) of built-in suite `name`, or None if `name` is not built in."""
    if name == "chat-sanity":
        return HERE / "chat-sanity.jsonl"
    if name == "python-docs":
        from gptsmith.eval.builtin.python_docs import multiple_choice_path

        return multiple_choice_path()
    if name == "python-docs-qa":
        from gptsmith.eval.builtin.python_docs_qa import path

        return path()
    if name == "python-docs-text":
        from gptsmith.eval.builtin.python_docs import text_path

        return text_path()
    return None


def describe() -> str:
    """The built-in suites, one a line, for help texts and errors."""
    return "\n".join(f"  {name:18} {what}" for name, what in BUILTIN.items())
