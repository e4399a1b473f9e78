"""`gptsmith eval`: run suites against one target and collect the result (see eval.results for the file).

A suite is named by what it is:
    notes.txt, docs/            an existing text file or folder: bits-per-byte and perplexity (eval.text)
    text:PATH                   the same, forced (e.g. a .jsonl of {"text": ...} records)
    quiz.jsonl                  a task suite: multiple choice or generation (eval.suites), kind from its keys
    lm-eval:TASK[,TASK][@DIR]   lm-evaluation-harness tasks (task YAML from DIR too), the `gptsmith[eval]` extra
    python-docs                 a built-in suite shipped with gptsmith

    from gptsmith.eval.run import evaluate
    from gptsmith.eval.targets import open_target
    result = evaluate(open_target(model="out/chat"), ["quiz.jsonl", "notes/"], out_dir="out/chat/eval")
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

from gptsmith.errors import InputError

ACCEPTED = ("an existing text file or folder (bits-per-byte), text:PATH, a .jsonl task suite (multiple choice or "
            "generation), lm-eval:TASK[@YAML_DIR], or a built-in suite name")


@dataclass
class SuiteSpec:
    kind: str  # "text", "task" or "lm-eval"
    name: str
    source: str
    path: Path | None = None
    tasks: tuple[str, ...] = ()
    include_path: str | None = None


def suite_version(path: str | Path) -> str:
    """"sha256:" + 16 hex digits of the file's bytes (a folder: its sorted relative file names and contents)."""
    path = Path(path)
    h = hashlib.sha256()
    if path.is_dir():
        for f in sorted(p for p in path.rglob("*") if p.is_file()):
            h.update(f.relative_to(path).as_posix().encode("utf-8") + b"\0")
            h.update(f.read_bytes() + b"\0")
    else:
        h.update(path.read_bytes())
    return "sha256:" + h.hexdigest()[:16]


def _builtin(name: str) -> Path | None:
    try:
        from gptsmith.eval.builtin import resolve
    except ModuleNotFoundError as e:
        if e.name not in ("gptsmith.eval.builtin",):
            raise
        return None
    return resolve(name)


def _file_spec(path: Path, name: str, source: str, force_text: bool = False) -> SuiteSpec:
    if not force_text and path.is_file() and path.suffix == ".jsonl":
        from gptsmith.eval.suites import jsonl_kind

        if jsonl_kind(path) != "text":
            return SuiteSpec("task", name, source, path)
    return SuiteSpec("text", name, source, path)


def resolve_suite(spec: str) -> SuiteSpec:
    """What a --suite argument names (see the module docstring)."""
    if spec.startswith("lm-eval:"):
        tasks, _, include = spec[len("lm-eval:"):].partition("@")
        names = tuple(t.strip() for t in tasks.split(",") if t.strip())
        if not names:
            raise InputError(f"{spec}: no task name; write lm-eval:TASK (e.g. lm-eval:arc_easy)")
        if include and not Path(include).is_dir():
            raise InputError(f"{spec}: {include} is not a folder of task YAML files")
        return SuiteSpec("lm-eval", ",".join(names), spec, tasks=names, include_path=include or None)
    if spec.startswith("text:"):
        path = Path(spec[len("text:"):])
        if not path.exists():
            raise InputError(f"{spec}: {path} does not exist; text:PATH needs a text file or folder")
        return _file_spec(path, path.stem if path.is_file() else path.resolve().name, str(path.resolve()), True)
    path = Path(spec)
    if path.exists():
        return _file_spec(path, path.stem if path.is_file() else path.resolve().name, str(path.resolve()))
    builtin = _builtin(spec)
    if builtin is not None:
        return _file_spec(Path(builtin), spec, f"builtin:{spec}")
    raise InputError(f"unknown suite {spec}: not a file, not a built-in suite (accepted: {ACCEPTED})")


def _text_suite(target, spec: SuiteSpec, limit: int | None) -> dict:
    from gptsmith.eval.text import read_documents, score_documents, text_metrics

    engine = target._need_engine("bits-per-byte")
    items = score_documents(engine, read_documents(spec.path, limit), desc=spec.name)
    return {"name": spec.name, "kind": "text", "version": suite_version(spec.path), "source": spec.source,
            "n": len(items), "k_shot": 0, "chat_template": False, "primary": "bpb", "metrics": text_metrics(items),
            "higher_is_better": {"bpb": False, "ppl": False}, "items": items}


