"""Engine behaviour a user relies on: exact greedy output, batching, streaming text, stops, seeds, context
limits, and the continuous-batching scheduler."""

import asyncio
import dataclasses
import threading

import pytest
import torch

from gptsmith.engine import (BatchScheduler, Engine, IncrementalDecoder, SamplingParams, Sequence, StopMatcher)

# repetition_penalty=1: plain greedy, comparable with a full recompute and with HF generate
GREEDY = SamplingParams(max_new_tokens=40, temperature=0, repetition_penalty=1.0)
TEXTS = ["def foo(x):\n    return", "The", "Python is a programming language that lets you work quickly",
         "import os\nimport sys\n\nclass A:"]


def load_varied_engine(model_dir) -> Engine:
    """A freshly initialised model repeats one token forever, which would make every equality test pass
    trivially. Larger random weights give varied greedy output, so a wrong cache or position shows up."""
    eng = Engine.load(model_dir, device="cpu")
    torch.manual_seed(0)
    with torch.no_grad():
        for p in eng.model.parameters():
            if p.dim() > 1:
                p.normal_(0, 0.15)
    return eng


@pytest.fixture(scope="module")
def engine(tiny_model_dir):
    eng = load_varied_engine(tiny_model_dir)
    # one thread: on a small shared CPU, torch's thread pool spins against other processes (10x slower)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield eng
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def prompts(engine):
    return [engine.encode(t) for t in TEXTS]


def reference_greedy(engine, ids, n):
    """Full recompute every step, no cache: the ground truth."""
    ids, out = list(ids), []
    with torch.inference_mode():
        for _ in range(n):
            t = int(engine.model(torch.tensor([ids])).logits[0, -1].argmax())
            if t in engine.stop_ids:
                break
            out.append(t)
            ids.append(t)
    return out


def test_greedy_kv_cache_matches_full_recompute_and_hf_generate(engine, prompts):
    for ids in prompts:
        got = engine.generate([ids], GREEDY)[0]
        assert len(set(got.token_ids)) > 5  # the output is not degenerate
        assert got.token_ids == reference_greedy(engine, ids, GREEDY.max_new_tokens)
        hf = engine.model.generate(torch.tensor([ids]), do_sample=False, repetition_penalty=1.0,
                                   max_new_tokens=GREEDY.max_new_tokens,
                                   eos_token_id=sorted(engine.stop_ids), pad_token_id=1)[0, len(ids):].tolist()
        assert got.token_ids == [t for t in hf if t not in engine.stop_ids]


def test_greedy_with_repetition_penalty_matches_hf_batched_and_alone(engine, prompts):
    """The penalty is applied to a whole greedy batch in one op; it must equal HF's and a single sequence's."""
    params = SamplingParams(max_new_tokens=GREEDY.max_new_tokens, temperature=0, repetition_penalty=1.3)
    batched = engine.generate(prompts, [params] * (len(prompts) - 1) + [GREEDY])  # one row without a penalty
    for ids, got, p in zip(prompts, batched, [params] * (len(prompts) - 1) + [GREEDY]):
        hf = engine.model.generate(torch.tensor([ids]), do_sample=False, max_new_tokens=p.max_new_tokens,
                                   repetition_penalty=p.repetition_penalty, eos_token_id=sorted(engine.stop_ids),
                                   pad_token_id=1)[0, len(ids):].tolist()
        assert got.token_ids == [t for t in hf if t not in engine.stop_ids]
        assert got.token_ids == engine.generate([ids], p)[0].token_ids
    assert batched[0].token_ids != engine.generate([prompts[0]], GREEDY)[0].token_ids  # the penalty did something


def test_batched_equals_one_by_one(engine, prompts):
    sampled = SamplingParams(max_new_tokens=30, temperature=0.9, top_k=40, top_p=0.9, repetition_penalty=1.2, seed=7)
    for params in (GREEDY, sampled):
        batched = engine.generate(prompts, params)
        single = [engine.generate([p], params)[0] for p in prompts]
        assert [c.token_ids for c in batched] == [c.token_ids for c in single]
        assert [c.text for c in batched] == [c.text for c in single]
        assert [c.prompt_tokens for c in batched] == [len(p) for p in prompts]


