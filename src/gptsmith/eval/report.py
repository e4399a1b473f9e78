"""The report card of a model directory: `gptsmith report DIR`, also written at the end of every training command.

    gptsmith report chat            # -> chat/report.md, chat/report.html, chat/report/*.png

What it shows, each part from the files that hold it (nothing is recomputed that a file already records):
  model        config.json (shape, context, dtype), the weights' safetensors headers (parameter count), the tokenizer;
               for a LoRA adapter, adapter_config.json and its base model
  data         the lineage (gptsmith_lineage.json) of this model and of each parent it names, back to the data:
               the prepare manifest (documents, tokens, split, sources with hashes) or the SFT data file and hash
  compression  bytes per token: the manifest's figure, else measured on a sample of the validation text
  training     metrics.jsonl (loss and learning-rate curves), validation bits-per-byte before and after
  evals        every MODEL/eval/*.json written by `gptsmith eval` (kind "eval") or `gptsmith compare` ("compare")
  samples      a few short greedy generations through gptsmith.engine.Engine

Markdown (GitHub renders it; the plots are PNG files in MODEL/report/) and one self-contained HTML page (the plots
embedded as data: URIs, inline CSS, no external URL, every string from a file HTML-escaped by Jinja2). A part that
cannot be read (a corrupt JSON file, a parent model that was deleted) becomes a note in the report, never an error.
"""

from __future__ import annotations

import base64
import io
import json
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gptsmith.files import atomic_write_bytes, atomic_write_text, sha256_file

REPORT_MD = "report.md"
REPORT_HTML = "report.html"
PLOTS_DIR = "report"  # beside report.md: the PNGs the Markdown links to
PLOT_FILES = {"loss.png", "lr.png", "eval.png"}
MAX_LINEAGE_DEPTH = 12  # a lineage loop (a model dir re-used as its own ancestor) must not loop forever
MAX_SOURCES_SHOWN = 20
HASH_CHECK_MAX_BYTES = 256 << 20  # re-hash data files up to this size to tell whether they changed since training
COMPRESSION_SAMPLE_BYTES = 200_000
CHAT_PROMPTS = ("Hello! What can you do?", "What is Python?", "Give me one tip for writing clear code.")
TEXT_PROMPTS = ("The", "def ", "In Python,")


@dataclass
class Report:
    """Everything the templates show; plain values only, so both renderings read the same numbers."""

    model_dir: Path
    name: str
    created: str
    model: dict = field(default_factory=dict)
    chain: list[dict] = field(default_factory=list)
    compression: dict = field(default_factory=dict)
    training: dict = field(default_factory=dict)
    plots: list[dict] = field(default_factory=list)  # {"title", "file" (relative to the .md), "png" (bytes)}
    evals: list[dict] = field(default_factory=list)
    compares: list[dict] = field(default_factory=list)
    samples: list[dict] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


# ---------------------------------------------------------------------------------------------- reading files

