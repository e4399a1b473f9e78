"""The result of one `gptsmith eval` run: the JSON file (see the plan's contract), its table, and the comparison
with a baseline result (per suite and metric: the difference over the items both runs scored, with a bootstrap
interval, marked when significant)."""

from __future__ import annotations

import datetime as dt
import math
from pathlib import Path

from gptsmith.errors import InputError
from gptsmith.eval import stats
from gptsmith.files import atomic_write_json, read_json

TEXT_METRICS = {"bpb", "ppl"}  # ratios over items, not means: their intervals resample (bits, bytes) pairs


def gptsmith_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("gptsmith")
    except PackageNotFoundError:
        return "dev"


def now_utc() -> str:
    return dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def make_result(target_info: dict, suites: list[dict], seed: int) -> dict:
    return {"kind": "eval", "format": 1, "created": now_utc(), "seed": seed, "gptsmith_version": gptsmith_version(),
            "target": target_info, "suites": suites}


def write_result(result: dict, out_dir: str | Path) -> Path:
    """OUT_DIR/eval-YYYYmmdd-HHMMSS.json (a -2, -3... suffix if a run of the same second is there), atomically."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%d-%H%M%S")
    path, n = out_dir / f"eval-{stamp}.json", 1
    while path.exists():
        n += 1
        path = out_dir / f"eval-{stamp}-{n}.json"
    atomic_write_json(path, result)
    return path


def read_result(path: str | Path) -> dict:
    path = Path(path)
    try:
        result = read_json(path)
    except FileNotFoundError:
        raise InputError(f"{path}: no such result file; give a JSON file written by `gptsmith eval`") from None
    except ValueError as e:
        raise InputError(f"{path}: not a `gptsmith eval` result file (not JSON: {e})") from None
    if not isinstance(result, dict) or result.get("kind") != "eval" or not isinstance(result.get("suites"), list):
        raise InputError(f'{path}: not a `gptsmith eval` result (no "kind": "eval" with "suites")')
    return result


# ---------------------------------------------------------------------------------------------- intervals

def _values(items: list[dict], metric: str) -> list[float] | None:
    vals = [it.get(metric) for it in items]
    return [float(v) for v in vals] if vals and all(isinstance(v, (int, float)) for v in vals) else None


def _has_text_items(items: list[dict]) -> bool:
    return bool(items) and all(all(k in it for k in ("nll_bits", "bytes", "tokens")) for it in items)


def metric_value(items: list[dict], metric: str) -> float | None:
    """The suite-level value of `metric` recomputed from `items` (a subset when comparing)."""
    if metric in TEXT_METRICS and _has_text_items(items):
        bits = sum(it["nll_bits"] for it in items)
        if metric == "bpb":
            return bits / max(sum(it["bytes"] for it in items), 1)
        return 2 ** (bits / max(sum(it["tokens"] for it in items), 1))
    vals = _values(items, metric)
    return sum(vals) / len(vals) if vals else None


def metric_ci(items: list[dict], metric: str, seed: int = 0) -> tuple[float, float] | None:
    """95% bootstrap interval of a suite metric over its items, or None when the items do not carry it."""
    if metric in TEXT_METRICS and _has_text_items(items):
        bits = [it["nll_bits"] for it in items]
        if metric == "bpb":
            return stats.ratio_ci(bits, [it["bytes"] for it in items], seed=seed)
        lo, hi = stats.ratio_ci(bits, [it["tokens"] for it in items], seed=seed)  # ppl = 2 ** (bits / token)
        return 2 ** lo, 2 ** hi
    vals = _values(items, metric)
    return stats.mean_ci(vals, seed=seed) if vals else None


def shown_metrics(suite: dict) -> list[str]:
    """The metrics a table shows for a suite: the primary first, counts (tokens, bytes) left out."""
    names = [m for m in suite.get("metrics", {}) if m not in ("tokens", "bytes")]
    primary = suite.get("primary")
    return ([primary] if primary in names else []) + [m for m in names if m != primary]


# ---------------------------------------------------------------------------------------------- comparison

def _paired(base_items: list[dict], new_items: list[dict], metric: str, seed: int):
    """(diff, lo, hi) of new - base over items already aligned by id."""
    if metric == "bpb" and _has_text_items(base_items) and _has_text_items(new_items):
        return stats.paired_ratio_diff_ci([b["nll_bits"] for b in base_items], [b["bytes"] for b in base_items],
                                          [n["nll_bits"] for n in new_items], [n["bytes"] for n in new_items],
                                          seed=seed)
    a, b = _values(base_items, metric), _values(new_items, metric)
    if a is None or b is None:
        return None
    return stats.paired_diff_ci(a, b, seed=seed)


def _compare_suite(suite: dict, base: dict, seed: int) -> list[dict]:
    base_by_id = {str(it["id"]): it for it in base.get("items", [])}
    new_items = [it for it in suite.get("items", []) if str(it["id"]) in base_by_id]
    base_items = [base_by_id[str(it["id"])] for it in new_items]
    notes = []
    if suite.get("version") != base.get("version"):
        notes.append(f"suite version changed ({base.get('version')} -> {suite.get('version')}): compared on the "
                     f"{len(new_items)} items both runs have")
    rows = []
    # ppl depends on each model's tokenizer (a baseline may have another): bpb is the text number to compare
    for metric in [m for m in shown_metrics(suite) if not (m == "ppl" and suite.get("kind") == "text")]:
        higher = suite.get("higher_is_better", {}).get(metric, True)
        row = {"suite": suite["name"], "metric": metric, "n": len(new_items), "base": None, "new": None,
               "diff": None, "lo": None, "hi": None, "significant": False, "better": None, "note": "; ".join(notes)}
        paired = _paired(base_items, new_items, metric, seed) if new_items else None
        if paired is None:
            row["note"] = row["note"] or ("no items in common" if not new_items else "not comparable item by item")
            rows.append(row)
            continue
        diff, lo, hi = paired
        sig = stats.significant(lo, hi)
        row.update(base=metric_value(base_items, metric), new=metric_value(new_items, metric), diff=diff, lo=lo,
                   hi=hi, significant=sig, better=((diff > 0) == higher) if sig else None)
        rows.append(row)
    return rows


def compare_to_baseline(result: dict, baseline: dict, seed: int = 0) -> list[dict]:
    """One row per (suite, metric): {"suite", "metric", "n", "base", "new", "diff" (new - base), "lo", "hi" (95%
    bootstrap interval of the difference, items paired by id), "significant" (the interval excludes 0), "better"
    (True/False when significant, by the metric's direction; None otherwise), "note"}. Suites are matched by name;
    one missing on either side is a row with "missing": "baseline" or "new" and no numbers."""
    base_by_name = {s["name"]: s for s in baseline.get("suites", [])}
    new_names = {s["name"] for s in result.get("suites", [])}
    rows = []
    for suite in result.get("suites", []):
        if suite["name"] not in base_by_name:
            rows.append({"suite": suite["name"], "metric": suite.get("primary"), "missing": "baseline",
                         "significant": False, "better": None, "note": "not in the baseline"})
            continue
        rows += _compare_suite(suite, base_by_name[suite["name"]], seed)
    for name, suite in base_by_name.items():
        if name not in new_names:
            rows.append({"suite": name, "metric": suite.get("primary"), "missing": "new", "significant": False,
                         "better": None, "note": "in the baseline, not in this run"})
    return rows


# ---------------------------------------------------------------------------------------------- tables

def _fmt(x) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    return f"{x:.4f}" if abs(x) < 1000 else f"{x:.1f}"


def results_table(result: dict, seed: int = 0):
    from rich.table import Table

    target = result.get("target", {})
    table = Table(title=f"eval of {target.get('kind', '')} {target.get('name', '')}".strip())
    for col, justify in (("suite", "left"), ("metric", "left"), ("value", "right"), ("95% CI", "right"),
                         ("chance", "right"), ("n", "right")):
        table.add_column(col, justify=justify, no_wrap=col != "suite")
    for suite in result["suites"]:
        items = suite.get("items", [])
        chance = suite.get("chance")  # multiple choice: what guessing scores (acc and acc_norm alike)
        for i, metric in enumerate(shown_metrics(suite)):
            ci = metric_ci(items, metric, seed)
            at_chance = ci is not None and chance is not None and ci[0] <= chance <= ci[1]
            table.add_row(suite["name"] if i == 0 else "", metric, _fmt(suite["metrics"][metric]),
                          f"[{_fmt(ci[0])}, {_fmt(ci[1])}]" if ci else "-",
                          _fmt(chance) + (" [yellow](in the CI)[/]" if at_chance else ""),
                          str(suite.get("n", len(items))))
    return table


def comparison_table(rows: list[dict], baseline_name: str = "baseline"):
    from rich.table import Table

    table = Table(title=f"new - baseline ({baseline_name}), items paired by id")
    for col, justify in (("suite", "left"), ("metric", "left"), ("baseline", "right"), ("new", "right"),
                         ("diff", "right"), ("95% CI", "right"), ("", "left")):
        table.add_column(col, justify=justify, no_wrap=col not in ("suite", ""))
    for r in rows:
        if r.get("missing"):
            table.add_row(r["suite"], r.get("metric") or "", "-", "-", "-", "-", f"[yellow]{r['note']}[/]")
            continue
        mark = ""
        if r["significant"]:
            mark = "[green]better *[/]" if r["better"] else "[red]worse *[/]"
        note = f" [dim]{r['note']}[/]" if r.get("note") else ""
        ci = f"[{_fmt(r['lo'])}, {_fmt(r['hi'])}]" if r["lo"] is not None else "-"
        diff = "-" if r["diff"] is None else f"{r['diff']:+.4f}"
        table.add_row(r["suite"], r["metric"], _fmt(r["base"]), _fmt(r["new"]), diff, ci, mark + note)
    return table


def print_result(result: dict, console=None) -> None:
    """The results table, and the comparison table when the result carries one (`--baseline`)."""
    from rich.console import Console

    console = console or Console()
    console.print(results_table(result, result.get("seed", 0)))
    if result.get("baseline"):
        console.print(comparison_table(result["baseline"]["comparison"], result["baseline"]["path"]))
        console.print("* the 95% interval of the difference excludes 0")
