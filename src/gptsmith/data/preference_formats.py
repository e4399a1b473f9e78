"""Preference data for `gptsmith dpo` and `gptsmith kto`: read, validate and normalise to TRL's conversational shape.

Paired (dpo; kto takes them too, as one desirable and one undesirable completion each):
    explicit prompt, conversational (what `gptsmith feedback export --format dpo` writes, TRL's standard):
        {"prompt": [{"role": "user", "content": "..."}, ...], "chosen": [{"role": "assistant", ...}],
         "rejected": [{"role": "assistant", ...}]}
    explicit prompt, plain strings (TRL's standard): {"prompt": "...", "chosen": "...", "rejected": "..."}
        (the prompt becomes one user turn, each answer one assistant turn: the model is tuned as it is served,
        through its chat template)
    implicit prompt (UltraFeedback-binarized, Anthropic HH): {"chosen": [full conversation], "rejected": [full
        conversation]}: the messages both share are the prompt. HH's raw strings ("\\n\\nHuman: ...\\n\\nAssistant: ...")
        are split into turns.
Unpaired (kto; `feedback export --format kto`):
    {"prompt": [...] | "...", "completion": [...] | "...", "label": true | false}

Every record becomes {"prompt": messages, "chosen": messages, "rejected": messages} or {"prompt": messages,
"completion": messages, "label": bool}: the prompt an optional system message, then user/assistant turns from a user
turn to a user turn; each answer one or more messages starting with an assistant turn. A bad record is an InputError
naming file:line, the field and the fix (or, with on_error="skip", counted and skipped).
"""

from __future__ import annotations

import json
import os
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from gptsmith.data.chat_formats import ROLES, _records, check_turn_order, conversation_key
from gptsmith.data.clean import SPLIT_SEED, assign_split
from gptsmith.errors import InputError

Messages = list[dict[str, str]]
KINDS = ("dpo", "kto")

DPO_FIX = ('each line is {"prompt": [{"role": "user", "content": "..."}], "chosen": [{"role": "assistant", '
           '"content": "..."}], "rejected": [{"role": "assistant", "content": "..."}]} (plain strings work too), '
           'or {"chosen": [full conversation], "rejected": [full conversation]}')
KTO_FIX = ('each line is {"prompt": [{"role": "user", "content": "..."}], "completion": [{"role": "assistant", '
           '"content": "..."}], "label": true|false} (plain strings work too), or a dpo pair')


@dataclass
class PreferenceData:
    examples: list[dict]
    format: str | None  # explicit, plain, implicit, hh, unpaired, ...
    skipped: int = 0
    problems: Counter = field(default_factory=Counter)


def _messages(value, name: str) -> Messages:
    """A list of {role, content} messages, checked field by field."""
    if not isinstance(value, list) or not value:
        raise ValueError(f"'{name}' must be a non-empty list of {{role, content}} messages or a string")
    out = []
    for i, m in enumerate(value):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise ValueError(f"{name}[{i}] needs 'role' and 'content' fields")
        if m["role"] not in ROLES:
            raise ValueError(f"{name}[{i}] has unknown role {m['role']!r}; use one of {', '.join(ROLES)}")
        if not isinstance(m["content"], str) or not m["content"].strip():
            raise ValueError(f"{name}[{i}].content must be non-empty text")
        out.append({"role": m["role"], "content": m["content"]})
    return out


def _prompt(value) -> Messages:
    if isinstance(value, str):
        if not value.strip():
            raise ValueError("'prompt' is empty")
        return [{"role": "user", "content": value}]
    msgs = _messages(value, "prompt")
    if msgs[-1]["role"] != "user":
        raise ValueError(f"'prompt' ends with a {msgs[-1]['role']!r} turn; it must end with the user turn the "
                         "answers reply to")
    return msgs


def _answer(value, name: str) -> Messages:
    if isinstance(value, str):
        if not value.strip():
            raise ValueError(f"'{name}' is empty")
        return [{"role": "assistant", "content": value}]
    if isinstance(value, dict):  # one message instead of a list of one
        value = [value]
    msgs = _messages(value, name)
    if msgs[0]["role"] != "assistant":
        raise ValueError(f"{name}[0] is a {msgs[0]['role']!r} turn; an answer starts with an 'assistant' message")
    return msgs


