"""Helpers for the serve tests: a real uvicorn server on a free loopback port, always shut down."""

from __future__ import annotations

import contextlib
import socket
import threading
import time

import httpx


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def running(app, port: int | None = None):
    """Run `app` with uvicorn in a thread; yields the base URL and stops the server on exit."""
    import uvicorn

    port = port or free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning",
                                           timeout_graceful_shutdown=2))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("test server did not start")
        time.sleep(0.02)
    try:
        yield url
    finally:
        server.should_exit = True
        thread.join(timeout=15)


def wait_http(url: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(url + "/health", timeout=2).status_code in (200, 401):
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"server at {url} did not come up in {timeout}s")


def long_context_model(out_dir, tokenizer_dir, max_seq_len: int = 2048):
    """Like conftest's tiny_model_dir but with a long context, for answers long enough to interrupt."""
    from gptsmith.config import ModelConfig
    from gptsmith.model import build_model, llama_config, resolve_shape, save_model_dir
    from gptsmith.tokenizer import load_tokenizer

    tok = load_tokenizer(tokenizer_dir)
    cfg = llama_config(resolve_shape(ModelConfig(preset="test", max_seq_len=max_seq_len)), len(tok),
                       tok.bos_token_id, tok.eos_token_id, tok.pad_token_id)
    save_model_dir(build_model(cfg, seed=0), tok, out_dir)
    return out_dir


class DecodeGate:
    """Lets the engine run `free_steps` decode steps, then holds every further step until `release()`.

    With the gate installed an answer cannot end on its own (not by length, not by speed), so a test that
    disconnects, stops or kills mid-answer decides when generation may go on, on a slow or a fast machine.
    The first token of a request comes from its prefill, before any decode step."""

    def __init__(self, free_steps: int):
        self.free_steps, self.steps = free_steps, 0
        self._open = threading.Event()

    def install(self, monkeypatch=None) -> DecodeGate:
        from gptsmith.engine.core import Batch

        original, gate = Batch.step, self

        def step(batch):
            if gate.steps >= gate.free_steps:
                gate._open.wait()
            gate.steps += 1
            return original(batch)

        if monkeypatch is not None:
            monkeypatch.setattr(Batch, "step", step)
        else:  # a server subprocess that the test kills
            Batch.step = step
        return self

    def release(self) -> None:
        self._open.set()


def record_requests(scheduler, monkeypatch) -> list:
    """The engine requests `scheduler` gets from now on, to check how each one ended."""
    seen, submit = [], scheduler.submit

    def recording(*args, **kwargs):
        seen.append(submit(*args, **kwargs))
        return seen[-1]

    monkeypatch.setattr(scheduler, "submit", recording)
    return seen


def wait_for(fn, timeout: float = 30.0, what: str = "condition"):
    """Poll `fn` until it returns something true. The timeout only bounds a failing test: a passing one never
    depends on it."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = fn()
        if value:
            return value
        time.sleep(0.02)
    raise AssertionError(f"{what} not met within {timeout}s")


def serve_process(model_dir, port: int, db_url: str, *options: str, hold_after_steps: int | None = None):
    """`gptsmith serve` in a subprocess (to be killed with SIGKILL), optionally with a DecodeGate that is never
    released: answers stream `hold_after_steps` decode steps and then wait forever."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    code = "import sys\n"
    if hold_after_steps is not None:
        code += (f"sys.path.insert(0, {str(Path(__file__).parent)!r})\nimport serve_helpers\n"
                 f"serve_helpers.DecodeGate({hold_after_steps}).install()\n")
    code += "from gptsmith.cli import main\nsys.exit(main(sys.argv[1:]))\n"
    return subprocess.Popen([sys.executable, "-c", code, "serve", "--model", str(model_dir), "--port", str(port),
                             "--db", db_url, *options], env=os.environ | {"GPTSMITH_API_KEY": ""},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


class ScriptedBackend:
    """A backend that answers every prompt with `pieces`, then waits until `release()` to finish (or to raise
    `then_raise`): the test decides when an answer ends."""

    name, version, max_context = "scripted", "scripted@1", 10_000

    def __init__(self, pieces=("Hello", " there"), then_raise: Exception | None = None):
        self.pieces, self.then_raise = list(pieces), then_raise
        self.released = threading.Event()
        self.opened = threading.Event()

    def release(self) -> None:
        self.released.set()

    async def start(self) -> None: ...

    async def close(self) -> None:
        self.released.set()

    async def prepare(self, prompt, max_tokens, default_max_tokens, fit):
        from gptsmith.serve.backends import Prompt

        return Prompt(prompt.messages, prompt.text, [1, 2, 3], 3), max_tokens or default_max_tokens

    async def open(self, prompt, params):
        self.opened.set()
        return self._events()

    async def _events(self):
        import asyncio

        from gptsmith.serve.backends import Chunk

        for piece in self.pieces:
            yield Chunk(piece)
        while not self.released.is_set():
            await asyncio.sleep(0.01)
        if self.then_raise is not None:
            raise self.then_raise
        yield Chunk("", "stop", 3, len(self.pieces))


CHROMIUM = "/usr/bin/chromium"  # Debian's chromium (apt-get install -y chromium); Playwright drives it
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]


@contextlib.contextmanager
def chromium(*extra_args: str):
    """A headless Debian chromium under Playwright, closed on exit (the browser tests skip when it is missing)."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS + list(extra_args))
        try:
            yield browser
        finally:
            browser.close()


def watched_page(browser):
    """A new page and the list its script errors and dialogs (alert() from injected markup) are recorded in: a UI
    test ends by asserting the list is empty."""
    page, errors = browser.new_page(), []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.on("dialog", lambda d: errors.append(f"dialog: {d.message}") or d.dismiss())
    return page, errors
