"""Conversation data: read, validate and convert OpenAI `messages`, ShareGPT and Alpaca records.

Every loader returns conversations as OpenAI-style message lists, `[{"role": ..., "content": ...}, ...]`, the
format chat templates, TRL and the OpenAI API all take. The format is detected per file from its first valid
record; a file that mixes formats is an error naming the line, because a silently mis-read record trains the
model on garbage.

    messages:  {"messages": [{"role": "system"|"user"|"assistant", "content": "..."}, ...]}
    sharegpt:  {"conversations": [{"from": "system"|"human"|"gpt" (or user/assistant), "value": "..."}, ...]}
    alpaca:    {"instruction": "...", "input": "..." (optional), "output": "...", "system": "..." (optional)}
"""

from __future__ import annotations

import hashlib
import json
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Literal

from gptsmith.data.clean import SPLIT_SEED, assign_split, digest
from gptsmith.data.readers import SKIP_HINT
from gptsmith.errors import InputError
from gptsmith.files import iter_lines

FORMATS = ("messages", "sharegpt", "alpaca")
ROLES = ("system", "user", "assistant")
SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}
SHAREGPT_OUT = {"system": "system", "user": "human", "assistant": "gpt"}
CHATTERBOT = "chatterbot"  # data name of the embedded default conversations

Messages = list[dict[str, str]]


@dataclass
class LoadResult:
    conversations: list[Messages]
    format: str | None
    skipped: int = 0
    problems: Counter = field(default_factory=Counter)  # problem kind -> count, for the report


def detect_format(record) -> str | None:
    """The format a record looks like, from its keys alone (None when it matches none)."""
    if not isinstance(record, dict):
        return None
    if "messages" in record:
        return "messages"
    if "conversations" in record:
        return "sharegpt"
    if "instruction" in record or "output" in record:
        return "alpaca"
    return None


def _text(value, what: str) -> str:
    if not isinstance(value, str):
        raise ValueError(f"{what} must be a string, got {type(value).__name__}")
    if not value.strip():
        raise ValueError(f"{what} is empty")
    return value


def to_messages(record: dict, fmt: str) -> Messages:
    """Normalise one record of `fmt` to a message list and validate it; ValueError says what is wrong."""
    if fmt == "messages":
        turns = record["messages"]
        if not isinstance(turns, list):
            raise ValueError("'messages' must be a list of {role, content} objects")
        out = []
        for i, t in enumerate(turns):
            if not isinstance(t, dict) or "role" not in t or "content" not in t:
                raise ValueError(f"messages[{i}] needs 'role' and 'content' fields")
            if t["role"] not in ROLES:
                raise ValueError(f"messages[{i}] has unknown role {t['role']!r}; use one of {', '.join(ROLES)}")
            out.append({"role": t["role"], "content": _text(t["content"], f"messages[{i}].content")})
    elif fmt == "sharegpt":
        turns = record["conversations"]
        if not isinstance(turns, list):
            raise ValueError("'conversations' must be a list of {from, value} objects")
        out = []
        if isinstance(record.get("system"), str) and record["system"].strip():
            out.append({"role": "system", "content": record["system"]})
        for i, t in enumerate(turns):
            if not isinstance(t, dict) or "from" not in t or "value" not in t:
                raise ValueError(f"conversations[{i}] needs 'from' and 'value' fields")
            role = SHAREGPT_ROLES.get(t["from"])
            if role is None:
                raise ValueError(f"conversations[{i}] has unknown 'from' {t['from']!r}; "
                                 f"use one of {', '.join(SHAREGPT_ROLES)}")
            out.append({"role": role, "content": _text(t["value"], f"conversations[{i}].value")})
    elif fmt == "alpaca":
        for key in ("instruction", "output"):
            if key not in record:
                raise ValueError(f"missing field '{key}' (alpaca records need instruction and output)")
        prompt = _text(record["instruction"], "'instruction'")
        extra = record.get("input") or ""
        if not isinstance(extra, str):
            raise ValueError("'input' must be a string")
        if extra.strip():
            prompt = f"{prompt}\n\n{extra}"
        out = [{"role": "user", "content": prompt}, {"role": "assistant", "content": _text(record["output"], "'output'")}]
        system = record.get("system")
        if isinstance(system, str) and system.strip():
            out.insert(0, {"role": "system", "content": system})
    else:
        raise ValueError(f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}")
    check_turn_order(out)
    return out


def check_turn_order(messages: Messages) -> None:
    """Optional system first, then user/assistant alternating from user, ending with assistant (what we train on)."""
    if not messages:
        raise ValueError("the conversation is empty")
    body = messages[1:] if messages[0]["role"] == "system" else messages
    if not body:
        raise ValueError("the conversation has only a system message")
    for i, m in enumerate(body):
        want = "user" if i % 2 == 0 else "assistant"
        if m["role"] != want:
            offset = len(messages) - len(body)
            raise ValueError(f"turn {i + offset} is {m['role']!r} where {want!r} belongs: after an optional system "
                             "message, turns must alternate user, assistant, user, ...")
    if body[-1]["role"] != "assistant":
        raise ValueError("the conversation ends with a user turn; it must end with an assistant answer to train on")