def _task_suite(target, spec: SuiteSpec, k_shot: int, limit: int | None, seed: int, max_tokens: int) -> dict:
    from gptsmith.eval.suites import load_suite, score_generation, score_multiple_choice

    suite = load_suite(spec.path)
    # k-shot examples come from the whole suite; --limit only cuts which items are scored
    scored = suite.items[:limit] if limit else suite.items
    if suite.kind == "multiple_choice":
        items = score_multiple_choice(target, suite.items, k_shot, seed, n_items=len(scored))
        metrics = {m: sum(it[m] for it in items) / len(items) for m in ("acc", "acc_norm")}
        primary, higher = "acc_norm", {"acc": True, "acc_norm": True}
        # what guessing scores on these items: the report card marks a result whose interval contains it
        chance = sum(1 / len(it["choices"]) for it in scored) / len(scored)
    else:
        items = score_generation(target, suite.items, k_shot, seed, max_tokens, n_items=len(scored))
        metrics = {"score": sum(it["score"] for it in items) / len(items)}
        primary, higher = "score", {"score": True}
        chance = None  # a free-form answer has no guessing rate
    return {"name": spec.name, "kind": suite.kind, "version": suite_version(spec.path), "source": spec.source,
            "n": len(items), "k_shot": k_shot, "chat_template": target.is_chat, "primary": primary,
            "metrics": metrics, "higher_is_better": higher, "chance": chance, "items": items}


def _lm_eval_suites(target, spec: SuiteSpec, k_shot: int | None, limit: int | None, seed: int) -> list[dict]:
    try:
        from gptsmith.eval.lmeval import run_tasks
    except ModuleNotFoundError as e:
        if e.name != "gptsmith.eval.lmeval":
            raise
        raise InputError(f"{spec.source}: lm-eval tasks are not available in this gptsmith ({e})") from None
    return run_tasks(target, list(spec.tasks), include_path=spec.include_path, limit=limit, k_shot=k_shot, seed=seed)


def default_out_dir(target) -> Path:
    """Where results go when --out is not given: MODEL/eval/ for a model folder, else ./eval-results/."""
    return Path(target.ref) / "eval" if target.kind == "model" else Path("eval-results")


def evaluate(target, suites: list[str], out_dir: str | Path | None = None, k_shot: int | None = None,
             limit: int | None = None, seed: int = 0, baseline: str | Path | dict | None = None,
             max_tokens: int = 256, update_card: bool = True) -> dict:
    """Run every suite on `target`; returns the result dict (the plan's "eval" contract). With `out_dir` it is
    written to OUT_DIR/eval-YYYYmmdd-HHMMSS.json and result["path"] names the file (the key is not in the file).
    With `baseline` (a result file or dict), result["baseline"] = {"path", "comparison": compare_to_baseline(...)}.
    `k_shot` None: 0 for task suites, the task's own default for lm-eval. `limit`: the first N items/documents.
    `update_card`: results written into a local model's MODEL/eval/ re-write its report card (report.md/html)."""
    from gptsmith.eval.results import compare_to_baseline, make_result, read_result, write_result

    if not suites:
        raise InputError(f"no suite given; name at least one: {ACCEPTED}")
    if k_shot is not None and k_shot < 0 or limit is not None and limit < 1 or max_tokens < 1:
        raise InputError("--k-shot must be >= 0, --limit >= 1 and --max-tokens >= 1")
    base = None
    if baseline is not None:  # read first: a bad baseline fails before minutes of scoring
        base = baseline if isinstance(baseline, dict) else read_result(baseline)
    specs = [resolve_suite(s) for s in suites]
    done: list[dict] = []
    for spec in specs:
        if spec.kind == "text":
            done.append(_text_suite(target, spec, limit))
        elif spec.kind == "task":
            done.append(_task_suite(target, spec, k_shot or 0, limit, seed, max_tokens))
        else:
            done += _lm_eval_suites(target, spec, k_shot, limit, seed)
    names = [s["name"] for s in done]
    for i, name in enumerate(names):  # suites pair across runs by name, so two of one name get a suffix
        if names.count(name) > 1:
            done[i]["name"] = f"{name}#{names[:i + 1].count(name)}"
    result = make_result(target.describe(), done, seed)
    if base is not None:
        result["baseline"] = {"path": str(baseline if not isinstance(baseline, dict) else base.get("path", "")),
                              "comparison": compare_to_baseline(result, base, seed)}
    if out_dir is not None:
        path = write_result(result, out_dir)
        result["path"] = str(path)
        if update_card:
            _update_card(target, Path(out_dir))
    return result


def _update_card(target, out_dir: Path) -> None:
    """A local model's report card shows its eval results, so once a result lands in MODEL/eval/ the card is
    written again (samples from the engine already loaded); other targets and other --out folders have no card."""
    if target.kind != "model" or target.engine is None:
        return
    model_dir = Path(target.ref)
    if out_dir.resolve() != (model_dir / "eval").resolve():
        return
    from gptsmith.eval.report import report_after_training
    report_after_training(model_dir, samples=2, engine=target.engine)