def test_fallback_hf_runner_gives_same_output(engine, prompts):
    fast = engine.generate(prompts[:2], GREEDY)
    engine.fast = False
    try:
        slow = engine.generate(prompts[:2], GREEDY)
    finally:
        engine.fast = True
    assert [c.token_ids for c in fast] == [c.token_ids for c in slow]


def test_stream_reassembles_to_generate(engine, prompts):
    full = engine.generate([prompts[2]], GREEDY)[0]
    events = list(engine.stream(prompts[2], GREEDY))
    assert "".join(e.text for e in events) == full.text
    assert [t for e in events for t in e.token_ids] == full.token_ids
    assert [e.finish_reason for e in events[:-1]] == [None] * (len(events) - 1)
    assert events[-1].finish_reason == "length"


def test_incremental_decoder_holds_back_split_characters(engine):
    text = "héllo 😀 wörld 你好 🎉!"
    ids = engine.encode(text)
    assert len(ids) > len(text) / 2  # the 512-token vocab splits these characters into byte tokens
    dec = IncrementalDecoder(engine.tokenizer)
    pieces = [dec.push(t) for t in ids]
    assert "".join(pieces) + dec.flush() == text
    assert not any("\ufffd" in p for p in pieces)
    assert "" in pieces  # some token ended mid-character and was held back


def test_sequence_streams_multibyte_characters_and_stop_strings(engine):
    # drive the engine's per-token path with forced tokens: an emoji split over byte tokens, then a stop string
    text = "ok 😀 done STOP after"
    seq = Sequence(engine, [1, 2, 3], SamplingParams(max_new_tokens=100, stop=["STOP"]))
    events = []
    for t in engine.encode(text):
        events.append(seq.accept(t))
        if seq.finish_reason:
            break
    assert "".join(e.text for e in events) == "ok 😀 done "
    assert not any("\ufffd" in e.text for e in events)
    assert events[-1].finish_reason == "stop"


def test_stop_matcher_never_emits_part_of_a_stop():
    m = StopMatcher(["</s>", "END"])
    assert m.push("abc<") == ("abc", False)  # "<" may start "</s>"
    assert m.push("/") == ("", False)
    assert m.push("x") == ("</x", False)  # it did not: release it
    assert m.push("E") == ("", False)
    assert m.push("NDtail") == ("", True)
    m = StopMatcher(["ab"])
    assert m.push("xa") == ("x", False)
    assert m.flush() == "a"


def test_stop_string_spanning_tokens(engine, prompts):
    full = engine.generate([prompts[0]], GREEDY)[0]
    dec = IncrementalDecoder(engine.tokenizer)
    pieces = [dec.push(t) for t in full.token_ids]
    # a stop string made of the end of one token's text and the start of the next
    i = next(i for i in range(5, len(pieces) - 1) if len(pieces[i]) >= 2 and len(pieces[i + 1]) >= 2)
    stop = pieces[i][-2:] + pieces[i + 1][:2]
    got = engine.generate([prompts[0]], dataclasses.replace(GREEDY, stop=[stop]))[0]
    assert got.finish_reason == "stop"
    assert got.text == full.text[:full.text.find(stop)]
    streamed = "".join(e.text for e in engine.stream(prompts[0], dataclasses.replace(GREEDY, stop=[stop])))
    assert streamed == got.text


def test_eos_token_stops(engine, prompts):
    full = engine.generate([prompts[1]], GREEDY)[0]
    eos = full.token_ids[6]
    saved = engine.stop_ids
    engine.stop_ids = saved | {eos}
    try:
        got = engine.generate([prompts[1]], GREEDY)[0]
    finally:
        engine.stop_ids = saved
    assert got.finish_reason == "stop"
    assert got.token_ids == full.token_ids[:full.token_ids.index(eos)]


