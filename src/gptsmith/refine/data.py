"""refine's data: the feedback since the live version, de-duplicated and split; the method it is enough for."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

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


def parse_time(stamp: str) -> datetime:
    return datetime.strptime(stamp, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=timezone.utc)


def collect(db_url: str, since: str, holdout: float) -> Collected:
    from gptsmith.serve.feedback import build_examples, open_store

    store = open_store(db_url)
    try:
        found = {f: dedup(build_examples(store, f, since=parse_time(since))) for f in FORMATS}
    finally:
        store.close()
    parts = {f: split(found[f], f, holdout) for f in FORMATS}
    return Collected({f: parts[f][0] for f in FORMATS}, {f: parts[f][1] for f in FORMATS}, since)


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


def run_identity(live: str, data: Collected, method: str, candidate: Path | None) -> str:
    h = hashlib.sha256()
    for f in FORMATS:
        h.update(jsonl(data.train[f]).encode() + b"\0" + jsonl(data.held[f]).encode() + b"\0")
    h.update(method.encode() + b"\0" + (str(candidate.resolve()) if candidate else "").encode())
    return f"{live}-{method}-{h.hexdigest()[:12]}"
