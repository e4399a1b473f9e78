"""Train a byte-level BPE tokenizer with chat special tokens and a chat template.

The result is a plain Hugging Face tokenizer directory (tokenizer.json + tokenizer_config.json with the
Jinja chat template), so `AutoTokenizer.from_pretrained(dir).apply_chat_template(messages)` works with no
gptsmith code, and so does every tool that reads Hugging Face tokenizers.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

# Document boundary first, so it gets id 0 in every vocabulary we train.
BOS = "<|endoftext|>"  # starts every pretraining document
PAD = "<|pad|>"
SYSTEM, USER, ASSISTANT = "<|system|>", "<|user|>", "<|assistant|>"
END_OF_TURN = "<|end|>"  # ends every chat turn; a chat model's eos
SPECIAL_TOKENS = [BOS, PAD, SYSTEM, USER, ASSISTANT, END_OF_TURN]

# GPT-4's split pattern: keeps words, numbers (1-3 digits), punctuation runs and whitespace apart before
# BPE, which gives better compression on code and prose than GPT-2's pattern.
SPLIT_PATTERN = (
    r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]++[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+"""
)

# `{% generation %}` marks the tokens the assistant writes, so `apply_chat_template(...,
# return_assistant_tokens_mask=True)` (and TRL's assistant_only_loss) can train on those tokens only.
# The end-of-turn token is inside the block: the model must learn to stop.
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'assistant' -%}"
    "{{- '<|assistant|>\n' -}}{%- generation -%}{{- message['content'] -}}{{- '<|end|>' -}}{%- endgeneration -%}{{- '\n' -}}"
    "{%- else -%}"
    "{{- '<|' + message['role'] + '|>\n' + message['content'] + '<|end|>\n' -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|assistant|>\n' -}}{%- endif -%}"
)


def _batched(texts: Iterable[str], max_chars: int, batch: int = 1000) -> Iterator[list[str]]:
    buf, seen = [], 0
    for t in texts:
        if seen >= max_chars:
            break
        t = t[: max_chars - seen]
        seen += len(t)
        buf.append(t)
        if len(buf) == batch:
            yield buf
            buf = []
    if buf:
        yield buf


def build_tokenizer_object(vocab_size: int) -> tuple[Tokenizer, trainers.BpeTrainer]:
    tok = Tokenizer(models.BPE(byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(SPLIT_PATTERN), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # all 256 bytes: any input encodes, no <unk>
        show_progress=True,
    )
    return tok, trainer


def wrap_fast(tok: Tokenizer, model_max_length: int = 1 << 30) -> PreTrainedTokenizerFast:
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=END_OF_TURN,
        pad_token=PAD,
        model_max_length=model_max_length,
        clean_up_tokenization_spaces=False,
    )
    fast.add_special_tokens({"additional_special_tokens": [SYSTEM, USER, ASSISTANT]})
    fast.chat_template = CHAT_TEMPLATE
    return fast


def train_tokenizer(texts: Iterable[str], out_dir: str | os.PathLike, vocab_size: int = 8192,
                    min_frequency: int = 2, max_train_chars: int = 200_000_000) -> PreTrainedTokenizerFast:
    """Train on a stream of texts (at most `max_train_chars` characters) and save to `out_dir`."""
    from gptsmith.files import replace_dir

    tok, trainer = build_tokenizer_object(vocab_size)
    trainer.min_frequency = min_frequency
    t0 = time.perf_counter()
    tok.train_from_iterator(_batched(texts, max_train_chars), trainer=trainer)
    seconds = time.perf_counter() - t0
    fast = wrap_fast(tok)
    out_dir = Path(out_dir)
    tmp = out_dir.with_name(f".{out_dir.name}.tmp-{os.getpid()}")
    fast.save_pretrained(tmp)
    (tmp / "gptsmith_tokenizer.json").write_text(json.dumps(
        {"vocab_size": len(fast), "train_seconds": round(seconds, 3), "min_frequency": min_frequency}, indent=2))
    replace_dir(tmp, out_dir)
    return fast


def load_tokenizer(path: str | os.PathLike) -> PreTrainedTokenizerFast:
    return AutoTokenizer.from_pretrained(str(path))


def bytes_per_token(tokenizer, texts: Iterable[str]) -> float:
    """UTF-8 bytes per token over `texts`: the tokenizer's compression (higher is better)."""
    n_bytes = n_tokens = 0
    batch = []
    for t in texts:
        batch.append(t)
        if len(batch) == 256:
            n_bytes += sum(len(x.encode("utf-8")) for x in batch)
            n_tokens += sum(len(ids) for ids in tokenizer(batch, add_special_tokens=False)["input_ids"])
            batch = []
    if batch:
        n_bytes += sum(len(x.encode("utf-8")) for x in batch)
        n_tokens += sum(len(ids) for ids in tokenizer(batch, add_special_tokens=False)["input_ids"])
    return n_bytes / max(n_tokens, 1)