def test_seed_reproducible(engine, prompts):
    def sample(seed):
        return engine.generate([prompts[1]], SamplingParams(max_new_tokens=30, temperature=1.0, seed=seed))[0]
    assert sample(1).token_ids == sample(1).token_ids
    assert sample(1).token_ids != sample(2).token_ids


def test_generation_stops_at_max_context(engine):
    ids = [7] * (engine.max_context - 5)
    got = engine.generate([ids], SamplingParams(max_new_tokens=50, temperature=0, repetition_penalty=1.0))[0]
    assert got.finish_reason == "length" and len(got.token_ids) == 5
    with pytest.raises(ValueError, match="context"):
        engine.generate([[7] * engine.max_context], GREEDY)


def test_encode_chat_drops_oldest_turns_keeps_system(engine):
    messages = [{"role": "system", "content": "SYSTEM-PROMPT be brief"}]
    for i in range(12):
        messages += [{"role": "user", "content": f"question {i} " + "lorem " * 2},
                     {"role": "assistant", "content": f"answer {i} " + "dolor " * 2}]
    messages.append({"role": "user", "content": "LAST-QUESTION"})
    ids = engine.encode_chat(messages, max_new_tokens=64)
    assert len(ids) <= engine.max_context - 64
    text = engine.tokenizer.decode(ids)
    assert "SYSTEM-PROMPT" in text and "LAST-QUESTION" in text
    assert "question 0 " not in text and "question 11 " in text
    assert text.endswith("<|assistant|>\n")
    assert text.split("<|system|>")[1].find("<|user|>") >= 0  # the first kept turn is a user turn
    short = messages[:1] + messages[-1:]
    assert engine.encode_chat(short, 64) == engine.chat_template_ids(short)


def test_scheduler_concurrent_requests_match_single(engine):
    texts = [f"{t} {i}" for i, t in enumerate(TEXTS * 2)]
    prompts = [engine.encode(t) for t in texts]
    expected = [c.token_ids for c in (engine.generate([p], GREEDY)[0] for p in prompts)]
    sched = BatchScheduler(engine, max_batch_size=4)
    sched.start()
    results: dict[int, tuple] = {}

    def worker(i):
        req = sched.submit(prompts[i], GREEDY)
        events = list(req.events(timeout=60))
        results[i] = ([t for e in events for t in e.token_ids], events[-1].finish_reason, req.completion_tokens)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    sched.stop()
    assert [results[i][0] for i in range(8)] == expected
    assert all(reason in ("stop", "length") and n == len(ids) for ids, reason, n in results.values())


def test_scheduler_cancel_frees_slot_and_errors_are_per_request(engine, prompts):
    sched = BatchScheduler(engine, max_batch_size=1)
    sched.start()
    try:
        long = sched.submit(prompts[0], SamplingParams(max_new_tokens=10_000, temperature=0, repetition_penalty=1.0))
        it = long.events(timeout=30)
        next(it)
        bad = sched.submit([], GREEDY)  # an empty prompt is that request's error, not the scheduler's
        waiting = sched.submit(prompts[1], GREEDY)  # only one slot: it waits for the long one
        long.cancel()
        assert list(it)[-1].finish_reason == "cancelled"
        bad_events = list(bad.events(timeout=30))
        assert bad_events[-1].finish_reason == "error" and "empty" in bad_events[-1].text
        events = list(waiting.events(timeout=30))
        assert [t for e in events for t in e.token_ids] == engine.generate([prompts[1]], GREEDY)[0].token_ids
        assert sched.num_active == 0
    finally:
        sched.stop()


def test_scheduler_async_events(engine, prompts):
    sched = BatchScheduler(engine, max_batch_size=2)

    async def run():
        req = sched.submit(prompts[2], GREEDY)
        return [e async for e in req.aevents()]

    try:
        events = asyncio.run(run())
    finally:
        sched.stop()
    assert "".join(e.text for e in events) == engine.generate([prompts[2]], GREEDY)[0].text