def from_messages(messages: Messages, fmt: str) -> dict:
    """One validated message list as a record of `fmt`; ValueError when `fmt` cannot hold it."""
    if fmt == "messages":
        return {"messages": [dict(m) for m in messages]}
    if fmt == "sharegpt":
        return {"conversations": [{"from": SHAREGPT_OUT[m["role"]], "value": m["content"]} for m in messages]}
    if fmt == "alpaca":
        system = messages[0]["content"] if messages[0]["role"] == "system" else None
        body = messages[1:] if system is not None else messages
        if len(body) != 2:
            raise ValueError(f"alpaca holds one question and one answer, this conversation has {len(body)} turns; "
                             "convert it to messages or sharegpt instead")
        rec = {"instruction": body[0]["content"], "input": "", "output": body[1]["content"]}
        if system is not None:
            rec["system"] = system
        return rec
    raise ValueError(f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}")


def _records(path: Path) -> Iterator[tuple[str, object]]:
    """(location, parsed record or the JSON error) for each record of a .jsonl file or a .json list, streamed.
    JSONL lines end at "\\n" only (files.iter_lines): U+2028 or U+0085 inside a string is text, not a line end."""
    try:
        if path.suffix == ".json":
            yield from _json_list_records(path)
            return
        for n, raw in iter_lines(path):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError:
                raise InputError(f"{path}:{n}: not valid UTF-8; re-save the file as UTF-8") from None
            if not line.strip():
                continue
            try:
                yield f"{path}:{n}", json.loads(line)
            except json.JSONDecodeError as e:
                yield f"{path}:{n}", e
    except OSError as e:
        raise InputError(f"{path}: cannot read: {e.strerror or e}") from None


def _json_list_records(path: Path) -> Iterator[tuple[str, object]]:
    from gptsmith.data.readers import ReadContext, iter_json_records

    with open(path, "rb") as f:
        if f.read(4096).lstrip()[:1] != b"[":
            raise InputError(f"{path}: a .json file must hold a list of records, or use .jsonl with one record "
                             "per line")
    ctx = ReadContext()  # on_error="error": a broken list cannot be read on past the break
    try:
        for i, rec in iter_json_records(path, ctx):
            yield f"{path}: item {i}", rec
    except InputError as e:
        raise InputError(f"{str(e).removesuffix(SKIP_HINT)}; a .json file must hold one list of records, "
                         "or use .jsonl with one record per line") from None


