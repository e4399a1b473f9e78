"""Task suites a user writes in JSONL, one item a line, one kind per file:

    {"question": "What does len([1, 2]) return?", "choices": ["1", "2", "3"], "answer": 1}       multiple choice
    {"prompt": "What is 6 * 7?", "answer": "42", "match": "numeric"}                            generation

Multiple choice is scored by log-likelihood: each choice is scored as the continuation of the question, and the
item is right when the right choice is the most likely one, by its summed log-probability (acc) or by its
log-probability per UTF-8 byte of the choice text (acc_norm: corrects the bias towards short choices; lm-eval's
acc_norm divides by characters, bytes are the same for ASCII). Generation asks the target for a greedy reply and
checks it with a matcher (exact, contains, regex, numeric; optionally "must_stop").

k-shot: k other items of the same suite, picked at random (seeded by the run's seed and the item's id, so a rerun
picks the same ones), shown before the item: as user/assistant turns through the chat template for a chat model,
as "Question: ...\\nAnswer: ..." paragraphs for a base model.
"""

from __future__ import annotations

import inspect
import json
import random
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from gptsmith.errors import InputError
from gptsmith.files import iter_jsonl, iter_lines
from gptsmith.matching import MATCH, MATCHERS, last_number, parse_number  # noqa: F401 (re-exported)

MC_KEYS = {"question", "choices", "answer", "id", "system", "meta"}
GEN_KEYS = {"prompt", "answer", "match", "id", "system", "max_tokens", "must_stop", "meta"}
MC_EXAMPLE = '{"question": "...", "choices": ["...", "..."], "answer": 0}'
GEN_EXAMPLE = '{"prompt": "...", "answer": "...", "match": "exact"}'
MC_BATCH = 32  # continuations per forward pass (fewer when they are long: see _mc_batches)
LOGITS_BUDGET = 1 << 27  # logits elements per forward pass (~0.5 GB in float32)
TOKEN_BUDGET = 1 << 16  # input tokens per forward pass (activations)
SHARED_CONTEXT_MIN = 64  # context tokens from which an item's choices share one pass over it (_shares_long_context)


@dataclass
class Suite:
    path: Path
    kind: str  # "multiple_choice" or "generation"
    items: list[dict]  # validated; every item has "id" (str) and "line"


# ---------------------------------------------------------------------------------------------- loading

def item_kind(record: dict) -> str | None:
    if "question" in record or "choices" in record:
        return "multiple_choice"
    if "prompt" in record:
        return "generation"
    if "text" in record:
        return "text"
    return None


def jsonl_kind(path: str | Path) -> str | None:
    """The kind of a .jsonl by its first record: multiple_choice, generation, text (a "text" field), or None."""
    for _, raw in iter_lines(path):
        if raw.strip():
            try:
                record = json.loads(raw)
            except (json.JSONDecodeError, UnicodeDecodeError):
                return None
            return item_kind(record) if isinstance(record, dict) else None
    return None


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _check_mc(record: dict, where: str) -> dict:
    q, choices, answer = record.get("question"), record.get("choices"), record.get("answer")
    if not isinstance(q, str):
        raise InputError(f'{where}: "question" must be a string (the question text); e.g. {MC_EXAMPLE}')
    if (not isinstance(choices, list) or len(choices) < 2
            or not all(isinstance(c, str) and c.strip() for c in choices)):
        raise InputError(f'{where}: "choices" must be a list of at least 2 non-empty strings; e.g. {MC_EXAMPLE}')
    if not _is_int(answer):
        raise InputError(f'{where}: "answer" must be the 0-based index of the right choice (an integer), got '
                         f"{answer!r}")
    if not 0 <= answer < len(choices):
        raise InputError(f'{where}: "answer" {answer} is out of range: "choices" has {len(choices)} entries, so it '
                         f"must be 0..{len(choices) - 1} (0-based)")
    return {"question": q, "choices": choices, "answer": answer}


