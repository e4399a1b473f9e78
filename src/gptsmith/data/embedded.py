"""The embedded default corpus: Python's own documentation, which ships with every CPython.

`python_docs()` yields the language reference topics of `pydoc_data.topics` and one document per standard
library module made of its docstrings (module, classes, methods, functions). Importing ~300 modules has side
effects (warnings, prints, changed global state), so the walk runs in a child process
(`python -m gptsmith.data.embedded`) that streams JSON lines back; nothing is imported into the caller.
"""

from __future__ import annotations

import importlib
import inspect
import json
import os
import pkgutil
import re
import subprocess
import sys
from collections.abc import Iterator

# Modules that open windows or browsers, print on import, start GUIs, or only hold tests.
SKIP = {"antigravity", "this", "idlelib", "tkinter", "turtle", "turtledemo", "test", "lib2to3", "distutils",
        "ensurepip", "pydoc_data", "msilib", "winreg", "winsound", "msvcrt", "_winapi", "nturl2path"}
MAX_SUBMODULE_DEPTH = 2  # email.mime.text is deep enough; deeper packages are mostly internals


def _skip(name: str) -> bool:
    parts = name.split(".")
    return (parts[0] in SKIP or any(p.startswith("_") for p in parts)
            or any(p in ("test", "tests", "idle_test") or p.startswith("test_") for p in parts))


def _module_names() -> list[str]:
    names = []
    for top in sorted(sys.stdlib_module_names):
        if _skip(top):
            continue
        names.append(top)
        try:
            mod = importlib.import_module(top)
        except BaseException:  # noqa: BLE001 - SystemExit/ImportError from platform-specific modules
            continue
        if hasattr(mod, "__path__"):
            for info in pkgutil.walk_packages(mod.__path__, prefix=top + ".", onerror=lambda _: None):
                if info.name.count(".") <= MAX_SUBMODULE_DEPTH and not _skip(info.name):
                    names.append(info.name)
    return sorted(set(names))


def _own_doc(obj) -> str | None:
    # Own docstrings only: inspect.getdoc would repeat object.__init__'s text for every class without one.
    if getattr(obj, "__doc__", None) is None:
        return None
    doc = inspect.getdoc(obj)
    return doc.strip() if doc and doc.strip() else None


def module_document(name: str) -> str | None:
    """All docstrings of one module as one Markdown-ish document, or None if it has none or won't import."""
    try:
        mod = importlib.import_module(name)
    except BaseException:  # noqa: BLE001
        return None
    parts = [f"# {name}"]
    if doc := _own_doc(mod):
        parts.append(doc)
    for attr, obj in sorted(vars(mod).items()):
        if attr.startswith("_") or getattr(obj, "__module__", None) != name:
            continue
        if inspect.isclass(obj):
            section = []
            if doc := _own_doc(obj):
                section.append(doc)
            for meth_name, meth in sorted(vars(obj).items()):
                if meth_name.startswith("_") and meth_name != "__init__":
                    continue
                fn = meth.__func__ if isinstance(meth, (classmethod, staticmethod)) else meth
                if callable(fn) or isinstance(meth, property):
                    if doc := _own_doc(fn):
                        section.append(f"### {attr}.{meth_name}\n\n{doc}")
            if section:
                parts.append(f"## class {attr}\n\n" + "\n\n".join(section))
        elif inspect.isroutine(obj) and (doc := _own_doc(obj)):
            try:
                # Default values can print as "<object at 0x7f...>": drop the address so the text is stable.
                sig = re.sub(r" at 0x[0-9a-fA-F]+", "", str(inspect.signature(obj)))
            except (TypeError, ValueError):
                sig = "(...)"
            parts.append(f"## {attr}{sig}\n\n{doc}")
    return "\n\n".join(parts) if len(parts) > 1 else None


def _emit() -> None:
    import warnings

    import pydoc_data.topics

    warnings.simplefilter("ignore")
    # Some modules print when imported; keep our protocol stream clean by pointing fd 1 elsewhere.
    real_stdout = os.fdopen(os.dup(1), "w", encoding="utf-8")
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)
    sys.stdout = open(os.devnull, "w")
    for key in sorted(pydoc_data.topics.topics):
        real_stdout.write(json.dumps(pydoc_data.topics.topics[key]) + "\n")
    for name in _module_names():
        if doc := module_document(name):
            real_stdout.write(json.dumps(doc) + "\n")
    real_stdout.flush()


def python_docs() -> Iterator[str]:
    """Python's documentation topics, then one document of docstrings per stdlib module, in a fixed order."""
    # A fixed hash seed keeps set/dict reprs inside docstrings and signatures identical from run to run.
    env = {**os.environ, "PYTHONHASHSEED": "0"}
    proc = subprocess.Popen([sys.executable, "-m", "gptsmith.data.embedded"], stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL, env=env)
    finished = False
    try:
        for line in proc.stdout:
            yield json.loads(line)
        finished = True
    finally:
        if not finished:  # the caller stopped early (or failed): don't leave the child running
            proc.kill()
        proc.stdout.close()
        code = proc.wait()
    if code != 0:
        raise RuntimeError(f"collecting Python's documentation failed (exit {code}); "
                           f"run `{sys.executable} -m gptsmith.data.embedded` to see why")

if __name__ == "__main__":
    _emit()
