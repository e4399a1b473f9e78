"""`gptsmith compare A B --prompts FILE --judge URL_OR_DIR`: which of two models (assistants, backends) answers
better, judged pairwise by a third model.

    result = compare("out/chat-v1", "out/chat-v2", "prompts.jsonl", judge="http://localhost:8000/v1")
    result["win_rate_a"], result["ci"], result["length_controlled"]["win_rate_a"]

1. A and B answer every prompt greedily (temperature 0) with the same token budget.
2. The judge (gptsmith.eval.judge) rates each pair twice, A's answer shown first and then B's answer shown first.
   A local model folder judges by reference-guided likelihood, each answer scored alone, so its two orders agree
   by construction; the protocol is for text judges (URLs, assistants), which prefer a position: a verdict that
   flips with the order is that bias, not a preference, so only agreement counts: both say A -> A wins, both say
   B -> B wins, anything else (disagreement, a tie, a verdict that could not be read) is a tie.
3. Win rate of A = (wins + ties / 2) / n, with a bootstrap interval over prompts (stats.mean_ci of the
   per-prompt outcomes 1 / 0.5 / 0).
4. Length-controlled win rate (in the spirit of AlpacaEval's LC win rate): judges like long answers, so the
   per-prompt outcome is fitted with a logistic regression on an intercept plus the normalised length difference
   x = tanh((chars_A - chars_B) / std(chars_A - chars_B)), with a small L2 penalty on the length slope (it stays
   finite when length separates the outcomes). The LC win rate is the predicted win rate at equal length,
   sigmoid(intercept); its interval comes from refitting on bootstrap resamples of the prompts. Ties enter as
   soft targets (0.5).

The result (the "compare" kind of the results contract) is written to OUT/compare.json + OUT/compare.html, and a
copy of the JSON goes to <model dir>/eval/compare-<time>.json for A or B that is a local model folder.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from gptsmith.errors import InputError
from gptsmith.eval import stats
from gptsmith.eval.judge import JUDGE_MAX_TOKENS, Judgment, method, pair_judge

OUTCOME = {"a": 1.0, "tie": 0.5, "b": 0.0}
LC_METHOD = ("logistic regression of the per-prompt outcome (1 / 0.5 / 0) on an intercept and "
             "tanh((chars_A - chars_B) / std), L2 penalty 1.0 on the length slope; LC win rate = sigmoid(intercept), "
             "the predicted win rate at equal length; CI: percentile bootstrap over prompts")
LC_PENALTY = 1.0  # L2 on the length slope, as in a default-regularised logistic regression (C = 1)


@dataclass
class PromptItem:
    id: str
    messages: list[dict]  # the conversation to answer, ending with the user's turn


# ---------------------------------------------------------------------------------------------- prompts

def load_prompts(path: str | Path) -> list[PromptItem]:
    """A .jsonl file, one {"prompt": "..."} or {"messages": [...]} a line (optional "id"), or a .txt file with one
    prompt a line. Errors name the file and line."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: no such prompts file; give a .jsonl ({{\"prompt\": \"...\"}} a line) or a .txt "
                         "(one prompt a line)")
    if path.suffix not in (".jsonl", ".txt"):
        raise InputError(f"{path}: prompts must be a .jsonl file ({{\"prompt\": \"...\"}} or {{\"messages\": [...]}} "
                         "a line) or a .txt file (one prompt a line)")
    items: list[PromptItem] = []
    seen: set[str] = set()
    for lineno, line in _lines(path):
        item = _text_item(line, lineno) if path.suffix == ".txt" else _json_item(path, line, lineno)
        if item.id in seen:
            raise InputError(f"{path}:{lineno}: id {item.id!r} is used twice; give each prompt its own id")
        seen.add(item.id)
        items.append(item)
    if not items:
        raise InputError(f"{path}: no prompts in the file; write one prompt a line")
    return items


def _lines(path: Path):
    from gptsmith.files import iter_lines

    try:
        for lineno, raw in iter_lines(path):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError:
                raise InputError(f"{path}:{lineno}: not valid UTF-8; re-save the file as UTF-8") from None
            if line.strip():
                yield lineno, line
    except OSError as e:
        raise InputError(f"{path}: cannot read: {e.strerror or e}") from None


def _text_item(line: str, lineno: int) -> PromptItem:
    return PromptItem(str(lineno), [{"role": "user", "content": line.strip()}])


