"""gptsmith eval: text bits-per-byte, JSONL suites (multiple choice, generation, k-shot, validation), result files,
--baseline comparisons and the CLI."""

import json
import math
import shutil

import pytest
import torch

from gptsmith.errors import InputError
from gptsmith.eval import results as res
from gptsmith.eval import suites
from gptsmith.eval.run import evaluate, resolve_suite
from gptsmith.eval.targets import open_target
from gptsmith.eval.text import Document, read_documents, score_documents
from gptsmith.tokenizer import encode_text

from conftest import python_doc_texts

FACTS = [("What color is the sky?", ["blue", "green", "red"], 0),
         ("What do cows drink?", ["oil", "water", "sand"], 1),
         ("Which animal barks?", ["cat", "fish", "dog"], 2),
         ("What is frozen water?", ["ice", "steam", "smoke"], 0),
         ("How many legs has a spider?", ["six", "eight", "two"], 1),
         ("What do bees make?", ["milk", "glass", "honey"], 2),
         ("Where do fish live?", ["water", "trees", "clouds"], 0),
         ("What shines at night?", ["sun", "moon", "rain"], 1),
         ("What is the opposite of hot?", ["warm", "big", "cold"], 2),
         ("Which fruit is yellow?", ["banana", "grape", "plum"], 0)]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models run fastest on one thread; on a busy machine two OpenMP threads spin against each other."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def write_jsonl(path, records):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


def mc_records():
    return [{"question": q, "choices": c, "answer": a} for q, c, a in FACTS]


@pytest.fixture(scope="module")
def chat_target(tiny_model_dir):
    return open_target(model=tiny_model_dir, device="cpu")