def _read_json(path: Path, notes: list[str], what: str) -> Any:
    """A JSON file's content, or None with a note naming the file and the problem."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except OSError as e:
        notes.append(f"{what} {path}: cannot be read ({e.strerror or e})")
    except ValueError as e:
        notes.append(f"{what} {path}: not valid JSON ({e}); left out")
    return None


def _read_object(path: Path, notes: list[str], what: str) -> dict:
    """A JSON file that must hold an object: its content, or {} with a note."""
    found = _read_json(path, notes, what)
    if not isinstance(found, dict):
        if found is not None:
            notes.append(f"{what} {path}: not a JSON object; left out")
        return {}
    return found


def _lineage(model_dir: Path, notes: list[str]) -> dict:
    # gptsmith.model imports torch and transformers (seconds): a report of a directory that is not there, or a
    # card without samples, must not wait for them
    from gptsmith.model import LINEAGE_FILENAME

    path = model_dir / LINEAGE_FILENAME
    return _read_object(path, notes, "lineage") if path.is_file() else {}


def _safetensors_params(files: list[Path], notes: list[str]) -> int | None:
    """Parameters stored in these files, from their headers (no weights are loaded). A tied output matrix is stored
    once, so this is the count of distinct parameters."""
    from safetensors import safe_open

    total = 0
    for f in files:
        try:
            with safe_open(str(f), framework="numpy") as st:
                for key in st.keys():
                    total += math.prod(st.get_slice(key).get_shape())
        except Exception as e:  # a truncated or foreign file: the count is unknown, the report goes on
            notes.append(f"weights {f}: cannot read the safetensors header ({e})")
            return None
    return total if files else None


def _sorted_names(v):
    return sorted(map(str, v)) if isinstance(v, list) else v


def model_summary(model_dir: Path, notes: list[str]) -> dict:
    """Shape, size and tokenizer of a model directory, or of a LoRA adapter directory and its base."""
    info: dict[str, Any] = {"kind": "model"}
    adapter = model_dir / "adapter_config.json"
    if adapter.is_file():
        cfg = _read_object(adapter, notes, "adapter config")
        info.update(kind="LoRA adapter", peft_type=cfg.get("peft_type"), lora_r=cfg.get("r"),
                    lora_alpha=cfg.get("lora_alpha"), target_modules=_sorted_names(cfg.get("target_modules")),
                    base_model=cfg.get("base_model_name_or_path"),
                    adapter_params=_safetensors_params(sorted(model_dir.glob("adapter_model*.safetensors")), notes))
        base = info["base_model"]
        if base and Path(base).is_dir():
            info["base"] = model_summary(Path(base), notes)
        elif base:
            notes.append(f"base model {base} of the adapter is not a local directory: its shape is not shown")
    config_path = model_dir / "config.json"
    if config_path.is_file():
        cfg = _read_object(config_path, notes, "model config")
        text = cfg.get("text_config") if isinstance(cfg.get("text_config"), dict) else cfg
        pick = lambda *keys: next((text[k] for k in keys if text.get(k) is not None), None)  # noqa: E731
        info.update(
            architecture=", ".join(cfg.get("architectures") or []) or cfg.get("model_type"),
            model_type=cfg.get("model_type"),
            layers=pick("num_hidden_layers", "n_layer"), d_model=pick("hidden_size", "n_embd", "d_model"),
            heads=pick("num_attention_heads", "n_head"), kv_heads=pick("num_key_value_heads"),
            d_ff=pick("intermediate_size", "n_inner"), context=pick("max_position_embeddings", "n_positions"),
            dtype=cfg.get("dtype") or cfg.get("torch_dtype"), vocab_size=pick("vocab_size"),
            tied_embeddings=cfg.get("tie_word_embeddings"),
            params=_safetensors_params(sorted(p for p in model_dir.glob("*.safetensors")
                                              if not p.name.startswith("adapter_")), notes))
    elif info["kind"] == "model":
        notes.append(f"{model_dir}: no config.json, so this is not a model directory; only its files are reported")
    info.update(_tokenizer_summary(model_dir, notes))
    return info


def _tokenizer_summary(model_dir: Path, notes: list[str]) -> dict:
    if not any((model_dir / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json")):
        return {}
    try:
        from transformers import AutoTokenizer
        tok = AutoTokenizer.from_pretrained(str(model_dir))
    except Exception as e:  # a broken tokenizer must not stop the rest of the report
        notes.append(f"tokenizer in {model_dir}: cannot be loaded ({e})")
        return {}
    return {"tokenizer_vocab": len(tok), "chat_template": bool(getattr(tok, "chat_template", None))}


# ---------------------------------------------------------------------------------------------- lineage and data

def _is_path(ref: str) -> bool:
    """A parent written as a filesystem path (absolute, ./, ../ or ~: sft records local models resolved); a
    relative owner/name that is not here may be a hub id as well as a moved directory."""
    return Path(ref).is_absolute() or ref.startswith((".", "~"))


def _parents(lineage: dict) -> list[str]:
    """The models this one was made from, nearest first: a merged model's adapter, then the base it names."""
    refs = [lineage.get("adapter")] if lineage.get("stage") == "merge-lora" else []
    refs.append(lineage.get("parent_model") or lineage.get("base"))
    return [str(r) for r in refs if r]


def lineage_chain(model_dir: Path, notes: list[str]) -> list[dict]:
    """This model, its parent, the parent's parent ...: each with its stage, status and data, nearest first.
    A parent path that no longer exists ends the chain with status "missing" (and a note); a parent that is not a
    local directory (a hub id) ends it too, as nothing local records its data."""
    chain: list[dict] = []
    seen: set[str] = set()
    current: Path | None = model_dir.resolve()
    status = "this model"
    while current is not None and len(chain) < MAX_LINEAGE_DEPTH:
        key = str(current.resolve())
        if key in seen:
            notes.append(f"lineage loops back to {current}; stopped there")
            break
        seen.add(key)
        lineage = _lineage(current, notes)
        entry = {"ref": str(current), "status": status if lineage or status == "this model"
                 else "found, without a lineage file",
                 "stage": lineage.get("stage"), "data": data_summary(lineage, notes) if lineage else None}
        chain.append(entry)
        current = None
        for ref in _parents(lineage):
            if Path(ref).expanduser().is_dir():
                current, status = Path(ref).expanduser(), "found"
                break
            missing = _is_path(ref)
            chain.append({"ref": ref, "status": "missing" if missing else "not a local directory (a hub id?)",
                          "stage": None, "data": None})
            if missing:
                notes.append(f"parent model {ref} no longer exists, so its lineage (and the data it was trained on) "
                             f"cannot be shown")
    return chain


