"""The blind arena in a real browser (Debian's chromium driven by Playwright): a message in Arena mode gets two
anonymous answers side by side, "A is better" reveals the names, and the Leaderboard view counts the vote."""

import os
from pathlib import Path

import pytest
from serve_helpers import CHROMIUM, chromium, running, wait_for, watched_page
from test_arena import ALPHA, ANSWERS, BETA, arena_app

from gptsmith.serve.store import Store

ARTIFACTS = Path(__file__).parent / "artifacts"

pytestmark = pytest.mark.skipif(not os.path.exists(CHROMIUM),
                                reason=f"{CHROMIUM} is missing: apt-get install -y chromium")


def test_arena_vote_in_browser(tmp_path, monkeypatch):
    app, db, _ = arena_app(tmp_path, monkeypatch)
    with running(app) as url, chromium() as browser:
        page, errors = watched_page(browser)
        page.goto(url)
        page.wait_for_selector("#model-picker option", state="attached")  # /api/info has answered
        page.click("#mode-arena")
        page.fill("#input", "Which answer is better?")
        page.keyboard.press("Enter")
        page.wait_for_selector("#arena-vote:visible")

        shown = {side: page.inner_text(f"#arena-{side} .content").strip() for side in "ab"}
        assert sorted(shown.values()) == ["First answer.", "Second answer."]
        assert page.locator("#arena strong", has_text="First").count() == 1  # markdown rendered
        assert page.locator("#arena img[onerror]").count() == 0 and page.evaluate("window.__xss") is None
        labels = [page.inner_text(f"#arena-{side} .role") for side in "ab"]
        assert labels == ["Model A", "Model B"]
        assert ALPHA not in page.inner_text("#arena") and BETA not in page.inner_text("#arena")

        page.click("#arena-vote button[data-winner=a]")
        page.wait_for_selector("#arena-result:visible")
        model_a = ALPHA if shown["a"] == "First answer." else BETA
        model_b = BETA if model_a == ALPHA else ALPHA
        assert page.inner_text("#arena-a .role") == f"Model A: {model_a}"
        assert page.inner_text("#arena-b .role") == f"Model B: {model_b}"
        assert page.get_attribute("#arena-vote button[data-winner=a]", "aria-pressed") == "true"
        ARTIFACTS.mkdir(exist_ok=True)
        page.screenshot(path=str(ARTIFACTS / "ui_arena.png"), full_page=True)

        page.click("#mode-leaderboard")
        page.wait_for_selector("#leaderboard-table tbody tr")
        first = page.locator("#leaderboard-table tbody tr").first.locator("td").all_inner_texts()
        assert first[1] == model_a and first[6:] == ["1", "1", "0", "0"]  # votes, wins, ties, losses
        assert "1 vote" in page.inner_text("#leaderboard-summary")
        page.screenshot(path=str(ARTIFACTS / "ui_leaderboard.png"), full_page=True)

        # back to chat: the arena's conversation is not in the chat list, and chatting still works
        page.click("#mode-chat")
        assert page.locator("#conversations li").count() == 0
        assert errors == []
        page.close()

    store = Store(db)
    assert wait_for(lambda: store.list_votes()) == [{"model_a": model_a, "model_b": model_b, "winner": "a"}]
    battle = store.get_battle(1)
    assert {battle["a"]["content"], battle["b"]["content"]} == set(ANSWERS.values())
    store.close()
