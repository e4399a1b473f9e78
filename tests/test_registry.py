"""The model registry (gptsmith.registry, `gptsmith models ...`) and `gptsmith serve --registry`: versions added,
promoted and rolled back with one atomic registry.json write each, and a running server that switches to a newly
promoted version without dropping the requests it is answering."""

import json
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from serve_helpers import running, wait_for

from gptsmith.cli import main
from gptsmith.config import load_config
from gptsmith.errors import InputError
from gptsmith.registry import Registry

MSG = [{"role": "user", "content": "What is a list?"}]


def tiny_model(out: Path, tokenizer_dir, seed: int, lineage: dict | None = None) -> Path:
    """A 2-layer, 64-wide model; a different seed gives different weights (another version)."""
    from gptsmith.config import ModelConfig
    from gptsmith.model import build_model, llama_config, resolve_shape, save_model_dir
    from gptsmith.tokenizer import load_tokenizer

    tok = load_tokenizer(tokenizer_dir)
    cfg = llama_config(resolve_shape(ModelConfig(preset="test")), len(tok), tok.bos_token_id, tok.eos_token_id,
                       tok.pad_token_id)
    save_model_dir(build_model(cfg, seed=seed), tok, out, lineage=lineage)
    return out


@pytest.fixture(scope="module")
def models(tokenizer_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    data = root / "prefs.jsonl"
    data.write_text('{"prompt": "hi", "chosen": "hello", "rejected": "go away"}\n')
    lineage = {"stage": "dpo", "parent_model": "/models/base", "config": {"dpo": {"beta": 0.1}},
               "data": {"path": str(data), "sha256": "f" * 64}, "metrics": {"val_loss": 1.25}}
    return {"a": tiny_model(root / "a", tokenizer_dir, 0, lineage), "b": tiny_model(root / "b", tokenizer_dir, 1),
            "data": data}


@pytest.fixture
def reg(tmp_path):
    return Registry.open(tmp_path / "reg", create=True, name="chat")


def statuses(reg: Registry) -> dict:
    return {v["version"]: v["status"] for v in reg.versions()}


# ---------------------------------------------------------------------------------------------- the registry
def test_add_promote_rollback_show(reg, models):
    v1 = reg.add(models["a"])
    v2 = reg.add(models["b"], parent=v1, method="sft", data=[models["data"]], config={"lr": 1e-4})
    assert (v1, v2) == ("v1", "v2") and statuses(reg) == {"v1": "candidate", "v2": "candidate"}
    assert reg.live() is None and reg.live_dir() is None
    assert (reg.version_dir(v1) / "model.safetensors").is_file() and models["a"].is_dir()  # copied, not moved

    # lineage comes from the model's gptsmith_lineage.json unless given
    v1_meta = json.loads((reg.version_dir(v1) / "gptsmith_version.json").read_text())
    assert v1_meta["version"] == "v1" and v1_meta["method"] == "dpo" and v1_meta["config"] == {"dpo": {"beta": 0.1}}
    assert v1_meta["data"] == [{"path": str(models["data"]), "sha256": "f" * 64}]
    v2_meta = json.loads((reg.version_dir(v2) / "gptsmith_version.json").read_text())
    assert v2_meta["parent"] == "v1" and v2_meta["method"] == "sft" and v2_meta["config"] == {"lr": 1e-4}
    from gptsmith.files import sha256_file
    assert v2_meta["data"] == [{"path": str(models["data"].resolve()), "sha256": sha256_file(models["data"])}]

    assert reg.promote(v1)["changed"] and reg.live() == "v1" and reg.live_dir() == reg.version_dir("v1")
    again = reg.promote(v1)  # idempotent
    assert not again["changed"] and "already live" in again["message"]
    assert reg.promote(v2)["previous"] == "v1"
    assert statuses(reg) == {"v1": "retired", "v2": "live"}

    back = reg.rollback()
    assert (back["version"], back["previous"]) == ("v1", "v2") and reg.live() == "v1"
    assert statuses(reg) == {"v1": "live", "v2": "retired"}
    with pytest.raises(InputError, match="no earlier live version to roll back to") as e:  # v1 was the first live
        reg.rollback()
    assert str(reg.root) in str(e.value) and "models promote" in str(e.value)
    events = [(h["event"], h["version"], h["previous"]) for h in reg.read()["history"]]
    assert events == [("add", "v1", None), ("add", "v2", None), ("promote", "v1", None), ("promote", "v2", "v1"),
                      ("rollback", "v1", "v2")]

    # eval results beside the weights are summarised: suite, primary metric, value; compare win rates
    ev = reg.version_dir(v1) / "eval"
    ev.mkdir()
    (ev / "eval-1.json").write_text(json.dumps({"kind": "eval", "suites": [
        {"name": "python-docs", "primary": "bpb", "metrics": {"bpb": 1.9, "ppl": 7.0}, "n": 12}]}))
    (ev / "compare-1.json").write_text(json.dumps({"kind": "compare", "a": {"name": "v1"}, "b": {"name": "v2"},
                                                   "n": 10, "win_rate_a": 0.7, "ci": [0.5, 0.9]}))
    (ev / "broken.json").write_text("{")
    info = reg.show(v1)
    assert info["status"] == "live" and info["lineage"]["metrics"] == {"val_loss": 1.25}
    rows = {r["file"]: r for r in info["eval"]}
    assert rows["eval-1.json"] == {"file": "eval-1.json", "kind": "eval", "suite": "python-docs", "metric": "bpb",
                                   "value": 1.9, "n": 12}
    assert rows["compare-1.json"]["win_rate_a"] == 0.7 and rows["broken.json"]["kind"] == "unreadable"


def test_bad_input_errors_name_the_registry_version_and_fix(reg, models, tmp_path):
    reg.add(models["a"])
    with pytest.raises(InputError, match=r"has no version 'v7' \(it has: v1\)"):
        reg.promote("v7")
    with pytest.raises(InputError, match="has no version 'v3'"):
        reg.add(models["b"], parent="v3")
    with pytest.raises(InputError, match="not a model directory"):
        reg.add(tmp_path)
    with pytest.raises(InputError, match="not a model registry.*models add"):
        Registry.open(tmp_path / "nothing")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "registry.json").write_text("{oops")
    with pytest.raises(InputError, match="registry.json is not valid JSON"):
        Registry.open(tmp_path / "bad")
    assert statuses(reg) == {"v1": "candidate"}  # nothing half-added by the failed calls
    assert [p.name for p in (reg.root / "versions").iterdir()] == ["v1"]


