"""refine's checks: candidate vs live on held-out preferences and corrections, the regression suites and an
optional judge; the decision from them."""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING

from gptsmith.config import ProjectConfig
from gptsmith.refine.data import Collected

if TYPE_CHECKING:
    from gptsmith.refine import Options, Run


def resolve_suites(cfg: ProjectConfig) -> list[str]:
    """The configured suites; a built-in one that this install does not have is left out with a printed note."""
    from gptsmith.eval.run import _builtin

    from gptsmith.errors import InputError

    def builtin(name: str):
        try:
            return _builtin(name)
        except InputError:  # the built-in module's own "no such suite"
            return None

    out = []
    for name in cfg.refine.suites:
        if Path(name).exists() or ":" in name or builtin(name) is not None:
            out.append(name)
        else:
            print(f"refine: note: the regression suite '{name}' is not available in this install "
                  "(gptsmith.eval.builtin has no such suite); running without it")
    return out


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
        print(f"refine: keeping {run.live} live; candidate {version} is rejected (`gptsmith models prune` "
              "deletes it)")
