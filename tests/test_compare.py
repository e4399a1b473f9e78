"""gptsmith compare: answers of two targets judged pairwise in both orders, the aggregation (ties, interval,
length control), the HTML page, bad inputs; with real judges: a second gptsmith process over HTTP (text verdicts)
and local model folders (reference-guided likelihood verdicts)."""

import json
import random
import shutil
from html.parser import HTMLParser

import numpy as np
import pytest

from gptsmith.errors import InputError
from gptsmith.eval.compare import (compare, length_controlled, length_features, load_prompts, score_items,
                                   summarize)
from gptsmith.eval.compare_html import render_html
from gptsmith.eval.judge import SYSTEM_PROMPT, Judgment, judge_messages, parse_verdict
from gptsmith.eval.targets import Answer

from conftest import python_doc_texts
from serve_helpers import free_port, serve_process, wait_http

JUDGE_CONTEXT = 1536  # the MT-Bench judge prompt alone is ~650 tokens with the tests' 512-token vocabulary


def _long_context_model(tokenizer_dir, out, seed=0):
    from gptsmith.config import ModelConfig
    from gptsmith.model import build_model, llama_config, resolve_shape
    from gptsmith.tokenizer import load_tokenizer

    tok = load_tokenizer(tokenizer_dir)
    cfg = llama_config(resolve_shape(ModelConfig(preset="test", max_seq_len=JUDGE_CONTEXT)), len(tok),
                       tok.bos_token_id, tok.eos_token_id, tok.pad_token_id)
    return build_model(cfg, seed=seed), tok


@pytest.fixture(scope="module")
def random_judge_dir(tmp_path_factory, tokenizer_dir):
    """An untrained model with room for the judge prompt."""
    from gptsmith.model import save_model_dir

    out = tmp_path_factory.mktemp("judge") / "random-judge"
    model, tok = _long_context_model(tokenizer_dir, out, seed=1)
    save_model_dir(model, tok, out)
    return out


@pytest.fixture(scope="module")
def always_a_judge_dir(tmp_path_factory, tokenizer_dir):
    """A tiny model trained (plain AdamW, 60 full-batch steps) to answer every judge prompt with "[[A]]": the
    extreme of position bias. Trained on the end of judge prompts (the system prompt's last words, short
    questions and answers, some of them verdict-like), which RoPE's relative positions carry over to full ones."""
    from gptsmith.model import save_model_dir

    out = tmp_path_factory.mktemp("judge") / "always-a"
    model, tok = _long_context_model(tokenizer_dir, out)
    texts, rng = python_doc_texts(40), random.Random(0)
    rows = []
    for i in range(8):
        answers = [texts[i + 1][:rng.randint(0, 30)], rng.choice(["[[A]]", "[[B]]", "", "<script>"])]
        rng.shuffle(answers)
        messages = judge_messages(texts[i][:rng.randint(5, 60)], *answers)
        messages[0]["content"] = SYSTEM_PROMPT[-rng.randint(0, 100):]
        rows.append(messages + [{"role": "assistant", "content": "[[A]]"}])
    save_model_dir(_train_on_replies(model, tok, rows, steps=60), tok, out)
    return out


