"""Conversation data: the three formats load, convert both ways, and bad lines fail with file:line (or are counted)."""

import json
import random

import pytest

from gptsmith.cli import main
from gptsmith.data.chat_formats import (
    check_turn_order, chatterbot_conversations, convert, detect_format, load_chat_data, load_conversations,
    split_conversations,
)
from gptsmith.errors import InputError

CONV = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "4"}]


def write_jsonl(path, records):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


def test_messages_sharegpt_alpaca_load(tmp_path):
    m = load_conversations(write_jsonl(tmp_path / "m.jsonl", [{"messages": CONV}]))
    assert m.format == "messages" and m.conversations == [CONV]

    share = [{"from": "system", "value": "Be brief."}, {"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello!"},
             {"from": "user", "value": "2+2?"}, {"from": "assistant", "value": "4"}]
    s = load_conversations(write_jsonl(tmp_path / "s.jsonl", [{"conversations": share}]))
    assert s.format == "sharegpt" and s.conversations == [CONV]

    a = load_conversations(write_jsonl(tmp_path / "a.jsonl", [
        {"instruction": "Translate", "input": "chat", "output": "cat", "system": "You translate."},
        {"instruction": "Say hi", "output": "hi"}]))
    assert a.format == "alpaca"
    assert a.conversations[0] == [{"role": "system", "content": "You translate."},
                                  {"role": "user", "content": "Translate\n\nchat"}, {"role": "assistant", "content": "cat"}]
    assert a.conversations[1] == [{"role": "user", "content": "Say hi"}, {"role": "assistant", "content": "hi"}]


def test_json_list_file(tmp_path):
    path = tmp_path / "d.json"
    path.write_text(json.dumps([{"messages": CONV}, {"messages": CONV[1:3]}], indent=2))
    assert load_conversations(path).conversations == [CONV, CONV[1:3]]


def test_detect_format():
    assert detect_format({"messages": []}) == "messages"
    assert detect_format({"conversations": []}) == "sharegpt"
    assert detect_format({"instruction": "x", "output": "y"}) == "alpaca"
    assert detect_format({"text": "plain"}) is None
    assert detect_format([1, 2]) is None


def test_roundtrip_messages_sharegpt_messages(tmp_path):
    src = write_jsonl(tmp_path / "m.jsonl", [{"messages": CONV}, {"messages": CONV[1:3]}])
    convert(src, tmp_path / "s.jsonl", "sharegpt")
    first = json.loads((tmp_path / "s.jsonl").read_text().splitlines()[0])
    assert first["conversations"][1] == {"from": "human", "value": "Hi"}
    convert(tmp_path / "s.jsonl", tmp_path / "back.jsonl", "messages")
    back = [json.loads(line) for line in (tmp_path / "back.jsonl").read_text().splitlines()]
    assert back == [{"messages": CONV}, {"messages": CONV[1:3]}]


