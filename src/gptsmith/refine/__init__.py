"""`gptsmith refine --registry DIR --db URL`: user feedback becomes a better version, proven before it goes live.

    collect   the feedback in the run's window [since, until] (refine/data.py): `since` is the live version's
              "consumed_through" (registry.json; set by the refine run that made it) or else its `created`;
              `until` is a snapshot of the newest feedback stamp taken now, so feedback given while the run trains
              waits for the next run. Built by serve/feedback.build_examples in the sft, dpo and kto formats,
              de-duplicated by a content hash of prompt + answer, and split by that hash (data/clean.assign_split,
              the one split rule of gptsmith) into train and held-out files in REGISTRY/refine/<run>/.
    train     a candidate from the live version with train.sft / train.dpo / train.kto (or take --candidate DIR);
              the sha256 of its weights is recorded: the candidate is known by it from here on
    add       the candidate becomes a registry version (status candidate, parent = live, data with sha256, its run
              and consumed_through; --candidate: method external, no parent, no data)
    evaluate  candidate vs live: held-out preference accuracy, bits-per-byte of held-out corrections, the
              regression suites (eval.run.evaluate, live as baseline), optionally a judge's win rate
    decide    promote only when the candidate is better where it should be and not worse anywhere beyond the
              tolerances; refine.json in the run folder records every check with its values and the verdict; a
              candidate that is not promoted gets status rejected (`gptsmith models prune` deletes it)
    promote   Registry.promote: the one atomic write of registry.json, done last

A run is its live version (and that version's weights), its method, its feedback window and the examples in it, and
every setting that changes the outcome (run_settings): the key is their sha256, stored in state.json; the folder
REGISTRY/refine/<live>-<method>-<key[:12]>/ records the finished steps. Only the same run resumes: it skips them and
training resumes from its last checkpoint, so a crash at any point never leaves a half-promoted model. Other
settings are another run. Before add, evaluate and promote the weights are hashed again: refine never registers,
evaluates or promotes weights other than the ones this run trained (or the --candidate given).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from gptsmith.config import ProjectConfig
from gptsmith.errors import InputError
from gptsmith.files import atomic_write_json, atomic_write_text, read_json, sha256_file, weights_sha256
from gptsmith.refine.checks import (check, decide, evaluate_run, open_scorer, print_decision, resolve_suites,
                                    suite_checks)
from gptsmith.refine.data import (FORMATS, Collected, NotEnoughFeedback, after, collect, jsonl, plan_method,
                                  run_key, run_name, split)
from gptsmith.registry import weights_sha_or_none

__all__ = ["Options", "refine", "Collected", "NotEnoughFeedback", "collect", "split", "plan_method", "check", "decide",
           "suite_checks", "open_scorer", "FORMATS"]
STEPS = ("collect", "train", "add", "evaluate", "decide", "promote")


@dataclass
class Options:
    dry_run: bool = False
    candidate: Path | None = None  # an already-trained model to evaluate instead of training one
    judge: str | None = None
    prompts: Path | None = None
    device: str = "auto"


@dataclass
class Run:
    registry: object
    live: str
    method: str
    run_id: str
    folder: Path
    state: dict = field(default_factory=dict)
    key: str = ""

    def done(self, step: str) -> dict | None:
        return self.state.get("steps", {}).get(step)

    def finish(self, step: str, record: dict) -> dict:
        self.state.setdefault("steps", {})[step] = record
        atomic_write_json(self.folder / "state.json", self.state)
        return record


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


def run_settings(cfg: ProjectConfig, method: str, opts: Options) -> dict:
    """Every resolved setting that changes a run's outcome: the method's training section after refine.train,
    the split, the tolerances, the suites, the judge and its prompts (by content), the --candidate (by weights).
    Not refine.promote (whether a passing candidate goes live is not part of what the run finds), nor
    refine.min_* and refine.method (they only choose the method, which is in the key itself)."""
    r = cfg.refine.model_dump(exclude={"train", "promote", "min_dpo_pairs", "min_sft_examples", "min_kto_examples",
                                       "method", "suites"})
    out = {"refine": r, "suites": resolve_suites(cfg), "judge": opts.judge}
    if opts.candidate is not None:
        out["candidate"] = {"path": str(Path(opts.candidate).resolve()),
                            "weights_sha256": weights_sha_or_none(opts.candidate)}
    else:
        out["train"] = getattr(trained_config(cfg, method), method).model_dump(mode="json")
    if opts.prompts is not None:
        out["prompts"] = {"path": str(Path(opts.prompts).resolve()),
                          "sha256": sha256_file(opts.prompts) if Path(opts.prompts).is_file() else None}
    return out


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
        where = Path(opts.candidate).resolve()
        sha = weights_sha_or_none(where)
        if sha is None:
            raise InputError(f"--candidate {opts.candidate} has no weights (*.safetensors or *.bin); pass a trained "
                             "model directory")
        return {"model_dir": str(where), "trained": False, "weights_sha256": sha}
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
    return {"model_dir": str(out), "trained": True, "metrics": metrics, "weights_sha256": weights_sha256(out)}


def _preference_trainer(method: str):
    if method == "dpo":
        from gptsmith.train.dpo import dpo
        return dpo
    from gptsmith.train.kto import kto
    return kto


def add_candidate(run: Run, trained: dict) -> str:
    """The candidate's registry version: the one this run added before (a crash between add and the state file),
    known by its run and the sha256 of its weights, else a new one, after checking the weights are still the
    ones this run trained."""
    sha = trained["weights_sha256"]
    for v, entry in run.registry.read()["versions"].items():
        if entry.get("refine_run") == run.run_id and entry.get("weights_sha256") == sha:
            return v
    source = Path(trained["model_dir"])
    if not (source / "config.json").is_file():
        raise InputError(f"refine run {run.run_id}: its candidate {source} is gone and no registry version holds "
                         f"its weights (sha256 {sha[:16]}); delete {run.folder} to train it again")
    found = weights_sha256(source)
    if found != sha:
        raise InputError(f"refine run {run.run_id}: the weights in {source} (sha256 {found[:16]}) are not the ones "
                         f"this run {'trained' if trained['trained'] else 'was given'} (sha256 {sha[:16]}); "
                         f"nothing registered. Delete {run.folder} to start the run again")
    extra = {"refine_run": run.run_id, "consumed_through": run.state.get("until")}
    if not trained["trained"]:  # --candidate: refine neither made it nor knows what it learned from
        return run.registry.add(source, parent=None, method="external", data=[],
                                config={"refine_run": run.run_id, "compared_with": run.live}, extra=extra)
    import shutil
    shutil.rmtree(source / "checkpoints", ignore_errors=True)  # finished: its checkpoints are not part of it
    files = [run.folder / f"train-{run.method}.jsonl"]
    return run.registry.add(source, parent=run.live, method=run.method, data=files,
                            config={"refine_run": run.run_id}, move=True, extra=extra)


def verify_version(run: Run, version: str, trained: dict, step: str) -> None:
    """Before evaluating or promoting: `version` is still this run's candidate, by the sha256 of its weights."""
    entry = run.registry.read()["versions"].get(version)
    if entry is None:
        raise InputError(f"refine run {run.run_id}: its candidate {version} is no longer in {run.registry.root} "
                         f"(pruned?); delete {run.folder} to start the run again")
    found = weights_sha_or_none(run.registry.version_dir(version))
    if found != trained["weights_sha256"]:
        raise InputError(f"refine run {run.run_id}: {version}'s weights (sha256 {str(found)[:16]}) are not the ones "
                         f"this run {'trained' if trained['trained'] else 'was given'} "
                         f"(sha256 {trained['weights_sha256'][:16]}); refusing to {step} it. Delete {run.folder} to "
                         "start the run again")


