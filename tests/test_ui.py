"""The web chat UI end to end in a real browser (Debian's chromium driven by Playwright): chat, stop,
regenerate, thumbs, correction, conversation list, login, and no script injection from model output."""

import os
from pathlib import Path

import pytest
from serve_helpers import CHROMIUM, DecodeGate, chromium, long_context_model, running, wait_for, watched_page

from gptsmith.config import load_config
from gptsmith.serve.app import create_app
from gptsmith.serve.store import Store

ARTIFACTS = Path(__file__).parent / "artifacts"

pytestmark = pytest.mark.skipif(not os.path.exists(CHROMIUM),
                                reason=f"{CHROMIUM} is missing: apt-get install -y chromium")


@pytest.fixture(scope="module")
def browser():
    with chromium() as b:
        yield b


def last_answer(store: Store) -> dict:
    """The newest answer of the newest UI conversation, whichever branch it is on."""
    conv = store.list_conversations(source="ui")[0]
    msgs = store.get_conversation(conv["id"], all_messages=True)["messages"]
    return max((m for m in msgs if m["role"] == "assistant"), key=lambda m: m["id"])


def test_chat_in_browser(browser, tokenizer_dir, tmp_path, monkeypatch):
    model = long_context_model(tmp_path / "long", tokenizer_dir, 2048)
    db = f"sqlite:///{tmp_path / 'ui.db'}"
    app = create_app(load_config(None, {"serve.db": db, "serve.rate_limit_per_minute": 0}), model)
    store = Store(db)
    with running(app) as url:
        page, errors = watched_page(browser)
        page.goto(url)
        page.wait_for_selector("#model:has-text('long')")

        # settings, then a streamed answer
        page.click("#settings-toggle")
        page.fill("#system-prompt", "You are terse.")
        page.fill("#temperature", "1")
        page.fill("#max-tokens", "12")
        page.fill("#input", "Hello from the browser")
        page.keyboard.press("Enter")
        page.wait_for_selector(".msg.assistant:not(.streaming) .actions .thumb-up")
        answer = page.locator(".msg.assistant .content").last.inner_text()
        assert answer.strip()
        stored = last_answer(store)
        assert stored["content"].strip() and stored["finish_reason"] in ("stop", "length")
        assert stored["sampling"]["max_tokens"] == 12 and stored["sampling"]["temperature"] == 1
        conv = store.get_conversation(store.list_conversations(source="ui")[0]["id"])
        assert conv["system_prompt"] == "You are terse." and conv["messages"][0]["content"] == "Hello from the browser"
        assert page.locator("#conversations li .open").first.inner_text() == "Hello from the browser"

        # thumbs up and a correction, checked in the store
        page.locator(".msg.assistant .thumb-up").last.click()
        page.wait_for_selector(".msg.assistant .thumb-up[aria-pressed=true]")
        assert wait_for(lambda: (last_answer(store)["feedback"] or {}).get("rating") == 1, timeout=15)
        page.locator(".msg.assistant .correct").last.click()
        page.fill("#feedback-text", "Hello! How can I help?")
        page.click("#feedback-save")
        page.wait_for_selector(".msg.assistant .correction")
        assert wait_for(lambda: last_answer(store)["feedback"]["correction"] == "Hello! How can I help?", timeout=15)

        # regenerate: a second version of the same turn
        page.locator(".msg.assistant .regenerate").last.click()
        page.wait_for_selector(".msg.assistant .note:has-text('version 2 of 2')")
        assert last_answer(store)["regeneration_of_id"] is not None

        # stop a long answer mid-stream: the partial answer is kept, marked stopped
        page.fill("#temperature", "0")
        page.fill("#max-tokens", "1500")
        page.dispatch_event("#max-tokens", "change")
        gate = DecodeGate(free_steps=20).install(monkeypatch)  # the answer cannot end before the stop click
        try:
            page.fill("#input", "Now write a very long answer")
            page.click("#send")
            page.wait_for_selector(".msg.assistant.streaming")
            assert wait_for(lambda: last_answer(store)["content"], timeout=15)  # streaming, and already partly stored
            page.click("#stop")
            page.wait_for_selector(".msg.assistant .finish:has-text('stopped')")
        finally:
            gate.release()
        stopped = wait_for(lambda: (a := last_answer(store))["finish_reason"] and a, timeout=15)
        assert stopped["finish_reason"] == "cancelled"
        assert 0 < stopped["completion_tokens"] < 1500 and stopped["content"]
        ARTIFACTS.mkdir(exist_ok=True)
        page.screenshot(path=str(ARTIFACTS / "ui_chat.png"), full_page=True)

        # model output is untrusted: markdown renders, HTML and scripts do not run
        evil = store.create_conversation(title="evil")["id"]
        q = store.add_message(evil, "user", "show me")["id"]
        store.add_message(evil, "assistant", "**bold** <img src=x onerror=\"window.__xss=1\">"
                                             "<script>window.__xss=2</script> [x](javascript:window.__xss=3)\n\n"
                                             "```python\nprint('<b>hi</b>')\n```", q)
        page.fill("#search", "")
        page.reload()
        page.locator("#conversations li .open", has_text="evil").click()
        page.wait_for_selector(".msg.assistant strong:has-text('bold')")
        assert page.locator(".msg.assistant pre code").inner_text().strip() == "print('<b>hi</b>')"
        page.locator(".msg.assistant a").first.click()
        assert page.evaluate("window.__xss") is None
        assert page.locator(".msg.assistant img[onerror], .msg.assistant script").count() == 0

        # the conversation list: search, rename, delete
        page.fill("#search", "browser")
        page.wait_for_function("document.querySelectorAll('#conversations li').length === 1")
        page.locator("#conversations li .rename").click()
        page.fill("#conversations li input", "Renamed chat")
        page.keyboard.press("Enter")
        page.wait_for_selector("#conversations li .open:has-text('Renamed chat')")
        page.fill("#search", "")
        page.wait_for_function("document.querySelectorAll('#conversations li').length === 2")
        page.locator("#conversations li", has_text="evil").locator(".delete").click()
        page.wait_for_function("document.querySelectorAll('#conversations li').length === 1")
        assert [c["title"] for c in store.list_conversations(source="ui")] == ["Renamed chat"]
        assert errors == []
        page.close()
    store.close()


