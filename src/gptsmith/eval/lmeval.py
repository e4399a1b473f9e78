"""lm-evaluation-harness tasks through its Python API (the optional extra `pip install 'gptsmith[eval]'`).

    gptsmith eval --model out/chat --suite lm-eval:hellaswag          # a task of lm-eval's own (needs the network once)
    gptsmith eval --model out/chat --suite lm-eval:mytask@./tasks     # a task YAML from a local folder (offline)

`run_tasks(target, ["hellaswag"])` gives one suite dict per task in the shape of every other suite of a result file
(name, kind "lm-eval", version, source, n, k_shot, chat_template, primary, metrics, higher_is_better, items), with
per-item values from lm-eval's logged samples, so `--baseline` intervals and the report card treat lm-eval tasks
like gptsmith's own suites. A group (mmlu) is one suite whose items are all its subtasks' documents.

How a target is run:
- a model folder, or an assistant over a local model: lm-eval's HFLM over the model and tokenizer the target
  already loaded (no second copy in memory); a chat model gets its chat template (apply_chat_template=True);
- an assistant: its system prompt goes to lm-eval as the system instruction. Its sources (RAG) and few-shot
  examples are NOT applied to lm-eval tasks (lm-eval builds the prompts itself); a note says so when it runs;
- a backend URL (or an assistant over one): lm-eval's local-chat-completions model on BACKEND/chat/completions.
  Chat completions return no log-probabilities, so only generation tasks (output_type generate_until, e.g. gsm8k)
  run there; a log-likelihood task (multiple choice, perplexity) is a clear error.

A local task's YAML reads a local file with `dataset_path: json` and `dataset_kwargs: {data_files: {test: FILE}}`
(a relative FILE is relative to the directory gptsmith runs in, as for lm-eval itself); with HF_DATASETS_OFFLINE=1
nothing is downloaded.
"""

from __future__ import annotations

import contextlib
import difflib
import hashlib
import json
import logging
import math
import re
from pathlib import Path

from gptsmith.errors import InputError

MISSING_EXTRA = "lm-eval tasks need the eval extra: pip install 'gptsmith[eval]'"
PREFIX = "lm-eval:"
# lm-eval's request kinds that need the model's log-probabilities (a chat-completions API gives none)
LOGLIKELIHOOD_TYPES = {"loglikelihood", "loglikelihood_rolling", "multiple_choice"}
PRIMARY_ORDER = ("acc_norm", "acc", "exact_match")
CPU_BATCH, GPU_BATCH = 8, 32  # loglikelihood requests per forward pass: fills a CPU, small enough for any GPU


def _import_lm_eval():
    try:
        import lm_eval  # noqa: F401
        import lm_eval.evaluator  # noqa: F401
        import lm_eval.tasks  # noqa: F401
    except ImportError:
        raise InputError(MISSING_EXTRA) from None
    return lm_eval


def run_tasks(target, tasks: list[str], include_path=None, limit=None, k_shot=None, seed: int = 0,
              batch_size=None) -> list[dict]:
    """Run lm-eval `tasks` on `target` (gptsmith.eval.targets.Target): one suite dict per task, in order.
    `include_path`: a folder of task YAML; its tasks are looked up there (lm-eval's own only when one of them
    refers to a task that folder lacks). `limit`: at most this many documents per task; `k_shot`: lm-eval's
    num_fewshot (None = the task's own default)."""
    _import_lm_eval()
    folder = _check_folder(include_path)
    with _quiet_lm_eval():
        known = _Tasks(folder)
        loaded = {name: known.load(name) for name in tasks}  # every name checked before any scoring
        if target.engine is None:
            for name, task_dict in loaded.items():
                _require_generation(name, task_dict, target)
        lm, chat, system = _lm_for(target, batch_size)
        suites = []
        for name, task_dict in loaded.items():
            source = f"{PREFIX}{name}@{folder}" if folder else f"{PREFIX}{name}"
            suites.append(_evaluate(lm, name, source, task_dict, chat, system, limit, k_shot, seed))
    return suites


# ------------------------------------------------------------------------------------------------ the model

def _lm_for(target, batch_size):
    """(lm-eval model, apply the chat template?, system instruction) for a target."""
    system = None
    if target.assistant is not None:
        system = target.assistant.profile.system_prompt or None
        print(f"lm-eval: assistant {target.name}: its model and system prompt are evaluated; its sources (RAG) and "
              "few-shot examples are not applied to lm-eval tasks (lm-eval builds the prompts itself)")
    if target.engine is not None:
        return _hf_lm(target.engine, batch_size), bool(target.is_chat), system
    return _chat_api_lm(target.remote), True, system


def _hf_lm(engine, batch_size):
    from lm_eval.models.huggingface import HFLM

    if batch_size is None:
        batch_size = GPU_BATCH if engine.device.type == "cuda" else CPU_BATCH
    # The engine's own model and tokenizer: HFLM takes an already-loaded PreTrainedModel, so nothing is copied.
    return HFLM(pretrained=engine.model, tokenizer=engine.tokenizer, batch_size=batch_size,
                max_length=engine.max_context)