def _train_on_replies(model, tok, conversations, steps):
    """Plain AdamW on the assistant turns of the conversations, full batch, one thread."""
    import torch

    from gptsmith.tokenizer import encode_chat

    rows = []
    for messages in conversations:
        enc = encode_chat(tok, messages, assistant_mask=True)
        rows.append((enc.input_ids, [t if m else -100 for t, m in zip(enc.input_ids, enc.assistant_masks)]))
    width = max(len(ids) for ids, _ in rows)
    ids = torch.tensor([r[0] + [0] * (width - len(r[0])) for r in rows])
    labels = torch.tensor([r[1] + [-100] * (width - len(r[1])) for r in rows])
    mask = torch.tensor([[1] * len(r[0]) + [0] * (width - len(r[0])) for r in rows])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices: one thread is faster than several fighting over shared cores
    try:
        torch.manual_seed(0)
        opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
        for _ in range(steps):
            model(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
            opt.step()
            opt.zero_grad()
    finally:
        torch.set_num_threads(threads)
    return model.eval()


CAPITAL = "What is the capital of France?"


@pytest.fixture(scope="module")
def paris_judge_dir(tmp_path_factory, tokenizer_dir):
    """A tiny model trained (40 steps) to answer the capital question with "Paris.", asked plainly and with a
    reference in the system prompt, as the likelihood judge asks it: it knows one answer and nothing else."""
    from gptsmith.eval.judge import REFERENCE_SYSTEM
    from gptsmith.model import save_model_dir

    out = tmp_path_factory.mktemp("judge") / "paris"
    model, tok = _long_context_model(tokenizer_dir, out)
    reply = [{"role": "user", "content": CAPITAL}, {"role": "assistant", "content": "Paris."}]
    guided = [{"role": "system", "content": REFERENCE_SYSTEM.format(reference="Paris.")}] + reply
    save_model_dir(_train_on_replies(model, tok, [reply, guided], steps=40), tok, out)
    return out


@pytest.fixture(scope="module")
def flat_judge_dir(tmp_path_factory, tokenizer_dir):
    """A model whose next-token distribution is uniform (zero output layer): every answer of n tokens has the
    same likelihood, whatever it says."""
    import torch

    from gptsmith.model import save_model_dir

    out = tmp_path_factory.mktemp("judge") / "flat"
    model, tok = _long_context_model(tokenizer_dir, out, seed=2)
    with torch.no_grad():
        model.get_output_embeddings().weight.zero_()
    save_model_dir(model, tok, out)
    return out


@pytest.fixture
def answer_model(tiny_model_dir, tmp_path):
    """A private copy of the tiny model: compare writes into a model folder's eval/."""
    return shutil.copytree(tiny_model_dir, tmp_path / "tiny-a")


@pytest.fixture
def prompts_txt(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("What is a list?\n\nHow do I open a file?\nWhat does yield do?\n")
    return path


class FakeTarget:
    """A target with fixed answers (or a text judge with fixed judgments), for the paths that need no model."""

    engine = assistant = None

    def __init__(self, name, texts):
        self.name, self.texts, self.calls = name, list(texts), 0

    def replies(self, conversations, max_tokens=256, temperature=0.0, seed=0):
        """The next texts in turn, across calls."""
        out = []
        for _ in conversations:
            out.append(Answer(self.texts[self.calls % len(self.texts)], "stop"))
            self.calls += 1
        return out

    def describe(self):
        return {"kind": "backend", "name": self.name, "ref": f"fake:{self.name}", "lineage": {}}

    def close(self):
        pass


def _judgments(*texts):
    return [Judgment(parse_verdict(t), t) for t in texts]


# ---------------------------------------------------------------------------------------------- aggregation

def test_verdicts_in_both_orders_give_wins_ties_and_losses():
    # judge saw (A's answer, B's answer) then (B's answer, A's answer); a letter names a position, not a model
    ab = _judgments(*["[[A]]"] * 6, "[[B]]", "[[B]]", "[[A]]", "[[C]]", "no verdict at all")
    ba = _judgments(*["[[B]]"] * 6, "[[A]]", "[[A]]", "[[A]]", "[[C]]", "[[B]]")
    rows, unparsed = score_items(ab, ba)
    assert [r["result"] for r in rows] == ["a"] * 6 + ["b", "b"] + ["tie"] * 3
    assert rows[8] == {"verdict_ab": "a", "verdict_ba": "b", "result": "tie"}  # same position twice = bias = tie
    assert rows[10] == {"verdict_ab": "tie", "verdict_ba": "a", "result": "tie"}  # unreadable counts as a tie
    assert unparsed == 1
    summary = summarize([r["result"] for r in rows], [10] * 11, [10] * 11)
    assert (summary["n"], summary["wins_a"], summary["ties"], summary["wins_b"]) == (11, 6, 3, 2)
    assert summary["win_rate_a"] == pytest.approx((6 + 3 / 2) / 11)
    lo, hi = summary["ci"]
    assert 0 <= lo < summary["win_rate_a"] < hi <= 1
    assert summarize(["tie"] * 5, [1] * 5, [1] * 5)["ci"] == [0.5, 0.5]


def test_the_verdict_is_the_last_bracketed_letter():
    assert parse_verdict('Use "[[A]]" if A is better. B explains more. [[B]]') == "B"
    assert parse_verdict("[[C]]") == "C"
    assert parse_verdict("A is better") is None and parse_verdict("[[D]]") is None and parse_verdict("") is None


def test_length_control_removes_a_win_that_length_explains():
    rng = np.random.default_rng(0)
    n = 300
    len_b = rng.integers(100, 400, n)
    len_a = len_b + rng.normal(200, 200, n).astype(int)  # A is usually longer
    x = length_features(len_a, len_b)
    outcomes = (rng.random(n) < 1 / (1 + np.exp(-4 * x))).astype(float)  # only length decides who wins
    raw = outcomes.mean()
    lc = length_controlled(outcomes, len_a, len_b)
    assert raw > 0.75
    assert abs(lc["win_rate_a"] - 0.5) < 0.1 and lc["ci"][0] < 0.5 < lc["ci"][1]
    assert "logistic regression" in lc["method"]

    # the longer answer always wins, A is the longer one 38 times in 40: raw ~1, LC pulled toward 0.5
    len_a, len_b = [300 + 10 * i for i in range(38)] + [100, 120], [100] * 38 + [400, 420]
    results = ["a"] * 38 + ["b"] * 2
    summary = summarize(results, len_a, len_b)
    assert summary["win_rate_a"] == 0.95
    assert 0.5 < summary["length_controlled"]["win_rate_a"] < 0.9

    # lengths that say nothing leave the win rate as it is
    summary = summarize(["a"] * 30 + ["b"] * 10, [100] * 40, [100] * 40)
    assert summary["length_controlled"]["win_rate_a"] == pytest.approx(0.75, abs=1e-6)


# ---------------------------------------------------------------------------------------------- real judges

def test_a_judge_that_always_says_a_over_http_makes_every_pair_a_tie(always_a_judge_dir, answer_model, prompts_txt,
                                                                      tmp_path):
    """The judge is a second gptsmith process (gptsmith serve); A's answers come over HTTP from it too."""
    port = free_port()
    proc = serve_process(always_a_judge_dir, port, f"sqlite:///{tmp_path / 'judge.db'}")
    try:
        url = f"http://127.0.0.1:{port}"
        wait_http(url)
        result = compare(f"{url}/v1", answer_model, prompts_txt, f"{url}#always-a", out_dir=tmp_path / "out",
                         max_tokens=8, judge_max_tokens=16)
    finally:
        proc.kill()
        proc.wait()
    assert result["judge_method"] == "text" and result["a"]["kind"] == result["judge"]["kind"] == "backend"
    assert result["judge"]["name"] == "always-a" and result["judge"]["ref"] == f"{url}/v1"
    assert [i["prompt"] for i in result["items"]] == ["What is a list?", "How do I open a file?", "What does yield do?"]
    assert all(i["judgment_ab"] == i["judgment_ba"] == "[[A]]" for i in result["items"])
    assert all((i["verdict_ab"], i["verdict_ba"], i["result"]) == ("a", "b", "tie") for i in result["items"])
    assert (result["wins_a"], result["ties"], result["wins_b"], result["unparsed"]) == (0, 3, 0, 0)
    assert result["win_rate_a"] == 0.5 and result["ci"] == [0.5, 0.5]
    written = json.loads((tmp_path / "out" / "compare.json").read_text())
    assert written["kind"] == "compare" and written["items"] == result["items"] and "files" not in written
    (copy,) = (answer_model / "eval").glob("compare-*.json")  # B is a local model folder: it keeps a copy
    assert json.loads(copy.read_text())["b"]["ref"] == str(answer_model.resolve())


def test_a_local_judge_that_knows_the_answer_prefers_it_in_both_orders(paris_judge_dir, tmp_path):
    prompts = tmp_path / "capital.txt"
    prompts.write_text(f"{CAPITAL}\n{CAPITAL}\n")
    a = FakeTarget("alpha", ["Paris.", "Berlin."])  # right on the first prompt, wrong on the second
    b = FakeTarget("beta", ["Berlin.", "Paris."])
    result = compare(a, b, prompts, paris_judge_dir, out_dir=tmp_path / "out")
    assert result["judge_method"] == "reference-likelihood" and result["unparsed"] == 0
    first, second = result["items"]
    assert (first["verdict_ab"], first["verdict_ba"], first["result"]) == ("a", "a", "a")
    assert (second["verdict_ab"], second["verdict_ba"], second["result"]) == ("b", "b", "b")
    assert first["judgment_ab"].startswith("[[A]] (reference-likelihood: log p(A) = ")
    assert "reference: 'Paris.'" in first["judgment_ab"]  # the judge's own answer to the question
    assert (result["wins_a"], result["ties"], result["wins_b"]) == (1, 0, 1)
    html = (tmp_path / "out" / "compare.html").read_text()
    assert "reference-likelihood verdicts" in html and "The judge answered each question itself first" in html


def test_a_local_judge_that_cannot_tell_the_answers_apart_gives_ties(flat_judge_dir, tokenizer_dir, tmp_path):
    """The likelihood reading's position-bias-free premise: equal scores are a tie in both orders, never a win."""
    from gptsmith.tokenizer import load_tokenizer

    tok = load_tokenizer(tokenizer_dir)
    right, wrong = "Paris.", "Rome."
    assert len(tok.encode(right, add_special_tokens=False)) == len(tok.encode(wrong, add_special_tokens=False))
    prompts = tmp_path / "capital.txt"
    prompts.write_text(f"{CAPITAL}\nWhere is the Louvre?\n")
    result = compare(FakeTarget("alpha", [right]), FakeTarget("beta", [wrong]), prompts, flat_judge_dir,
                     out_dir=tmp_path / "out")
    assert all((i["verdict_ab"], i["verdict_ba"], i["result"]) == ("tie", "tie", "tie") for i in result["items"])
    assert result["ties"] == 2 and result["win_rate_a"] == 0.5 and result["unparsed"] == 0


def test_a_model_against_itself_ties_on_every_prompt_from_the_cli(answer_model, random_judge_dir, prompts_txt,
                                                                  tmp_path, capsys):
    from gptsmith.cli import main

    out = tmp_path / "same"
    assert main(["compare", str(answer_model), str(answer_model), "--prompts", str(prompts_txt), "--judge",
                 str(random_judge_dir), "--out", str(out), "--max-tokens", "6", "--limit", "2"]) == 0
    result = json.loads((out / "compare.json").read_text())
    assert result["n"] == 2 and result["ties"] == 2 and result["win_rate_a"] == 0.5
    assert all(i["answer_a"] == i["answer_b"] for i in result["items"])
    assert all(i["verdict_ab"] in ("a", "b", "tie") and i["verdict_ba"] in ("a", "b", "tie") for i in result["items"])
    printed = capsys.readouterr().out
    assert "win rate A [95% CI]" in printed and "50.0% [50.0, 50.0]" in printed and str(out / "compare.html") in printed


# ---------------------------------------------------------------------------------------------- html

class _Page(HTMLParser):
    def __init__(self):
        super().__init__()
        self.tags, self.text, self.links = [], [], []

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        self.links += [value for name, value in attrs if name in ("src", "href", "action", "srcset")]

    def handle_data(self, data):
        self.text.append(data)


def test_the_page_shows_both_answers_escaped_and_loads_nothing(tmp_path):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"id": "x1", "prompt": "Say <b>hi</b>"}\n'
                       '{"messages": [{"role": "system", "content": "Be brief."}, '
                       '{"role": "user", "content": "Hi"}]}\n')
    a = FakeTarget("alpha", ["<script>alert('a')</script> long answer from A", "short"])
    b = FakeTarget("beta", ['B says <img src="https://example.com/x.png"> & more'])
    judge = FakeTarget("judge", ["A explains better. [[A]]", "[[C]]", "[[B]]", "no verdict"])  # ab, ab, ba, ba
    result = compare(a, b, prompts, judge, out_dir=tmp_path / "out")
    html = (tmp_path / "out" / "compare.html").read_text()
    page = _Page()
    page.feed(html)
    text = "".join(page.text)
    assert "script" not in page.tags and "img" not in page.tags and page.links == []  # nothing to load
    assert "url(" not in html and "@import" not in html
    assert "&lt;script&gt;alert(&#39;a&#39;)&lt;/script&gt;" in html
    assert "<script>alert('a')</script> long answer from A" in text  # shown as text
    assert 'B says <img src="https://example.com/x.png"> & more' in text
    assert "Say <b>hi</b>" in text and "System: Be brief.\n\nUser: Hi" in text
    assert "x1" in text and "A wins (alpha)" in text
    assert result["items"][0]["result"] == "a" and result["items"][1]["result"] == "tie"
    assert result["unparsed"] == 1 and html == render_html({k: v for k, v in result.items() if k != "files"})