def _file_state(path: str | None, recorded_sha: str | None) -> str:
    """Whether a data file recorded in a lineage is still there, unchanged."""
    if not path:
        return "not recorded"
    p = Path(path)
    if not p.is_file():
        return "missing"
    if not recorded_sha:
        return "present (no hash recorded)"
    if p.stat().st_size > HASH_CHECK_MAX_BYTES:
        return "present (too large to re-hash here)"
    return "unchanged" if sha256_file(p) == recorded_sha else "changed since training"


def data_summary(lineage: dict, notes: list[str]) -> dict | None:
    """What a stage trained on, from its lineage: a prepare WORKDIR's manifest (pretrain) or a conversation file."""
    data = lineage.get("data")
    if not isinstance(data, dict):
        return None
    if data.get("manifest") or data.get("workdir"):
        out = {"kind": "tokens", "workdir": data.get("workdir"), "manifest": data.get("manifest"), "splits": [],
               "sources": [], "sources_more": 0, "bytes_per_token": None,
               "sha256": data.get("manifest_sha256"), "state": _file_state(data.get("manifest"),
                                                                           data.get("manifest_sha256"))}
        if out["state"] in ("unchanged", "present (no hash recorded)", "changed since training"):
            manifest = _read_json(Path(data["manifest"]), notes, "data manifest")
            if isinstance(manifest, dict):
                out.update(_manifest_summary(manifest))
        return out
    metrics = lineage.get("metrics") if isinstance(lineage.get("metrics"), dict) else {}
    return {"kind": "conversations", "path": data.get("path"), "sha256": data.get("sha256"),
            "package": data.get("package"), "format": lineage.get("data_format"),
            "state": "built in" if data.get("package") else _file_state(data.get("path"), data.get("sha256")),
            "train_conversations": metrics.get("train_conversations"),
            "val_conversations": metrics.get("val_conversations"), "skipped": metrics.get("skipped")}


def _manifest_summary(m: dict) -> dict:
    from gptsmith.data.shards import corpus_counts

    counts = corpus_counts(m)  # the numbers `gptsmith prepare` printed, by the same rule
    rows = [{"split": name, **c} for name, c in counts["splits"].items()]
    sources = [s for s in m.get("sources") or [] if isinstance(s, dict)]
    return {"splits": rows, "documents_read": counts["read"], "documents_kept": counts["kept"],
            "vocab_size": m.get("vocab_size"), "bytes_per_token": m.get("bytes_per_token"),
            "dropped": m.get("dropped"), "skipped": m.get("skipped"),
            "sources": sources[:MAX_SOURCES_SHOWN], "sources_more": max(0, len(sources) - MAX_SOURCES_SHOWN)}


def compression(model_dir: Path, chain: list[dict], notes: list[str]) -> dict:
    """Bytes per token of the model's tokenizer: the manifest of the data it was pretrained on (same tokenizer),
    else measured on up to COMPRESSION_SAMPLE_BYTES of that data's validation text when it is still there."""
    for entry in chain:
        d = entry.get("data") or {}
        if d.get("kind") == "tokens" and isinstance(d.get("bytes_per_token"), (int, float)):
            return {"bytes_per_token": d["bytes_per_token"], "source": f"data manifest {d['manifest']}"}
    texts, where = [], None
    for entry in chain:
        d = entry.get("data") or {}
        if d.get("kind") == "tokens" and d.get("workdir"):
            where = Path(d["workdir"]) / "clean" / "val.jsonl"
            texts = _sample_jsonl(where, lambda r: [r.get("text")])
        elif d.get("kind") == "conversations" and d.get("path") and d.get("state") != "missing":
            where = Path(d["path"])
            texts = _sample_jsonl(where, lambda r: [m.get("content") for m in r.get("messages") or []
                                                    if isinstance(m, dict)])
        if texts:
            break
    if not texts:
        return {"bytes_per_token": None, "source": "not recorded, and no validation text is reachable to measure it"}
    try:
        from transformers import AutoTokenizer

        from gptsmith.tokenizer import bytes_per_token
        tok = AutoTokenizer.from_pretrained(str(model_dir))
        return {"bytes_per_token": bytes_per_token(tok, texts),
                "source": f"measured now on {sum(len(t.encode()) for t in texts):,} bytes of {where}"}
    except Exception as e:
        notes.append(f"compression: cannot measure it on {where} ({e})")
        return {"bytes_per_token": None, "source": "not measurable"}


def _sample_jsonl(path: Path, texts_of) -> list[str]:
    """The first COMPRESSION_SAMPLE_BYTES of text in a JSONL file; lines that are not the expected JSON are skipped."""
    out, size = [], 0
    if not path.is_file():
        return out
    with open(path, "rb") as f:
        for line in f:
            try:
                record = json.loads(line)
                found = [t for t in texts_of(record) if isinstance(t, str) and t]
            except (ValueError, AttributeError):
                continue
            out += found
            size += sum(len(t.encode("utf-8")) for t in found)
            if size >= COMPRESSION_SAMPLE_BYTES:
                break
    return out


