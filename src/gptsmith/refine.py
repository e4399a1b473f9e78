"""`gptsmith refine --registry DIR --db URL`: user feedback becomes a better version, proven before it goes live.

    collect   the feedback stored since the live version was made: a rating or correction counts when its
              Feedback.updated_at (the time of the latest opinion on that answer) is at or after the live version's
              `created` in registry.json; an arena vote when its ArenaBattle.voted_at is. Built by
              serve/feedback.build_examples in the sft, dpo and kto formats, de-duplicated by a content hash of
              prompt + answer, and split by that hash (data/clean.assign_split, the one split rule of gptsmith)
              into train and held-out files in REGISTRY/refine/<run-id>/. The run id is the live version plus a
              hash of the collected data and the method: the same data is the same run.
    train     a candidate from the live version with train.sft / train.dpo / train.kto (or take --candidate DIR)
    add       the candidate becomes a registry version (status candidate, parent = live, data with sha256)
    evaluate  candidate vs live: held-out preference accuracy, bits-per-byte of held-out corrections, the
              regression suites (eval.run.evaluate, live as baseline), optionally a judge's win rate
    decide    promote only when the candidate is better where it should be and not worse anywhere beyond the
              tolerances; refine.json in the run folder records every check with its values and the verdict
    promote   Registry.promote: the one atomic write of registry.json, done last

REGISTRY/refine/<run-id>/state.json records the finished steps; a rerun skips them and training resumes from its
last checkpoint, so a crash at any point never leaves a half-promoted model.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from gptsmith.config import ProjectConfig
from gptsmith.errors import InputError
from gptsmith.files import atomic_write_json, atomic_write_text, read_json

FORMATS = ("sft", "dpo", "kto")
STEPS = ("collect", "train", "add", "evaluate", "decide", "promote")


class NotEnoughFeedback(InputError):
    """Too little new feedback for any method: nothing is trained."""


@dataclass
class Options:
    dry_run: bool = False
    candidate: Path | None = None  # an already-trained model to evaluate instead of training one
    judge: str | None = None
    prompts: Path | None = None
    device: str = "auto"


@dataclass
class Collected:
    train: dict[str, list[dict]]
    held: dict[str, list[dict]]
    since: str

    def counts(self) -> dict:
        return {f: {"train": len(self.train[f]), "held_out": len(self.held[f])} for f in FORMATS}


@dataclass
class Run:
    registry: object
    live: str
    method: str
    run_id: str
    folder: Path
    state: dict = field(default_factory=dict)

    def done(self, step: str) -> dict | None:
        return self.state.get("steps", {}).get(step)

    def finish(self, step: str, record: dict) -> dict:
        self.state.setdefault("steps", {})[step] = record
        atomic_write_json(self.folder / "state.json", self.state)
        return record


# ---------------------------------------------------------------------------------------------- collect
def example_key(ex: dict, fmt: str) -> bytes:
    """Prompt + the answer it teaches: a correction's sft example and its dpo pair share a key, so they land on
    the same side of the split."""
    if fmt == "sft":
        shown = ex["messages"]
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


# ---------------------------------------------------------------------------------------------- plan
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


def planned_checks(data: Collected, cfg: ProjectConfig, opts: Options, suites: list[str]) -> list[str]:
    r = cfg.refine
    checks = []
    if data.held["dpo"]:
        checks.append(f"held-out preference accuracy on {len(data.held['dpo'])} pairs (must rise, or bpb fall; "
                      f"may not drop by more than {r.accuracy_tolerance})")
    if data.held["sft"]:
        checks.append(f"bits-per-byte on {len(data.held['sft'])} held-out corrections (must fall, or accuracy "
                      f"rise; may not rise by more than {r.bpb_tolerance:.0%})")
    checks += [f"regression suite {s} (primary metric may not drop significantly by more than {r.suite_tolerance})"
               for s in suites]
    if opts.judge:
        checks.append(f"judge {opts.judge} on {opts.prompts}: win rate CI upper bound >= {r.judge_min_upper}")
    return checks


def resolve_suites(cfg: ProjectConfig) -> list[str]:
    """The configured suites; a built-in one that this install does not have is left out with a printed note."""
    from gptsmith.eval.run import _builtin

    out = []
    for name in cfg.refine.suites:
        if Path(name).exists() or ":" in name or _builtin(name) is not None:
            out.append(name)
        else:
            print(f"refine: note: the regression suite '{name}' is not available in this install "
                  "(gptsmith.eval.builtin has no such suite); running without it")
    return out


# ---------------------------------------------------------------------------------------------- train + add
def trained_config(cfg: ProjectConfig, method: str) -> ProjectConfig:
    """The method's section with refine.train overrides; no further split of refine's own training data."""
    section = getattr(cfg, method)
    updates = {**section.model_dump(), "val_fraction": 0.0, **cfg.refine.train}
    try:
        new = type(section).model_validate(updates)
    except Exception as e:
        raise InputError(f"refine.train: {e}; its keys are those of the {method} section "
                         f"(`gptsmith config show`)") from None
    return cfg.model_copy(update={method: new})


def train_candidate(run: Run, cfg: ProjectConfig, opts: Options) -> dict:
    if opts.candidate is not None:
        if not (Path(opts.candidate) / "config.json").is_file():
            raise InputError(f"--candidate {opts.candidate} is not a model directory (no config.json)")
        return {"model_dir": str(Path(opts.candidate).resolve()), "trained": False}
    out = run.folder / "candidate"
    live_dir = str(run.registry.version_dir(run.live))
    train_file, held_file = run.folder / f"train-{run.method}.jsonl", run.folder / f"heldout-{run.method}.jsonl"
    if run.method == "sft":
        from gptsmith.train.sft import sft
        metrics = sft(live_dir, train_file, out, trained_config(cfg, "sft"), resume=True)
    else:
        has_val = bool(held_file.read_text().strip())
        trainer = _preference_trainer(run.method)
        metrics = trainer(live_dir, train_file, out, trained_config(cfg, run.method), resume=True,
                          val=held_file if has_val else None)
    return {"model_dir": str(out), "trained": True, "metrics": metrics}


def _preference_trainer(method: str):
    if method == "dpo":
        from gptsmith.train.dpo import dpo
        return dpo
    from gptsmith.train.kto import kto
    return kto


def add_candidate(run: Run, trained: dict) -> str:
    """The candidate's registry version; the one added before when a crash came between add and the state file."""
    from gptsmith.registry import VERSION_FILE

    source = str(Path(trained["model_dir"]).resolve())
    for row in run.registry.versions():
        meta_file = run.registry.version_dir(row["version"]) / VERSION_FILE
        if meta_file.is_file() and read_json(meta_file).get("source") == source:
            return row["version"]
    if trained["trained"]:  # finished: its checkpoints are not part of the version
        import shutil
        shutil.rmtree(Path(source) / "checkpoints", ignore_errors=True)
    files = [run.folder / f"train-{run.method}.jsonl"]
    return run.registry.add(source, parent=run.live, method=run.method, data=files,
                            config={"refine_run": run.run_id}, move=trained["trained"])