@pytest.fixture(scope="module")
def base_model_dir(tmp_path_factory, tiny_model_dir):
    """The tiny model with a tokenizer that has no chat template: a base (plain text) model."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    tok.chat_template = None
    out = tmp_path_factory.mktemp("base") / "base"
    AutoModelForCausalLM.from_pretrained(tiny_model_dir).save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def base_target(base_model_dir):
    target = open_target(model=base_model_dir, device="cpu")
    assert not target.is_chat
    return target


def hand_bits(model, ids):
    """-log2 P of ids[1:] from one forward pass of ids."""
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), -1)
    return -sum(logp[t - 1, ids[t]].item() for t in range(1, len(ids))) / math.log(2)


# ---------------------------------------------------------------------------------------------- text

def test_bits_per_byte_equals_a_hand_computation(chat_target):
    engine = chat_target.engine
    text = "def add(x, y):\n    return x + y\n"
    (item,) = score_documents(engine, [Document("a.py", text)])
    ids = [engine.tokenizer.bos_token_id] + encode_text(engine.tokenizer, text)  # BOS: the first token is scored
    assert item["nll_bits"] == pytest.approx(hand_bits(engine.model, ids), rel=1e-4)
    assert item["bytes"] == len(text.encode()) and item["tokens"] == len(ids) - 1


@pytest.mark.parametrize("stride", [100, 255])
def test_a_document_longer_than_the_context_is_scored_in_sliding_windows(chat_target, stride):
    engine = chat_target.engine
    context = engine.max_context
    text = " ".join(python_doc_texts(40))[:6000]
    ids = [engine.tokenizer.bos_token_id] + encode_text(engine.tokenizer, text)
    assert len(ids) > 2 * context
    (item,) = score_documents(engine, [Document("long", text)], stride=stride, batch_size=2)
    # by hand: token t is scored by the first window (starting at 0, stride, 2*stride...) that reaches past it
    bits, logps = 0.0, {}
    for t in range(1, len(ids)):
        begin = 0
        while min(begin + context, len(ids)) <= t:
            begin += stride
        if begin not in logps:
            with torch.no_grad():
                logps[begin] = torch.log_softmax(engine.model(torch.tensor([ids[begin:begin + context]])).logits[0], -1)
        assert t - begin >= min(t, context - stride)  # enough history after the first window
        bits -= logps[begin][t - begin - 1, ids[t]].item() / math.log(2)
    assert item["tokens"] == len(ids) - 1  # every token exactly once
    assert item["nll_bits"] == pytest.approx(bits, rel=1e-4)
    with pytest.raises(InputError, match="stride 256 must be between 1 and the model's context - 1"):
        score_documents(engine, [Document("long", text)], stride=context)


@pytest.fixture(scope="module")
def other_tokenizer_model(tmp_path_factory):
    """A second model whose tokenizer has a different vocabulary (300 tokens instead of 512)."""
    from gptsmith.config import ModelConfig
    from gptsmith.model import build_model, llama_config, resolve_shape, save_model_dir
    from gptsmith.tokenizer import load_tokenizer, train_tokenizer

    tok_dir = tmp_path_factory.mktemp("tok2") / "tokenizer"
    train_tokenizer(python_doc_texts(200), tok_dir, vocab_size=300)
    tok = load_tokenizer(tok_dir)
    cfg = llama_config(resolve_shape(ModelConfig(preset="test")), len(tok), tok.bos_token_id, tok.eos_token_id,
                       tok.pad_token_id)
    return save_model_dir(build_model(cfg, seed=1), tok, tmp_path_factory.mktemp("m2") / "m2")


def test_bytes_come_from_the_text_whatever_the_tokenizer(chat_target, other_tokenizer_model):
    text = "Grüße aus Köln — naïve café ✓ 東京\n"
    other = open_target(model=other_tokenizer_model, device="cpu")
    (a,) = score_documents(chat_target.engine, [Document("t", text)])
    (b,) = score_documents(other.engine, [Document("t", text)])
    assert a["bytes"] == b["bytes"] == len(text.encode("utf-8")) > len(text)  # bytes, not characters
    assert a["tokens"] != b["tokens"]  # the tokenizers differ; the denominator of bpb does not


def test_text_inputs_folder_jsonl_and_bad_files(tmp_path):
    folder = tmp_path / "docs"
    (folder / "sub").mkdir(parents=True)
    (folder / "a.md").write_text("# Title\ntext")
    (folder / "sub" / "b.py").write_text("x = 1\n")
    (folder / "empty.txt").write_text("")
    (folder / "image.png").write_bytes(b"\x89PNG\x00")
    (folder / ".hidden.txt").write_text("secret")
    assert [d.id for d in read_documents(folder)] == ["a.md", "sub/b.py"]
    lines = write_jsonl(tmp_path / "t.jsonl", [{"text": "one"}, {"text": "two"}])
    assert [(d.id, d.text) for d in read_documents(lines)] == [("t.jsonl:1", "one"), ("t.jsonl:2", "two")]
    bad = tmp_path / "latin1.txt"
    bad.write_bytes("caf\xe9".encode("latin-1"))
    with pytest.raises(InputError, match="latin1.txt: not valid UTF-8"):
        read_documents(bad)
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(InputError, match="empty.txt: the file has no text"):
        read_documents(tmp_path / "empty.txt")
    write_jsonl(tmp_path / "bad.jsonl", [{"text": "ok"}, {"body": "no text"}])
    with pytest.raises(InputError, match=r"bad.jsonl:2: no \"text\""):
        read_documents(tmp_path / "bad.jsonl")
    with pytest.raises(InputError, match="no such file"):
        read_documents(tmp_path / "missing")


# ---------------------------------------------------------------------------------------------- multiple choice

def test_choice_log_probs_score_only_the_continuation_tokens(chat_target, base_target, tmp_path):
    items = suites.load_suite(write_jsonl(tmp_path / "mc.jsonl", mc_records())).items
    chat = suites.choice_logprobs(chat_target, items, batch_size=4)  # batches mix items and padding
    base = suites.choice_logprobs(base_target, items, batch_size=5)
    engine, tok = chat_target.engine, chat_target.engine.tokenizer
    for item, got_chat, got_base in zip(items, chat, base):
        ctx = engine.chat_template_ids([{"role": "user", "content": item["question"]}])
        plain = f"Question: {item['question']}\nAnswer:"
        for choice, (lp_chat, n_chat), (lp_base, n_base) in zip(item["choices"], got_chat, got_base):
            cont = encode_text(tok, choice)
            full = ctx + cont
            assert -lp_chat / math.log(2) == pytest.approx(
                hand_bits(engine.model, full) - hand_bits(engine.model, ctx), rel=1e-4, abs=1e-4)
            # base: the choice's tokens are what follows the context's tokens in context + " " + choice
            ctx_ids = [tok.bos_token_id] + encode_text(tok, plain)
            whole = [tok.bos_token_id] + encode_text(tok, plain + " " + choice)
            assert -lp_base / math.log(2) == pytest.approx(
                hand_bits(base_target.engine.model, whole) - hand_bits(base_target.engine.model, ctx_ids),
                rel=1e-4, abs=1e-4)
            assert n_chat == len(choice.encode()) and n_base == len((" " + choice).encode())



def test_batching_limits_do_not_change_the_scores(chat_target, tmp_path, monkeypatch):
    items = suites.load_suite(write_jsonl(tmp_path / "mc.jsonl", mc_records())).items
    together = suites.choice_logprobs(chat_target, items, batch_size=64)
    monkeypatch.setattr(suites, "LOGITS_BUDGET", 1)  # one request per forward pass
    alone = suites.choice_logprobs(chat_target, items)
    for a, b in zip(together, alone):
        assert [x[0] for x in a] == pytest.approx([x[0] for x in b], rel=1e-5, abs=1e-5)


def test_a_long_shared_context_is_scored_once_with_the_same_log_probabilities(chat_target, tmp_path, monkeypatch):
    # an assistant's sources or k-shot examples make the context long: the choices then share one pass over it
    # (its key/value cache copied per choice); the scores must be those of scoring each choice in full
    long = [dict(r, question="Background: " + "the list type keeps items in order. " * 12 + r["question"])
            for r in mc_records()]
    items = suites.load_suite(write_jsonl(tmp_path / "mc.jsonl", long)).items
    assert all(suites._shares_long_context(suites.item_requests(chat_target, items, i, 0, 0))
               for i in range(len(items)))
    shared = suites.choice_logprobs(chat_target, items)
    monkeypatch.setattr(suites, "SHARED_CONTEXT_MIN", 10**9)  # every choice in full, batched across items
    full = suites.choice_logprobs(chat_target, items)
    for a, b in zip(shared, full):
        assert [x[0] for x in a] == pytest.approx([x[0] for x in b], rel=1e-4, abs=1e-4)
        assert [x[1] for x in a] == [x[1] for x in b]


def test_acc_norm_corrects_the_length_bias_of_raw_log_probability():
    # a long right answer loses on its summed log-probability but wins per byte
    pred, pred_norm = suites.choose([(-4.0, 2), (-9.0, 30)])
    assert (pred, pred_norm) == (0, 1)
    assert suites.choose([(-1.0, 5), (-3.0, 5)]) == (0, 0)


def _train_on_answers(target, items, steps=60):
    """Teach the model the right answers in exactly the form the suite scores them (chat template + reply)."""
    engine = target.engine
    seqs = [engine.chat_template_ids([{"role": "user", "content": it["question"]}])
            + encode_text(engine.tokenizer, it["choices"][it["answer"]]) for it in items]
    width = max(map(len, seqs))
    ids = torch.tensor([s + [0] * (width - len(s)) for s in seqs])
    labels = torch.tensor([s + [-100] * (width - len(s)) for s in seqs])
    torch.manual_seed(0)
    model = engine.model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(steps):
        loss = model(input_ids=ids, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()


def test_a_model_trained_on_the_answers_beats_a_random_one(tiny_model_dir, tmp_path):
    items = suites.load_suite(write_jsonl(tmp_path / "mc.jsonl", mc_records())).items
    random_model = open_target(model=tiny_model_dir, device="cpu")
    trained = open_target(model=tiny_model_dir, device="cpu")
    _train_on_answers(trained, items)
    rand_acc = sum(r["acc"] for r in suites.score_multiple_choice(random_model, items)) / len(items)
    scored = suites.score_multiple_choice(trained, items)
    acc = sum(r["acc"] for r in scored) / len(items)
    assert acc >= 0.9 and acc > rand_acc
    assert set(scored[0]) == {"id", "acc", "acc_norm", "pred", "pred_norm"}


def test_an_item_too_long_for_the_context_drops_shots_then_is_named(chat_target, tmp_path):
    long_q = "word " * 300
    records = mc_records() + [{"id": "huge", "question": long_q, "choices": ["a", "b"], "answer": 0}]
    items = suites.load_suite(write_jsonl(tmp_path / "mc.jsonl", records)).items
    big_shots = [dict(it, question="many words here " * 20) for it in items[:10]]
    reqs = suites.item_requests(chat_target, big_shots + [items[0]], 10, k_shot=8, seed=0)
    assert max(len(r.context) + len(r.continuation) for r in reqs) <= chat_target.engine.max_context + 1
    with pytest.raises(InputError, match=r"item huge \(line 11\).*context is 256"):
        suites.score_multiple_choice(chat_target, items)


# ---------------------------------------------------------------------------------------------- k-shot

def test_shots_never_include_the_item_and_are_fixed_by_the_seed(tmp_path):
    items = suites.load_suite(write_jsonl(tmp_path / "mc.jsonl", mc_records())).items
    for i in range(len(items)):
        shots = suites.pick_shots(items, i, 5, seed=0)
        assert len(shots) == 5 and items[i] not in shots
        assert shots == suites.pick_shots(items, i, 5, seed=0)
    assert any(suites.pick_shots(items, i, 3, 0) != suites.pick_shots(items, i, 3, 1) for i in range(len(items)))
    assert len(suites.pick_shots(items, 0, 50, 0)) == len(items) - 1


def test_k_shot_uses_the_chat_template_for_a_chat_model_and_plain_text_for_a_base_one(chat_target, base_target,
                                                                                        tmp_path):
    items = suites.load_suite(write_jsonl(tmp_path / "mc.jsonl", mc_records())).items
    shots = suites.pick_shots(items, 0, 2, seed=0)
    (chat_req, *_) = suites.item_requests(chat_target, items, 0, k_shot=2, seed=0)
    tok = chat_target.engine.tokenizer
    text = tok.decode(chat_req.context)
    assert text.count("<|user|>") == 3 and text.count("<|assistant|>") == 3 and text.endswith("<|assistant|>\n")
    assert f"{shots[0]['question']}<|end|>\n<|assistant|>\n{shots[0]['choices'][shots[0]['answer']]}<|end|>" in text
    (base_req, *_) = suites.item_requests(base_target, items, 0, k_shot=2, seed=0)
    assert base_req.context[0] == tok.bos_token_id
    plain = tok.decode(base_req.context[1:])
    assert "<|" not in plain and plain == (
        "\n\n".join(f"Question: {s['question']}\nAnswer: {s['choices'][s['answer']]}" for s in shots)
        + f"\n\nQuestion: {items[0]['question']}\nAnswer:")
    gen = suites.load_suite(write_jsonl(tmp_path / "gen.jsonl", [{"prompt": f"{i}+1=", "answer": str(i + 1)}
                                                                 for i in range(4)])).items
    msgs = suites.generation_messages(chat_target, gen, 0, 2, 0)
    assert [m["role"] for m in msgs] == ["user", "assistant", "user", "assistant", "user"]
    (plain_msg,) = suites.generation_messages(base_target, gen, 0, 2, 0)
    assert plain_msg["content"].endswith("\n\n0+1=\n") and plain_msg["content"].count("\n\n") == 2


def test_an_assistant_is_scored_on_the_prompt_it_builds(tiny_model_dir, tmp_path):
    bot = tmp_path / "bot.yaml"
    bot.write_text(f"name: bot\nmodel: {tiny_model_dir}\nsystem_prompt: Answer in one word.\n")
    target = open_target(assistant=bot, device="cpu")
    items = suites.load_suite(write_jsonl(tmp_path / "mc.jsonl", mc_records())).items
    (req, *_) = suites.item_requests(target, items, 0, k_shot=0, seed=0)
    assert "Answer in one word." in target.engine.tokenizer.decode(req.context)
    assert len(suites.score_multiple_choice(target, items[:2])) == 2


def test_a_generation_prompt_too_long_drops_shots_then_is_named(chat_target, tmp_path):
    records = [{"prompt": "many words here " * 5, "answer": "x"} for _ in range(6)]
    records.append({"id": "huge", "prompt": "word " * 300, "answer": "x"})
    items = suites.load_suite(write_jsonl(tmp_path / "g.jsonl", records)).items
    msgs = suites.generation_messages(chat_target, items, 0, 5, 0, max_tokens=16)
    assert len(chat_target.engine.chat_template_ids(msgs)) + 16 <= chat_target.engine.max_context
    assert 1 < len(msgs) < 11  # some shots kept, some dropped
    with pytest.raises(InputError, match=r"item huge \(line 7\): the prompt is \d+ tokens"):
        suites.score_generation(chat_target, items, max_tokens=4)


# ---------------------------------------------------------------------------------------------- generation

def gen_item(match, answer, must_stop=False):
    return {"match": match, "answers": [answer] if isinstance(answer, str) else answer, "must_stop": must_stop}


def test_exact_match_strips_whitespace_and_is_case_sensitive():
    item = gen_item("exact", "Paris")
    assert suites.generation_score(item, "  Paris\n", "stop") == 1.0
    assert suites.generation_score(item, "paris", "stop") == 0.0
    assert suites.generation_score(item, "Paris is the capital", "stop") == 0.0
    assert suites.generation_score(gen_item("exact", ["Rome", "Paris"]), "Paris", "stop") == 1.0


def test_contains_and_regex_matchers():
    assert suites.generation_score(gen_item("contains", ["Lyon", "Paris"]), "It is Paris.", "stop") == 1.0
    assert suites.generation_score(gen_item("contains", "Paris"), "It is Rome.", "stop") == 0.0
    assert suites.generation_score(gen_item("regex", r"def \w+\("), "x\ndef foo(a):", "stop") == 1.0
    assert suites.generation_score(gen_item("regex", r"^\d+$"), "abc", "stop") == 0.0
    assert suites.generation_score(gen_item("regex", r"(?i)paris"), "PARIS", "stop") == 1.0


@pytest.mark.parametrize("output,answer,ok", [
    ("The answer is 1,234.", "1234", True),
    ("costs $1,000,000 in total", "1000000", True),
    ("first 3 then -7.5", "-7.5", True),
    ("it drops to \u221212", "-12", True),
    ("about 50%", "50", True),
    ("3.14159", "3.14159", True),
    ("0.1 + 0.2 = 0.30000000000000004", "0.3", True),  # within the relative tolerance
    ("42 then 41", "42", False),  # the last number counts
    ("no number here", "0", False),
    ("x = 2.5", "2", False),
])
def test_numeric_matcher_reads_the_last_number(output, answer, ok):
    assert suites.generation_score(gen_item("numeric", answer), output, "stop") == float(ok)


def test_must_stop_fails_a_reply_cut_at_the_token_limit():
    assert suites.generation_score(gen_item("contains", "ok", must_stop=True), "ok", "length") == 0.0
    assert suites.generation_score(gen_item("contains", "ok", must_stop=True), "ok", "stop") == 1.0
    only_stop = {"match": None, "answers": [], "must_stop": True}
    assert suites.generation_score(only_stop, "anything", "stop") == 1.0
    assert suites.generation_score(only_stop, "anything", "length") == 0.0


def test_a_generation_suite_runs_end_to_end_through_a_model(chat_target, tmp_path):
    records = [{"prompt": "Say hi", "answer": ".*", "match": "regex"},
               {"prompt": "Say hi", "answer": ".*", "match": "regex", "must_stop": True, "max_tokens": 2},
               {"prompt": "Count", "must_stop": True},
               {"prompt": "2+2?", "answer": "4", "match": "numeric"}]
    items = suites.load_suite(write_jsonl(tmp_path / "g.jsonl", records)).items
    out = suites.score_generation(chat_target, items, max_tokens=8)
    assert [set(o) for o in out] == [{"id", "score", "output", "finish_reason"}] * 4
    assert out[0]["score"] == 1.0  # ".*" matches any reply
    assert out[1]["finish_reason"] in ("stop", "length") and len(chat_target.engine.encode(out[1]["output"])) <= 2
    for item, o in zip(items, out):
        assert o["score"] == suites.generation_score(item, o["output"], o["finish_reason"])
    again = suites.score_generation(chat_target, items, max_tokens=8)
    assert again == out  # greedy: a rerun gives the same outputs


# ---------------------------------------------------------------------------------------------- validation

@pytest.mark.parametrize("line,message", [
    ('{"question": "q", "choices": ["a", "b"], "answer": 0', r"bad.jsonl:2: not valid JSON"),
    ('{"choices": ["a", "b"], "answer": 0}', r'bad.jsonl:2: "question" must be a string'),
    ('{"question": "q", "choices": ["a", "b"], "answer": 2}', r'bad.jsonl:2: "answer" 2 is out of range.*0\.\.1'),
    ('{"question": "q", "choices": ["a"], "answer": 0}', r'bad.jsonl:2: "choices" must be a list of at least 2'),
    ('{"question": "q", "choices": ["a", "b"], "answer": "a"}', r'bad.jsonl:2: "answer" must be the 0-based'),
    ('{"prompt": "p", "answer": "x"}', r"bad.jsonl:2: a generation item, but line 1 is multiple choice; one kind"),
    ('{"question": "q", "choices": ["a", "b"], "answer": 0, "anwser": 1}', r"bad.jsonl:2: unknown field 'anwser'"),
    ('{"question": "q", "choices": ["a", "b"], "answer": 0, "id": "1"}', r'bad.jsonl:2: "id" \'1\' is also line 1'),
    ('[1, 2]', r"bad.jsonl:2: a line must be a JSON object"),
    ('{"foo": 1}', r'bad.jsonl:2: neither "question"'),
])
def test_multiple_choice_validation_names_file_line_and_field(tmp_path, line, message):
    path = write_jsonl(tmp_path / "bad.jsonl", ['{"id": "1", "question": "q", "choices": ["a", "b"], "answer": 1}',
                                                line])
    with pytest.raises(InputError, match=message):
        suites.load_suite(path)


@pytest.mark.parametrize("record,message", [
    ({"prompt": "p", "answer": "(unclosed", "match": "regex"}, r"g.jsonl:1: \"answer\" '\(unclosed' is not a valid"),
    ({"prompt": "p", "answer": "many", "match": "numeric"}, r'g.jsonl:1: "answer" \'many\' is not a number'),
    ({"prompt": "p", "answer": "x", "match": "fuzzy"}, r'g.jsonl:1: "match" \'fuzzy\' is not one of'),
    ({"prompt": "p"}, r'g.jsonl:1: no "answer" to check'),
    ({"prompt": "p", "answer": "x", "max_tokens": 0}, r'g.jsonl:1: "max_tokens" must be a positive'),
    ({"prompt": "", "answer": "x"}, r'g.jsonl:1: "prompt" must be a non-empty'),
])
def test_generation_validation_names_file_line_and_field(tmp_path, record, message):
    with pytest.raises(InputError, match=message):
        suites.load_suite(write_jsonl(tmp_path / "g.jsonl", [record]))


def test_an_empty_suite_and_an_unknown_suite_name_are_refused(tmp_path):
    (tmp_path / "e.jsonl").write_text("\n\n")
    with pytest.raises(InputError, match="e.jsonl: no items"):
        suites.load_suite(tmp_path / "e.jsonl")
    with pytest.raises(InputError, match="unknown suite no-such-suite: not a file, not a built-in suite"):
        resolve_suite("no-such-suite")
    assert resolve_suite(str(write_jsonl(tmp_path / "t.jsonl", [{"text": "x"}]))).kind == "text"
    assert resolve_suite(str(write_jsonl(tmp_path / "q.jsonl", mc_records()))).kind == "task"
    assert resolve_suite("lm-eval:arc_easy,hellaswag").tasks == ("arc_easy", "hellaswag")


# ---------------------------------------------------------------------------------------------- results

def test_evaluate_writes_the_result_file_per_contract(chat_target, tmp_path):
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "a.txt").write_text("Lists are mutable sequences.")
    (docs / "b.md").write_text("Tuples are immutable.")
    quiz = write_jsonl(tmp_path / "quiz.jsonl", mc_records())
    result = evaluate(chat_target, [str(docs), str(quiz)], out_dir=tmp_path / "out", k_shot=1, seed=3)
    on_disk = json.loads((tmp_path / "out").joinpath(result["path"]).read_text())
    assert on_disk["kind"] == "eval" and on_disk["format"] == 1 and on_disk["seed"] == 3
    assert on_disk["target"]["kind"] == "model" and "path" not in on_disk
    text, mc = on_disk["suites"]
    assert text["name"] == "docs" and text["kind"] == "text" and text["primary"] == "bpb"
    assert set(text["metrics"]) == {"bpb", "ppl", "tokens", "bytes"} and text["higher_is_better"]["bpb"] is False
    assert text["metrics"]["bpb"] == pytest.approx(sum(i["nll_bits"] for i in text["items"]) / text["metrics"]["bytes"])
    assert text["version"].startswith("sha256:") and len(text["version"]) == len("sha256:") + 16
    assert mc["name"] == "quiz" and mc["kind"] == "multiple_choice" and mc["k_shot"] == 1 and mc["chat_template"]
    assert mc["n"] == len(FACTS) and mc["primary"] == "acc_norm" and mc["source"] == str(quiz.resolve())
    limited = evaluate(chat_target, [str(quiz)], limit=3)
    assert limited["suites"][0]["n"] == 3 and "path" not in limited


def _suite(name, items, kind="multiple_choice", version="sha256:1"):
    metrics = ({"bpb": res.metric_value(items, "bpb"), "ppl": 1.0} if kind == "text"
               else {"acc": res.metric_value(items, "acc")})
    return {"name": name, "kind": kind, "version": version, "primary": "bpb" if kind == "text" else "acc",
            "metrics": metrics, "higher_is_better": {"bpb": False, "ppl": False, "acc": True}, "items": items}


def _result(*suites_):
    return {"kind": "eval", "suites": list(suites_)}


def test_baseline_identical_runs_show_no_significant_difference():
    items = [{"id": str(i), "acc": float(i % 2)} for i in range(40)]
    rows = res.compare_to_baseline(_result(_suite("quiz", items)), _result(_suite("quiz", items)))
    assert [(r["metric"], r["diff"], r["significant"], r["better"]) for r in rows] == [("acc", 0.0, False, None)]


def test_baseline_a_clearly_better_run_is_significant_in_the_right_direction():
    base = [{"id": str(i), "acc": 0.0} for i in range(40)]
    new = [{"id": str(i), "acc": 1.0 if i < 30 else 0.0} for i in reversed(range(40))]  # ids paired, not positions
    (row,) = res.compare_to_baseline(_result(_suite("quiz", new)), _result(_suite("quiz", base)))
    assert row["diff"] == pytest.approx(0.75) and row["significant"] and row["better"] is True and row["lo"] > 0
    (row,) = res.compare_to_baseline(_result(_suite("quiz", base)), _result(_suite("quiz", new)))
    assert row["better"] is False
    # bits-per-byte: lower is better
    docs = [{"id": str(i), "nll_bits": 100.0 + i, "bytes": 50, "tokens": 20} for i in range(30)]
    fewer_bits = [dict(d, nll_bits=d["nll_bits"] * 0.8) for d in docs]
    rows = res.compare_to_baseline(_result(_suite("docs", fewer_bits, "text")), _result(_suite("docs", docs, "text")))
    (bpb,) = rows  # ppl is not compared: it depends on each model's tokenizer
    assert bpb["diff"] < 0 and bpb["significant"] and bpb["better"] is True


def test_baseline_missing_suites_are_listed_and_a_new_version_compares_shared_items():
    items = [{"id": str(i), "acc": 1.0} for i in range(10)]
    new = _result(_suite("quiz", items + [{"id": "new", "acc": 0.0}], version="sha256:2"), _suite("extra", items))
    rows = res.compare_to_baseline(new, _result(_suite("quiz", items), _suite("gone", items)))
    by = {(r["suite"], r.get("missing")): r for r in rows}
    assert by[("extra", "baseline")]["note"] == "not in the baseline"
    assert by[("gone", "new")]["note"] == "in the baseline, not in this run"
    quiz = by[("quiz", None)]
    assert quiz["n"] == 10 and "version changed" in quiz["note"] and quiz["diff"] == 0
    from rich.console import Console

    console = Console(width=200, record=True)
    console.print(res.comparison_table(rows))
    assert "not in the baseline" in console.export_text()


def test_evaluate_with_a_baseline_file(chat_target, tmp_path):
    quiz = write_jsonl(tmp_path / "quiz.jsonl", mc_records())
    first = evaluate(chat_target, [str(quiz)], out_dir=tmp_path)
    again = evaluate(chat_target, [str(quiz)], baseline=first["path"])
    (row,) = [r for r in again["baseline"]["comparison"] if r["metric"] == "acc_norm"]
    assert row["diff"] == 0 and not row["significant"]
    with pytest.raises(InputError, match="not a `gptsmith eval` result"):
        evaluate(chat_target, [str(quiz)], baseline=quiz)


# ---------------------------------------------------------------------------------------------- CLI

def test_cli_eval_on_a_text_folder_and_a_suite(tiny_model_dir, tmp_path, capsys):
    from gptsmith.cli import main

    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "a.txt").write_text("Dictionaries map keys to values.")
    quiz = write_jsonl(tmp_path / "quiz.jsonl", mc_records())
    gen = write_jsonl(tmp_path / "gen.jsonl", [{"prompt": "Hi", "must_stop": True}])
    assert main(["eval", "--model", str(tiny_model_dir), "--suite", str(docs), str(quiz), "--suite", str(gen),
                 "--out", str(tmp_path / "out"), "--limit", "4", "--device", "cpu", "--max-tokens", "4"]) == 0
    out = capsys.readouterr().out
    (written,) = (tmp_path / "out").glob("eval-*.json")
    assert f"wrote {written}" in out and "bpb" in out and "acc_norm" in out
    result = json.loads(written.read_text())
    assert [s["name"] for s in result["suites"]] == ["docs", "quiz", "gen"]
    assert main(["eval", "--model", str(tiny_model_dir), "--suite", str(quiz), "--out", str(tmp_path / "out"),
                 "--baseline", str(written), "--device", "cpu"]) == 0
    assert "new - baseline" in capsys.readouterr().out
    assert main(["eval", "--model", str(tiny_model_dir), "--suite", "nope", "--device", "cpu"]) == 2
    assert "unknown suite nope" in capsys.readouterr().err
    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    assert main(["eval", "--model", str(model), "--suite", str(docs), "--device", "cpu"]) == 0
    assert len(list((model / "eval").glob("eval-*.json"))) == 1  # the default: MODEL/eval/