# ---------------------------------------------------------------------------------------------- training curves

def training_records(model_dir: Path, notes: list[str]) -> list[dict]:
    """metrics.jsonl (every gptsmith trainer writes it), else the Trainer's log history in the newest checkpoint."""
    path = model_dir / "metrics.jsonl"
    records: list[dict] = []
    if path.is_file():
        bad = 0
        for line in path.read_text(encoding="utf-8", errors="replace").split("\n"):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except ValueError:
                bad += 1
                continue
            if isinstance(rec, dict) and isinstance(rec.get("step"), (int, float)):
                records.append(_named(rec))
        if bad:
            notes.append(f"{path}: {bad} line(s) are not JSON and were left out of the curves")
        return records
    states = sorted(model_dir.glob("checkpoints/checkpoint-*/trainer_state.json"),
                    key=lambda p: int(p.parent.name.rsplit("-", 1)[-1]) if p.parent.name.rsplit("-", 1)[-1].isdigit()
                    else -1)
    if states:
        state = _read_object(states[-1], notes, "trainer state")
        return history_records(state.get("log_history") or [])
    return records


TRAINER_NAMES = {"loss": "train/loss", "learning_rate": "train/lr", "eval_loss": "val/loss"}


def _named(rec: dict) -> dict:
    """A record in pretrain's names (train/loss, train/lr, val/loss): the TRL trainers (sft, dpo, kto, ...) write
    the Trainer's own log records, whose names are loss, learning_rate, eval_loss."""
    return {TRAINER_NAMES.get(k, k): v for k, v in rec.items()}


def history_records(log_history: list[dict]) -> list[dict]:
    """A transformers Trainer's log history in metrics.jsonl's names (train/loss, train/lr, val/loss)."""
    out = []
    for h in log_history:
        rec = {TRAINER_NAMES[k]: v for k, v in h.items() if k in TRAINER_NAMES and isinstance(v, (int, float))}
        if rec and isinstance(h.get("step"), int):
            out.append({"step": h["step"], **rec})
    return out


def _series(records: list[dict], key: str) -> list[tuple[float, float]]:
    return [(r["step"], r[key]) for r in records
            if isinstance(r.get(key), (int, float)) and not isinstance(r.get(key), bool) and math.isfinite(r[key])]


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    import matplotlib.pyplot as plt
    plt.close(fig)
    return buf.getvalue()


def _pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def validation_points(records: list[dict], metrics: dict) -> list[tuple[float, float]]:
    """Validation loss per step: what the trainer logged (val/loss, the Trainer's eval_loss), plus the lineage's
    before-training and final figures where the log has no point at those steps. A time-boxed sft run can end
    before its first periodic evaluation; its validation loss before and after training is still measured and
    recorded, and belongs on the plot."""
    val = dict(_series(records, "val/loss"))
    last = metrics.get("step", metrics.get("steps"))
    for step, key in ((0, "val_loss_before"), (last, "val_loss")):
        v = metrics.get(key)
        if _num(step) and _num(v) and math.isfinite(v) and step not in val:
            val[step] = v
    return sorted(val.items())


def curve_plots(records: list[dict], plot_dir: Path, stage: str | None = None,
                metrics: dict | None = None) -> list[dict]:
    """loss.png (train as a line, validation as markers, drawn by the trainers' own save_loss_plot) and lr.png
    when the LR was logged. `metrics`: the lineage's, for the validation loss before and after training."""
    from gptsmith.train.common import save_loss_plot

    plots = []
    train, val = _series(records, "train/loss"), validation_points(records, metrics or {})
    if train or val:
        unit = "nats / token" if stage in (None, "pretrain") else "nats / assistant token"  # sft: answers only
        save_loss_plot(plot_dir / "loss.png", train=train, val=val, ylabel=f"loss ({unit})", title=stage)
        title = ("Loss (train and validation)" if train and val else "Loss (train; no validation loss recorded)"
                 if train else "Loss (validation)")
        plots.append({"title": title, "file": "loss.png"})
    lr = _series(records, "train/lr")
    if lr:
        plt = _pyplot()
        fig, ax = plt.subplots(figsize=(7, 3))
        ax.plot(*zip(*lr), linewidth=1)
        ax.set_xlabel("step")
        ax.set_ylabel("learning rate")
        ax.grid(alpha=0.3)
        fig.tight_layout()
        atomic_write_bytes(plot_dir / "lr.png", _png(fig))
        plots.append({"title": "Learning rate", "file": "lr.png"})
    return plots