def _chat_api_lm(remote):
    from lm_eval.models.openai_completions import LocalChatCompletion

    auth = remote.client.headers.get("Authorization")
    return LocalChatCompletion(base_url=f"{remote.base}/chat/completions", model=remote.model,
                               tokenizer_backend=None, tokenized_requests=False, max_length=remote.max_context,
                               header={"Authorization": auth} if auth else {"Content-Type": "application/json"})


@contextlib.contextmanager
def _quiet_lm_eval():
    """lm-eval logs every step at INFO/WARNING (including "pretrained is not a str", which is how we pass the
    loaded model on purpose); keep errors only while we run it."""
    logger = logging.getLogger("lm_eval")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


# ------------------------------------------------------------------------------------------------ the tasks

def _check_folder(include_path) -> Path | None:
    if include_path is None:
        return None
    folder = Path(include_path)
    if not folder.is_dir():
        raise InputError(f"{folder}: no such folder of lm-eval task YAML (lm-eval:TASK@FOLDER names a folder)")
    return folder.resolve()


class _Tasks:
    """lm-eval's TaskManager, built once per run: with a folder, over that folder alone (a name is looked up there
    only; indexing lm-eval's ~15,000 built-in tasks takes many seconds), else over lm-eval's own tasks."""

    def __init__(self, folder: Path | None):
        self.folder = folder
        self._managers: dict[bool, object] = {}

    def manager(self, with_defaults: bool):
        from lm_eval.tasks import TaskManager

        if with_defaults not in self._managers:
            self._managers[with_defaults] = TaskManager(
                include_path=str(self.folder) if self.folder else None, include_defaults=with_defaults)
        return self._managers[with_defaults]

    def load(self, name: str) -> dict:
        """TaskManager.load([name]): {"tasks", "groups", "group_map"}, with the task's documents loaded."""
        where = f"in {self.folder}" if self.folder else "in lm-eval"
        manager = self.manager(with_defaults=self.folder is None)
        if name not in manager.all_tasks:
            raise InputError(_unknown(name, manager.all_tasks, where))
        try:
            try:
                return manager.load([name])
            except KeyError:
                if self.folder is None:
                    raise
                # the local YAML refers to one of lm-eval's own tasks: index those too
                return self.manager(with_defaults=True).load([name])
        except Exception as e:  # noqa: BLE001 - lm-eval and datasets raise many kinds; all mean "this task's
            # YAML or data could not be read", which the user fixes
            raise InputError(f"lm-eval task {name} ({where}) could not be loaded: {type(e).__name__}: {e}. A task "
                             "of lm-eval's downloads its data once (network, or a cached copy with "
                             "HF_DATASETS_OFFLINE=1); a local YAML's dataset_kwargs.data_files are relative to the "
                             "directory you run in") from None


def _unknown(name: str, known: list[str], where: str) -> str:
    close = difflib.get_close_matches(name, known, n=5, cutoff=0.6)
    hint = f"; did you mean {', '.join(close)}?" if close else ""
    listed = "" if close or len(known) > 30 else f"; tasks there: {', '.join(known) or 'none'}"
    return (f"lm-eval has no task {name!r} {where}{hint}{listed} (a task YAML in a local folder is "
            "lm-eval:TASK@FOLDER)")


def _output_types(loaded: dict) -> dict[str, str]:
    return {task_name: task.get_config("output_type") or task.OUTPUT_TYPE
            for task_name, task in loaded["tasks"].items()}


def _require_generation(name: str, loaded: dict, target) -> None:
    scored = {t: kind for t, kind in _output_types(loaded).items() if kind in LOGLIKELIHOOD_TYPES}
    if scored:
        task, kind = next(iter(scored.items()))
        raise InputError(f"lm-eval task {name} ({task}: output_type {kind}) is scored by log-likelihood, which a "
                         f"chat-completions backend ({target.ref}) does not return; run it on the model folder "
                         "(--model DIR) or an assistant over a local model. Over a backend only generation tasks "
                         "(output_type generate_until, e.g. gsm8k) run.")


def _evaluate(lm, name: str, source: str, loaded: dict, chat: bool, system: str | None, limit, k_shot,
              seed) -> dict:
    """lm_eval.evaluator.evaluate with what simple_evaluate would set up (seeds, num_fewshot), without the rest of
    simple_evaluate: it also collects a report of the machine (pip list, GPUs, git) that takes tens of seconds."""
    import random

    import numpy as np
    import torch
    from lm_eval.evaluator import evaluate

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    for task in loaded["tasks"].values():
        default = task.get_config("num_fewshot")
        if k_shot is not None and default != 0:  # lm-eval's rule: a task that fixes 0 shots keeps 0
            task.set_config(key="num_fewshot", value=k_shot)
        elif default is None:
            task.set_config(key="num_fewshot", value=0)
        task.set_fewshot_seed(seed=seed)
    out = evaluate(lm=lm, task_dict=loaded, limit=limit, bootstrap_iters=0, log_samples=True,
                   system_instruction=system, apply_chat_template=chat, fewshot_as_multiturn=chat)
    return _suite(name, source, loaded, out, chat)