def test_add_move(reg, models, tmp_path):
    import shutil

    src = tmp_path / "to-move"
    shutil.copytree(models["b"], src)
    v = reg.add(src, move=True)
    assert not src.exists() and (reg.version_dir(v) / "config.json").is_file()


def test_crash_mid_promote_leaves_registry_unchanged(reg, models, monkeypatch):
    """The write of registry.json is the promotion: a crash before its rename leaves the old file, whole."""
    reg.add(models["a"])
    reg.add(models["b"])
    reg.promote("v1")
    before = reg.file.read_bytes()

    def crash(src, dst):
        raise OSError("disk died")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError, match="disk died"):
        reg.promote("v2")
    monkeypatch.undo()
    assert reg.file.read_bytes() == before
    assert reg.live() == "v1" and statuses(reg) == {"v1": "live", "v2": "candidate"}
    assert not [p for p in reg.root.iterdir() if p.name.endswith(".tmp")]  # no temp file left behind
    assert reg.promote("v2")["changed"] and reg.live() == "v2"  # and the registry still works


def test_rejected_versions_are_pruned_and_their_numbers_never_reused(reg, models, capsys):
    from gptsmith.files import weights_sha256

    v1, v2, v3 = reg.add(models["a"]), reg.add(models["b"]), reg.add(models["b"])
    reg.promote(v1)
    assert reg.read()["versions"][v2]["weights_sha256"] == weights_sha256(models["b"])  # known by its weights
    reg.reject(v2, "v1-sft-abc")
    reg.reject(v1, "v1-sft-abc")  # only a candidate is rejected: the live one keeps its status
    assert statuses(reg) == {"v1": "live", "v2": "rejected", "v3": "candidate"}
    assert reg.read()["versions"][v2]["rejected_by"] == "v1-sft-abc"
    assert main(["models", "prune", "--registry", str(reg.root)]) == 0
    assert "deleted the rejected versions v2" in capsys.readouterr().out
    assert statuses(reg) == {"v1": "live", "v3": "candidate"} and not reg.version_dir(v2).exists()
    assert reg.add(models["a"]) == "v4"  # v2 is gone, its number stays taken (history names it)
    assert main(["models", "prune", "--registry", str(reg.root)]) == 0
    assert "no rejected versions" in capsys.readouterr().out


def test_concurrent_adds_all_land(reg, models):
    """Eight adds at once (each its own lock holder, as separate commands are): every one gets its own id and
    its registry entry; none overwrites another's update."""
    barrier = threading.Barrier(8)

    def add(_):
        barrier.wait()
        return Registry.open(reg.root).add(models["a"])

    with ThreadPoolExecutor(8) as pool:
        ids = list(pool.map(add, range(8)))
    assert sorted(ids, key=lambda v: int(v[1:])) == [f"v{i}" for i in range(1, 9)]
    assert len(reg.read()["versions"]) == 8 and len(reg.read()["history"]) == 8


