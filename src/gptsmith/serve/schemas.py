"""Typed request and response bodies: the subset of OpenAI's API we serve, and the web UI's own JSON API.

Unknown request fields are ignored (clients such as the `openai` package send fields we have no use for);
a known field with a wrong type is a 400 in OpenAI's error shape.
"""

from __future__ import annotations

from typing import Annotated, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, model_serializer

INT64_MAX = 2**63 - 1
# Every integer a client sends is bounded here, so an out-of-range value is a 400 naming the field, never a 500
# from SQLite ("Python int too large") or torch ("Overflow when unpacking long long").
DbId = Annotated[int, Field(ge=1, le=INT64_MAX)]
Seed = Annotated[int, Field(ge=-(2**63), le=INT64_MAX)]
TokenCount = Annotated[int, Field(ge=1, le=2**31 - 1)]


class APIError(Exception):
    """Any failure a client should see, rendered as OpenAI's `{"error": {message, type, param, code}}`."""

    TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
             404: "invalid_request_error", 405: "invalid_request_error", 413: "invalid_request_error",
             429: "rate_limit_error", 502: "backend_error", 503: "server_error"}

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.type = type or self.TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
        self.headers = headers

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class Lenient(BaseModel):
    model_config = ConfigDict(extra="ignore")


# ------------------------------------------------------------------------------------------- requests

class ContentPart(Lenient):
    type: str
    text: str | None = None


class ChatMessage(Lenient):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[ContentPart] | None = None
    name: str | None = None

    def text(self, where: str) -> str:
        """The message's text; `where` (e.g. "messages[2]") names it in the error for a non-text part."""
        if not isinstance(self.content, list):
            return self.content or ""
        for j, part in enumerate(self.content):
            if part.type != "text":
                raise APIError(400, f"{where}.content[{j}] is a '{part.type}' part, but this model reads text only; "
                                    "send text parts.", f"{where}.content[{j}].type", "unsupported_content")
        return "".join(p.text or "" for p in self.content)


class StreamOptions(Lenient):
    include_usage: StrictBool = False


class SamplingFields(Lenient):
    n: int = Field(1, ge=1, le=1024, description="choices to generate")
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    max_tokens: TokenCount | None = None
    stop: str | list[str] | None = None
    seed: Seed | None = None
    stream: StrictBool = False  # OpenAI's booleans are JSON booleans: "yes" is an error, not true
    stream_options: StreamOptions | None = None
    user: str | None = None

    def stop_list(self) -> list[str]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        return [s for s in stops if s]


class ChatCompletionRequest(SamplingFields):
    model: str
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: TokenCount | None = None
    include_reasoning: StrictBool = Field(False, description="a chain-of-thought assistant: also return its "
                                          "reasoning, as `reasoning_content` (hidden by default)")

    def chat(self) -> list[dict]:
        """The messages as the engine's chat template takes them ("developer" is OpenAI's newer "system")."""
        return [{"role": "system" if m.role == "developer" else m.role, "content": m.text(f"messages[{i}]")}
                for i, m in enumerate(self.messages)]


class CompletionRequest(SamplingFields):
    model: str
    prompt: str | list[str]


class EmbeddingRequest(Lenient):
    input: str | list[str] | list[int] | list[list[int]]
    model: str
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = None


# ------------------------------------------------------------------------------------------- responses

class Extras(BaseModel):
    """A response that may carry fields of our own (an assistant's sources, what its context budget dropped, its
    reasoning): sent only when set, so a plain model's replies are exactly OpenAI's and clients that do not know
    them (the `openai` package) ignore them."""
    OPTIONAL: ClassVar[tuple[str, ...]] = ()

    @model_serializer(mode="wrap")
    def _drop_unset_extras(self, handler):
        return {k: v for k, v in handler(self).items() if not (k in self.OPTIONAL and v is None)}