# ---------------------------------------------------------------------------------------------- safe encoding
# A chat template renders messages into one string, and tokenizing that string parses every special-token
# string in it, the ones a user typed included: a message "<|end|>\n<|system|>..." would become real turn
# markers (role injection). So user text is encoded apart from the template's own text: the template's text
# with its control tokens parsed, the user's control-token strings as plain text. Text with no control-token
# strings in it is tokenized in one piece, exactly as `apply_chat_template(tokenize=True)` does, so the ids of
# ordinary conversations (and so every model already trained on them) do not change.

# Roles a message may have. The template builds some control tokens from the role ('<|' + role + '|>'), so a
# role is never free text.
CHAT_ROLES = ("system", "developer", "user", "assistant", "tool")


@dataclass
class ChatEncoding:
    input_ids: list[int]
    assistant_masks: list[int] | None = None  # 1 on the tokens the template's {% generation %} blocks write


def control_tokens(tokenizer, chat_template: str | None = None) -> tuple[str, ...]:
    """Strings that user text must never turn into tokens: every special token, plus the added tokens the chat
    template writes (some tokenizers add their turn markers as non-special tokens). Longest first."""
    template = chat_template or getattr(tokenizer, "chat_template", None) or ""
    found = {t.content for t in tokenizer.added_tokens_decoder.values()
             if t.special or (t.content in template and not t.content.isspace())}
    return tuple(sorted(found, key=lambda t: (-len(t), t)))


@lru_cache(maxsize=64)
def _control_pattern(tokens: tuple[str, ...]) -> re.Pattern | None:
    return re.compile("|".join(map(re.escape, tokens))) if tokens else None


def _encode_ignoring_added_tokens(backend, text: str) -> list[int]:
    """Tokenize with the model's vocabulary alone: no added token (special or not) is matched."""
    if backend.normalizer is not None:
        text = backend.normalizer.normalize_str(text)
    splits = [s for s, _ in backend.pre_tokenizer.pre_tokenize_str(text)] if backend.pre_tokenizer else [text]
    return [t.id for s in splits for t in backend.model.tokenize(s)]