def test_alpaca_to_messages_and_back(tmp_path):
    src = write_jsonl(tmp_path / "a.jsonl", [{"instruction": "Q", "input": "", "output": "A", "system": "S"}])
    convert(src, tmp_path / "m.jsonl", "messages")
    assert json.loads((tmp_path / "m.jsonl").read_text()) == {"messages": [
        {"role": "system", "content": "S"}, {"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}]}
    convert(tmp_path / "m.jsonl", tmp_path / "a2.jsonl", "alpaca")
    assert json.loads((tmp_path / "a2.jsonl").read_text()) == {"instruction": "Q", "input": "", "output": "A", "system": "S"}


def test_multi_turn_to_alpaca_is_an_error_or_skipped(tmp_path):
    src = write_jsonl(tmp_path / "m.jsonl", [{"messages": CONV}, {"messages": CONV[1:3]}])
    with pytest.raises(InputError, match="alpaca holds one question"):
        convert(src, tmp_path / "a.jsonl", "alpaca")
    assert not (tmp_path / "a.jsonl").exists()  # nothing half-written
    stats = convert(src, tmp_path / "a.jsonl", "alpaca", on_error="skip")
    assert stats["written"] == 1 and stats["skipped"] == 1


BAD_LINES = [
    ("invalid JSON", '{"messages": [', "invalid JSON"),
    ("unknown role", {"messages": [{"role": "bot", "content": "x"}, {"role": "assistant", "content": "y"}]}, "unknown role"),
    ("empty content", {"messages": [{"role": "user", "content": "  "}, {"role": "assistant", "content": "y"}]}, "is empty"),
    ("wrong turn order", {"messages": [{"role": "assistant", "content": "x"}, {"role": "user", "content": "y"}]},
     "where 'user' belongs"),
    ("ends with user", {"messages": [{"role": "user", "content": "x"}]}, "ends with a user turn"),
    ("missing field", {"messages": [{"role": "user"}, {"role": "assistant", "content": "y"}]}, "needs 'role' and 'content'"),
    ("alpaca missing output", {"instruction": "x"}, None),  # mixed with messages: a format error first
    ("mixed formats", {"conversations": [{"from": "human", "value": "x"}, {"from": "gpt", "value": "y"}]},
     "started as messages"),
]


@pytest.mark.parametrize("name,line,message", BAD_LINES, ids=[b[0] for b in BAD_LINES])
def test_bad_line_names_file_and_line(tmp_path, name, line, message):
    path = write_jsonl(tmp_path / "bad.jsonl", [{"messages": CONV}, "", line, {"messages": CONV[1:3]}])
    with pytest.raises(InputError) as err:
        load_conversations(path)
    assert f"{path}:3:" in str(err.value) and "Fix:" in str(err.value)
    if message:
        assert message in str(err.value)
    res = load_conversations(path, on_error="skip")
    assert res.conversations == [CONV, CONV[1:3]] and res.skipped == 1 and sum(res.problems.values()) == 1


def test_alpaca_missing_field_and_skip_counts_by_kind(tmp_path):
    path = write_jsonl(tmp_path / "a.jsonl", [{"instruction": "Q", "output": "A"}, {"instruction": "Q"},
                                              {"instruction": "", "output": "A"}, "not json"])
    with pytest.raises(InputError, match=r"a\.jsonl:2: missing field 'output'"):
        load_conversations(path)
    res = load_conversations(path, on_error="skip")
    assert len(res.conversations) == 1 and res.skipped == 3
    assert res.problems == {"missing field": 1, "empty content": 1, "invalid JSON": 1}


def test_no_valid_conversations_is_an_error(tmp_path):
    with pytest.raises(InputError, match="no valid conversations"):
        load_conversations(write_jsonl(tmp_path / "x.jsonl", ['{"text": "a"}']), on_error="skip")
    with pytest.raises(InputError, match="no such file"):
        load_conversations(tmp_path / "missing.jsonl")


def test_chatterbot_conversations():
    convs = chatterbot_conversations()
    assert len(convs) > 1000
    for c in convs:
        check_turn_order(c)  # raises on a bad conversation
        assert all(m["role"] != "system" for m in c)
    assert any(len(c) > 2 for c in convs)  # multi-turn dialogs are kept
    assert load_chat_data("chatterbot").conversations == convs


def test_split_is_deterministic_by_content():
    convs = [[{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}] for i in range(200)]
    train, val = split_conversations(convs, 0.1)
    shuffled = convs[:]
    random.Random(0).shuffle(shuffled)
    train2, val2 = split_conversations(shuffled, 0.1)
    key = lambda c: c[0]["content"]  # noqa: E731
    assert sorted(map(key, val)) == sorted(map(key, val2))
    assert len(train) + len(val) == 200 and 5 <= len(val) <= 40
    assert not set(map(key, train)) & set(map(key, val))
    # tiny data still gets one validation conversation
    t, v = split_conversations(convs[:3], 0.01)
    assert len(v) == 1 and len(t) == 2


def test_cli_data_convert(tmp_path, capsys):
    src = write_jsonl(tmp_path / "s.jsonl", [{"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Yo"}]}])
    assert main(["data", "convert", str(src), str(tmp_path / "m.jsonl"), "--to", "messages"]) == 0
    assert json.loads((tmp_path / "m.jsonl").read_text())["messages"][1] == {"role": "assistant", "content": "Yo"}
    bad = write_jsonl(tmp_path / "bad.jsonl", ["{oops"])
    assert main(["data", "convert", str(bad), str(tmp_path / "o.jsonl")]) == 2
    assert f"{bad}:1: invalid JSON" in capsys.readouterr().err


def test_line_separators_inside_content_are_text_not_line_ends(tmp_path):
    # feedback export and `data convert` write JSON with ensure_ascii=False: U+2028, U+2029 and U+0085 stay raw
    odd = [{"role": "user", "content": "first\u2028second\u0085third\u2029fourth"},
           {"role": "assistant", "content": "ok\u2028done \x1c"}]
    path = tmp_path / "odd.jsonl"
    path.write_bytes("".join(json.dumps(r, ensure_ascii=False) + "\r\n" for r in [{"messages": odd}, {"messages": CONV}]
                             ).encode("utf-8") + b"{broken\n")
    with pytest.raises(InputError, match=rf"{path}:3: invalid JSON"):
        load_conversations(path)
    res = load_conversations(path, on_error="skip")
    assert res.conversations == [odd, CONV] and res.skipped == 1
    # and through `data convert` (which writes raw U+2028 again) and back
    out = tmp_path / "share.jsonl"
    convert(path, out, "sharegpt", on_error="skip")
    assert "\u2028" in out.read_text(encoding="utf-8")
    assert load_conversations(out).conversations == [odd, CONV]


def test_json_list_is_streamed_and_a_broken_record_is_named(tmp_path):
    path = tmp_path / "list.json"
    path.write_text(json.dumps([{"messages": CONV}, {"messages": CONV[1:3]}])[:-1] + ', {"messages": [oops]}]')
    with pytest.raises(InputError, match=rf"{path}: item \[2\]: not valid JSON.*one list of records"):
        load_conversations(path)
    obj = tmp_path / "obj.json"
    obj.write_text(json.dumps({"messages": CONV}))
    with pytest.raises(InputError, match="must hold a list of records"):
        load_conversations(obj)