# ------------------------------------------------------------------------------------------------ the result

def _metric_name(metric: str, filter_name: str) -> str:
    """lm-eval reports "acc,none" / "exact_match,strict-match": the unfiltered one keeps its plain name."""
    return metric if filter_name == "none" else f"{metric},{filter_name}"


def _number(value) -> float | None:
    if isinstance(value, bool):
        return float(value)
    if isinstance(value, (int, float)) and math.isfinite(value):
        return float(value)
    return None


def _suite_metrics(row: dict) -> dict[str, float]:
    metrics = {}
    for key, value in row.items():
        metric, sep, filter_name = key.partition(",")
        if sep and "_stderr" not in metric and (v := _number(value)) is not None:
            metrics[_metric_name(metric, filter_name)] = v
    return metrics


def _primary(metrics: dict) -> str | None:
    for want in PRIMARY_ORDER:
        for name in metrics:
            if name.split(",")[0] == want:
                return name
    return next(iter(metrics), None)


def _task_items(task_name: str, task, samples: list[dict], prefix: str) -> list[dict]:
    """One item per document: every numeric per-document metric (of every filter), the choice picked for a
    multiple-choice task (pred by raw log-likelihood, pred_norm per character as lm-eval's acc_norm), the output
    of a generation task."""
    items: dict[int, dict] = {}
    kind = task.get_config("output_type")
    for sample in samples:
        item = items.setdefault(sample["doc_id"], {"id": f"{prefix}{sample['doc_id']}"})
        for metric in sample.get("metrics", []):
            if (v := _number(sample.get(metric))) is not None:
                item[_metric_name(metric, sample.get("filter", "none"))] = v
        if "pred" in item or "output" in item:
            continue
        resps = sample.get("filtered_resps") or []
        if kind == "multiple_choice" and resps:
            lls = [float(r[0]) for r in resps]
            lengths = [max(1, len(c)) for c in task.doc_to_choice(sample["doc"])]
            item["pred"] = max(range(len(lls)), key=lls.__getitem__)
            if len(lengths) == len(lls):
                item["pred_norm"] = max(range(len(lls)), key=lambda i: lls[i] / lengths[i])
        elif kind == "generate_until" and resps and isinstance(resps[0], str):
            item["output"] = resps[0]
    return [items[k] for k in sorted(items)]


def _stable_json(obj) -> str:
    # A task config may hold functions; their repr carries a memory address that changes from run to run.
    return re.sub(r" at 0x[0-9a-fA-F]+", "", json.dumps(obj, sort_keys=True, default=str))


def _version(name: str, leaves: list[str], out: dict) -> str:
    """lm-eval's version of the task, plus a hash of the task configs and of the documents evaluated (lm-eval's
    doc_hash of each), so a changed prompt or data file gives a different version even at the same number."""
    h = hashlib.sha256()
    for leaf in leaves:
        h.update(_stable_json(out.get("configs", {}).get(leaf, {})).encode())
        for sample in out.get("samples", {}).get(leaf, []):
            h.update(str(sample.get("doc_hash", "")).encode())
    number = out.get("versions", {}).get(name)  # "Yaml" when the task's YAML sets no metadata.version
    numbered = isinstance(number, (int, float)) and not isinstance(number, bool)
    return f"{'v' + str(number) + '+' if numbered else ''}sha256:{h.hexdigest()[:16]}"


def _suite(name: str, source: str, loaded: dict, out: dict, chat: bool) -> dict:
    leaves = sorted(loaded["tasks"])
    grouped = len(leaves) > 1 or leaves != [name]
    items = []
    for leaf in leaves:
        items += _task_items(leaf, loaded["tasks"][leaf], out.get("samples", {}).get(leaf, []),
                             f"{leaf}/" if grouped else "")
    row = (out.get("groups") or {}).get(name) or out["results"].get(name) or {}
    metrics = _suite_metrics(row)
    if not metrics:  # a tag (several tasks, no group row): the mean over all their documents
        names = {k for item in items for k in item if k not in ("id", "pred", "pred_norm", "output")}
        metrics = {k: sum(i[k] for i in items if k in i) / sum(1 for i in items if k in i) for k in sorted(names)}
    better_by_base = {}
    for leaf in [name, *leaves]:
        better_by_base.update(out.get("higher_is_better", {}).get(leaf, {}))
    higher = {m: bool(better_by_base[m.split(",")[0]]) for m in metrics if m.split(",")[0] in better_by_base}
    shots = out.get("n-shot", {})
    return {
        "name": name, "kind": "lm-eval", "version": _version(name, leaves, out), "source": source,
        "n": len(items), "k_shot": shots.get(name, shots.get(leaves[0], 0)), "chat_template": chat,
        "primary": _primary(metrics), "metrics": metrics, "higher_is_better": higher, "items": items,
    }