# ---------------------------------------------------------------------------------------------- evaluate
def open_scorer(model_dir: Path, device: str):
    from gptsmith.train.tuning import load_model, prepare_chat_template, resolve_device

    model, tokenizer = load_model(str(model_dir), resolve_device(device, "refine"))
    prepare_chat_template(model, tokenizer, lora=True)  # as the trainers render the chat: the same tokens
    return model, tokenizer


def heldout_suites(model_dir: Path, held: dict[str, list[dict]], device: str) -> list[dict]:
    """The held-out checks as suites of an eval result (kind "eval"): preference accuracy over pairs (sum of the
    answer tokens' log-probs under the chat template, chosen vs rejected) and bits-per-byte of the corrections
    (the correction as the assistant's answer after its prompt; bytes of the answer text)."""
    from gptsmith.train.dpo import tokenize_pair
    from gptsmith.train.preference import completion_logps, prompt_and_answer_ids

    model, tok = open_scorer(model_dir, device)
    suites = []
    if held["dpo"]:
        rows = [tokenize_pair(tok, ex) for ex in held["dpo"]]
        chosen, rejected = completion_logps(model, rows, "chosen_ids"), completion_logps(model, rows, "rejected_ids")
        items = [{"id": str(i), "acc": float(c > r), "margin": c - r} for i, (c, r) in enumerate(zip(chosen, rejected))]
        suites.append({"name": "refine-preference-accuracy", "kind": "preference", "source": "refine:heldout-dpo",
                       "n": len(items), "primary": "acc", "higher_is_better": {"acc": True, "margin": True},
                       "metrics": {"acc": sum(x["acc"] for x in items) / len(items),
                                   "margin": sum(x["margin"] for x in items) / len(items)}, "items": items})
    if held["sft"]:
        rows = []
        for ex in held["sft"]:
            prompt, answer = prompt_and_answer_ids(tok, ex["messages"][:-1], ex["messages"][-1:])
            rows.append({"prompt_ids": prompt, "answer_ids": answer})
        logps = completion_logps(model, rows, "answer_ids")
        items = [{"id": str(i), "nll_bits": -lp / math.log(2), "bytes": len(ex["messages"][-1]["content"].encode()),
                  "tokens": len(r["answer_ids"])} for i, (lp, ex, r) in enumerate(zip(logps, held["sft"], rows))]
        bits, nbytes = sum(x["nll_bits"] for x in items), sum(x["bytes"] for x in items)
        suites.append({"name": "refine-correction-bpb", "kind": "text", "source": "refine:heldout-sft",
                       "n": len(items), "primary": "bpb", "higher_is_better": {"bpb": False},
                       "metrics": {"bpb": bits / max(nbytes, 1), "bytes": nbytes}, "items": items})
    del model
    return suites


