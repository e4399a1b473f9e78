"""The engine: load a model dir, encode prompts and chats, and run batched, streaming generation."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import torch

from gptsmith.engine.params import (Completion, SamplingParams, StreamEvent, apply_repetition_penalty,
                                    make_generator, read_generation_config, sample_token)
from gptsmith.engine.runners import HFRunner, LlamaRunner, llama_supported, llama_weights, weights_key
from gptsmith.engine.text import IncrementalDecoder, StopMatcher
from gptsmith.tokenizer import encode_chat, encode_text


class Sequence:
    """One prompt being generated: its tokens, sampling state, text decoder and stop matcher."""

    def __init__(self, engine: "Engine", prompt_ids: list[int], params: SamplingParams):
        params = engine.resolve(params)
        engine.check_prompt(prompt_ids)
        self.prompt_ids = list(prompt_ids)
        self.params = params
        self.out_ids: list[int] = []
        self.finish_reason: str | None = None
        self.max_context = engine.max_context
        self.stop_ids = engine.stop_ids
        self.generator = None if params.greedy else make_generator(params.seed, engine.device)
        self.decoder = IncrementalDecoder(engine.tokenizer)
        self.stopper = StopMatcher(params.stop)
        self.seen = None  # tokens already in the sequence, as a vocabulary mask, when a repetition penalty is on
        if params.repetition_penalty != 1.0:
            vocab = engine.model.get_output_embeddings().weight.shape[0]  # the logits' width
            self.seen = torch.zeros(vocab, dtype=torch.bool, device=engine.device)
            self.seen[self.prompt_ids] = True

    @property
    def length(self) -> int:
        return len(self.prompt_ids) + len(self.out_ids)

    def pick(self, logits: torch.Tensor) -> int:
        if self.seen is not None:
            logits = apply_repetition_penalty(logits, self.seen, self.params.repetition_penalty)
        return sample_token(logits, self.params, self.generator)

    def accept(self, token: int) -> StreamEvent:
        """Take the next token; returns the text it completes and, when the sequence ends, why."""
        if token in self.stop_ids:
            # the end-of-turn/eos token ends the answer; it is not part of its text or token ids
            self.finish_reason = "stop"
            return StreamEvent(self._flush(), [], "stop")
        self.out_ids.append(token)
        if self.seen is not None:
            self.seen[token] = True
        text, hit = self.stopper.push(self.decoder.push(token))
        if hit:
            self.finish_reason = "stop"
        elif len(self.out_ids) >= self.params.max_new_tokens or self.length >= self.max_context:
            self.finish_reason = "length"
            text += self._flush()
        return StreamEvent(text, [token], self.finish_reason)

    def _flush(self) -> str:
        text, _ = self.stopper.push(self.decoder.flush())
        return text + self.stopper.flush()


class Batch:
    """Sequences decoding together over one runner; sequence i lives in cache slot i."""

    def __init__(self, engine: "Engine", n_slots: int, max_len: int):
        self.engine = engine
        self.n_slots = n_slots
        self.runner = engine.make_runner(n_slots, max_len)
        self.seqs: list[Sequence] = []
        self.empty_seen: torch.Tensor | None = None

    @property
    def full(self) -> bool:
        return len(self.seqs) >= self.n_slots

    def add(self, seq: Sequence) -> StreamEvent:
        """Prefill a new sequence into the next free slot and sample its first token."""
        logits = self.runner.prefill(len(self.seqs), seq.prompt_ids)
        self.seqs.append(seq)
        try:
            event = seq.accept(seq.pick(logits))
        except BaseException:
            self.remove(seq)
            raise
        if seq.finish_reason:
            self.remove(seq)
        return event

    def step(self) -> list[tuple[Sequence, StreamEvent]]:
        """One decode step for every sequence; finished ones leave the batch."""
        seqs = list(self.seqs)
        logits = self.runner.decode([s.out_ids[-1] for s in seqs], [s.length - 1 for s in seqs])
        if all(s.params.greedy for s in seqs):
            if any(s.seen is not None for s in seqs):  # the repetition penalty for every row in one op, not one gather/scatter per row
                seen = torch.stack([s.seen if s.seen is not None else self._no_tokens(logits) for s in seqs])
                penalty = logits.new_tensor([[s.params.repetition_penalty] for s in seqs])
                logits = apply_repetition_penalty(logits, seen, penalty)
            events = [(s, s.accept(t)) for s, t in zip(seqs, logits.argmax(-1).tolist())]  # one op for all
        else:
            events = [(s, self._next(s, row)) for s, row in zip(seqs, logits)]
        for s in seqs:
            if s.finish_reason:
                self.remove(s)
        return events

    def _no_tokens(self, logits: torch.Tensor) -> torch.Tensor:
        """The `seen` row of a sequence without a penalty: penalises nothing."""
        if self.empty_seen is None:
            self.empty_seen = torch.zeros(logits.shape[-1], dtype=torch.bool, device=logits.device)
        return self.empty_seen

    @staticmethod
    def _next(seq: Sequence, logits: torch.Tensor) -> StreamEvent:
        try:
            return seq.accept(seq.pick(logits))
        except Exception as e:  # e.g. NaN logits: this sequence fails, the others go on
            seq.finish_reason = "error"
            return StreamEvent(f"{type(e).__name__}: {e}", [], "error")

    def remove(self, seq: Sequence) -> None:
        i, last = self.seqs.index(seq), len(self.seqs) - 1
        if i != last:
            self.runner.move(last, i, self.seqs[last].length)
            self.seqs[i] = self.seqs[last]
        self.seqs.pop()


class Engine:
    def __init__(self, model, tokenizer, device: torch.device, stop_ids: set[int] | None = None,
                 generation_defaults: dict | None = None):
        self.model = model
        self.tokenizer = tokenizer
        self.device = device
        self.max_context = int(getattr(model.config, "max_position_embeddings", None) or 2048)
        self.stop_ids = set(stop_ids or ())
        # the model's generation_config.json sampling settings: used for whatever a request leaves unset
        self.generation_defaults = dict(generation_defaults or {})
        if tokenizer.eos_token_id is not None:
            self.stop_ids.add(tokenizer.eos_token_id)
        self.fast = llama_supported(model)
        self._weights: tuple | None = None  # (key, LlamaRunner weights): fused copies made once, not per request

    @classmethod
    def load(cls, model_dir, device: str = "auto", dtype=None) -> "Engine":
        from transformers import AutoModelForCausalLM, AutoTokenizer

        model_dir = Path(model_dir)
        if not (model_dir / "config.json").is_file():
            raise FileNotFoundError(f"{model_dir}: not a model directory (no config.json); pass the directory "
                                    "written by `gptsmith pretrain` or `gptsmith sft`")
        from gptsmith.device import select_device
        device = select_device(device, setting="device")
        if dtype is None:
            dtype = torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else torch.float32
        tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
        model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=dtype).to(device).eval()
        generation_defaults, eos = read_generation_config(model_dir)
        if not eos:
            eos = model.config.eos_token_id
            eos = eos if isinstance(eos, list) else [eos] if eos is not None else []
        return cls(model, tokenizer, device, set(eos), generation_defaults)

    def resolve(self, params: SamplingParams) -> SamplingParams:
        """`params` with every unset field filled (the model's generation config, else the defaults), validated."""
        params.validate()
        params = params.resolved(self.generation_defaults)
        params.validate()
        return params

    def make_runner(self, n_slots: int, max_len: int):
        if not self.fast:
            return HFRunner(self.model, n_slots, max_len)
        key = weights_key(self.model)  # rebuilt if a weight was replaced or edited in place since
        if self._weights is None or self._weights[0] != key:
            self._weights = (key, llama_weights(self.model))
        return LlamaRunner(self.model, n_slots, max_len, self._weights[1])

    # ------------------------------------------------------------------------------------------ prompts

    def encode(self, text: str) -> list[int]:
        """A plain-text prompt's ids; special-token strings in it stay text (tokenizer.encode_text)."""
        return encode_text(self.tokenizer, text)

    def chat_template_ids(self, messages: list[dict]) -> list[int]:
        """The chat template with the generation prompt, as token ids; no turn is dropped (see encode_chat).
        Message text never becomes control tokens (tokenizer.encode_chat)."""
        return encode_chat(self.tokenizer, messages, add_generation_prompt=True).input_ids

    def encode_chat(self, messages: list[dict], max_new_tokens: int = 0) -> list[int]:
        """Chat template + generation prompt. When prompt + max_new_tokens does not fit the context, drop the
        oldest turns after the system prompt (never the last message) until it does."""
        if not messages:
            raise ValueError("messages is empty; send at least one {'role': 'user', 'content': ...} message")
        ids = self.chat_template_ids(messages)
        budget = self.max_context - max_new_tokens
        head = [m for m in messages if m.get("role") == "system"][:1] if messages[0].get("role") == "system" else []
        rest = messages[len(head):]
        while len(ids) > budget and len(rest) > 1:
            rest = rest[1:]
            while len(rest) > 1 and rest[0].get("role") == "assistant":  # a conversation resumes at a user turn
                rest = rest[1:]
            ids = self.chat_template_ids(head + rest)
        if len(ids) >= self.max_context:
            raise ValueError(f"the conversation's last message and system prompt alone are {len(ids)} tokens; the "
                             f"model's context is {self.max_context}. Send a shorter message or system prompt.")
        return ids

    def check_prompt(self, ids: list[int]) -> None:
        if not ids:
            raise ValueError("the prompt is empty; give at least one token")
        if len(ids) >= self.max_context:
            raise ValueError(f"the prompt is {len(ids)} tokens; the model's context is {self.max_context}, "
                             "so shorten the prompt")
        vocab = self.model.config.vocab_size
        bad = [t for t in ids if not 0 <= t < vocab]
        if bad:
            raise ValueError(f"token id {bad[0]} is outside the vocabulary (0..{vocab - 1})")

    # ------------------------------------------------------------------------------------------ generation

    def _max_len(self, seqs: list[Sequence]) -> int:
        return min(self.max_context, max(len(s.prompt_ids) + s.params.max_new_tokens for s in seqs))

    @torch.inference_mode()
    def generate(self, prompts: list[list[int]], params: SamplingParams | list[SamplingParams]) -> list[Completion]:
        """Generate for several prompts at once; they decode together in one batch."""
        plist = params if isinstance(params, list) else [params] * len(prompts)
        if len(plist) != len(prompts):
            raise ValueError(f"got {len(prompts)} prompts but {len(plist)} SamplingParams")
        seqs = [Sequence(self, p, sp) for p, sp in zip(prompts, plist)]
        if not seqs:
            return []
        texts = {id(s): [] for s in seqs}
        batch = Batch(self, len(seqs), self._max_len(seqs))
        for s in seqs:
            texts[id(s)].append(batch.add(s).text)
        while batch.seqs:
            for s, ev in batch.step():
                texts[id(s)].append(ev.text)
        return [Completion("".join(texts[id(s)]), s.out_ids, s.finish_reason, len(s.prompt_ids)) for s in seqs]

    def stream(self, prompt_ids: list[int], params: SamplingParams) -> Iterator[StreamEvent]:
        """Yield text pieces as they are generated; the last event carries the finish reason.
        Closing the iterator early (break, Ctrl-C) just stops generating."""
        seq = Sequence(self, prompt_ids, params)
        batch = Batch(self, 1, self._max_len([seq]))
        with torch.inference_mode():
            event = batch.add(seq)
        yield event
        while batch.seqs:
            with torch.inference_mode():  # not held across the yield: the caller's code runs outside it
                (_, event), = batch.step()
            yield event


def generate_cli(model_dir, prompt: str, gen_cfg, chat: bool = False, device: str = "auto") -> None:
    """`gptsmith generate`: stream the continuation of PROMPT to stdout; statistics go to stderr."""
    import sys
    import time

    engine = Engine.load(model_dir, device=device)
    params = engine.resolve(SamplingParams.from_config(gen_cfg))  # unset: the model's generation_config.json
    ids = (engine.encode_chat([{"role": "user", "content": prompt}], params.max_new_tokens) if chat
           else engine.encode(prompt))
    t0, n, reason = time.perf_counter(), 0, None
    for ev in engine.stream(ids, params):
        sys.stdout.write(ev.text)
        sys.stdout.flush()
        n += len(ev.token_ids)
        reason = ev.finish_reason
    sys.stdout.write("\n")
    dt = time.perf_counter() - t0
    print(f"[{len(ids)} prompt tokens, {n} generated in {dt:.2f}s ({n / max(dt, 1e-9):.1f} tok/s), "
          f"finish: {reason}]", file=sys.stderr)