def _whole(prompt: Messages, answer: Messages, name: str) -> None:
    try:
        check_turn_order(prompt + answer)
    except ValueError as e:
        raise ValueError(f"prompt + {name}: {e}") from None


HH_TURN = re.compile(r"\n\n(Human|Assistant): ?")


def _hh_messages(text: str, name: str) -> Messages:
    """Anthropic HH's raw text ("\\n\\nHuman: ...\\n\\nAssistant: ...") as messages."""
    parts = HH_TURN.split(text)
    if len(parts) < 3 or parts[0].strip():
        raise ValueError(f"'{name}' is a plain string without a separate prompt; give a 'prompt' field, or write "
                         "the conversation as messages (or as Anthropic HH text: \\n\\nHuman: ... \\n\\nAssistant: ...)")
    roles = {"Human": "user", "Assistant": "assistant"}
    msgs = [{"role": roles[who], "content": said.strip()} for who, said in zip(parts[1::2], parts[2::2])]
    return _messages(msgs, name)


def _split_implicit(chosen: Messages, rejected: Messages) -> tuple[Messages, Messages, Messages]:
    """The longest run of leading messages both conversations share is the prompt (TRL's extract_prompt)."""
    n = 0
    while n < min(len(chosen), len(rejected)) and chosen[n] == rejected[n]:
        n += 1
    while n and chosen[n - 1]["role"] != "user":  # an identical first assistant message still belongs to the answer
        n -= 1
    if n == 0:
        raise ValueError("'chosen' and 'rejected' share no prompt: with no 'prompt' field, both must be the same "
                         "conversation up to the last user turn, then differ in the assistant's answer")
    return chosen[:n], chosen[n:], rejected[n:]


def to_pair(record: dict) -> tuple[str, dict]:
    """(format, {"prompt", "chosen", "rejected"}) from one record; ValueError says what is wrong."""
    for key in ("chosen", "rejected"):
        if key not in record:
            raise ValueError(f"missing field '{key}'")
    if "prompt" in record:
        fmt = "plain" if all(isinstance(record[k], str) for k in ("prompt", "chosen", "rejected")) else "explicit"
        prompt = _prompt(record["prompt"])
        chosen, rejected = _answer(record["chosen"], "chosen"), _answer(record["rejected"], "rejected")
    else:
        if isinstance(record["chosen"], str) and isinstance(record["rejected"], str):
            fmt, full_c, full_r = "hh", _hh_messages(record["chosen"], "chosen"), _hh_messages(record["rejected"], "rejected")
        else:
            fmt, full_c, full_r = "implicit", _messages(record["chosen"], "chosen"), _messages(record["rejected"], "rejected")
        prompt, chosen, rejected = _split_implicit(full_c, full_r)
        if not chosen or not rejected:
            raise ValueError("one conversation is the other's prefix: 'chosen' and 'rejected' must both go on with "
                             "an assistant answer after the shared prompt")
        chosen, rejected = _answer(chosen, "chosen"), _answer(rejected, "rejected")
    _whole(prompt, chosen, "chosen")
    _whole(prompt, rejected, "rejected")
    if chosen == rejected:
        raise ValueError("'chosen' and 'rejected' are the same answer, which teaches nothing; drop the line or fix "
                         "one of them")
    return fmt, {"prompt": prompt, "chosen": chosen, "rejected": rejected}


def to_unpaired(record: dict) -> tuple[str, dict]:
    """(format, {"prompt", "completion", "label"}) from one kto record; ValueError says what is wrong."""
    for key in ("prompt", "completion", "label"):
        if key not in record:
            raise ValueError(f"missing field '{key}'")
    if not isinstance(record["label"], bool):
        raise ValueError(f"'label' must be true (a desirable answer) or false (an undesirable one), got "
                         f"{record['label']!r}")
    prompt, completion = _prompt(record["prompt"]), _answer(record["completion"], "completion")
    _whole(prompt, completion, "completion")
    fmt = "plain" if isinstance(record["prompt"], str) and isinstance(record["completion"], str) else "unpaired"
    return fmt, {"prompt": prompt, "completion": completion, "label": record["label"]}


