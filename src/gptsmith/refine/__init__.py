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

from dataclasses import dataclass, field
from pathlib import Path

from gptsmith.config import ProjectConfig
from gptsmith.errors import InputError
from gptsmith.files import atomic_write_json, atomic_write_text, read_json
from gptsmith.refine.checks import (check, decide, evaluate_run, open_scorer, print_decision, resolve_suites,
                                    suite_checks)
from gptsmith.refine.data import (FORMATS, Collected, NotEnoughFeedback, collect, jsonl, plan_method,
                                  run_identity, split)

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