def evaluate_model(model_dir: Path, held: dict, suites: list[str], out_dir: Path, device: str,
                   baseline: dict | None = None) -> dict:
    """One eval result (the contract's kind "eval") with the held-out checks and the regression suites."""
    from gptsmith.eval.results import compare_to_baseline, make_result, write_result
    from gptsmith.eval.targets import open_target

    done = heldout_suites(model_dir, held, device)
    target = open_target(model=model_dir, device=device)
    if suites:
        from gptsmith.eval.run import evaluate
        done += evaluate(target, suites)["suites"]
    result = make_result(target.describe(), done, seed=0)
    if baseline is not None:
        result["baseline"] = {"path": baseline.get("path", ""), "comparison": compare_to_baseline(result, baseline)}
    result["path"] = str(write_result({k: v for k, v in result.items() if k != "path"}, out_dir))
    return result


def suite_metric(result: dict, name: str, metric: str) -> float | None:
    for suite in result["suites"]:
        if suite["name"] == name:
            return suite["metrics"].get(metric)
    return None


def held_checks(live: dict, cand: dict, r) -> list[dict]:
    checks = []
    acc_l, acc_c = (suite_metric(x, "refine-preference-accuracy", "acc") for x in (live, cand))
    if acc_l is not None:
        checks.append(check("held-out preference accuracy rises", "improve", acc_l, acc_c, f"> {acc_l:.4f}",
                            acc_c > acc_l))
        checks.append(check("held-out preference accuracy does not drop", "guard", acc_l, acc_c,
                            f">= {acc_l - r.accuracy_tolerance:.4f}", acc_c >= acc_l - r.accuracy_tolerance))
    bpb_l, bpb_c = (suite_metric(x, "refine-correction-bpb", "bpb") for x in (live, cand))
    if bpb_l is not None:
        checks.append(check("held-out correction bits-per-byte falls", "improve", bpb_l, bpb_c, f"< {bpb_l:.4f}",
                            bpb_c < bpb_l))
        limit = bpb_l * (1 + r.bpb_tolerance)
        checks.append(check("held-out correction bits-per-byte does not rise", "guard", bpb_l, bpb_c,
                            f"<= {limit:.4f} (+{r.bpb_tolerance:.0%})", bpb_c <= limit))
    return checks


