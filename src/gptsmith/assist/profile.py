"""The assistant profile: one YAML file that names a model (or another OpenAI-compatible server) and how to use it
without training: a system prompt, retrieval over the user's documents, few-shot examples, chain of thought and
sampling settings.

    name: pydocs
    model: ./qs/chat                 # or  backend_url: http://127.0.0.1:11434/v1
    system_prompt: You answer questions about Python and cite your sources.
    rag: {index: ./pyindex, top_k: 4}
    few_shot: {file: examples.jsonl, k: 2}
    chain_of_thought: false
    sampling: {temperature: 0.7, max_tokens: 256}

Validated like the project config: every section forbids unknown keys and names the closest valid one. Relative
paths (model, rag.index, rag.rerank, few_shot.file) are taken from the YAML file's folder, so a
profile works from any working directory; a path that does not exist is an error naming the file and the field.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from gptsmith.config import all_keys, closest_key, format_validation_error
from gptsmith.errors import InputError


class AssistantError(InputError):
    """An assistant file that cannot be used; the message names the file, the field and the fix."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class RagSettings(_Strict):
    index: Path = Field(..., description="index folder written by `gptsmith rag index`")
    top_k: int = Field(4, ge=1, le=100, description="chunks retrieved per question (fewer when they do not fit)")
    mode: Literal["hybrid", "bm25", "vector"] | None = Field(None, description="hybrid (BM25 + vectors fused by "
                                                             "reciprocal rank), bm25 alone or vectors alone; null = "
                                                             "the index's choice (recorded by `gptsmith rag eval "
                                                             "--save`), else hybrid")
    min_score: float | None = Field(None, description="drop chunks scoring below this; null = keep the top_k")
    rerank: Path | None = Field(None, description="a local cross-encoder folder that re-orders the retrieved "
                                "chunks; null = the index's choice (rerank only where `gptsmith rag eval --save` "
                                "measured it better), else no rerank")
    sources: list[str] | None = Field(None, description="only search files whose path matches one of these globs")


class FewShotSettings(_Strict):
    file: Path = Field(..., description="JSONL of example conversations (OpenAI messages, sharegpt or alpaca)")
    k: int = Field(2, ge=0, le=50, description="most similar examples put before the question (0 = none)")
    max_tokens: int = Field(512, ge=1, description="token budget of all chosen examples together")


class SamplingSettings(_Strict):
    temperature: float | None = Field(None, ge=0, description="0 = greedy; null = the model's default")
    top_p: float | None = Field(None, gt=0, le=1, description="nucleus sampling mass; null = the model's default")
    top_k: int | None = Field(None, ge=0, description="sample from the k likeliest tokens, 0 = off (local models)")
    repetition_penalty: float | None = Field(None, gt=0, description="> 1 discourages repeats (local models)")
    max_tokens: int | None = Field(None, ge=1, description="longest answer in tokens; null = the model's default")
    seed: int | None = Field(None, description="random seed for reproducible answers")
    stop: list[str] = Field(default_factory=list, description="stop strings; the answer ends before them")


class AssistantProfile(_Strict):
    name: str = Field(..., description="the assistant's name: the model id clients ask the server for")
    model: Path | None = Field(None, description="local chat model folder (written by `gptsmith sft`)")
    backend_url: str | None = Field(None, description="an OpenAI-compatible server's base URL (…/v1) instead of model")
    backend_model: str | None = Field(None, description="model id to ask backend_url for; default: the first it lists")
    api_key_env: str = Field("GPTSMITH_BACKEND_API_KEY", description="environment variable holding backend_url's "
                             "API key (the key itself never goes in the file)")
    max_context: int | None = Field(None, ge=16, description="the model's context in tokens; default: a local "
                                    "model's own, 4096 for backend_url")
    system_prompt: str = Field("", description="instructions the model sees before every conversation")
    rag: RagSettings | None = Field(None, description="retrieval over an index of your documents; null = none")
    few_shot: FewShotSettings | None = Field(None, description="example conversations picked per question")
    chain_of_thought: bool = Field(False, description="ask for step-by-step reasoning before the answer; the "
                                   "reasoning is kept apart from the answer (gptsmith.assist.reasoning)")
    sampling: SamplingSettings = Field(default_factory=SamplingSettings, description="how answers are sampled")

    @model_validator(mode="after")
    def _one_model(self) -> "AssistantProfile":
        if (self.model is None) == (self.backend_url is None):
            raise ValueError("give exactly one of 'model' (a local model folder) and 'backend_url' (an "
                             "OpenAI-compatible server)")
        return self


NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,63}$")


def _suggest(key: str) -> str:
    keys = all_keys(AssistantProfile)
    close = closest_key(key, keys)  # `top_k` at the top level -> `rag.top_k`
    return f" Did you mean '{close}'?" if close else f" Valid keys: {', '.join(keys)}."


def _resolve_paths(profile: AssistantProfile, base: Path, source: Path) -> AssistantProfile:
    """Relative paths from the YAML file's folder; every path must exist (the error names the field)."""
    def need(path: Path, field: str, what: str) -> Path:
        path = path.expanduser()
        path = path if path.is_absolute() else base / path
        if not path.exists():
            raise AssistantError(f"{source}: '{field}': {path} does not exist; {what}")
        return path

    if profile.model is not None:
        profile.model = need(profile.model, "model", "give the folder written by `gptsmith sft` (relative paths "
                                                     "start at the assistant file's folder)")
        if not (profile.model / "config.json").is_file():
            raise AssistantError(f"{source}: 'model': {profile.model} is not a model folder (no config.json)")
    if profile.rag is not None:
        profile.rag.index = need(profile.rag.index, "rag.index", "build it with `gptsmith rag index DOCS --index "
                                                                 "DIR` or fix the path")
        if profile.rag.rerank is not None:
            profile.rag.rerank = need(profile.rag.rerank, "rag.rerank", "give a local cross-encoder folder")
    if profile.few_shot is not None:
        profile.few_shot.file = need(profile.few_shot.file, "few_shot.file", "give a JSONL of example "
                                                                             "conversations")
    return profile


def parse_assistant(tree: object, source: Path, base: Path | None = None) -> AssistantProfile:
    """Validate an already-parsed YAML tree (what `load_assistant` reads) as a profile."""
    if not isinstance(tree, dict):
        raise AssistantError(f"{source}: the top level must be a mapping (name, model, system_prompt, rag, ...)")
    try:
        profile = AssistantProfile.model_validate(tree)
    except ValidationError as e:
        raise AssistantError(format_validation_error(e, source, _suggest)) from None
    if not NAME_PATTERN.match(profile.name):
        raise AssistantError(f"{source}: 'name': {profile.name!r} must be 1-64 letters, digits, '.', '_', ':' or '-' "
                             "(it becomes the model id clients ask for)")
    return _resolve_paths(profile, base if base is not None else source.parent, source)


def load_assistant(path: str | Path) -> AssistantProfile:
    """Read and validate an assistant YAML file; AssistantError names the file and the field on any problem."""
    path = Path(path)
    if not path.is_file():
        raise AssistantError(f"assistant file not found: {path}")
    try:
        tree = yaml.safe_load(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise AssistantError(f"{path}: not valid UTF-8; re-save the file as UTF-8") from None
    except yaml.YAMLError as e:
        raise AssistantError(f"{path}: not valid YAML: {e}") from None
    return parse_assistant(tree, path, path.resolve().parent)