def training_summary(lineage: dict) -> dict:
    m = lineage.get("metrics") if isinstance(lineage.get("metrics"), dict) else {}
    keys = ("step", "steps", "steps_planned_at_start", "steps_planned", "steps_at_best_speed", "tokens_seen",
            "train_loss", "val_loss_before", "val_loss", "val_bpb_before", "val_bpb", "tokens_per_s", "mfu",
            "stop_reason", "train_seconds", "trainable_params", "total_params", "verdict")
    out = {k: m[k] for k in keys if m.get(k) is not None}
    if lineage.get("stage"):
        out = {"stage": lineage["stage"], **({"mode": lineage["mode"]} if lineage.get("mode") else {}), **out}
    return out


# ---------------------------------------------------------------------------------------------- eval results

def _num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _target_name(t) -> str:
    if isinstance(t, dict):
        return str(t.get("name") or t.get("ref") or "?")
    return "?"


def _same_model(target, model_dir: Path) -> bool:
    if not isinstance(target, dict) or not target.get("ref"):
        return False
    try:
        return Path(str(target["ref"])).resolve() == model_dir.resolve()
    except (OSError, ValueError):
        return False


def _interval(s: dict, metric: str, seed) -> list[float] | None:
    """The 95% interval `gptsmith eval` prints for a suite metric: recomputed from the result's items by the same
    function (eval.results.metric_ci, same seed), else one the result stores, else None."""
    from gptsmith.eval.results import metric_ci

    items = s.get("items")
    if isinstance(items, list) and items and all(isinstance(it, dict) for it in items):
        ci = metric_ci(items, metric, seed if isinstance(seed, int) else 0)
        if ci is not None:
            return [float(ci[0]), float(ci[1])]
    stored = (s.get("ci") or {}).get(metric) if isinstance(s.get("ci"), dict) else None
    return [float(stored[0]), float(stored[1])] if isinstance(stored, list) and len(stored) == 2 and all(
        _num(c) for c in stored) else None


def _eval_entry(path: Path, r: dict, notes: list[str]) -> dict | None:
    suites = r.get("suites")
    if not isinstance(suites, list):
        notes.append(f"{path}: an eval result without a 'suites' list; left out")
        return None
    rows = []
    for s in suites:
        if not isinstance(s, dict):
            continue
        metrics = s.get("metrics") if isinstance(s.get("metrics"), dict) else {}
        primary = s.get("primary") if isinstance(s.get("primary"), str) and s["primary"] in metrics \
            else next(iter(metrics), None)
        hib = s.get("higher_is_better") if isinstance(s.get("higher_is_better"), dict) else {}
        ci = _interval(s, primary, r.get("seed")) if primary else None
        # chance: what guessing scores (multiple choice: the mean of 1/choices over the items); None where no
        # guess has a known score (generation, text)
        chance = s.get("chance") if _num(s.get("chance")) else None
        rows.append({"suite": str(s.get("name", "?")), "kind": s.get("kind"), "primary": primary,
                     "value": metrics.get(primary) if primary else None, "n": s.get("n"), "k_shot": s.get("k_shot"),
                     "higher_is_better": hib.get(primary), "ci": ci, "chance": chance,
                     "at_chance": bool(ci and chance is not None and ci[0] <= chance <= ci[1]),
                     "others": {k: {"value": v, "ci": _interval(s, k, r.get("seed"))} for k, v in metrics.items()
                                if k != primary and k not in ("tokens", "bytes") and _num(v)}})
    return {"file": path.name, "created": str(r.get("created") or ""), "target": _target_name(r.get("target")),
            "seed": r.get("seed"), "rows": rows, "any_at_chance": any(row["at_chance"] for row in rows)}


def _compare_entry(path: Path, r: dict, model_dir: Path, notes: list[str]) -> dict | None:
    """A compare result seen from this model's side: when it is B, its wins are B's and its win rate 1 - A's."""
    needed = ("wins_a", "ties", "wins_b", "win_rate_a")
    if not all(_num(r.get(k)) for k in needed):
        notes.append(f"{path}: a compare result without the numbers {', '.join(needed)}; left out")
        return None
    is_b = _same_model(r.get("b"), model_dir) and not _same_model(r.get("a"), model_dir)
    flip = (lambda x: 1 - x) if is_b else (lambda x: x)

    def rate(win_rate, ci) -> dict:
        ci = ci if isinstance(ci, list) and len(ci) == 2 and all(_num(c) for c in ci) else None
        lo_hi = sorted(flip(c) for c in ci) if ci else None
        return {"win_rate": flip(win_rate), "ci": lo_hi}

    lc = r.get("length_controlled") if isinstance(r.get("length_controlled"), dict) else {}
    return {"file": path.name, "created": str(r.get("created") or ""),
            "this": _target_name(r.get("b") if is_b else r.get("a")),
            "other": _target_name(r.get("a") if is_b else r.get("b")),
            "judge": _target_name(r.get("judge")), "n": r.get("n"),
            "wins": r["wins_b"] if is_b else r["wins_a"], "ties": r["ties"],
            "losses": r["wins_a"] if is_b else r["wins_b"],
            **rate(r["win_rate_a"], r.get("ci")),
            "lc": rate(lc["win_rate_a"], lc.get("ci")) if _num(lc.get("win_rate_a")) else None,
            "lc_method": lc.get("method")}