def window_since(state: dict) -> str:
    """The start of the live version's feedback window: after what the run that made it consumed, else its
    creation."""
    entry = state["versions"][state["live"]]
    return after(entry["consumed_through"]) if entry.get("consumed_through") else entry["created"]


def open_run(registry_dir, db_url: str, cfg: ProjectConfig, opts: Options) -> tuple[Run, Collected]:
    """The run these settings and the feedback stored now make, or the unfinished run with these settings over an
    earlier window (it resumes; what came after waits for the next run)."""
    from gptsmith.registry import Registry

    reg = Registry.open(registry_dir)
    state = reg.read()
    live = state.get("live")
    if live is None:
        raise InputError(f"registry {reg.root} has no live version to refine; make one live first: "
                         f"`gptsmith models promote VERSION --registry {registry_dir}`")
    since, live_sha = window_since(state), weights_sha_or_none(reg.version_dir(live))
    others = []
    for path in sorted((reg.root / "refine").glob("*/state.json")):
        saved = read_json(path)
        if saved.get("live") == live and saved.get("since") == since:
            others.append((path.parent, saved))
    unfinished = [(f, s) for f, s in others if _unfinished(s)]
    for folder, saved in unfinished:  # crash recovery first: the same settings over the window it collected
        data = collect(db_url, since, cfg.refine.holdout, until=saved.get("until"))
        try:
            method = plan_method(data, cfg)  # --method / refine.min_* choose the method, which is in the key
        except NotEnoughFeedback:
            continue
        key = run_key(live, live_sha, method, data, run_settings(cfg, method, opts))
        if key == saved.get("key"):
            return Run(reg, live, method, folder.name, folder, saved, key), data
    data = collect(db_url, since, cfg.refine.holdout)
    method = plan_method(data, cfg)
    key = run_key(live, live_sha, method, data, run_settings(cfg, method, opts))
    folder = reg.root / "refine" / run_name(live, method, key)
    saved = read_json(folder / "state.json") if (folder / "state.json").is_file() else {}
    if saved and saved.get("key") != key:  # a folder from an older gptsmith, or another run with the same prefix
        aside = folder.with_name(f"{folder.name}.other-{saved.get('key', 'nokey')[:12]}")
        folder.rename(aside)
        print(f"refine: {folder} held another run (its key differs); moved it to {aside}")
        saved = {}
    if not saved:
        for other, _ in unfinished:
            print(f"refine: unfinished run {other.name} had other settings, feedback or live weights; starting a "
                  f"new run (it stays as it is)")
    fresh = {"run": folder.name, "key": key, "live": live, "live_weights_sha256": live_sha, "method": method,
             "since": since, "until": data.until}
    return Run(reg, live, method, folder.name, folder, saved or fresh, key), data


