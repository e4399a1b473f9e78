"""refine's data: the feedback in the run's window, de-duplicated and split; the method it is enough for; the run's
identity.

The window is [since, until]: `since` is the live version's feedback cut-off ("consumed_through" in its registry.json
entry, set by the refine run that made it; 1 microsecond after it) or, for a version refine did not make, its
`created`; `until` is the newest Feedback.updated_at / ArenaBattle.voted_at stored when the run collects (a snapshot).
Feedback that arrives while the run trains is stamped after `until`, so it waits for the next run. A rating changed
later gets a new updated_at and counts again, as the latest opinion. Limitation: a write stamped before the snapshot
but committed after it (the milliseconds inside one Store transaction) is missed by both runs."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone

from gptsmith.config import ProjectConfig
from gptsmith.errors import InputError

FORMATS = ("sft", "dpo", "kto")


class NotEnoughFeedback(InputError):
    """Too little new feedback for any method: nothing is trained."""


@dataclass
class Collected:
    train: dict[str, list[dict]]
    held: dict[str, list[dict]]
    since: str
    until: str | None = None  # the snapshot: the newest stamp read; None when nothing was stored in the window

    def counts(self) -> dict:
        return {f: {"train": len(self.train[f]), "held_out": len(self.held[f])} for f in FORMATS}


def example_key(ex: dict, fmt: str) -> bytes:
    """Prompt + the answer it teaches: a correction's sft example and its dpo pair share a key, so they land on
    the same side of the split."""
    if fmt == "sft":
        shown = [ex["messages"][:-1], ex["messages"][-1:]]
    else:
        shown = [ex["prompt"], ex["chosen"] if fmt == "dpo" else ex["completion"]]
    return json.dumps(shown, sort_keys=True, ensure_ascii=False).encode("utf-8")


def dedup(examples: list[dict]) -> list[dict]:
    seen, out = set(), []
    for ex in examples:
        digest = hashlib.sha256(json.dumps(ex, sort_keys=True, ensure_ascii=False).encode("utf-8")).digest()
        if digest not in seen:
            seen.add(digest)
            out.append(ex)
    return out


def split(examples: list[dict], fmt: str, holdout: float) -> tuple[list[dict], list[dict]]:
    """Content-hash split; at least one held out (and one kept for training) when there are two or more."""
    from gptsmith.data.clean import assign_split

    if holdout <= 0 or len(examples) < 2:
        return list(examples), []
    scored = [(*assign_split(example_key(ex, fmt), holdout), i) for i, ex in enumerate(examples)]
    held = {i for side, _, i in scored if side == "val"}
    if not held:
        held = {min(scored, key=lambda s: s[1])[2]}
    if len(held) == len(examples):
        held.discard(max(scored, key=lambda s: s[1])[2])
    return [ex for i, ex in enumerate(examples) if i not in held], [ex for i, ex in enumerate(examples) if i in held]


STAMP = "%Y-%m-%dT%H:%M:%S.%fZ"  # microseconds: what the store keeps


def parse_time(stamp: str) -> datetime:
    fmt = STAMP if "." in stamp else "%Y-%m-%dT%H:%M:%SZ"  # registry `created` has whole seconds
    return datetime.strptime(stamp, fmt).replace(tzinfo=timezone.utc)


def format_time(at: datetime) -> str:
    return at.astimezone(timezone.utc).strftime(STAMP)


def after(stamp: str) -> str:
    """The first stamp after `stamp`: the next run's `since` once a run consumed feedback through `stamp`."""
    return format_time(parse_time(stamp) + timedelta(microseconds=1))


def newest_stamp(store, since: datetime) -> datetime | None:
    """The newest feedback or arena-vote time at or after `since`: the snapshot a run consumes through."""
    from sqlalchemy import select

    from gptsmith.serve.store import ArenaBattle, Feedback

    with store.Session() as s:
        stamps = list(s.scalars(select(Feedback.updated_at))) + list(s.scalars(select(ArenaBattle.voted_at)))
    aware = [t if t.tzinfo else t.replace(tzinfo=timezone.utc) for t in stamps if t is not None]
    return max((t for t in aware if t >= since), default=None)


def collect(db_url: str, since: str, holdout: float, until: str | None = None) -> Collected:
    """The feedback stamped in [since, until]; without `until`, through the newest stamp stored now."""
    from gptsmith.serve.feedback import build_examples, open_store

    store = open_store(db_url)
    try:
        if until is None:
            newest = newest_stamp(store, parse_time(since))
            until = format_time(newest) if newest is not None else None
        if until is None:
            found = {f: [] for f in FORMATS}
        else:
            found = {f: dedup(build_examples(store, f, since=parse_time(since), until=parse_time(until)))
                     for f in FORMATS}
    finally:
        store.close()
    parts = {f: split(found[f], f, holdout) for f in FORMATS}
    return Collected({f: parts[f][0] for f in FORMATS}, {f: parts[f][1] for f in FORMATS}, since, until)


def jsonl(rows: list[dict]) -> str:
    return "".join(json.dumps(r, ensure_ascii=False, sort_keys=True) + "\n" for r in rows)


def plan_method(data: Collected, cfg: ProjectConfig) -> str:
    """dpo on pairs, else sft on corrections, else kto on thumbs (auto); a named method needs its own minimum."""
    r = cfg.refine
    need = {"dpo": r.min_dpo_pairs, "sft": r.min_sft_examples, "kto": r.min_kto_examples}
    what = {"dpo": "pairs", "sft": "corrections/good answers", "kto": "thumbs"}
    have = {f: len(data.train[f]) for f in FORMATS}
    order = ("dpo", "sft", "kto") if r.method == "auto" else (r.method,)
    for method in order:
        if have[method] >= need[method]:
            return method
    short = "; ".join(f"{m}: {have[m]} {what[m]} to train on, need {need[m]}" for m in order)
    raise NotEnoughFeedback(f"not enough feedback since {data.since} for refine ({short}; held-out examples do not "
                            "count); collect more thumbs, corrections or arena votes in the web UI, or lower "
                            "refine.min_* in the config")


def run_key(live: str, live_sha: str | None, method: str, data: Collected, settings: dict) -> str:
    """sha256 of everything that decides a run's outcome: the live version and its weights, the method, the
    feedback window and the examples collected in it, and every resolved setting (`settings`). Any difference is
    another run."""
    h = hashlib.sha256()
    h.update(json.dumps({"live": live, "live_weights_sha256": live_sha, "method": method, "since": data.since,
                         "until": data.until, "settings": settings}, sort_keys=True, default=str).encode() + b"\0")
    for f in FORMATS:
        h.update(jsonl(data.train[f]).encode() + b"\0" + jsonl(data.held[f]).encode() + b"\0")
    return h.hexdigest()


def run_name(live: str, method: str, key: str) -> str:
    return f"{live}-{method}-{key[:12]}"