def _encode_piece(tokenizer, text: str, as_text: bool, first: bool) -> tuple[list[int], list[tuple[int, int]]]:
    """Ids and character offsets of one piece of a longer string. A piece after the first is encoded after a
    newline that is then removed, so a SentencePiece-style tokenizer does not add the word-start space it adds at
    the start of a string (the same trick transformers' own control-token sanitizer uses)."""
    prefix = "" if first else "\n"
    if as_text:
        backend = tokenizer.backend_tokenizer
        ids = _encode_ignoring_added_tokens(backend, prefix + text)
        newline = _encode_ignoring_added_tokens(backend, prefix) if prefix else []
        ids = ids[len(newline):] if ids[:len(newline)] == newline else _encode_ignoring_added_tokens(backend, text)
        return ids, [(0, len(text))] * len(ids)  # the whole piece is one unit for the assistant mask
    enc = tokenizer(prefix + text, add_special_tokens=False, split_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = list(enc["input_ids"]), list(enc["offset_mapping"])
    if prefix:
        newline = tokenizer("\n", add_special_tokens=False, split_special_tokens=False)["input_ids"]
        if ids[:len(newline)] == list(newline):
            ids, offsets = ids[len(newline):], [(max(a - 1, 0), max(b - 1, 0)) for a, b in offsets[len(newline):]]
        else:
            enc = tokenizer(text, add_special_tokens=False, split_special_tokens=False, return_offsets_mapping=True)
            ids, offsets = list(enc["input_ids"]), list(enc["offset_mapping"])
    return ids, offsets


def _encode_pieces(tokenizer, pieces: list[tuple[int, str, bool]], spans: list[tuple[int, int]] | None,
                   controls: tuple[str, ...]) -> ChatEncoding:
    """Encode (start, text, as_text) pieces of one string; `spans` (character ranges of the assistant's text in
    that string) give the mask: a token is the assistant's when it overlaps one."""
    control_ids = {tokenizer.convert_tokens_to_ids(t) for t in controls}
    ids: list[int] = []
    mask: list[int] = []
    for i, (start, text, as_text) in enumerate(pieces):
        piece_ids, offsets = _encode_piece(tokenizer, text, as_text, first=i == 0)
        if as_text and control_ids & set(piece_ids):
            raise ValueError(f"cannot encode {text!r} as plain text: this tokenizer's vocabulary turns it into a "
                             "control token")
        ids += piece_ids
        if spans is not None:
            mask += [int(any(start + a < hi and start + b > lo for lo, hi in spans)) for a, b in offsets]
    return ChatEncoding(ids, mask if spans is not None else None)


def encode_text(tokenizer, text: str) -> list[int]:
    """Token ids of user text, any special-token strings in it ("<|end|>") encoded as the plain text they are."""
    controls = control_tokens(tokenizer)
    pattern = _control_pattern(controls)
    if pattern is None or not pattern.search(text):  # the common case: one piece, the tokenizer's own ids
        return list(tokenizer(text, add_special_tokens=False, split_special_tokens=False)["input_ids"])
    _require_fast(tokenizer)
    return _encode_pieces(tokenizer, _split(text, pattern, 0), None, controls).input_ids


def _split(text: str, pattern: re.Pattern, group: int) -> list[tuple[int, str, bool]]:
    """(start, text, as_text) pieces: each match's `group` as plain text, the text between as it is."""
    pieces, pos = [], 0
    for m in pattern.finditer(text):
        if m.start() > pos:
            pieces.append((pos, text[pos:m.start()], False))
        pieces.append((m.start(group), m.group(group), True))
        pos = m.end()
    if pos < len(text):
        pieces.append((pos, text[pos:], False))
    return pieces


def _require_fast(tokenizer) -> None:
    if getattr(tokenizer, "backend_tokenizer", None) is None:
        raise ValueError(f"{type(tokenizer).__name__} is a slow (Python) tokenizer; encoding user text safely needs a "
                         "fast one: load the tokenizer with use_fast=True (a directory with tokenizer.json)")


def _mark(value, pattern: re.Pattern | None, open_: str, close: str):
    """Wrap every control-token string in user-supplied values (content, content parts, names) in markers."""
    if isinstance(value, str):
        return pattern.sub(lambda m: open_ + m.group() + close, value) if pattern else value
    if isinstance(value, dict):
        return {k: _mark(v, pattern, open_, close) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_mark(v, pattern, open_, close) for v in value]
    return value


def _check_messages(messages: list[dict]) -> None:
    if not isinstance(messages, (list, tuple)) or not messages:
        raise ValueError("messages must be a non-empty list of {'role': ..., 'content': ...} dicts")
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise ValueError(f"messages[{i}] is {type(m).__name__}, not a {{'role': ..., 'content': ...}} dict")
        if m.get("role") not in CHAT_ROLES:
            raise ValueError(f"messages[{i}] has role {m.get('role')!r}; use one of {', '.join(CHAT_ROLES)}")


def encode_chat(tokenizer, messages: list[dict], add_generation_prompt: bool = False, assistant_mask: bool = False,
                chat_template: str | None = None, **template_kwargs) -> ChatEncoding:
    """The chat template applied to `messages`, as token ids, with no message text ever becoming a control token.

    Works for any Hugging Face fast tokenizer and template. Control-token strings in the messages are wrapped in
    one-off markers before rendering; the rendered string is then encoded piece by piece: the template's text
    with special tokens parsed, each marked string as plain text. With `assistant_mask`, also returns the mask of
    the tokens inside the template's `{% generation %}` blocks (what SFT trains on), as
    `apply_chat_template(return_assistant_tokens_mask=True)` computes it.
    """
    from transformers.utils.chat_template_utils import render_jinja_template

    _check_messages(messages)
    _require_fast(tokenizer)
    template = tokenizer.get_chat_template(chat_template)
    controls = control_tokens(tokenizer, template)
    pattern = _control_pattern(controls)
    nonce = secrets.token_hex(8)  # unguessable, so message text cannot forge a marker
    open_, close = f"\U000f0000{nonce}[", f"]{nonce}\U000f0001"
    marked = [_mark({k: v for k, v in m.items() if v is not None}, pattern, open_, close) for m in messages]
    rendered, spans = render_jinja_template(
        [marked], chat_template=template, return_assistant_tokens_mask=assistant_mask,
        add_generation_prompt=add_generation_prompt, **{**tokenizer.special_tokens_map, **template_kwargs})
    rendered, spans = rendered[0], (spans[0] if spans else [])
    pieces = _split(rendered, re.compile(re.escape(open_) + "(.*?)" + re.escape(close), flags=re.S), 1)
    if any(nonce in text for _, text, as_text in pieces if not as_text):
        raise ValueError("the chat template cut a message inside a special-token string; gptsmith cannot tell the "
                         "template's tokens from the message's. Remove the special-token strings from the message")
    return _encode_pieces(tokenizer, pieces, spans if assistant_mask else None, controls)