def _json_item(path: Path, line: str, lineno: int) -> PromptItem:
    where = f"{path}:{lineno}"
    try:
        record = json.loads(line)
    except json.JSONDecodeError as e:
        raise InputError(f"{where}: not valid JSON ({e.msg}); write one JSON object a line") from None
    if not isinstance(record, dict):
        raise InputError(f"{where}: expected a JSON object like {{\"prompt\": \"...\"}}")
    if ("prompt" in record) == ("messages" in record):
        raise InputError(f"{where}: give exactly one of \"prompt\" (a string) or \"messages\" (a list of "
                         "{\"role\", \"content\"} ending with the user's turn)")
    raw_id = record.get("id", lineno)
    if not isinstance(raw_id, (str, int)) or isinstance(raw_id, bool):
        raise InputError(f"{where}: \"id\" must be a string or an integer")
    if "prompt" in record:
        prompt = record["prompt"]
        if not isinstance(prompt, str) or not prompt.strip():
            raise InputError(f"{where}: \"prompt\" must be a non-empty string")
        return PromptItem(str(raw_id), [{"role": "user", "content": prompt}])
    return PromptItem(str(raw_id), _check_messages(record["messages"], where))


def _check_messages(messages, where: str) -> list[dict]:
    if not isinstance(messages, list) or not messages:
        raise InputError(f"{where}: \"messages\" must be a non-empty list of {{\"role\", \"content\"}}")
    for n, m in enumerate(messages):
        if not (isinstance(m, dict) and m.get("role") in ("system", "user", "assistant")
                and isinstance(m.get("content"), str)):
            raise InputError(f"{where}: messages[{n}] must be {{\"role\": \"system|user|assistant\", "
                             "\"content\": \"...\"}")
    if messages[-1]["role"] != "user":
        raise InputError(f"{where}: the last message must be the user's (the turn A and B answer)")
    return [{"role": m["role"], "content": m["content"]} for m in messages]


def question_text(messages: list[dict]) -> str:
    """What the judge and the page show as the question: the prompt, or the conversation as a transcript."""
    if len(messages) == 1:
        return messages[0]["content"]
    return "\n\n".join(f"{m['role'].capitalize()}: {m['content']}" for m in messages)


# ---------------------------------------------------------------------------------------------- verdicts

def position_verdict(judgment: Judgment, a_first: bool) -> str:
    """The judge's letter as "a", "b" or "tie" for the models, given which one it saw as Assistant A."""
    if judgment.verdict == "A":
        return "a" if a_first else "b"
    if judgment.verdict == "B":
        return "b" if a_first else "a"
    return "tie"  # [[C]], or no verdict found (counted as unparsed)


def combine(verdict_ab: str, verdict_ba: str) -> str:
    """Both orders agree -> that result; they disagree -> a tie (the judge followed the position, not the answer)."""
    return verdict_ab if verdict_ab == verdict_ba else "tie"


def score_items(judgments_ab: list[Judgment], judgments_ba: list[Judgment]) -> tuple[list[dict], int]:
    """Per prompt {"verdict_ab", "verdict_ba", "result"} (ab: A's answer shown first) and how many of the 2n
    judgments had no readable verdict."""
    rows, unparsed = [], 0
    for ab, ba in zip(judgments_ab, judgments_ba, strict=True):
        unparsed += (ab.verdict is None) + (ba.verdict is None)
        v_ab, v_ba = position_verdict(ab, a_first=True), position_verdict(ba, a_first=False)
        rows.append({"verdict_ab": v_ab, "verdict_ba": v_ba, "result": combine(v_ab, v_ba)})
    return rows, unparsed


# ---------------------------------------------------------------------------------------------- aggregation

def summarize(results: list[str], lengths_a: list[int], lengths_b: list[int], seed: int = 0) -> dict:
    """Counts, the win rate of A with its bootstrap interval, and the length-controlled win rate."""
    outcomes = [OUTCOME[r] for r in results]
    n = len(outcomes)
    win_rate = float(np.mean(outcomes)) if n else float("nan")
    lo, hi = stats.mean_ci(outcomes, seed=seed)
    return {"n": n, "wins_a": results.count("a"), "ties": results.count("tie"), "wins_b": results.count("b"),
            "win_rate_a": win_rate, "ci": [lo, hi],
            "length_controlled": length_controlled(outcomes, lengths_a, lengths_b, seed=seed)}


def length_features(lengths_a, lengths_b) -> np.ndarray:
    """tanh of the character-length difference over its standard deviation (0 when the lengths never differ
    by varying amounts)."""
    diff = np.asarray(lengths_a, dtype=float) - np.asarray(lengths_b, dtype=float)
    std = diff.std()
    return np.tanh(diff / std) if std > 0 else np.zeros_like(diff)