def suite_checks(cand: dict, r) -> list[dict]:
    """Each regression suite's primary metric: a significant move the wrong way by more than the tolerance fails."""
    primary = {s["name"]: s.get("primary") for s in cand["suites"]}
    checks = []
    for row in (cand.get("baseline") or {}).get("comparison", []):
        if row["suite"].startswith("refine-") or row.get("metric") != primary.get(row["suite"]):
            continue
        if row.get("missing"):
            checks.append(check(f"suite {row['suite']}", "guard", None, None, "present in both", False))
            continue
        worse = row["significant"] and row["better"] is False and abs(row["diff"]) > r.suite_tolerance
        checks.append(check(f"suite {row['suite']} {row['metric']} not worse", "guard", row["base"], row["new"],
                            f"no significant change the wrong way > {r.suite_tolerance}", not worse))
    return checks


def judge_check(run: Run, cand_dir: Path, opts: Options, r) -> list[dict]:
    if not opts.judge:
        return []
    from gptsmith.eval.compare import compare

    res = compare(str(cand_dir), str(run.registry.version_dir(run.live)), opts.prompts, opts.judge,
                  out_dir=run.folder / "compare", device=opts.device)
    lo, hi = res["ci"]
    return [check("judge win rate of candidate over live", "guard", 0.5, res["win_rate_a"],
                  f"CI upper bound [{lo:.3f}, {hi:.3f}] >= {r.judge_min_upper}", hi >= r.judge_min_upper)]


def check(name: str, kind: str, live, candidate, threshold: str, passed: bool) -> dict:
    return {"name": name, "kind": kind, "live": live, "candidate": candidate, "threshold": threshold,
            "passed": bool(passed)}


def evaluate_run(run: Run, version: str, data: Collected, cfg: ProjectConfig, opts: Options) -> dict:
    cand_dir = run.registry.version_dir(version)
    live_dir = run.registry.version_dir(run.live)
    suites = resolve_suites(cfg)
    live = evaluate_model(live_dir, data.held, suites, run.folder / "live-eval", opts.device)
    cand = evaluate_model(cand_dir, data.held, suites, cand_dir / "eval", opts.device, baseline=live)
    checks = held_checks(live, cand, cfg.refine) + suite_checks(cand, cfg.refine)
    checks += judge_check(run, cand_dir, opts, cfg.refine)
    return {"checks": checks, "live_result": live["path"], "candidate_result": cand["path"]}


# ---------------------------------------------------------------------------------------------- decide
def decide(checks: list[dict]) -> dict:
    improved = [c for c in checks if c["kind"] == "improve" and c["passed"]]
    failed = [c for c in checks if not c["passed"] and (c["kind"] == "guard" or not improved)]
    if not any(c["kind"] == "improve" for c in checks):
        failed.append(check("an improvement on held-out data", "improve", None, None,
                            "held-out pairs or corrections to measure", False))
    return {"verdict": "promote" if not failed else "keep live", "failed": [c["name"] for c in failed]}


def describe_failure(c: dict) -> str:
    return f"{c['name']}: live {fmt(c['live'])}, candidate {fmt(c['candidate'])}, needs {c['threshold']}"


def fmt(x) -> str:
    return "-" if x is None else f"{x:.4f}" if isinstance(x, float) else str(x)


def print_decision(run: Run, version: str, decision: dict, checks: list[dict]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"refine {run.run_id}: candidate {version} vs live {run.live}")
    for col in ("check", "live", "candidate", "threshold", "result"):
        table.add_column(col)
    for c in checks:
        table.add_row(c["name"], fmt(c["live"]), fmt(c["candidate"]), c["threshold"],
                      "[green]pass[/]" if c["passed"] else "[red]FAIL[/]")
    Console().print(table)
    if decision["verdict"] == "promote":
        print(f"refine: {version} is better and not worse anywhere beyond the tolerances")
    else:
        for c in checks:
            if c["name"] in decision["failed"]:
                print(f"refine: failed check: {describe_failure(c)}")
        print(f"refine: keeping {run.live} live; candidate {version} stays a candidate")