def _check_gen(record: dict, where: str) -> dict:
    prompt = record.get("prompt")
    if not isinstance(prompt, str) or not prompt.strip():
        raise InputError(f'{where}: "prompt" must be a non-empty string; e.g. {GEN_EXAMPLE}')
    answer = record.get("answer")
    answers = [answer] if isinstance(answer, str) else answer
    if answer is not None and (not isinstance(answers, list) or not answers
                               or not all(isinstance(a, str) and a for a in answers)):
        raise InputError(f'{where}: "answer" must be a non-empty string or a list of them; e.g. {GEN_EXAMPLE}')
    must_stop = record.get("must_stop", False)
    if not isinstance(must_stop, bool):
        raise InputError(f'{where}: "must_stop" must be true or false')
    match = record.get("match", "exact" if answer is not None else None)
    if match is not None and match not in MATCHERS:
        raise InputError(f'{where}: "match" {match!r} is not one of {", ".join(MATCHERS)}')
    if answer is None and (match is not None or not must_stop):
        raise InputError(f'{where}: no "answer" to check; give "answer" (with "match": {"|".join(MATCHERS)}), '
                         'or "must_stop": true to check only that the reply ends by itself')
    if match == "regex":
        for a in answers:
            try:
                re.compile(a)
            except re.error as e:
                raise InputError(f'{where}: "answer" {a!r} is not a valid regular expression ({e}); fix the '
                                 "pattern (Python re syntax)") from None
    if match == "numeric":
        for a in answers:
            if parse_number(a) is None:
                raise InputError(f'{where}: "answer" {a!r} is not a number, which "match": "numeric" needs '
                                 '(e.g. "42", "-3.5", "1,000")')
    max_tokens = record.get("max_tokens")
    if max_tokens is not None and (not _is_int(max_tokens) or max_tokens < 1):
        raise InputError(f'{where}: "max_tokens" must be a positive integer')
    return {"prompt": prompt, "answers": answers or [], "match": match, "must_stop": must_stop,
            "max_tokens": max_tokens}


def _check_common(record: dict, where: str, kind: str, out: dict) -> dict:
    allowed = MC_KEYS if kind == "multiple_choice" else GEN_KEYS
    unknown = sorted(set(record) - allowed)
    if unknown:
        raise InputError(f"{where}: unknown field {unknown[0]!r}; a {kind.replace('_', ' ')} item has "
                         f"{', '.join(sorted(allowed))} (put anything else under \"meta\")")
    system = record.get("system")
    if system is not None and not isinstance(system, str):
        raise InputError(f'{where}: "system" must be a string (a system prompt)')
    item_id = record.get("id")
    if item_id is not None and not (isinstance(item_id, str) and item_id) and not _is_int(item_id):
        raise InputError(f'{where}: "id" must be a non-empty string or an integer')
    return {**out, "system": system, "id": None if item_id is None else str(item_id)}