class Source(BaseModel):
    """One retrieved passage an assistant's answer may cite as [index]."""
    index: int
    citation: str
    source: str
    heading: str
    start: int
    end: int
    unit: str
    text: str
    score: float
    id: str = ""

class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class AssistantMessage(Extras):
    OPTIONAL = ("reasoning_content",)
    role: Literal["assistant"] = "assistant"
    content: str
    refusal: None = None
    reasoning_content: str | None = None  # a CoT assistant's reasoning, when the request asks for it


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    finish_reason: str
    logprobs: None = None


class ChatCompletion(Extras):
    OPTIONAL = ("sources", "dropped")
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    system_fingerprint: str | None = None
    choices: list[ChatChoice]
    usage: Usage
    sources: list[Source] | None = None  # an assistant's retrieved passages, numbered as its answer cites them
    dropped: dict[str, int] | None = None  # what the context budget left out: history_turns, chunks, examples


class TextChoice(BaseModel):
    index: int
    text: str
    finish_reason: str | None
    logprobs: None = None


class TextCompletion(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    system_fingerprint: str | None = None
    choices: list[TextChoice]
    usage: Usage


class ChunkDelta(BaseModel):
    """What a chat stream chunk adds: the role (first chunk), some text, or nothing (the finishing chunk)."""
    role: Literal["assistant"] | None = None
    content: str | None = None
    reasoning_content: str | None = None

    @model_serializer(mode="wrap")
    def _only_set(self, handler):  # OpenAI sends {} or {"content": ...}, never explicit nulls here
        return {k: v for k, v in handler(self).items() if v is not None}


class ChatChunkChoice(BaseModel):
    index: int
    delta: ChunkDelta
    logprobs: None = None
    finish_reason: str | None = None


class ChatCompletionChunk(Extras):
    OPTIONAL = ("sources", "dropped")
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    system_fingerprint: str | None = None
    choices: list[ChatChunkChoice]
    usage: Usage | None = None  # sent (null until the last chunk) only with stream_options.include_usage
    sources: list[Source] | None = None  # an assistant's: in the first chunk
    dropped: dict[str, int] | None = None


class TextCompletionChunk(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    system_fingerprint: str | None = None
    choices: list[TextChoice]
    usage: Usage | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "gptsmith"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class Embedding(BaseModel):
    object: Literal["embedding"] = "embedding"
    index: int
    embedding: list[float] | str  # base64: the little-endian float32 bytes, as OpenAI sends them


class EmbeddingUsage(BaseModel):
    prompt_tokens: int
    total_tokens: int


class EmbeddingList(BaseModel):
    object: Literal["list"] = "list"
    data: list[Embedding]
    model: str
    usage: EmbeddingUsage


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorDetail


# ------------------------------------------------------------------------------------------- the UI's API

class UISettings(Lenient):
    model: str | None = Field(None, max_length=200, description="the served model or assistant to answer with")
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    max_tokens: TokenCount | None = None


class ConversationCreate(Lenient):
    title: str = Field("", max_length=200)
    system_prompt: str = ""
    settings: UISettings = Field(default_factory=UISettings)


class ConversationPatch(Lenient):
    title: str | None = Field(None, max_length=200)
    system_prompt: str | None = None
    settings: UISettings | None = None


class SendMessage(Lenient):
    """One of: a new user message (content [+ parent_id]), an edit (edit_of + content), a regeneration
    (regenerate_of)."""
    content: str | None = None
    parent_id: DbId | None = Field(None, description="message the new one follows; default: the newest one")
    edit_of: DbId | None = Field(None, description="user message to replace with `content` (a new branch)")
    regenerate_of: DbId | None = Field(None, description="assistant message to answer again")
    settings: UISettings | None = None
    system_prompt: str | None = None


class FeedbackIn(Lenient):
    rating: Literal[-1, 0, 1] | None = Field(None, description="+1 thumbs up, -1 thumbs down, 0 clears")
    comment: str | None = None
    correction: str | None = Field(None, description="a better answer written by the user")