def eval_results(model_dir: Path, notes: list[str]) -> tuple[list[dict], list[dict]]:
    """(eval runs, comparisons) from MODEL/eval/*.json, oldest first; anything else there becomes a note."""
    evals, compares = [], []
    folder = model_dir / "eval"
    for path in sorted(folder.glob("*.json")) if folder.is_dir() else []:
        r = _read_json(path, notes, "eval result")
        if r is None:
            continue
        if not isinstance(r, dict) or r.get("kind") not in ("eval", "compare"):
            kind = r.get("kind") if isinstance(r, dict) else type(r).__name__
            notes.append(f"{path}: not an eval or compare result (kind {kind!r}); left out")
            continue
        if r.get("format") != 1:
            notes.append(f"{path}: result format {r.get('format')!r} is not one this gptsmith reads (1); left out")
            continue
        entry = _part(notes, str(path), lambda: _eval_entry(path, r, notes) if r["kind"] == "eval"
                      else _compare_entry(path, r, model_dir, notes), None)
        if entry:
            (evals if r["kind"] == "eval" else compares).append(entry)
    evals.sort(key=lambda e: (e["created"], e["file"]))
    compares.sort(key=lambda e: (e["created"], e["file"]))
    return evals, compares


def eval_bar_plot(run: dict, plot_dir: Path) -> dict | None:
    """Bars of the latest eval run's primary metric per suite."""
    rows = [r for r in run["rows"] if _num(r["value"]) and math.isfinite(r["value"])]
    if not rows:
        return None
    plt = _pyplot()
    labels = [f"{r['suite']} ({r['primary']})" for r in rows]
    fig, ax = plt.subplots(figsize=(7, 0.5 * len(rows) + 1.2))
    bars = ax.barh(range(len(rows)), [r["value"] for r in rows], color="#4c72b0",
                   xerr=[[max(0.0, r["value"] - r["ci"][0]) if r.get("ci") else 0 for r in rows],
                         [max(0.0, r["ci"][1] - r["value"]) if r.get("ci") else 0 for r in rows]], capsize=3)
    for i, r in enumerate(rows):  # guessing's score: a bar whose interval reaches it shows nothing learned
        if r.get("chance") is not None:
            ax.plot([r["chance"]] * 2, [i - 0.4, i + 0.4], color="#c44e52", linestyle="--", linewidth=1.5,
                    label="chance" if i == min(j for j, x in enumerate(rows) if x.get("chance") is not None) else None)
    if any(r.get("chance") is not None for r in rows):
        ax.legend(loc="lower right")
    ax.set_yticks(range(len(rows)), labels)
    ax.bar_label(bars, labels=[_fmt(r["value"]) for r in rows], padding=3)
    ax.invert_yaxis()
    ax.set_title(f"latest eval: {run['file']}")
    ax.margins(x=0.2)
    fig.tight_layout()
    atomic_write_bytes(plot_dir / "eval.png", _png(fig))
    return {"title": f"Latest eval ({run['file']})", "file": "eval.png"}


# ---------------------------------------------------------------------------------------------- samples

def _engine(model_dir: Path, device: str):
    from gptsmith.engine import Engine
    return Engine.load(model_dir, device=device)


def _adapter_engine(adapter_dir: Path, device: str):
    """An Engine on a LoRA adapter merged into its base in memory (what `gptsmith merge-lora` would save)."""
    import torch
    from peft import PeftConfig, PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from gptsmith.device import select_device
    from gptsmith.engine import Engine
    from gptsmith.engine.params import read_generation_config

    base = PeftConfig.from_pretrained(str(adapter_dir)).base_model_name_or_path
    if not base or not Path(base).is_dir():
        raise FileNotFoundError(f"the adapter's base model {base} is not a local directory")
    dev = select_device(device)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    model = PeftModel.from_pretrained(model, str(adapter_dir)).merge_and_unload().to(dev).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(adapter_dir))
    defaults, eos = read_generation_config(base)
    return Engine(model, tokenizer, dev, set(eos), defaults)