def test_concurrent_adds_from_processes(reg, models):
    """The same across processes: two `gptsmith models add` commands at once."""
    import subprocess
    import sys

    cmd = [sys.executable, "-m", "gptsmith.cli", "models", "add", str(models["a"]), "--registry", str(reg.root)]
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(3)]
    outs = [p.communicate(timeout=120) for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    assert statuses(reg) == {"v1": "candidate", "v2": "candidate", "v3": "candidate"}


def test_models_cli(reg, models, capsys, tmp_path):
    assert main(["models", "add", str(models["a"]), "--registry", str(tmp_path / "new"), "--name", "bot"]) == 0
    assert Registry.open(tmp_path / "new").name == "bot" and Registry.open(tmp_path / "new").live() is None
    assert main(["models", "add", str(models["a"]), "--registry", str(reg.root), "--name", "other"]) == 2
    assert "is named 'chat'" in capsys.readouterr().err
    assert main(["models", "add", str(models["a"]), "--registry", str(reg.root)]) == 0
    assert main(["models", "add", str(models["b"]), "--registry", str(reg.root), "--parent", "v1",
                 "--method", "kto"]) == 0
    assert main(["models", "promote", "v1", "--registry", str(reg.root)]) == 0
    assert main(["models", "promote", "v2", "--registry", str(reg.root)]) == 0
    capsys.readouterr()
    assert main(["models", "list", "--registry", str(reg.root)]) == 0
    out = capsys.readouterr().out
    assert "retired" in out and "live" in out and "kto" in out
    assert main(["models", "show", "v1", "--registry", str(reg.root)]) == 0
    out = capsys.readouterr().out
    assert "/models/base" in out and "val_loss" in out and "no eval results" in out
    assert main(["models", "show", "v2", "--registry", str(reg.root), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["parent"] == "v1"
    assert main(["models", "rollback", "--registry", str(reg.root)]) == 0
    assert "rolled back to v1" in capsys.readouterr().out
    assert main(["models", "promote", "v9", "--registry", str(reg.root)]) == 2
    assert "no version 'v9'" in capsys.readouterr().err
    assert main(["models", "list", "--registry", str(reg.root / "missing")]) == 2
    assert main(["models", "rollback", "--registry", str(reg.root)]) == 2
    assert "no earlier live version" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------- serve --registry
class EngineGate:
    """Holds the decode steps of ONE engine after `free_steps` until release(): an answer on the old version
    stays in flight for as long as the test says, while the new version decodes freely."""

    def __init__(self, engine, free_steps: int):
        self.engine, self.free_steps, self.steps = engine, free_steps, 0
        self.holding = threading.Event()
        self._open = threading.Event()

    def install(self, monkeypatch) -> "EngineGate":
        from gptsmith.engine.core import Batch

        original, gate = Batch.step, self

        def step(batch):
            if batch.engine is gate.engine:
                if gate.steps >= gate.free_steps:
                    gate.holding.set()
                    gate._open.wait()
                gate.steps += 1
            return original(batch)

        monkeypatch.setattr(Batch, "step", step)
        return self

    def release(self) -> None:
        self._open.set()


def stored_answers(db: str) -> list[dict]:
    from gptsmith.serve.store import Store

    store = Store(db)
    try:
        return [m for c in store.list_conversations() for m in store.get_conversation(c["id"])["messages"]
                if m["role"] == "assistant"]
    finally:
        store.close()


def test_serve_registry_switches_versions_without_dropping_requests(reg, models, tmp_path, monkeypatch):
    from gptsmith.serve.app import create_app

    reg.add(models["a"])
    reg.add(models["b"])
    reg.promote("v1")
    db = f"sqlite:///{tmp_path / 'store.db'}"
    cfg = load_config(None, {"serve.db": db, "serve.registry": str(reg.root), "serve.registry_seconds": 0.05,
                             "serve.store_flush_seconds": 0.05, "serve.rate_limit_per_minute": 0})
    app = create_app(cfg)
    srv, watcher = app.state.server, app.state.server.registry_watcher
    gate = EngineGate(srv.backend.engine, free_steps=5).install(monkeypatch)
    body = {"model": "chat", "messages": MSG, "max_tokens": 120, "temperature": 0}
    with running(app) as url, ThreadPoolExecutor(1) as pool:
        info = httpx.get(url + "/api/info").json()
        assert (info["model"], info["version"]) == ("chat", "v1")
        try:
            in_flight = pool.submit(httpx.post, url + "/v1/chat/completions", json=body, timeout=120)
            assert gate.holding.wait(60), "the v1 answer never reached the gate"

            assert main(["models", "promote", "v2", "--registry", str(reg.root)]) == 0
            wait_for(lambda: httpx.get(url + "/api/info").json()["version"] == "v2", what="the server on v2")
            new = httpx.post(url + "/v1/chat/completions", json=body | {"max_tokens": 8}, timeout=60)
            assert new.status_code == 200 and new.json()["system_fingerprint"] == "v2"
            assert new.json()["model"] == "chat"
            assert not in_flight.done() and "v1" not in watcher.released  # v1 still answering, not released
        finally:
            gate.release()
        old = in_flight.result(timeout=120)
        assert old.status_code == 200, old.text
        old = old.json()
        assert old["system_fingerprint"] == "v1" and old["choices"][0]["finish_reason"] in ("stop", "length")
        assert old["usage"]["completion_tokens"] > gate.free_steps  # it went on decoding on v1 after the switch
        wait_for(lambda: "v1" in watcher.released, what="v1 released after its last request")
        assert watcher.switches == [("v1", "v2")]
        answers = stored_answers(db)
        assert sorted((m["model_name"], m["model_version"]) for m in answers) == [("chat", "v1"), ("chat", "v2")]
        assert {m["model_version"]: m["finish_reason"] for m in answers}["v1"] in ("stop", "length")

        # a promoted version that does not load: logged, and v2 goes on serving
        v3 = reg.add(models["a"])
        (reg.version_dir(v3) / "config.json").write_text("{not json")
        reg.promote(v3)
        wait_for(lambda: v3 in watcher.failed, what="v3's load failure noticed")
        again = httpx.post(url + "/v1/chat/completions", json=body | {"max_tokens": 4}, timeout=60)
        assert again.status_code == 200 and again.json()["system_fingerprint"] == "v2"
        assert httpx.get(url + "/api/info").json()["version"] == "v2"

        # rollback: back to v2, which is already serving (nothing to load); then a rollback to v1 switches again
        reg.rollback()
        reg.rollback()
        wait_for(lambda: httpx.get(url + "/api/info").json()["version"] == "v1", what="the server back on v1")
        assert httpx.post(url + "/v1/chat/completions", json=body | {"max_tokens": 4},
                          timeout=60).json()["system_fingerprint"] == "v1"


def test_serve_registry_needs_a_live_version(reg, models, tmp_path):
    from gptsmith.serve.app import create_app

    reg.add(models["a"])
    cfg = load_config(None, {"serve.db": f"sqlite:///{tmp_path / 's.db'}", "serve.registry": str(reg.root)})
    with pytest.raises(InputError, match="no live version to serve.*models promote"):
        create_app(cfg)
    assert main(["serve", "--registry", str(reg.root), "--db", f"sqlite:///{tmp_path / 's.db'}"]) == 2
    reg.promote("v1")
    with pytest.raises(InputError, match="leave out --model"):
        create_app(cfg, models["a"])


@pytest.mark.skipif(not os.path.exists("/usr/bin/chromium"), reason="/usr/bin/chromium is missing: apt-get install -y "
                    "chromium")
def test_ui_shows_the_version_that_answered_each_message(reg, models, tmp_path):
    from serve_helpers import chromium, watched_page

    from gptsmith.serve.app import create_app

    reg.add(models["a"])
    reg.add(models["b"])
    reg.promote("v1")
    cfg = load_config(None, {"serve.db": f"sqlite:///{tmp_path / 'ui.db'}", "serve.registry": str(reg.root),
                             "serve.registry_seconds": 0.05, "serve.rate_limit_per_minute": 0})
    app = create_app(cfg)
    with running(app) as url, chromium() as browser:
        page, errors = watched_page(browser)
        page.goto(url)
        page.wait_for_selector("#model:has-text('chat')")
        page.click("#settings-toggle")
        page.fill("#max-tokens", "6")
        page.fill("#input", "first question")
        page.keyboard.press("Enter")
        page.wait_for_selector(".msg.assistant:not(.streaming) .actions .thumb-up")
        assert page.locator(".msg.assistant .version").last.inner_text() == "v1"

        reg.promote("v2")
        wait_for(lambda: httpx.get(url + "/api/info").json()["version"] == "v2", what="the server on v2")
        page.fill("#input", "second question")
        page.keyboard.press("Enter")
        page.wait_for_function("document.querySelectorAll('.msg.assistant:not(.streaming) .thumb-up').length == 2")
        wait_for(lambda: page.locator(".msg.assistant .version").all_inner_texts() == ["v1", "v2"],
                 what="each answer labelled with its version")
        assert page.locator(".msg.assistant .role").all_inner_texts() == ["chat", "chat"]
        page.reload()  # rendered again from the store
        page.locator("#conversations li .open").first.click()
        wait_for(lambda: page.locator(".msg.assistant .version").all_inner_texts() == ["v1", "v2"],
                 what="the versions shown from the stored messages")
        assert errors == []