def _kind(message: str) -> str:
    for needle, label in (("missing field", "missing field"), ("same answer", "chosen equals rejected"),
                          ("role", "wrong roles"), ("turn", "wrong roles"), ("empty", "empty content"),
                          ("label", "bad label")):
        if needle in message:
            return label
    return "invalid"


def load_preferences(path: str | os.PathLike, kind: Literal["dpo", "kto"],
                     on_error: Literal["error", "skip"] = "error") -> PreferenceData:
    """Read a preference file (.jsonl, or a .json list) for `kind`: dpo takes pairs; kto takes unpaired records and
    pairs (each pair gives its chosen answer as desirable, its rejected one as undesirable, as TRL unpairs them)."""
    if kind not in KINDS:
        raise ValueError(f"unknown preference kind {kind!r}; use one of {', '.join(KINDS)}")
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: no such file; give a .jsonl file with one preference record per line "
                         "(e.g. from `gptsmith feedback export --format " + kind + "`)")
    fix = DPO_FIX if kind == "dpo" else KTO_FIX
    result = PreferenceData([], None)

    def bad(where: str, problem: str, label: str) -> None:
        if on_error != "skip":
            raise InputError(f"{where}: {problem}. Fix: {fix} (or pass --on-error skip to skip bad lines)")
        result.skipped += 1
        result.problems[label] += 1

    for where, rec in _records(path):
        if isinstance(rec, json.JSONDecodeError):
            bad(where, f"invalid JSON ({rec.msg})", "invalid JSON")
            continue
        if not isinstance(rec, dict):
            bad(where, "a record must be a JSON object", "invalid")
            continue
        try:
            if kind == "kto" and "completion" in rec:
                fmt, ex = to_unpaired(rec)
                examples = [ex]
            elif kind == "kto" and "chosen" not in rec and "label" in rec:
                fmt, ex = to_unpaired(rec)  # raises: names the missing 'completion'
                examples = [ex]
            else:
                fmt, pair = to_pair(rec)
                examples = [pair] if kind == "dpo" else [
                    {"prompt": pair["prompt"], "completion": pair["chosen"], "label": True},
                    {"prompt": pair["prompt"], "completion": pair["rejected"], "label": False}]
                if kind == "kto":
                    fmt = f"{fmt} pairs"
        except ValueError as e:
            bad(where, str(e), _kind(str(e)))
            continue
        result.examples.extend(examples)
        result.format = result.format or fmt
    if not result.examples:
        raise InputError(f"{path}: no valid {kind} examples (skipped {result.skipped}: {dict(result.problems)}). "
                         f"Fix: {fix}")
    return result


def split_preferences(examples: list[dict], val_fraction: float, seed: int = SPLIT_SEED) -> tuple[list[dict], list[dict]]:
    """Deterministic train/validation split by the content hash of each example's prompt (clean.assign_split, the
    rule every gptsmith split follows): all answers to one prompt land on the same side, so validation measures
    prompts the model was not tuned on. Keeps at least one prompt on each side when there are two or more."""
    if val_fraction <= 0:
        return list(examples), []
    sides = {}
    for ex in examples:
        key = conversation_key(ex["prompt"])
        if key not in sides:
            sides[key] = assign_split(key, val_fraction, seed)
    if len(sides) < 2:
        return list(examples), []
    val_keys = {k for k, (side, _) in sides.items() if side == "val"}
    if not val_keys:  # tiny data: the lowest hash goes to validation so there is always something to measure
        val_keys = {min(sides, key=lambda k: sides[k][1])}
    elif len(val_keys) == len(sides):
        val_keys.discard(max(sides, key=lambda k: sides[k][1]))
    train = [ex for ex in examples if conversation_key(ex["prompt"]) not in val_keys]
    val = [ex for ex in examples if conversation_key(ex["prompt"]) in val_keys]
    return train, val
