"""What is evaluated: a model folder, an assistant (a model or backend plus its system prompt, sources and
examples) or any OpenAI-compatible server. `eval`, `compare` and the judge all go through one `Target`, so
"which setting answers better" is measured exactly like "which model answers better".

    target = open_target(model="out/chat")            # or assistant="bot.yaml", or backend="http://host:8000/v1"
    target.replies([[{"role": "user", "content": "Hi"}]], max_tokens=64)   # -> [Answer(text, finish_reason)]
    target.prompt_ids(messages)   # the exact tokens a local model sees (for log-likelihood scoring)

Replies are greedy (temperature 0) unless asked otherwise, so a rerun gives the same answers.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from gptsmith.errors import InputError

LOCAL_BATCH = 8  # prompts decoded together on a local engine: enough to fill a CPU, small enough for any GPU


@dataclass
class Answer:
    text: str
    finish_reason: str | None  # stop (ended by itself), length (hit max_tokens), ...


def plain_text(messages: list[dict]) -> str:
    """A base model (no chat template) continues text: the messages' contents, one paragraph each (a single user
    message is exactly its text)."""
    return "\n\n".join(m.get("content") or "" for m in messages)


class Target:
    """One thing that answers. Build with `open_target`."""

    def __init__(self, kind: str, name: str, ref: str, engine=None, assistant=None, remote=None,
                 lineage: dict | None = None):
        self.kind, self.name, self.ref = kind, name, ref
        self.engine = engine  # gptsmith.engine.Engine of a local model, else None
        self.assistant = assistant  # gptsmith.assist.Assistant, else None
        self.remote = remote  # gptsmith.assist.answer.RemoteModel for a backend (or an assistant over one)
        self.lineage = lineage or {}

    @property
    def is_chat(self) -> bool:
        if self.engine is None or self.assistant is not None:
            return True
        return bool(getattr(self.engine.tokenizer, "chat_template", None))

    def describe(self) -> dict:
        """The "target" entry of a result file: enough to know later exactly what was measured."""
        out = {"kind": self.kind, "name": self.name, "ref": self.ref, "lineage": self.lineage}
        if self.assistant is not None:
            out["assistant"] = self.assistant.profile.model_dump(mode="json")
        return out

    def _need_engine(self, what: str):
        if self.engine is None:
            raise InputError(f"{what} needs the model's log-probabilities, which {self.kind} {self.ref} does not "
                             "give; evaluate the model folder itself (--model DIR) or an assistant over a local model")
        return self.engine

    def prompt_ids(self, messages: list[dict], reserve_tokens: int = 0) -> list[int]:
        """The tokens the model sees for `messages` followed by its answer: chat template + generation prompt
        (an assistant's prompt after its system prompt, sources and examples are added), or plain text for a
        base model. `reserve_tokens` is kept free for what is scored after it."""
        engine = self._need_engine("log-likelihood scoring")
        if self.assistant is not None:
            count = lambda msgs: len(engine.chat_template_ids(msgs))  # noqa: E731
            prepared = self.assistant.prepare(messages, count, engine.max_context, reserve_tokens, None)
            return engine.chat_template_ids(prepared.messages)
        if self.is_chat:
            return engine.chat_template_ids(messages)
        return engine.encode(plain_text(messages))

    def replies(self, conversations: list[list[dict]], max_tokens: int = 256, temperature: float = 0.0,
                seed: int = 0) -> list[Answer]:
        """One answer per conversation (each a list of messages ending with the user's turn)."""
        if self.assistant is not None:
            return [self._assistant_reply(m, max_tokens, temperature, seed) for m in conversations]
        if self.engine is not None:
            return self._local_replies(conversations, max_tokens, temperature, seed)
        return [self._remote_reply(m, max_tokens, temperature, seed) for m in conversations]

    def _local_replies(self, conversations, max_tokens, temperature, seed) -> list[Answer]:
        from gptsmith.engine import SamplingParams

        engine = self.engine
        params = engine.resolve(SamplingParams(max_new_tokens=max_tokens, temperature=temperature, seed=seed))
        out: list[Answer] = []
        for start in range(0, len(conversations), LOCAL_BATCH):
            prompts = []
            for messages in conversations[start:start + LOCAL_BATCH]:
                try:
                    ids = (engine.encode_chat(messages, max_tokens) if self.is_chat
                           else engine.encode(plain_text(messages)))
                    engine.check_prompt(ids)
                except ValueError as e:
                    raise InputError(f"{self.name}: {e}") from None
                prompts.append(ids)
            out += [Answer(c.text, c.finish_reason) for c in engine.generate(prompts, params)]
        return out

    def _assistant_reply(self, messages, max_tokens, temperature, seed) -> Answer:
        from gptsmith.assist.answer import LocalModel, answer
        from gptsmith.assist.prompt import Assistant

        profile = self.assistant.profile
        sampling = profile.sampling.model_copy(update={"temperature": temperature, "max_tokens": max_tokens,
                                                       "seed": seed})
        greedy = Assistant(profile.model_copy(update={"sampling": sampling}), self.assistant.retriever,
                           self.assistant.examples)
        model = self.remote if self.remote is not None else LocalModel(engine=self.engine)
        reply = answer(greedy, model, messages)
        return Answer(reply.answer, reply.finish_reason)

    def _remote_reply(self, messages, max_tokens, temperature, seed) -> Answer:
        remote = self.remote
        remote.finish_reason = None
        text = "".join(remote.stream(messages, {"temperature": temperature, "seed": seed}, max_tokens))
        return Answer(text.strip(), remote.finish_reason)

    def close(self) -> None:
        if self.remote is not None:
            self.remote.client.close()


def _open_backend(url: str, model: str | None):
    from gptsmith.assist.answer import RemoteModel
    from gptsmith.assist.profile import AssistantProfile

    return RemoteModel(AssistantProfile(name="backend", backend_url=url, backend_model=model))


def open_target(model: str | Path | None = None, assistant: str | Path | None = None, backend: str | None = None,
                backend_model: str | None = None, device: str = "auto") -> Target:
    """Exactly one of a model folder, an assistant file or a backend URL. A backend needs no torch: gptsmith.model
    (torch, transformers) is imported only for a local model."""
    given = [x for x in (model, assistant, backend) if x is not None]
    if len(given) != 1:
        raise InputError("give exactly one of --model DIR, --assistant FILE or --backend URL")
    if model is not None:
        from gptsmith.engine import Engine
        from gptsmith.model import read_lineage

        path = Path(model)
        try:
            engine = Engine.load(path, device=device)
        except FileNotFoundError as e:
            raise InputError(str(e)) from None
        return Target("model", path.resolve().name, str(path.resolve()), engine=engine, lineage=read_lineage(path))
    if backend is not None:
        remote = _open_backend(backend, backend_model)
        return Target("backend", remote.model, remote.base, remote=remote)
    from gptsmith.assist.prompt import Assistant

    bot = Assistant.open(assistant)
    profile = bot.profile
    if profile.model is not None:
        from gptsmith.engine import Engine
        from gptsmith.model import read_lineage

        engine = Engine.load(profile.model, device=device)
        return Target("assistant", profile.name, str(Path(assistant).resolve()), engine=engine, assistant=bot,
                      lineage=read_lineage(profile.model))
    from gptsmith.assist.answer import RemoteModel

    return Target("assistant", profile.name, str(Path(assistant).resolve()), assistant=bot,
                  remote=RemoteModel(profile))


def target_from_spec(spec: str, device: str = "auto") -> Target:
    """`compare A B` and `--judge X` take one string each: an http(s) URL is a backend (URL#NAME picks the model
    NAME of a server that serves several; without it, the first it lists), a .yaml/.yml file an assistant,
    anything else a model folder."""
    if spec.startswith(("http://", "https://")):
        url, _, model = spec.partition("#")
        return open_target(backend=url, backend_model=model or None, device=device)
    if spec.endswith((".yaml", ".yml")) and Path(spec).is_file():
        return open_target(assistant=spec, device=device)
    if not Path(spec).exists():
        raise InputError(f"{spec}: no such model folder or assistant file (and not an http(s) URL)")
    return open_target(model=spec, device=device)