def load_conversations(path: str | os.PathLike, on_error: Literal["error", "skip"] = "error") -> LoadResult:
    """Read a conversations file (format detected from its first valid record) as message lists."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: no such file; give a .jsonl (one conversation per line) or .json list, "
                         f"or '{CHATTERBOT}' for the embedded conversations")
    result = LoadResult([], None)

    def bad(where: str, kind: str, problem: str, fix: str) -> None:
        if on_error != "skip":
            raise InputError(f"{where}: {problem}. Fix: {fix} (or pass --on-error skip to skip bad lines)")
        result.skipped += 1
        result.problems[kind] += 1

    for where, rec in _records(path):
        if isinstance(rec, json.JSONDecodeError):
            bad(where, "invalid JSON", f"invalid JSON ({rec.msg})", "each line must be one complete JSON object")
            continue
        fmt = detect_format(rec)
        if fmt is None:
            bad(where, "unknown format", "record is not messages, sharegpt or alpaca",
                "give it a 'messages' list, a 'conversations' list, or 'instruction' and 'output' fields")
            continue
        if result.format is not None and fmt != result.format:
            bad(where, "mixed formats", f"record is {fmt} but this file started as {result.format}",
                f"keep one format per file (`gptsmith data convert` turns a file into {result.format})")
            continue
        try:
            result.conversations.append(to_messages(rec, fmt))
        except ValueError as e:
            bad(where, _kind(str(e)), f"{e} ({fmt} record)", _FIXES.get(fmt, ""))
            continue
        result.format = result.format or fmt  # the first valid record decides the file's format
    if not result.conversations:
        raise InputError(f"{path}: no valid conversations (skipped {result.skipped}: {dict(result.problems)})")
    return result


_FIXES = {
    "messages": 'each line is {"messages": [{"role": "system"|"user"|"assistant", "content": "non-empty text"}, ...]}',
    "sharegpt": 'each line is {"conversations": [{"from": "system"|"human"|"gpt", "value": "non-empty text"}, ...]}',
    "alpaca": 'each line is {"instruction": "...", "input": "" (optional), "output": "..."}',
}
_KINDS = {"unknown role": "unknown role", "unknown 'from'": "unknown role", "is empty": "empty content",
          "missing field": "missing field", "needs": "missing field", "ends with a user": "wrong turn order",
          "belongs": "wrong turn order", "only a system": "wrong turn order", "must be": "wrong type"}


def _kind(message: str) -> str:
    """A short problem label for the skip counts ('empty content', 'wrong turn order', ...)."""
    return next((label for needle, label in _KINDS.items() if needle in message), "invalid")


def convert(input: str | os.PathLike, output: str | os.PathLike, to_format: str = "messages",
            on_error: Literal["error", "skip"] = "error") -> dict:
    """Convert a conversations file to `to_format` JSONL (atomic write); returns counts."""
    from gptsmith.files import atomic_write_text

    if to_format not in FORMATS:
        raise InputError(f"unknown output format {to_format!r}; choose one of {', '.join(FORMATS)}")
    res = load_conversations(input, on_error=on_error)
    lines = []
    for i, conv in enumerate(res.conversations):
        try:
            lines.append(json.dumps(from_messages(conv, to_format), ensure_ascii=False))
        except ValueError as e:
            if on_error != "skip":
                raise InputError(f"{input}: conversation {i + 1}: {e}") from None
            res.skipped += 1
            res.problems[f"not representable in {to_format}"] += 1
    atomic_write_text(output, "".join(line + "\n" for line in lines))
    stats = {"input": str(input), "from": res.format, "to": to_format, "written": len(lines),
             "skipped": res.skipped, "problems": dict(res.problems)}
    print(f"wrote {len(lines)} {to_format} conversations to {output} (from {res.format}; skipped {res.skipped}"
          + (f": {dict(res.problems)}" if res.problems else "") + ")")
    return stats


def conversation_hash(messages: Messages) -> str:
    return hashlib.sha256(json.dumps(messages, sort_keys=True, ensure_ascii=False).encode("utf-8")).hexdigest()


def conversation_key(messages: Messages) -> bytes:
    """The content digest a conversation is split by (the same digest pretraining text is split by)."""
    return digest(json.dumps(messages, sort_keys=True, ensure_ascii=False))


def split_conversations(conversations: list[Messages], val_fraction: float,
                        seed: int = SPLIT_SEED) -> tuple[list[Messages], list[Messages]]:
    """Deterministic train/validation split by content hash (clean.assign_split, the rule pretraining data uses):
    the same conversation always lands on the same side, however the file is ordered or grown. Keeps at least one
    conversation on each side when there are two or more."""
    if val_fraction <= 0 or len(conversations) < 2:
        return list(conversations), []
    scored = [(*assign_split(conversation_key(c), val_fraction, seed), c) for c in conversations]
    train = [c for side, _, c in scored if side == "train"]
    val = [c for side, _, c in scored if side == "val"]
    scored = [(score, c) for _, score, c in scored]
    if not val:  # tiny data: the lowest hash goes to validation so there is always something to measure
        i = min(range(len(scored)), key=lambda j: scored[j][0])
        val, train = [scored[i][1]], [c for j, (_, c) in enumerate(scored) if j != i]
    if not train:
        i = max(range(len(scored)), key=lambda j: scored[j][0])
        train, val = [scored[i][1]], [c for j, (_, c) in enumerate(scored) if j != i]
    return train, val


def chatterbot_dir() -> Path:
    """The English YAML files of the installed `chatterbot-corpus` package."""
    from importlib.util import find_spec

    spec = find_spec("chatterbot_corpus")
    if spec is None or not spec.submodule_search_locations:
        raise InputError("the embedded conversations need the `chatterbot-corpus` package: pip install chatterbot-corpus")
    return Path(list(spec.submodule_search_locations)[0]) / "data" / "english"


def chatterbot_conversations() -> list[Messages]:
    """The English dialogs of `chatterbot-corpus` as message lists: turns alternate user/assistant from the first
    line; a dialog whose last line would be a user turn loses that line (no answer to learn from)."""
    import yaml

    convs = []
    for path in sorted(chatterbot_dir().glob("*.yml")):
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        for dialog in data.get("conversations") or []:
            lines = [str(x).strip() for x in dialog if x is not None and str(x).strip()]
            if len(lines) % 2:
                lines = lines[:-1]
            if not lines:
                continue
            convs.append([{"role": "user" if i % 2 == 0 else "assistant", "content": t} for i, t in enumerate(lines)])
    return convs


def load_chat_data(data: str | os.PathLike, on_error: Literal["error", "skip"] = "error") -> LoadResult:
    """A conversations file, or the name `chatterbot` for the embedded default."""
    if str(data) == CHATTERBOT and not Path(data).exists():
        return LoadResult(chatterbot_conversations(), "messages")
    return load_conversations(data, on_error=on_error)