def test_login_page(browser, tiny_model_dir, tmp_path):
    cfg = load_config(None, {"serve.db": f"sqlite:///{tmp_path / 'a.db'}", "serve.api_key": "open-sesame"})
    with running(create_app(cfg, tiny_model_dir)) as url:
        page = browser.new_page()
        page.goto(url)
        assert page.url.endswith("/login")
        page.fill("#key", "wrong")
        page.click("#login")
        page.wait_for_selector("#error:visible")
        page.fill("#key", "open-sesame")
        page.click("#login")
        page.wait_for_selector(f"#model:has-text('{tiny_model_dir.name}')")
        assert page.url.rstrip("/") == url
        assert page.is_visible("#logout-form")
        page.close()


def test_refused_message_is_not_kept(browser, tiny_model_dir, tmp_path):
    """A message the server refuses (longer than the model's context) is shown as an error, given back in the
    input box, and not stored; the next message follows the last answer, not the refused question."""
    db = f"sqlite:///{tmp_path / 'refused.db'}"
    app = create_app(load_config(None, {"serve.db": db, "serve.rate_limit_per_minute": 0}), tiny_model_dir)
    store = Store(db)
    with running(app) as url:
        page = browser.new_page()
        page.goto(url)
        page.wait_for_selector(f"#model:has-text('{tiny_model_dir.name}')")
        page.click("#settings-toggle")
        page.fill("#max-tokens", "8")
        page.fill("#input", "Hello")
        page.keyboard.press("Enter")
        page.wait_for_selector(".msg.assistant:not(.streaming) .actions .thumb-up")
        too_long = " ".join(["value"] * 400)
        page.fill("#input", too_long)
        page.keyboard.press("Enter")
        page.wait_for_selector("#error:visible")
        assert "context" in page.inner_text("#error")
        assert page.input_value("#input") == too_long
        page.fill("#input", "Shorter now")
        page.keyboard.press("Enter")
        wait_for(lambda: page.locator(".msg.assistant:not(.streaming) .actions .thumb-up").count() == 2, timeout=15)
        page.close()
    conv = store.list_conversations(source="ui")[0]
    msgs = store.get_conversation(conv["id"], all_messages=True)["messages"]
    store.close()
    assert [m["role"] for m in msgs] == ["user", "assistant", "user", "assistant"]
    assert [m["content"] for m in msgs if m["role"] == "user"] == ["Hello", "Shorter now"]
    assert all(m["parent_id"] == prev["id"] for prev, m in zip(msgs, msgs[1:]))