# ---------------------------------------------------------------------------------------------- the loop
def open_run(registry_dir, db_url: str, cfg: ProjectConfig, opts: Options) -> tuple[Run, Collected]:
    from gptsmith.registry import Registry

    reg = Registry.open(registry_dir)
    state = reg.read()
    live = state.get("live")
    if live is None:
        raise InputError(f"registry {reg.root} has no live version to refine; make one live first: "
                         f"`gptsmith models promote VERSION --registry {registry_dir}`")
    data = collect(db_url, state["versions"][live]["created"], cfg.refine.holdout)
    method = plan_method(data, cfg)
    run_id = run_identity(live, data, method, opts.candidate)
    folder = reg.root / "refine" / run_id
    saved = read_json(folder / "state.json") if (folder / "state.json").is_file() else {}
    return Run(reg, live, method, run_id, folder, saved or {"run": run_id, "live": live, "method": method}), data


def print_plan(run: Run, data: Collected, cfg: ProjectConfig, opts: Options) -> None:
    print(f"refine plan ({run.run_id}), feedback since {data.since} (the live version's creation):")
    for f, c in data.counts().items():
        print(f"  {f}: {c['train']} to train on, {c['held_out']} held out")
    for f in FORMATS:
        for ex in data.held[f]:
            prompt = ex["messages"][:-1] if f == "sft" else ex["prompt"]
            print(f"  held out ({f}): {(prompt[-1]['content'] if prompt else '')[:70]!r}")
    how = f"take {opts.candidate}" if opts.candidate else f"train with {run.method}"
    print(f"  method: {run.method}; candidate: {how} from parent {run.live} "
          f"({run.registry.version_dir(run.live)}) into {run.folder}")
    for c in planned_checks(data, cfg, opts, resolve_suites(cfg)):
        print(f"  check: {c}")
    print(f"  then: {'promote if every check passes' if cfg.refine.promote else 'decide only (--no-promote)'}")


def refine(registry_dir, db_url: str, cfg: ProjectConfig, opts: Options | None = None) -> dict:
    """The whole loop (module docstring); returns the decision record (refine.json), or the plan with dry_run."""
    opts = opts or Options()
    if opts.judge and not opts.prompts:
        raise InputError("--judge needs --prompts FILE (the prompts both versions answer for the judge)")
    run, data = open_run(registry_dir, db_url, cfg, opts)
    if opts.dry_run:
        print_plan(run, data, cfg, opts)
        return {"run": run.run_id, "method": run.method, "counts": data.counts(), "dry_run": True}
    if run.done("collect") is None:
        run.folder.mkdir(parents=True, exist_ok=True)
        for f in FORMATS:
            atomic_write_text(run.folder / f"train-{f}.jsonl", jsonl(data.train[f]))
            atomic_write_text(run.folder / f"heldout-{f}.jsonl", jsonl(data.held[f]))
        run.finish("collect", {"since": data.since, "counts": data.counts()})
    else:
        print(f"refine: resuming run {run.run_id} (finished: {', '.join(run.state['steps'])})")
    trained = run.done("train") or run.finish("train", train_candidate(run, cfg, opts))
    version = (run.done("add") or run.finish("add", {"version": add_candidate(run, trained)}))["version"]
    evaluated = run.done("evaluate") or run.finish("evaluate", evaluate_run(run, version, data, cfg, opts))
    decision = run.done("decide") or run.finish("decide", decide(evaluated["checks"]))
    record = {"run": run.run_id, "live": run.live, "candidate": version, "method": run.method,
              "counts": data.counts(), **evaluated, **decision, "promoted": False}
    if decision["verdict"] == "promote" and cfg.refine.promote:
        result = run.done("promote") or run.finish("promote", run.registry.promote(version))
        record["promoted"] = True
        print(f"refine: {result['message']}")
    atomic_write_json(run.folder / "refine.json", record)
    print_decision(run, version, decision, evaluated["checks"])
    if decision["verdict"] == "promote" and not cfg.refine.promote:
        print(f"refine: --no-promote: make it live with `gptsmith models promote {version} --registry "
              f"{registry_dir}`")
    return record
