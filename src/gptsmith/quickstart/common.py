"""What both quickstart tracks share: banners and the Python reference docs written as files to index."""

from __future__ import annotations

from pathlib import Path

from gptsmith.files import atomic_write_text


def banner(text: str) -> None:
    print(f"\n=== {text} " + "=" * max(0, 70 - len(text)), flush=True)


def write_pydocs(folder: Path, only: list[str] | None = None) -> Path:
    """The Python reference topics (the `help()` pages that ship with CPython) as one reStructuredText file each,
    so the index can cite `try.rst:12-30 (The "try" statement)`; `only`: just these topics."""
    import pydoc_data.topics

    folder.mkdir(parents=True, exist_ok=True)
    for name, text in pydoc_data.topics.topics.items():
        if only is None or name in only:
            atomic_write_text(folder / f"{name}.rst", text)
    return folder