def test_generate_cli_streams_to_stdout(tiny_model_dir, capsys):
    from gptsmith.config import GenerateConfig
    from gptsmith.engine import generate_cli

    cfg = GenerateConfig(max_new_tokens=7, temperature=0)
    generate_cli(tiny_model_dir, "def main():", cfg, device="cpu")
    plain = capsys.readouterr()
    eng = Engine.load(tiny_model_dir, device="cpu")
    expected = eng.generate([eng.encode("def main():")], SamplingParams.from_config(cfg))[0]
    assert plain.out == expected.text + "\n"
    assert f"{len(expected.token_ids)} generated" in plain.err
    generate_cli(tiny_model_dir, "hi", cfg, chat=True, device="cpu")
    chat_ids = eng.encode_chat([{"role": "user", "content": "hi"}], 7)
    assert f"[{len(chat_ids)} prompt tokens" in capsys.readouterr().err


def test_weight_edits_after_first_generate_are_used(tiny_model_dir, prompts):
    """The fast path keeps fused copies of q/k/v and gate/up; editing the model's weights must not leave them stale."""
    eng = load_varied_engine(tiny_model_dir)
    before = eng.generate([prompts[0]], GREEDY)[0].token_ids  # builds the fused copies
    with torch.no_grad():
        for layer in eng.model.model.layers:
            layer.self_attn.k_proj.weight.normal_(0, 0.3)
            layer.mlp.up_proj.weight.normal_(0, 0.3)
    got = eng.generate([prompts[0]], GREEDY)[0].token_ids
    assert got != before
    hf = eng.model.generate(torch.tensor([prompts[0]]), do_sample=False, repetition_penalty=1.0,
                            max_new_tokens=GREEDY.max_new_tokens,
                            eos_token_id=sorted(eng.stop_ids), pad_token_id=1)[0, len(prompts[0]):].tolist()
    assert got == [t for t in hf if t not in eng.stop_ids]


# ------------------------------------------------------------------------------ sampling defaults in one place

def sampling_values(params) -> dict:
    from gptsmith.generation_defaults import SAMPLING_FIELDS
    return {f: getattr(params, f) for f in SAMPLING_FIELDS}


def test_sampling_defaults_agree_in_config_engine_and_saved_models(tokenizer_dir, tmp_path):
    from transformers import GenerationConfig

    from gptsmith.config import GenerateConfig
    from gptsmith.engine.params import read_generation_config
    from gptsmith.generation_defaults import DEFAULTS, SAMPLING_FIELDS
    from gptsmith.model import default_generation_config
    from gptsmith.tokenizer import load_tokenizer

    expected = {f: getattr(DEFAULTS, f) for f in SAMPLING_FIELDS}
    assert sampling_values(SamplingParams().resolved()) == expected  # the engine, nothing asked
    assert sampling_values(SamplingParams.from_config(GenerateConfig()).resolved()) == expected  # the config
    default_generation_config(load_tokenizer(tokenizer_dir)).save_pretrained(tmp_path)  # every saved model
    assert read_generation_config(tmp_path)[0] == expected
    hf = GenerationConfig.from_pretrained(tmp_path)  # ... and what other tools (HF generate) read from it
    assert hf.do_sample and {f: getattr(hf, f) for f in SAMPLING_FIELDS} == expected


@pytest.fixture()
def varied_model_dir(tiny_model_dir, tmp_path):
    eng = load_varied_engine(tiny_model_dir)
    out = tmp_path / "varied"
    eng.model.save_pretrained(out)
    eng.tokenizer.save_pretrained(out)
    return out


def write_generation_config(model_dir, **values) -> None:
    import json
    (model_dir / "generation_config.json").write_text(json.dumps(values))