# ---------------------------------------------------------------------------------------------- bad inputs

def test_bad_prompt_files_are_refused_with_file_and_line(tmp_path):
    with pytest.raises(InputError, match="no such prompts file"):
        load_prompts(tmp_path / "missing.jsonl")
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n")
    with pytest.raises(InputError, match="no prompts"):
        load_prompts(empty)
    cases = {
        '{"prompt": "ok"}\n{"prompt": "unterminated\n': "bad.jsonl:2: not valid JSON",
        '{"prompt": "ok"}\n\n["a list"]\n': "bad.jsonl:3: expected a JSON object",
        '{"text": "hi"}\n': 'bad.jsonl:1: give exactly one of "prompt"',
        '{"prompt": "  "}\n': 'bad.jsonl:1: "prompt" must be a non-empty string',
        '{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}\n':
            "bad.jsonl:1: the last message must be the user's",
        '{"messages": [{"role": "bot", "content": "hi"}]}\n': r"bad.jsonl:1: messages\[0\]",
        '{"id": 1, "prompt": "a"}\n{"id": "1", "prompt": "b"}\n': "bad.jsonl:2: id '1' is used twice",
    }
    for content, message in cases.items():
        bad = tmp_path / "bad.jsonl"
        bad.write_text(content)
        with pytest.raises(InputError, match=message):
            load_prompts(bad)
    csv = tmp_path / "prompts.csv"
    csv.write_text("prompt\nhi\n")
    with pytest.raises(InputError, match=r"\.jsonl file .* or a \.txt file"):
        load_prompts(csv)
    ids = tmp_path / "ok.jsonl"
    ids.write_text('{"prompt": "a"}\n\n{"id": "q", "prompt": "b"}\n')
    assert [p.id for p in load_prompts(ids)] == ["1", "q"]