def fit_length_model(outcomes, x, penalty: float = LC_PENALTY, iterations: int = 60
                     ) -> tuple[np.ndarray, np.ndarray]:
    """Logistic regression outcome ~ sigmoid(b0 + b1 * x) fitted by Newton's method, many fits at once.
    outcomes, x: shape (fits, n), outcomes in [0, 1] (soft targets); L2 `penalty` on b1 only.
    Returns (b0, b1), each shape (fits,). b0 is kept within +-30 (an all-wins sample drives it to infinity)."""
    y, x = np.atleast_2d(np.asarray(outcomes, dtype=float)), np.atleast_2d(np.asarray(x, dtype=float))
    b0, b1 = np.zeros(len(y)), np.zeros(len(y))
    for _ in range(iterations):
        p = 1.0 / (1.0 + np.exp(-(b0[:, None] + b1[:, None] * x)))
        w = p * (1.0 - p)
        g0 = (p - y).sum(1)
        g1 = ((p - y) * x).sum(1) + penalty * b1
        h00, h01, h11 = w.sum(1) + 1e-9, (w * x).sum(1), (w * x * x).sum(1) + penalty
        det = h00 * h11 - h01 * h01
        d0, d1 = (h11 * g0 - h01 * g1) / det, (h00 * g1 - h01 * g0) / det
        scale = np.minimum(1.0, 5.0 / np.maximum(np.hypot(d0, d1), 1e-12))  # no wild first steps
        b0 = np.clip(b0 - scale * d0, -30.0, 30.0)
        b1 = b1 - scale * d1
    return b0, b1


def _lc_win_rate(outcomes, x, axis=-1):
    y, x = np.moveaxis(np.asarray(outcomes, dtype=float), axis, -1), np.moveaxis(np.asarray(x, dtype=float), axis, -1)
    shape = y.shape[:-1]
    b0, _ = fit_length_model(y.reshape(-1, y.shape[-1]), x.reshape(-1, x.shape[-1]))
    rate = 1.0 / (1.0 + np.exp(-b0))
    return rate.reshape(shape) if shape else float(rate[0])


def length_controlled(outcomes, lengths_a, lengths_b, seed: int = 0) -> dict:
    """The win rate of A at equal answer length, with its bootstrap interval (see the module doc)."""
    y = np.asarray(outcomes, dtype=float)
    if len(y) == 0:
        return {"win_rate_a": float("nan"), "ci": [float("nan"), float("nan")], "method": LC_METHOD}
    x = length_features(lengths_a, lengths_b)
    point = float(_lc_win_rate(y, x))
    if len(y) < 2 or np.ptp(y) == 0:  # no spread to resample: the interval is the point
        return {"win_rate_a": point, "ci": [point, point], "method": LC_METHOD}
    from scipy.stats import bootstrap

    res = bootstrap((y, x), _lc_win_rate, paired=True, vectorized=True, n_resamples=stats.N_RESAMPLES,
                    confidence_level=stats.CONFIDENCE, method="percentile", rng=np.random.default_rng(seed))
    ci = [float(res.confidence_interval.low), float(res.confidence_interval.high)]
    return {"win_rate_a": point, "ci": ci, "method": LC_METHOD}


# ---------------------------------------------------------------------------------------------- compare

def compare(a, b, prompts_file, judge, out_dir=None, max_tokens: int = 256, seed: int = 0, limit: int | None = None,
            judge_max_tokens: int = JUDGE_MAX_TOKENS, device: str = "auto") -> dict:
    """Answers of A and B on the prompts, judged twice each with positions swapped; the result dict of the
    "compare" contract, written to `out_dir` (default ./compare-<A>-vs-<B>/) as compare.json and compare.html.
    a, b, judge: Targets or spec strings (URL, assistant .yaml, model folder). The returned dict also holds
    "files": the paths written (not part of the JSON file)."""
    for flag, value in (("--limit", limit), ("--max-tokens", max_tokens), ("--judge-max-tokens", judge_max_tokens)):
        if value is not None and value < 1:
            raise InputError(f"{flag} must be at least 1, got {value}")
    from gptsmith.files import sha256_file

    prompts = load_prompts(prompts_file)[:limit]
    source = {"source": str(Path(prompts_file).resolve()), "version": "sha256:" + sha256_file(prompts_file)[:16]}
    opened: dict[str, object] = {}
    try:
        ta, tb, tj = (_target(x, opened, device) for x in (a, b, judge))
        result = run_comparison(ta, tb, tj, prompts, max_tokens, seed, judge_max_tokens)
    finally:
        for target in opened.values():
            target.close()
    result["prompts"] = source
    out = Path(out_dir) if out_dir is not None else default_out_dir(result["a"]["name"], result["b"]["name"])
    files = write_result(result, out)
    return {**result, "files": files}


def _target(spec, opened: dict, device: str):
    """A Target as given, or one opened from a spec string (opened once even when A, B or the judge repeat it)."""
    if not isinstance(spec, (str, Path)):
        return spec
    from gptsmith.eval.targets import target_from_spec

    key = str(spec)
    if key not in opened:
        opened[key] = target_from_spec(key, device=device)
    return opened[key]