def test_engine_and_generate_cli_honour_generation_config_json(varied_model_dir, capsys, tmp_path):
    from gptsmith.cli import main
    from gptsmith.config import load_config

    eng = Engine.load(varied_model_dir, device="cpu")
    ids = eng.encode(TEXTS[2])
    plain = eng.generate([ids], GREEDY)[0].token_ids  # greedy, no penalty
    cut = next(i for i in range(2, len(plain)) if plain[i] not in plain[:i])  # a token whose first use ends it
    eos = eng.tokenizer.eos_token_id
    write_generation_config(varied_model_dir, do_sample=False, repetition_penalty=1.0, top_k=7, max_new_tokens=30,
                            eos_token_id=[eos, plain[cut]])

    eng = Engine.load(varied_model_dir, device="cpu")
    got = eng.generate([ids], SamplingParams())[0]  # greedy, and the extra eos id stops it
    assert got.token_ids == plain[:cut] and got.finish_reason == "stop"
    unset = eng.resolve(SamplingParams())
    assert (unset.temperature, unset.top_k, unset.repetition_penalty, unset.max_new_tokens) == (0, 7, 1.0, 30)
    # what a request or the config sets wins, even when it is gptsmith's default value
    asked = eng.resolve(SamplingParams.from_config(load_config(None, {"generate.temperature": 0.8,
                                                                       "generate.max_new_tokens": 256}).generate))
    assert (asked.temperature, asked.max_new_tokens, asked.top_k) == (0.8, 256, 7)
    # a config saved with every key (gptsmith.yaml beside a model) and loaded again still leaves them to the model
    from gptsmith.config import save_config
    reloaded = load_config(save_config(load_config(None, {"generate.seed": 3}), tmp_path), {}).generate
    again = eng.resolve(SamplingParams.from_config(reloaded))
    assert (again.temperature, again.top_k, again.max_new_tokens, again.seed) == (0, 7, 30, 3)

    assert main(["generate", "--model", str(varied_model_dir), "--prompt", TEXTS[2], "--device", "cpu"]) in (0, None)
    assert capsys.readouterr().out == eng.tokenizer.decode(plain[:cut]) + "\n"
    write_generation_config(varied_model_dir, do_sample=False, repetition_penalty=1.0, max_new_tokens=4)
    assert main(["generate", "--model", str(varied_model_dir), "--prompt", TEXTS[2], "--device", "cpu"]) in (0, None)
    out = capsys.readouterr()
    assert out.out == eng.tokenizer.decode(plain[:4]) + "\n" and "4 generated" in out.err and "length" in out.err
    assert main(["generate", "--model", str(varied_model_dir), "--prompt", TEXTS[2], "--device", "cpu",
                 "--max-new-tokens", "2"]) in (0, None)
    assert capsys.readouterr().out == eng.tokenizer.decode(plain[:2]) + "\n"
    write_generation_config(varied_model_dir, temperature=0, top_p=0.5)  # no do_sample: only these keys count
    unset = Engine.load(varied_model_dir, device="cpu").resolve(SamplingParams())
    assert (unset.temperature, unset.top_p, unset.top_k, unset.max_new_tokens) == (0, 0.5, 50, 256)


def test_bad_generation_config_json_is_a_clear_error(varied_model_dir):
    from gptsmith.errors import InputError

    write_generation_config(varied_model_dir, do_sample=True, temperature=-1)
    with pytest.raises(InputError, match=r"generation_config.json: temperature must be >= 0"):
        Engine.load(varied_model_dir, device="cpu")
    (varied_model_dir / "generation_config.json").write_text("{not json")
    with pytest.raises(InputError, match="generation_config.json: not a readable JSON file"):
        Engine.load(varied_model_dir, device="cpu")


def test_generated_nul_byte_is_replacement_character(tokenizer_dir):
    """A byte-level model can emit byte 0; streamed text (and so the store and the client) gets U+FFFD."""
    from gptsmith.engine.text import IncrementalDecoder
    from gptsmith.tokenizer import load_tokenizer

    tok = load_tokenizer(tokenizer_dir)
    ids = tok.encode("a\x00b", add_special_tokens=False)
    dec = IncrementalDecoder(tok)
    text = "".join(dec.push(i) for i in ids) + dec.flush()
    assert text == "a\ufffdb"