def generate_samples(model_dir: Path, n: int, device: str, max_new_tokens: int, notes: list[str],
                     chat: bool, engine=None) -> list[dict]:
    """n short greedy generations: chat prompts through the chat template for a chat model, text continuations
    (a new document: the separator, then the prompt) for a base model. `engine`: the model already loaded (eval
    re-writing the card of the model it just scored), else it is loaded here."""
    from gptsmith.engine import SamplingParams

    if n <= 0:
        return []
    try:
        if engine is None:
            engine = _adapter_engine(model_dir, device) if (model_dir / "adapter_config.json").is_file() \
                else _engine(model_dir, device)
    except Exception as e:
        notes.append(f"samples: the model cannot be loaded ({e})")
        return []
    params = engine.resolve(SamplingParams(max_new_tokens=max_new_tokens, temperature=0.0, seed=0))
    prompts = list(CHAT_PROMPTS if chat else TEXT_PROMPTS)[:n]
    try:
        if chat:
            ids = [engine.encode_chat([{"role": "user", "content": p}], max_new_tokens) for p in prompts]
        else:
            sep = engine.tokenizer.bos_token_id if engine.tokenizer.bos_token_id is not None \
                else engine.tokenizer.eos_token_id
            ids = [([sep] if sep is not None else []) + engine.encode(p) for p in prompts]
        outs = engine.generate(ids, params)
    except Exception as e:
        notes.append(f"samples: generation failed ({e})")
        return []
    return [{"prompt": p, "output": o.text, "finish_reason": o.finish_reason, "chat": chat}
            for p, o in zip(prompts, outs)]


# ---------------------------------------------------------------------------------------------- building

def _part(notes: list[str], name: str, build, default):
    """One part of the report, or `default` and a note: a hand-edited or foreign file of an unexpected shape
    costs that part only, never the report (the files' own problems are noted more precisely inside)."""
    try:
        return build()
    except Exception as e:
        notes.append(f"{name}: left out ({type(e).__name__}: {e})")
        return default


def build_report(model_dir: str | os.PathLike, plot_dir: Path, samples: int = 3, device: str = "auto",
                 max_new_tokens: int = 32, engine=None) -> Report:
    """Read everything the report shows; PNGs are written into plot_dir."""
    model_dir = Path(model_dir)
    rep = Report(model_dir=model_dir.resolve(), name=model_dir.resolve().name,
                 created=time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()))
    notes = rep.notes
    rep.model = _part(notes, "model", lambda: model_summary(model_dir, notes), {"kind": "model"})
    rep.chain = _part(notes, "lineage", lambda: lineage_chain(model_dir, notes), [])
    rep.compression = _part(notes, "tokenizer compression", lambda: compression(model_dir, rep.chain, notes),
                            {"bytes_per_token": None, "source": "not measurable"})
    rep.training = _part(notes, "training metrics", lambda: training_summary(_lineage(model_dir, [])), {})
    records = _part(notes, "metrics.jsonl", lambda: training_records(model_dir, notes), [])
    lineage_metrics = _lineage(model_dir, []).get("metrics")
    rep.plots = curve_plots(records, plot_dir, rep.training.get("stage"),
                            lineage_metrics if isinstance(lineage_metrics, dict) else {})
    rep.evals, rep.compares = eval_results(model_dir, notes)
    if rep.evals:
        bar = eval_bar_plot(rep.evals[-1], plot_dir)
        if bar:
            rep.plots.append(bar)
    for name in PLOT_FILES - {p["file"] for p in rep.plots}:  # an earlier report's plot of what is gone now
        (plot_dir / name).unlink(missing_ok=True)
    for p in rep.plots:
        p["png"] = (plot_dir / p["file"]).read_bytes()
    # a pretrained model carries the tokenizer's chat template but was never taught to chat: it continues text
    chat = bool(rep.model.get("chat_template")) and rep.training.get("stage") != "pretrain"
    rep.samples = generate_samples(model_dir, samples, device, max_new_tokens, notes, chat, engine)
    return rep


def write_report(model_dir: str | os.PathLike, out_dir: str | os.PathLike | None = None, samples: int = 3,
                 device: str = "auto", max_new_tokens: int = 32, engine=None) -> tuple[Path, Path]:
    """Write OUT/report.md (its plots in OUT/report/*.png) and the self-contained OUT/report.html; OUT defaults to
    the model directory. `engine`: the model already loaded, for the samples. Returns (md_path, html_path)."""
    from gptsmith.errors import InputError

    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise InputError(f"{model_dir}: no such model directory; give a directory written by `gptsmith pretrain`, "
                         "`gptsmith sft` or `gptsmith merge-lora`")
    out = Path(out_dir) if out_dir else model_dir
    rep = build_report(model_dir, out / PLOTS_DIR, samples=samples, device=device, max_new_tokens=max_new_tokens,
                       engine=engine)
    md_path, html_path = out / REPORT_MD, out / REPORT_HTML
    atomic_write_text(md_path, render_markdown(rep))
    atomic_write_text(html_path, render_html(rep))
    return md_path, html_path