def run_comparison(a, b, judge, prompts: list[PromptItem], max_tokens: int = 256, seed: int = 0,
                   judge_max_tokens: int = JUDGE_MAX_TOKENS) -> dict:
    conversations = [p.messages for p in prompts]
    answers_a = a.replies(conversations, max_tokens=max_tokens, temperature=0.0, seed=seed)
    answers_b = b.replies(conversations, max_tokens=max_tokens, temperature=0.0, seed=seed)
    texts_a, texts_b = [x.text for x in answers_a], [x.text for x in answers_b]
    questions = [question_text(p.messages) for p in prompts]
    rate = pair_judge(judge, judge_max_tokens, seed)  # one judge for both orders (a local one reuses its scores)
    judged_ab = rate(questions, texts_a, texts_b)
    judged_ba = rate(questions, texts_b, texts_a)
    rows, unparsed = score_items(judged_ab, judged_ba)
    items = [{"id": p.id, "prompt": q, "answer_a": ta.text, "answer_b": tb.text, **row,
              "judgment_ab": jab.text, "judgment_ba": jba.text,
              "finish_a": ta.finish_reason, "finish_b": tb.finish_reason}
             for p, q, ta, tb, row, jab, jba in zip(prompts, questions, answers_a, answers_b, rows, judged_ab,
                                                     judged_ba)]
    summary = summarize([r["result"] for r in rows], [len(t) for t in texts_a], [len(t) for t in texts_b], seed)
    return {"kind": "compare", "format": 1, "created": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "seed": seed, "gptsmith_version": _version(),
            "a": a.describe(), "b": b.describe(), "judge": judge.describe(), "judge_method": method(judge),
            "max_tokens": max_tokens, **summary, "unparsed": unparsed, "items": items}


def default_out_dir(name_a: str, name_b: str) -> Path:
    def safe(name: str) -> str:
        return re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-.") or "model"

    return Path(f"compare-{safe(name_a)}-vs-{safe(name_b)}")


def write_result(result: dict, out_dir: Path) -> dict:
    """compare.json + compare.html in out_dir, and a copy of the JSON in each local model folder's eval/."""
    from gptsmith.eval.compare_html import render_html
    from gptsmith.files import atomic_write_json, atomic_write_text

    json_path, html_path = out_dir / "compare.json", out_dir / "compare.html"
    atomic_write_json(json_path, result)
    atomic_write_text(html_path, render_html(result))
    stamp = datetime.strptime(result["created"], "%Y-%m-%dT%H:%M:%SZ").strftime("%Y%m%d-%H%M%S")
    copies = []
    for side in ("a", "b"):
        if result[side]["kind"] == "model":
            copy = Path(result[side]["ref"]) / "eval" / f"compare-{stamp}.json"
            if copy not in copies:
                atomic_write_json(copy, result)
                copies.append(copy)
    return {"json": str(json_path), "html": str(html_path), "copies": [str(c) for c in copies]}


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("gptsmith")
    except PackageNotFoundError:
        return "dev"


def render_summary(result: dict, console=None) -> None:
    """The summary table (rich) and where the files are."""
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    def rate(value: float, ci: list[float]) -> str:
        return f"{100 * value:.1f}% [{100 * ci[0]:.1f}, {100 * ci[1]:.1f}]"

    lc = result["length_controlled"]
    table = Table(title=f"{result['a']['name']} (A) vs {result['b']['name']} (B) on {result['n']} prompts, judged by "
                        f"{result['judge']['name']} ({result['judge_method']} verdicts, both orders)")
    for column in ("wins A", "ties", "wins B", "win rate A [95% CI]", "length-controlled [95% CI]"):
        table.add_column(column, justify="right")
    table.add_row(str(result["wins_a"]), str(result["ties"]), str(result["wins_b"]),
                  rate(result["win_rate_a"], result["ci"]), rate(lc["win_rate_a"], lc["ci"]))
    console.print(table)
    if result["unparsed"]:
        console.print(f"[yellow]{result['unparsed']} of {2 * result['n']} judgments had no [[A]]/[[B]]/[[C]] "
                      "verdict and counted as ties; a judge that follows the format (or a local model folder as "
                      "judge, read by reference-guided likelihood) gives none.[/yellow]")
    files = result.get("files") or {}
    for label, key in (("result", "json"), ("side by side", "html")):
        if key in files:
            console.print(f"{label}: {files[key]}", soft_wrap=True)  # a path stays one line
    for copy in files.get("copies", []):
        console.print(f"copy: {copy}", soft_wrap=True)