def test_unknown_targets_and_bad_numbers_are_refused(tmp_path, prompts_txt):
    fake = FakeTarget("x", ["hi"])
    with pytest.raises(InputError, match="no such model folder"):
        compare(str(tmp_path / "nope"), fake, prompts_txt, fake, out_dir=tmp_path / "out")
    with pytest.raises(InputError, match="not a model directory"):
        compare(fake, fake, prompts_txt, str(tmp_path), out_dir=tmp_path / "out")
    with pytest.raises(InputError, match="--limit must be at least 1"):
        compare(fake, fake, prompts_txt, fake, limit=0)
    with pytest.raises(InputError, match="--max-tokens must be at least 1"):
        compare(fake, fake, prompts_txt, fake, max_tokens=0)
    assert not (tmp_path / "out").exists()


def test_a_judge_without_room_for_the_prompt_is_refused(tiny_model_dir, prompts_txt, tmp_path):
    fake = FakeTarget("x", ["a long answer " * 100])
    with pytest.raises(InputError, match="an answer with the question and the reference takes .* context is 256"):
        compare(fake, fake, prompts_txt, tiny_model_dir, out_dir=tmp_path / "out")
    long_question = tmp_path / "long.txt"
    long_question.write_text("why " * 300 + "\n")  # no room left for the judge's own reference answer
    with pytest.raises(InputError, match="the question and the reference take .* context is 256"):
        compare(FakeTarget("x", ["hi"]), fake, long_question, tiny_model_dir, out_dir=tmp_path / "out")