def load_suite(path: str | Path) -> Suite:
    """Read and validate a suite; every problem is an InputError naming FILE:LINE, the field and the fix."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: no such suite file")
    items, kind, first_line, ids = [], None, 0, {}
    for lineno, record in iter_jsonl(path, MC_EXAMPLE):
        where = f"{path}:{lineno}"
        if not isinstance(record, dict):
            raise InputError(f"{where}: a line must be a JSON object, e.g. {MC_EXAMPLE}")
        this = item_kind(record)
        if this not in ("multiple_choice", "generation"):
            raise InputError(f'{where}: neither "question"+"choices" (multiple choice, {MC_EXAMPLE}) nor "prompt" '
                             f"(generation, {GEN_EXAMPLE})")
        if kind is None:
            kind, first_line = this, lineno
        elif this != kind:
            raise InputError(f"{where}: a {this.replace('_', ' ')} item, but line {first_line} is "
                             f"{kind.replace('_', ' ')}; one kind per file: put them in two suite files")
        item = _check_mc(record, where) if kind == "multiple_choice" else _check_gen(record, where)
        item = _check_common(record, where, kind, item)
        item["id"] = item["id"] or str(lineno)
        if item["id"] in ids:
            raise InputError(f'{where}: "id" {item["id"]!r} is also line {ids[item["id"]]}\'s; ids pair items '
                             "across runs, so each must be unique")
        ids[item["id"]] = lineno
        items.append({**item, "line": lineno})
    if not items:
        raise InputError(f"{path}: no items; write one JSON object a line, e.g. {MC_EXAMPLE}")
    return Suite(path, kind, items)


# ---------------------------------------------------------------------------------------------- k-shot

def pick_shots(items: list[dict], index: int, k: int, seed: int, usable=lambda item: True) -> list[dict]:
    """k items other than items[index], random but fixed by (seed, the item's id)."""
    if k <= 0:
        return []
    pool = [it for i, it in enumerate(items) if i != index and usable(it)]
    rng = random.Random(f"{seed}/{items[index]['id']}")  # a str seed is hashed with sha512: same on every run
    return rng.sample(pool, min(k, len(pool)))


# ---------------------------------------------------------------------------------------------- multiple choice

@dataclass
class Request:
    item: int  # index of the item
    choice: int
    context: list[int]
    continuation: list[int]  # the scored tokens
    n_bytes: int  # UTF-8 bytes of the continuation's text (acc_norm's length)


def _split_trailing_space(context: str, continuation: str) -> tuple[str, str]:
    """lm-eval's rule: whitespace that ends the context moves to the start of the continuation."""
    n = len(context) - len(context.rstrip())
    return (context[:-n], context[-n:] + continuation) if n else (context, continuation)


def _base_requests(engine, item: dict, shots: list[dict], index: int) -> list[Request]:
    """Plain text: the context and context+choice are tokenized as strings and the choice's tokens are what
    follows the context's tokens (lm-eval's split), after the separator a pretraining document starts with."""
    from gptsmith.eval.text import separator

    blocks = [f"Question: {s['question']}\nAnswer: {s['choices'][s['answer']]}" for s in shots]
    context = "\n\n".join(([item["system"]] if item["system"] else []) + blocks
                          + [f"Question: {item['question']}\nAnswer:"])
    sep = [separator(engine.tokenizer)]
    ctx, _ = _split_trailing_space(context, "")
    ctx_ids = engine.encode(ctx)  # the same for every choice
    out = []
    for c, choice in enumerate(item["choices"]):
        ctx, cont = _split_trailing_space(context, " " + choice)
        whole = engine.encode(ctx + cont)
        if len(whole) <= len(ctx_ids):  # lm-eval's split: the choice's tokens are those after the context's
            raise InputError(f"item {item['id']} (line {item['line']}): choice {c} adds no token after the "
                             "question; give a non-empty choice")
        out.append(Request(index, c, sep + ctx_ids, whole[len(ctx_ids):], len(cont.encode("utf-8"))))
    return out


def _chat_requests(target, item: dict, shots: list[dict], index: int, reserve: int) -> list[Request]:
    """Chat: the prompt is exactly what the model sees before it answers (chat template + generation prompt);
    each choice is scored as the reply, as the tokens the model would generate for it."""
    from gptsmith.tokenizer import encode_text

    messages = [{"role": "system", "content": item["system"]}] if item["system"] else []
    for s in shots:
        messages += [{"role": "user", "content": s["question"]},
                     {"role": "assistant", "content": s["choices"][s["answer"]]}]
    messages.append({"role": "user", "content": item["question"]})
    ctx = target.prompt_ids(messages, reserve_tokens=reserve)
    tok = target.engine.tokenizer
    return [Request(index, c, ctx, encode_text(tok, choice), len(choice.encode("utf-8")))
            for c, choice in enumerate(item["choices"])]


def item_requests(target, items: list[dict], index: int, k_shot: int, seed: int) -> list[Request]:
    """One request per choice of items[index], sharing one context; shots are dropped (last first) until every
    choice fits the model's context."""
    engine = target.engine
    item = items[index]
    shots = pick_shots(items, index, k_shot, seed)
    reserve = max(len(engine.encode(c)) for c in item["choices"]) + 1
    while True:
        reqs = (_chat_requests(target, item, shots, index, reserve) if target.is_chat
                else _base_requests(engine, item, shots, index))
        if max(len(r.context) + len(r.continuation) - 1 for r in reqs) <= engine.max_context:
            return reqs
        if not shots:
            longest = max(len(r.context) + len(r.continuation) - 1 for r in reqs)
            raise InputError(f"item {item['id']} (line {item['line']}): question and choice are {longest} tokens; "
                             f"the model's context is {engine.max_context}. Shorten the item or leave it out")
        shots = shots[:-1]


def _mc_batches(requests: list[Request], vocab: int, batch_size: int, keep_ok: bool):
    """Requests grouped for one forward pass each: longest first (little padding), at most `batch_size` rows,
    TOKEN_BUDGET input tokens and LOGITS_BUDGET logits (only the kept positions when logits_to_keep works)."""
    order = sorted(requests, key=lambda r: -(len(r.context) + len(r.continuation)))
    i = 0
    while i < len(order):
        width = len(order[i].context) + len(order[i].continuation) - 1
        first = width
        n = 0
        while i + n < len(order) and n < batch_size:
            first_n = min(first, len(order[i + n].context) - 1)
            kept = width - first_n if keep_ok else width
            if n and ((n + 1) * width > TOKEN_BUDGET or (n + 1) * kept * vocab > LOGITS_BUDGET):
                break
            first, n = first_n, n + 1
        yield order[i:i + n]
        i += n


def _forward_logprobs(model, batch: list[Request], pad: int, device, keep_ok: bool) -> list[float]:
    """Summed log-probability of each request's continuation from one forward pass over the right-padded batch
    (a causal model never sees the padding after a row's tokens). Only the positions that predict continuation
    tokens get logits (logits_to_keep), so a long shared context costs no vocabulary-sized rows."""
    inputs = [r.context + r.continuation[:-1] for r in batch]
    width = max(len(x) for x in inputs)
    ids = torch.tensor([x + [pad] * (width - len(x)) for x in inputs], device=device)
    first = min(len(r.context) - 1 for r in batch)  # earliest position whose logits predict a continuation token
    if keep_ok:
        logits = model(input_ids=ids, use_cache=False, logits_to_keep=width - first).logits
        offset = first
    else:
        logits, offset = model(input_ids=ids, use_cache=False).logits, 0
    rows = torch.cat([torch.full((len(r.continuation),), i, dtype=torch.long) for i, r in enumerate(batch)])
    cols = torch.cat([torch.arange(len(r.context) - 1, len(r.context) - 1 + len(r.continuation)) for r in batch])
    targets = torch.tensor([t for r in batch for t in r.continuation], device=device)
    rows, cols = rows.to(device), cols.to(device)
    lp = -torch.nn.functional.cross_entropy(logits[rows, cols - offset].float(), targets, reduction="none")
    return torch.zeros(len(batch), dtype=torch.float64, device=device).index_add_(0, rows, lp.double()).tolist()


def choice_logprobs(target, items: list[dict], k_shot: int = 0, seed: int = 0, batch_size: int = MC_BATCH,
                    n_items: int | None = None) -> list[list[tuple[float, int]]]:
    """Per item (the first `n_items`; shots come from all), per choice: (summed log-probability of the choice as
    the continuation, its UTF-8 bytes)."""
    from tqdm.auto import tqdm

    from gptsmith.eval.text import keeps_logits

    target._need_engine("multiple-choice scoring")
    engine = target.engine
    n_items = len(items) if n_items is None else n_items
    per_item = [item_requests(target, items, i, k_shot, seed) for i in range(n_items)]
    shares = [_shares_long_context(reqs) for reqs in per_item]
    shared = [reqs for reqs, yes in zip(per_item, shares) if yes]
    requests = [r for reqs, yes in zip(per_item, shares) if not yes for r in reqs]
    pad = engine.tokenizer.pad_token_id if engine.tokenizer.pad_token_id is not None else 0
    vocab = engine.model.get_output_embeddings().weight.shape[0]
    keep_ok = keeps_logits(engine.model)
    out = [[(0.0, 0)] * len(it["choices"]) for it in items[:n_items]]
    total = len(requests) + sum(map(len, shared))
    with torch.inference_mode(), tqdm(total=total, desc="choices", unit="choice", leave=False) as bar:
        for batch in _mc_batches(requests, vocab, batch_size, keep_ok):
            for r, lp in zip(batch, _forward_logprobs(engine.model, batch, pad, engine.device, keep_ok)):
                out[r.item][r.choice] = (lp, r.n_bytes)
            bar.update(len(batch))
        for reqs in shared:
            for r, lp in zip(reqs, _shared_context_logprobs(engine.model, reqs, pad, engine.device)):
                out[r.item][r.choice] = (lp, r.n_bytes)
            bar.update(len(reqs))
    return out


def _shares_long_context(reqs: list[Request]) -> bool:
    """Whether an item's choices are worth scoring over one shared pass of their context: they all have the same
    context (always, for items built here) and it is longer than their continuations together, as with an
    assistant's retrieved sources or k-shot examples in front of short choices. Short contexts are cheaper batched
    across items (one forward pass for many rows) than in two passes per item."""
    first = reqs[0].context
    return (len(reqs) > 1 and len(first) > SHARED_CONTEXT_MIN
            and len(first) > sum(len(r.continuation) for r in reqs)
            and all(r.context == first for r in reqs[1:]))


def _shared_context_logprobs(model, reqs: list[Request], pad: int, device) -> list[float]:
    """The same sums as _forward_logprobs, but the shared context is run once: its key/value cache is copied
    to one row per choice, and only the choices' tokens go through the model again. With a 500-token context and
    four 30-token choices that is ~620 tokens of work instead of ~2,100."""
    context = reqs[0].context
    from transformers import DynamicCache

    # transformers 5.x renamed the forward's `past_key_values` to `cache`; the cache object is filled in place
    cache = DynamicCache(config=model.config)
    kw = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    model(input_ids=torch.tensor([context[:-1]], device=device), use_cache=True, logits_to_keep=1, **{kw: cache})
    cache.batch_repeat_interleave(len(reqs))
    # each row: the context's last token (its logits predict the first choice token), then the choice but its last
    inputs = [[context[-1]] + r.continuation[:-1] for r in reqs]
    width = max(map(len, inputs))
    ids = torch.tensor([x + [pad] * (width - len(x)) for x in inputs], device=device)  # right padding: never seen
    start = len(context) - 1
    positions = torch.arange(start, start + width, device=device).expand(len(reqs), width)
    logits = model(input_ids=ids, position_ids=positions, use_cache=True, **{kw: cache}).logits.float()
    targets = torch.tensor([r.continuation + [0] * (width - len(r.continuation)) for r in reqs], device=device)
    picked = torch.log_softmax(logits, dim=-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    lengths = torch.tensor([len(r.continuation) for r in reqs], device=device)
    scored = torch.arange(width, device=device).expand(len(reqs), width) < lengths[:, None]
    return (picked.double() * scored).sum(dim=1).tolist()


def choose(scores: list[tuple[float, int]]) -> tuple[int, int]:
    """(pred, pred_norm): the choice with the highest log-probability, and with the highest per byte."""
    raw = [lp for lp, _ in scores]
    norm = [lp / max(n, 1) for lp, n in scores]
    return raw.index(max(raw)), norm.index(max(norm))


def score_multiple_choice(target, items: list[dict], k_shot: int = 0, seed: int = 0, batch_size: int = MC_BATCH,
                          n_items: int | None = None) -> list[dict]:
    """Per item {"id", "acc", "acc_norm", "pred", "pred_norm"}, for the first `n_items` items (default all; the
    shots are picked from all `items`)."""
    results = []
    for item, scores in zip(items, choice_logprobs(target, items, k_shot, seed, batch_size, n_items)):
        pred, pred_norm = choose(scores)
        results.append({"id": item["id"], "acc": float(pred == item["answer"]),
                        "acc_norm": float(pred_norm == item["answer"]), "pred": pred, "pred_norm": pred_norm})
    return results


# ---------------------------------------------------------------------------------------------- generation



def generation_score(item: dict, output: str, finish_reason: str | None) -> float:
    """1.0 when the output passes the item's matcher, and, with "must_stop", ended by itself (not at the token
    limit); else 0.0."""
    if item["must_stop"] and finish_reason != "stop":
        return 0.0
    if item["match"] is None:
        return 1.0
    return float(MATCH[item["match"]](output, item["answers"]))


def _can_be_shot(item: dict) -> bool:
    # a shot shows a right answer; a regex is a pattern, not an answer
    return bool(item["answers"]) and item["match"] != "regex"


def _generation_prompt(target, item: dict, shots: list[dict]) -> list[dict]:
    system = [{"role": "system", "content": item["system"]}] if item["system"] else []
    if target.is_chat:
        turns = [m for s in shots for m in ({"role": "user", "content": s["prompt"]},
                                            {"role": "assistant", "content": s["answers"][0]})]
        return system + turns + [{"role": "user", "content": item["prompt"]}]
    blocks = [f"{s['prompt']}\n{s['answers'][0]}" for s in shots]
    text = "\n\n".join(([item["system"]] if item["system"] else []) + blocks + [item["prompt"] + "\n"])
    return [{"role": "user", "content": text}]


def generation_messages(target, items: list[dict], index: int, k_shot: int, seed: int,
                        max_tokens: int | None = None) -> list[dict]:
    """The conversation asked for item index: k shots as user/assistant turns (chat), or for a base model one
    text of "prompt\\nanswer" paragraphs ending with the item's prompt and a newline. On a local model, shots are
    dropped (last first) until the prompt leaves `max_tokens` for the reply; an item whose prompt alone does not
    fit the context is named in the error."""
    item = items[index]
    shots = pick_shots(items, index, k_shot, seed, _can_be_shot)
    engine = target.engine
    while True:
        messages = _generation_prompt(target, item, shots)
        if engine is None or target.assistant is not None:  # a backend or an assistant fits its own prompt
            return messages
        n = len(engine.chat_template_ids(messages) if target.is_chat else engine.encode(messages[0]["content"]))
        if n + (max_tokens or 0) <= engine.max_context or (not shots and n < engine.max_context):
            return messages
        if not shots:
            raise InputError(f"item {item['id']} (line {item['line']}): the prompt is {n} tokens; the model's "
                             f"context is {engine.max_context}. Shorten the prompt or leave the item out")
        shots = shots[:-1]


def score_generation(target, items: list[dict], k_shot: int = 0, seed: int = 0, max_tokens: int = 256,
                     n_items: int | None = None) -> list[dict]:
    """Per item {"id", "score", "output", "finish_reason"}: greedy replies, batched (items that share a token
    limit go to the target together). A base model's output is cut at its first blank line, the separator of
    the shots (lm-eval's `until`)."""
    from tqdm.auto import tqdm

    scored = items[:len(items) if n_items is None else n_items]
    outputs: list = [None] * len(scored)
    by_limit: dict[int, list[int]] = {}
    for i, item in enumerate(scored):
        by_limit.setdefault(item["max_tokens"] or max_tokens, []).append(i)
    with tqdm(total=len(scored), desc="replies", unit="item", leave=False) as bar:
        for limit, indices in by_limit.items():
            convs = [generation_messages(target, items, i, k_shot, seed, limit) for i in indices]
            for i, answer in zip(indices, target.replies(convs, max_tokens=limit, temperature=0.0, seed=seed)):
                outputs[i] = answer
            bar.update(len(indices))
    results = []
    for item, answer in zip(scored, outputs):
        text, finish = answer.text, answer.finish_reason
        if not target.is_chat and "\n\n" in text:
            text, finish = text.split("\n\n", 1)[0], "stop"  # the blank line ended the answer
        results.append({"id": item["id"], "score": generation_score(item, text, finish), "output": text,
                        "finish_reason": finish})
    return results