def report_after_training(model_dir: str | os.PathLike, device: str = "auto", samples: int = 2,
                          engine=None) -> None:
    """What the training commands call at their end, and `gptsmith eval` after scoring a local model: the report
    card, or a warning; the model (or the eval result) is saved already and a report that fails (a plotting
    backend missing, a full disk) must never make the run fail."""
    try:
        md, html = write_report(model_dir, samples=samples, device=device, engine=engine)
        print(f"report card: {md} and {html}", file=sys.stderr)
    except Exception as e:
        print(f"warning: the report card of {model_dir} could not be written ({type(e).__name__}: {e}); the model "
              f"is saved. Write it later with `gptsmith report {model_dir}`", file=sys.stderr)


# ---------------------------------------------------------------------------------------------- rendering

def _fmt(v) -> str:
    """Numbers the way the tables show them: integers with thousands separators, floats with 4 decimals."""
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, int):
        return f"{v:,}"
    if isinstance(v, float):
        if not math.isfinite(v):
            return str(v)
        return f"{v:,.1f}" if abs(v) >= 10_000 else f"{v:.4f}"
    if v is None:
        return "-"
    if isinstance(v, (list, tuple)):
        return ", ".join(_fmt(x) for x in v)
    return str(v)


def _pct(v) -> str:
    return f"{100 * v:.1f}%" if _num(v) else "-"


def _ci(ci) -> str:
    return f"[{_pct(ci[0])}, {_pct(ci[1])}]" if ci else "-"


def _interval_text(ci) -> str:
    """[lo, hi] with the digits `gptsmith eval` prints (results_table); "-" when there is none."""
    return f"[{_fmt(ci[0])}, {_fmt(ci[1])}]" if ci else "-"


def _md_text(v) -> str:
    """A value in Markdown text or a table cell: no HTML (GitHub would render tags), no markup, no table-breaking
    | or newline."""
    s = _fmt(v) if not isinstance(v, str) else v
    s = s.replace("\\", "\\\\").replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
    for ch in "|`*_[]#":
        s = s.replace(ch, "\\" + ch)
    return " ".join(s.split())


def _md_span(v) -> str:
    """A value as inline code (paths, hashes): shown literally, so only backticks, | and newlines need care."""
    s = " ".join((_fmt(v) if not isinstance(v, str) else v).split()).replace("`", "'").replace("|", "\\|")
    return f"`{s}`"


def _md_code(text: str) -> str:
    """A fenced code block that the text itself cannot close: the fence is longer than any run of backticks in it."""
    longest, run = 0, 0
    for ch in text:
        run = run + 1 if ch == "`" else 0
        longest = max(longest, run)
    fence = "`" * max(3, longest + 1)
    return f"{fence}text\n{text}\n{fence}"


def _env(autoescape: bool):
    from jinja2 import Environment, PackageLoader

    # templates/report.{md,html}.j2. The default Undefined: a field an older or foreign file lacks renders empty
    # instead of failing the report
    env = Environment(loader=PackageLoader("gptsmith.eval", "templates"), autoescape=autoescape, trim_blocks=True,
                      lstrip_blocks=True, keep_trailing_newline=True)
    env.filters.update(fmt=_fmt, pct=_pct, ci=_ci, interval=_interval_text, md=_md_text, mdspan=_md_span,
                       mdcode=_md_code, b64=lambda b: base64.b64encode(b).decode("ascii"))
    return env


def _context(rep: Report) -> dict:
    return {"r": rep, "m": rep.model, "t": rep.training, "plot_dir": PLOTS_DIR,
            "shape_keys": [("architecture", "architecture"), ("layers", "layers"), ("d_model", "width (d_model)"),
                           ("heads", "attention heads"), ("kv_heads", "key/value heads"), ("d_ff", "MLP width"),
                           ("context", "context (tokens)"), ("dtype", "dtype"), ("vocab_size", "vocabulary (model)"),
                           ("tokenizer_vocab", "vocabulary (tokenizer)"), ("chat_template", "chat template"),
                           ("params", "parameters")],
            "train_keys": [("stage", "stage"), ("mode", "mode"), ("verdict", "what the run bought"),
                           ("step", "steps"), ("steps", "steps"),
                           ("steps_planned_at_start", "steps planned at the start"),
                           ("steps_planned", "steps planned at the end"),
                           ("steps_at_best_speed", "steps the budget buys at the fastest measured speed"),
                           ("tokens_seen", "tokens seen"), ("train_loss", "final train loss"),
                           ("val_loss_before", "validation loss before"), ("val_loss", "validation loss after"),
                           ("val_bpb_before", "validation bits/byte before"), ("val_bpb", "validation bits/byte after"),
                           ("tokens_per_s", "tokens/s"), ("mfu", "MFU"), ("train_seconds", "train seconds"),
                           ("trainable_params", "trainable parameters"), ("stop_reason", "stopped by")]}


def render_markdown(rep: Report) -> str:
    return _env(autoescape=False).get_template("report.md.j2").render(**_context(rep))


def render_html(rep: Report) -> str:
    return _env(autoescape=True).get_template("report.html.j2").render(**_context(rep))
