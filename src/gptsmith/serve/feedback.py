"""Turn stored ratings and corrections into training data in TRL's conversational formats.

    gptsmith feedback export --format dpo --out prefs.jsonl     # the store of serve.db (--config), or --db URL

- sft: `{"messages": [...history, {"role": "assistant", "content": ANSWER}]}` for every correction (the user's
  better answer) and every thumbs-up answer that has no correction. A correction wins over the thumb on the
  same message because the user wrote it to replace the answer.
- dpo: `{"prompt": [...history], "chosen": [assistant], "rejected": [assistant]}`: a correction over the answer
  it corrects; among answers to the same turn (regenerations), every thumbs-up one over every thumbs-down one;
  and every blind-arena vote for A or B (serve/arena.py): the winner's answer over the loser's, the prompt being
  the history before the battle. A tie or "both bad" vote says neither is better, so it gives no pair.
- kto: `{"prompt": [...history], "completion": [assistant], "label": bool}` for every thumbs-up/down answer.

The prompt is the conversation's system prompt plus the branch of messages the answer replied to.
"""

from __future__ import annotations

import json
from collections import defaultdict
from datetime import datetime, timezone
from pathlib import Path

from sqlalchemy import func, select

from gptsmith.errors import InputError
from gptsmith.files import atomic_write_text
from gptsmith.serve.store import ArenaBattle, Conversation, Message, Store, branch, history

FORMATS = ("sft", "dpo", "kto")


def _assistant(text: str) -> list[dict]:
    return [{"role": "assistant", "content": text}]


def _since(at, since, until=None) -> bool:
    """`at` (a stored time; SQLite hands back naive UTC) is at or after `since` and at or before `until` (aware
    UTC); no `since` / `until`: no bound on that side."""
    if since is None and until is None:
        return True
    if at is None:
        return False
    at = at if at.tzinfo else at.replace(tzinfo=timezone.utc)
    return (since is None or at >= since) and (until is None or at <= until)


def build_examples(store: Store, fmt: str, since: datetime | None = None, until: datetime | None = None) -> list[dict]:
    """The examples of `fmt`; with `since` / `until` (aware UTC) only feedback updated in [since, until]
    (Feedback.updated_at) and arena votes cast in it (ArenaBattle.voted_at): what `gptsmith refine` learns from."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown feedback export format '{fmt}'; choose one of {', '.join(FORMATS)}")
    out: list[dict] = []
    with store.Session() as s:
        conv_ids = s.scalars(select(Message.conversation_id).where(Message.feedback.has())
                             .group_by(Message.conversation_id).order_by(func.min(Message.id))).all()
        for conv_id in conv_ids:  # oldest first, so the file's order is the order things happened
            conv = s.get(Conversation, conv_id)
            msgs = list(s.scalars(select(Message).where(Message.conversation_id == conv_id).order_by(Message.id)))
            answers = [m for m in msgs if m.role == "assistant"]

            def prompt(m: Message) -> list[dict]:
                return history(conv, branch(msgs, m.parent_id)) if m.parent_id is not None else history(conv, [])

            for m in answers:
                fb = m.feedback
                if fb is None or not _since(fb.updated_at, since, until):
                    continue
                if fmt == "sft":
                    best = fb.correction or (m.content if fb.rating == 1 else None)
                    if best and best.strip():
                        out.append({"messages": prompt(m) + _assistant(best)})
                elif fmt == "dpo":
                    if fb.correction and fb.correction.strip() and fb.correction != m.content:
                        out.append({"prompt": prompt(m), "chosen": _assistant(fb.correction),
                                    "rejected": _assistant(m.content)})
                elif fmt == "kto":
                    if fb.rating in (1, -1) and m.content.strip():
                        out.append({"prompt": prompt(m), "completion": _assistant(m.content),
                                    "label": fb.rating == 1})
            if fmt == "dpo":  # regenerations: answers that share a parent are alternatives for the same turn
                turns: dict[int | None, list[Message]] = defaultdict(list)
                for m in answers:
                    turns[m.parent_id].append(m)
                for siblings in turns.values():
                    rated = [m for m in siblings if m.feedback and _since(m.feedback.updated_at, since, until)]
                    ups = [m for m in rated if m.feedback.rating == 1]
                    downs = [m for m in rated if m.feedback.rating == -1]
                    for good in ups:
                        for bad in downs:
                            out.append({"prompt": prompt(good), "chosen": _assistant(good.content),
                                        "rejected": _assistant(bad.content)})
        if fmt == "dpo":
            # not twice when also thumbed up/down
            out += [pair for pair in arena_pairs(s, since, until) if pair not in out]
    return out


def arena_pairs(s, since: datetime | None = None, until: datetime | None = None) -> list[dict]:
    """A DPO pair per arena battle voted A or B (in [since, until]) whose answers are still stored, in the order
    of the votes."""
    out = []
    battles = s.scalars(select(ArenaBattle).where(ArenaBattle.winner.in_(("a", "b")))
                        .order_by(ArenaBattle.voted_at, ArenaBattle.id)).all()
    for b in battles:
        if not _since(b.voted_at, since, until):
            continue
        conv = s.get(Conversation, b.conversation_id) if b.conversation_id is not None else None
        if conv is None:  # the conversation was deleted: the vote still counts for the ratings, the texts are gone
            continue
        msgs = list(s.scalars(select(Message).where(Message.conversation_id == conv.id)))
        by_id = {m.id: m for m in msgs}
        a, other = by_id.get(b.message_a_id), by_id.get(b.message_b_id)
        if a is None or other is None:
            continue
        chosen, rejected = (a, other) if b.winner == "a" else (other, a)
        if chosen.content.strip() and chosen.content != rejected.content:
            out.append({"prompt": history(conv, branch(msgs, chosen.parent_id)), "chosen": _assistant(chosen.content),
                        "rejected": _assistant(rejected.content)})
    return out


def open_store(db_url: str) -> Store:
    """The store `gptsmith serve` wrote; a clear error, instead of a new empty database, when its file is missing."""
    if db_url.startswith("sqlite:///") and db_url != "sqlite:///:memory:":
        path = Path(db_url.removeprefix("sqlite:///"))
        if not path.is_file():
            raise InputError(f"feedback store not found: {path} (serve.db = {db_url}); pass the store `gptsmith serve` "
                             "used: --db URL, or serve.db in --config FILE")
    return Store(db_url)


def export(db_url: str, fmt: str, out: str | Path) -> int:
    """Write the examples as JSONL, atomically; returns how many were written."""
    store = open_store(db_url)
    try:
        rows = build_examples(store, fmt)
    finally:
        store.close()
    atomic_write_text(out, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    return len(rows)
