"""The web UI with assistants, in a real browser (Debian's chromium driven by Playwright): the picker lists the
served assistants, an assistant's answer shows numbered citations that open the cited passage, and a chain of
thought stays behind a "show reasoning" toggle."""

import os

import pytest
from serve_helpers import CHROMIUM, ScriptedBackend, chromium, running, watched_page

from gptsmith.config import RagConfig, load_config
from gptsmith.serve.app import create_app
from gptsmith.serve.store import Store

pytestmark = pytest.mark.skipif(not os.path.exists(CHROMIUM),
                                reason=f"{CHROMIUM} is missing: apt-get install -y chromium")
TUPLES = "# Tuples\n\nA tuple is an immutable sequence: once made, its items never change.\n"
LISTS = "# Lists\n\nA list is a mutable sequence: append and remove change it in place.\n"


@pytest.fixture(scope="module")
def browser():
    with chromium() as b:
        yield b


def test_pick_an_assistant_and_open_a_cited_passage(browser, tmp_path, tiny_model_dir):
    from gptsmith.rag.index import build_index

    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "tuples.md").write_text(TUPLES)
    (docs / "lists.md").write_text(LISTS)
    build_index([str(docs)], tmp_path / "index", RagConfig(), progress=False)
    (tmp_path / "pydocs.yaml").write_text(f"name: pydocs\nmodel: {tiny_model_dir}\nchain_of_thought: true\n"
                                          f"rag: {{index: {tmp_path / 'index'}, top_k: 2}}\n")
    backend = ScriptedBackend(["Reasoning: the source says tuples are fixed.\n",
                               "Answer: Tuples never change [1]. <img src=x onerror=alert(1)>"])
    backend.release()
    db = f"sqlite:///{tmp_path / 'ui.db'}"
    app = create_app(load_config(None, {"serve.db": db, "serve.rate_limit_per_minute": 0}), tiny_model_dir,
                     backend=backend, assistants=[tmp_path / "pydocs.yaml"])
    with running(app) as url:
        page, errors = watched_page(browser)
        page.goto(url)
        picker = page.locator("#model-picker")
        picker.wait_for(state="visible")
        assert picker.locator("option").all_inner_texts() == ["scripted", "pydocs (assistant)"]
        picker.select_option("pydocs")
        assert page.locator("#model").inner_text() == "pydocs"

        page.fill("#input", "Are tuples immutable?")
        page.keyboard.press("Enter")
        answer = page.locator(".msg.assistant:not(.streaming)").last
        answer.locator(".actions .thumb-up").wait_for()
        assert answer.locator(".role").inner_text() == "pydocs"
        assert answer.locator(".content").inner_text().startswith("Tuples never change")
        assert answer.locator(".content img").count() == 0  # model output stays sanitised

        # the inline [1] and the list under the answer both open the passage
        inline = answer.locator(".content button.cite")
        assert inline.count() == 1 and inline.inner_text() == "[1]"
        listed = answer.locator(".sources button.cite")
        assert listed.count() == 2
        assert "tuples.md:1-" in answer.locator(".sources .where").first.inner_text()
        inline.click()
        panel = page.locator("#source-panel")
        panel.wait_for(state="visible")
        assert "tuples.md:1-" in page.locator("#source-citation").inner_text()
        assert "immutable sequence" in page.locator("#source-text").inner_text()
        page.click("#source-close")
        assert panel.is_hidden()
        listed.nth(1).click()
        assert "mutable sequence" in page.locator("#source-text").inner_text()
        assert page.locator("#source-citation").inner_text().startswith("[2] ")

        # the reasoning is there, closed until the user opens it
        reasoning = answer.locator("details.reasoning")
        assert reasoning.is_visible() and reasoning.get_attribute("open") is None
        assert not answer.locator(".reasoning-text").is_visible()
        answer.locator("details.reasoning summary").click()
        assert answer.locator(".reasoning-text").inner_text() == "the source says tuples are fixed."

        # the chat remembers its assistant: reopened, it is still picked and the citations are still there
        page.reload()
        page.locator("#conversations li .open").first.click()
        page.locator(".msg.assistant .sources button.cite").first.wait_for()
        assert picker.input_value() == "pydocs"
        assert errors == []

    store = Store(db)
    conv = store.list_conversations(source="ui")[0]
    msg = store.get_conversation(conv["id"])["messages"][-1]
    assert conv["settings"]["model"] == "pydocs" and msg["model_name"] == "pydocs"
    assert msg["reasoning"] == "the source says tuples are fixed." and msg["content"].startswith("Tuples never")
    assert [s["index"] for s in msg["sources"]] == [1, 2]
