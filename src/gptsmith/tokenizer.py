"""Train a byte-level BPE tokenizer with chat special tokens and a chat template.

The result is a plain Hugging Face tokenizer directory (tokenizer.json + tokenizer_config.json with the
Jinja chat template), so `AutoTokenizer.from_pretrained(dir).apply_chat_template(messages)` works with no
gptsmith code, and so does every tool that reads Hugging Face tokenizers.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterable, Iterator
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
