"""Where the tokens come from: a local model through the engine's continuous-batching scheduler, or any other
OpenAI-compatible server (vLLM, Ollama, a hosted API) over HTTP. The routes, the UI and the store are the
same for both; a backend only turns one prompt into one stream of text pieces.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import httpx

from gptsmith.files import aiter_lines
from gptsmith.serve.schemas import APIError

log = logging.getLogger("gptsmith.serve")


@dataclass
class GenParams:
    max_tokens: int | None
    temperature: float | None  # None: the backend decides (an external server applies its own default)
    top_p: float | None
    stop: list[str] = field(default_factory=list)
    seed: int | None = None
    top_k: int | None = None  # an assistant's; None: the server's (local models only, like repetition_penalty)
    repetition_penalty: float | None = None


@dataclass
class Prompt:
    messages: list[dict] | None = None  # a chat
    text: str | None = None  # a plain completion prompt
    ids: list[int] | None = None  # local backend: the encoded prompt
    n_tokens: int | None = None  # None when the backend does not say (until its usage arrives)


@dataclass
class Chunk:
    text: str
    finish_reason: str | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None


class Backend(Protocol):
    name: str  # the model id clients pass as `model`
    version: str  # stored with every answer: which weights produced it
    max_context: int | None

    async def start(self) -> None: ...
    async def close(self) -> None: ...
    async def prepare(self, prompt: Prompt, max_tokens: int | None, default_max_tokens: int,
                      fit: bool) -> tuple[Prompt, int | None]: ...
    async def open(self, prompt: Prompt, params: GenParams) -> AsyncIterator[Chunk]: ...


def model_version(model_dir: Path) -> str:
    """dir name + a hash of config, lineage and weights: two answers with the same version came from the same
    model, whatever the directory is called later."""
    from gptsmith.files import sha256_file

    h = hashlib.sha256()
    for name in ("config.json", "gptsmith_lineage.json"):
        if (model_dir / name).is_file():
            h.update((model_dir / name).read_bytes())
    for w in sorted(model_dir.glob("*.safetensors")) + sorted(model_dir.glob("*.bin")):
        h.update(sha256_file(w).encode())
    return f"{model_dir.name}@{h.hexdigest()[:12]}"


class LocalBackend:
    """A model in this process. Every request becomes a GenerationRequest on one BatchScheduler, so concurrent
    requests decode together in one batch (continuous batching) instead of queueing one after another."""

    def __init__(self, engine, name: str, version: str, max_batch_size: int = 16, top_k: int = 0,
                 repetition_penalty: float = 1.0, stream_interval: float = 0.0):
        from gptsmith.engine import BatchScheduler

        self.engine = engine
        self.name, self.version = name, version
        self.max_context = engine.max_context
        self.top_k, self.repetition_penalty = top_k, repetition_penalty
        self.scheduler = BatchScheduler(engine, max_batch_size=max_batch_size, stream_interval=stream_interval)

    def sampling_defaults(self) -> dict:
        """What this model samples with when a request sets nothing (its generation_config.json, else DEFAULTS)."""
        from gptsmith.engine import SamplingParams

        resolved = self.engine.resolve(SamplingParams(top_k=self.top_k, repetition_penalty=self.repetition_penalty))
        return {"temperature": resolved.temperature, "top_p": resolved.top_p, "max_new_tokens": resolved.max_new_tokens}

    def count_tokens(self, messages: list[dict]) -> int:
        """The length of `messages` in this model's tokens, as its chat template encodes them (an assistant's
        context budget is counted with it)."""
        return len(self.engine.chat_template_ids(messages))

    async def start(self) -> None:
        self.scheduler.start()

    async def close(self) -> None:
        await asyncio.to_thread(self.scheduler.stop)

    def _encode(self, prompt: Prompt, budget_tokens: int, fit: bool) -> list[int]:
        if prompt.text is not None:
            return self.engine.encode(prompt.text)
        if fit:  # the UI: drop the oldest turns rather than refuse a long conversation
            try:
                return self.engine.encode_chat(prompt.messages, budget_tokens)
            except ValueError as e:
                raise APIError(400, str(e), "messages", "context_length_exceeded") from None
        return self.engine.chat_template_ids(prompt.messages)

    async def prepare(self, prompt: Prompt, max_tokens: int | None, default_max_tokens: int,
                      fit: bool) -> tuple[Prompt, int]:
        budget = max_tokens or min(default_max_tokens, self.max_context // 2)
        ids = await asyncio.to_thread(self._encode, prompt, budget, fit)
        room = self.max_context - len(ids)
        what = "prompt" if prompt.text is not None else "messages"
        if not ids:
            raise APIError(400, "the prompt is empty; send some text", what)
        if max_tokens is not None and len(ids) + max_tokens > self.max_context:
            over = len(ids) + max_tokens - self.max_context
            raise APIError(400, f"This model's maximum context length is {self.max_context} tokens. However, you "
                                f"requested {len(ids) + max_tokens} tokens ({len(ids)} in the {what}, {max_tokens} "
                                f"for the completion): {over} tokens over the limit. Shorten the {what} or lower "
                                "max_tokens.", what, "context_length_exceeded")
        if room < 1:
            raise APIError(400, f"This model's maximum context length is {self.max_context} tokens and the {what} "
                                f"alone is {len(ids)} tokens: {len(ids) - self.max_context + 1} tokens over the "
                                f"limit. Shorten the {what}.", what, "context_length_exceeded")
        # no max_tokens: the server's default, cut to whatever room the context has left
        return Prompt(prompt.messages, prompt.text, ids, len(ids)), max_tokens or min(default_max_tokens, room)

    async def open(self, prompt: Prompt, params: GenParams) -> AsyncIterator[Chunk]:
        from gptsmith.engine import SamplingParams

        sp = SamplingParams(max_new_tokens=params.max_tokens, temperature=params.temperature, top_p=params.top_p,
                            top_k=self.top_k if params.top_k is None else params.top_k,
                            repetition_penalty=self.repetition_penalty if params.repetition_penalty is None
                            else params.repetition_penalty, stop=params.stop,
                            seed=params.seed)
        try:
            sp.validate()
        except ValueError as e:
            raise APIError(400, str(e)) from None
        req = self.scheduler.submit(prompt.ids, sp)
        return self._events(req)

    @staticmethod
    async def _events(req) -> AsyncIterator[Chunk]:
        finished = False
        try:
            async for ev in req.aevents():
                if ev.finish_reason == "error":
                    finished = True
                    raise APIError(500, f"generation failed: {ev.text}", type="server_error")
                finished = ev.finish_reason is not None
                yield Chunk(ev.text, ev.finish_reason, req.prompt_tokens, req.completion_tokens)
        finally:
            if not finished:  # the consumer stopped early (client gone, UI stop button): free the slot
                req.cancel()


def check_backend(url: str, api_key: str | None) -> None:
    """Fail at startup, with the fix, when the backend is down or refuses our key (ValueError: CLI exit 2)."""
    base = url.rstrip("/") if url.rstrip("/").endswith("/v1") else url.rstrip("/") + "/v1"
    try:
        r = httpx.get(base + "/models", headers={"Authorization": f"Bearer {api_key}"} if api_key else {}, timeout=10)
    except httpx.HTTPError as e:
        raise ValueError(f"backend {base} is not reachable ({e}); start it or fix --backend-url") from None
    if r.status_code != 200:
        raise ValueError(f"backend {base}/models answered {r.status_code}: {r.text[:300]} "
                         "(set GPTSMITH_BACKEND_API_KEY if it needs a key)")


class ExternalBackend:
    """Another OpenAI-compatible server. Each choice is one streamed request with n=1, so the routes treat
    it exactly like a local one; closing the stream closes the connection, which stops the backend too."""

    def __init__(self, url: str, api_key: str | None = None, model: str | None = None, timeout: float = 600.0):
        base = url.rstrip("/")
        self.base = base if base.endswith("/v1") else base + "/v1"
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.client = httpx.AsyncClient(base_url=self.base, headers=headers,
                                        timeout=httpx.Timeout(timeout, connect=10.0))
        self.name = model or ""
        self.version = ""
        self.max_context = None

    async def start(self) -> None:
        try:
            r = await self.client.get("/models")
        except httpx.HTTPError as e:
            raise RuntimeError(f"backend {self.base} is not reachable ({e}); start it or fix --backend-url") from e
        if r.status_code != 200:
            raise RuntimeError(f"backend {self.base}/models answered {r.status_code}: {r.text[:300]} "
                               "(is GPTSMITH_BACKEND_API_KEY set?)")
        ids = [m.get("id") for m in r.json().get("data", [])]
        if not self.name:
            if not ids:
                raise RuntimeError(f"backend {self.base} lists no models; set serve.backend_model")
            self.name = ids[0]
        self.version = f"{self.name}@{self.base}"

    async def close(self) -> None:
        await self.client.aclose()

    async def prepare(self, prompt: Prompt, max_tokens: int | None, default_max_tokens: int,
                      fit: bool) -> tuple[Prompt, int | None]:
        return prompt, max_tokens or default_max_tokens

    async def open(self, prompt: Prompt, params: GenParams) -> AsyncIterator[Chunk]:
        body: dict = {"model": self.name, "stream": True, "stream_options": {"include_usage": True}, "n": 1}
        body |= {k: v for k, v in (("temperature", params.temperature), ("top_p", params.top_p)) if v is not None}
        if params.max_tokens:
            body["max_tokens"] = params.max_tokens
        if params.stop:
            body["stop"] = params.stop
        if params.seed is not None:
            body["seed"] = params.seed
        if prompt.text is not None:
            path, body["prompt"] = "/completions", prompt.text
        else:
            path, body["messages"] = "/chat/completions", prompt.messages
        try:
            resp = await self.client.send(self.client.build_request("POST", path, json=body), stream=True)
        except httpx.HTTPError as e:
            raise APIError(502, f"backend {self.base} failed: {e}") from None
        if resp.status_code != 200:
            raw = await resp.aread()
            await resp.aclose()
            try:
                err = json.loads(raw)["error"]
                raise APIError(resp.status_code, err.get("message", str(err)), err.get("param"), err.get("code"))
            except (ValueError, KeyError, TypeError, AttributeError):
                raise APIError(502 if resp.status_code >= 500 else resp.status_code,
                               f"backend answered {resp.status_code}: {raw[:300].decode(errors='replace')}") from None
        return self._events(resp)

    @staticmethod
    async def _events(resp: httpx.Response) -> AsyncIterator[Chunk]:
        finish, usage, n_pieces = None, None, 0
        try:
            async for line in aiter_lines(resp.aiter_text()):  # not resp.aiter_lines(): it splits at U+2028
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                try:
                    obj = json.loads(data)
                except ValueError:
                    obj = None
                if not isinstance(obj, dict):
                    raise APIError(502, f"backend sent a stream line that is not a JSON object: {data[:200]!r}")
                if obj.get("error"):
                    raise APIError(502, f"backend error: {obj['error'].get('message', obj['error'])}")
                usage = obj.get("usage") or usage
                for choice in obj.get("choices") or []:
                    text = (choice.get("delta") or {}).get("content") or choice.get("text") or ""
                    if text:
                        n_pieces += 1
                        yield Chunk(text)
                    finish = choice.get("finish_reason") or finish
        except httpx.HTTPError as e:
            raise APIError(502, f"backend stream failed: {e}") from None
        finally:
            await resp.aclose()
        usage = usage or {}
        yield Chunk("", finish or "stop", usage.get("prompt_tokens"), usage.get("completion_tokens", n_pieces))