def _unfinished(state: dict) -> bool:
    steps = state.get("steps", {})
    return "decide" not in steps and "key" in state


def print_plan(run: Run, data: Collected, cfg: ProjectConfig, opts: Options) -> None:
    print(f"refine plan ({run.run_id}), feedback from {data.since} through {data.until or 'now'}:")
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
        return {"run": run.run_id, "method": run.method, "counts": data.counts(), "dry_run": True,
                "since": data.since, "until": data.until}
    if run.done("collect") is None:
        run.folder.mkdir(parents=True, exist_ok=True)
        for f in FORMATS:
            atomic_write_text(run.folder / f"train-{f}.jsonl", jsonl(data.train[f]))
            atomic_write_text(run.folder / f"heldout-{f}.jsonl", jsonl(data.held[f]))
        run.finish("collect", {"since": data.since, "until": data.until, "counts": data.counts()})
    else:
        print(f"refine: resuming run {run.run_id} (finished: {', '.join(run.state['steps'])}); its feedback: "
              f"{data.since} through {data.until}")
    trained = run.done("train") or run.finish("train", train_candidate(run, cfg, opts))
    version = (run.done("add") or run.finish("add", {"version": add_candidate(run, trained)}))["version"]
    if run.done("evaluate") is None:
        verify_version(run, version, trained, "evaluate")
    evaluated = run.done("evaluate") or run.finish("evaluate", evaluate_run(run, version, data, cfg, opts))
    decision = run.done("decide") or run.finish("decide", decide(evaluated["checks"]))
    record = {"run": run.run_id, "live": run.live, "candidate": version, "method": run.method,
              "counts": data.counts(), "since": data.since, "until": data.until,
              "candidate_weights_sha256": trained["weights_sha256"], **evaluated, **decision, "promoted": False}
    if decision["verdict"] != "promote":
        if version in run.registry.read()["versions"]:
            run.registry.reject(version, run.run_id)
        else:  # a rerun after `models prune`: the verdict stands, there is nothing left to mark
            print(f"refine: run {run.run_id} rejected {version} before; it has been pruned since")
    elif cfg.refine.promote:
        if run.done("promote") is None:
            verify_version(run, version, trained, "promote")
            print(f"refine: {run.finish('promote', run.registry.promote(version))['message']}")
        else:
            print(f"refine: {promoted_status(run, version)}")
        record["promoted"] = True
    atomic_write_json(run.folder / "refine.json", record)
    print_decision(run, version, decision, evaluated["checks"])
    if decision["verdict"] == "promote" and not cfg.refine.promote:
        print(f"refine: --no-promote: make it live with `gptsmith models promote {version} --registry "
              f"{registry_dir}`")
    return record


def promoted_status(run: Run, version: str) -> str:
    """What registry.json says now about a version this run promoted earlier (a rollback may have come since)."""
    state = run.registry.read()
    live = state.get("live")
    status = (state["versions"].get(version) or {}).get("status", "pruned")
    if live == version:
        return f"run {run.run_id} promoted {version} before; {version} is live"
    return (f"run {run.run_id} promoted {version} before; registry.json now says {version} is {status} and {live} "
            f"is live (changed since by `gptsmith models`); nothing to do")
