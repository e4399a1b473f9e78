"""The project config: one pydantic model per stage, loaded from YAML, overridable key by key.

    gptsmith pretrain --config configs/quickstart.yaml --pretrain.lr 3e-4 --model.n_layer 6

Every section forbids unknown keys, so a typo is an error that names the key and the closest valid one
instead of a setting that silently does nothing. The effective config (file + overrides) is written beside
every output as `gptsmith.yaml`, so any run can be repeated exactly.
"""

from __future__ import annotations

import difflib
import json
import textwrap
import types
import typing
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from gptsmith.generation_defaults import DEFAULTS

CONFIG_FILENAME = "gptsmith.yaml"


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class DataConfig(Section):
    text_field: str = Field("text", description="field holding the text in .jsonl/.json/.parquet/.csv/hub inputs")
    min_chars: int = Field(64, ge=0, description="documents shorter than this (after cleaning) are dropped")
    max_chars: int = Field(0, ge=0, description="documents longer than this are cut into pieces of this size; 0 = no limit")
    val_fraction: float = Field(0.02, ge=0.0, lt=1.0, description="share of documents (by content hash; long ones by ~4 KB pieces) in validation")
    dedup: bool = Field(True, description="drop exact duplicate documents (by content hash)")
    max_documents: int = Field(0, ge=0, description="stop reading after this many kept documents (a sample of a big hub dataset); 0 = all")
    on_error: Literal["error", "skip"] = Field("error", description="bad input: stop with an error, or skip and count it")
    hub_split: str = Field("train", description="split to stream when an input is a Hugging Face dataset id")
    hub_config: str | None = Field(None, description="dataset config name for hub inputs")
    num_workers: int = Field(0, ge=0, description="tokenisation worker processes; 0 = number of CPU cores")
    shard_tokens: int = Field(100_000_000, ge=1, description="tokens per shard file under WORKDIR/tokens (at most, roughly)")
    seed: int = Field(1234, description="seed of the content-hash train/validation split (same seed, same split)")


class TokenizerConfig(Section):
    vocab_size: int = Field(8192, ge=300, description="vocabulary size of the byte-level BPE, special tokens included")
    min_frequency: int = Field(2, ge=1, description="minimum pair frequency for a BPE merge")
    max_train_chars: int = Field(200_000_000, ge=1, description="train the tokenizer on at most this many characters")


class ModelConfig(Section):
    preset: str = Field("tiny", description="named size: test, tiny, small, gpt2-small (~101M), gpt2-medium (~304M)")
    n_layer: int | None = Field(None, ge=1, description="override the preset's number of layers")
    d_model: int | None = Field(None, ge=8, description="override the preset's hidden size")
    n_head: int | None = Field(None, ge=1, description="override the preset's number of attention heads")
    n_kv_head: int | None = Field(None, ge=1, description="override the number of key/value heads (grouped-query attention)")
    d_ff: int | None = Field(None, ge=8, description="override the SwiGLU hidden size")
    max_seq_len: int | None = Field(None, ge=8, description="override the context length")
    tie_embeddings: bool | None = Field(None, description="share input and output embeddings")
    rope_theta: float | None = Field(None, gt=0, description="override the rotary base")


class PretrainConfig(Section):
    seq_len: int = Field(256, ge=8, description="tokens per training sequence (<= model context)")
    batch_size: int = Field(16, ge=1, description="sequences per micro-batch (per process)")
    grad_accum: int = Field(1, ge=1, description="micro-batches per optimizer step")
    max_steps: int = Field(1000, ge=1, description="optimizer steps")
    max_minutes: float | None = Field(None, gt=0, description="stop (and save) after this many minutes of training")
    lr: float = Field(3e-3, gt=0, description="peak learning rate")
    min_lr_ratio: float = Field(0.1, ge=0, le=1, description="final learning rate as a fraction of the peak")
    warmup_steps: int = Field(50, ge=0, description="steps of linear learning-rate warmup from 0 to the peak")
    schedule: Literal["cosine", "wsd", "constant"] = Field("cosine", description="cosine decay, or warmup-stable-decay")
    decay_fraction: float = Field(0.2, gt=0, le=1, description="wsd: share of steps spent decaying at the end")
    weight_decay: float = Field(0.1, ge=0, description="AdamW weight decay of matrices and embeddings (not norms)")
    beta1: float = Field(0.9, description="AdamW beta1 (momentum of the gradient average)")
    beta2: float = Field(0.95, description="AdamW beta2 (momentum of the squared-gradient average)")
    grad_clip: float = Field(1.0, ge=0, description="clip gradient norm to this; 0 = off")
    eval_every: int = Field(100, ge=1, description="validation loss and bits-per-byte every N steps")
    eval_batches: int = Field(8, ge=1, description="micro-batches per validation")
    save_every: int = Field(200, ge=1, description="checkpoint every N steps")
    keep_checkpoints: int = Field(2, ge=1, description="checkpoints kept under OUT/checkpoints")
    sample_every: int = Field(0, ge=0, description="print sample text every N steps; 0 = at checkpoints only")
    sample_prompt: str = Field("The", description="prompt of the sample text printed during training")
    seed: int = Field(1337, description="seed of the model initialisation and the batch order")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field("auto", description="auto: bf16 autocast on CUDA, fp32 on CPU")
    compile: Literal["auto", "on", "off"] = Field("auto", description="torch.compile: auto = on CUDA only")
    device: str = Field("auto", description="auto, cpu, cuda, cuda:1, mps")
    init_from: str | None = Field(None, description="continue pretraining from this Hugging Face model dir or hub id")


class TrainerSection(Section):
    """Keys every TRL-based trainer (sft, dpo, kto, reward, grpo) has, with one meaning; each section adds its own
    and its method's defaults for the rest (epochs, lr, batch size, ...)."""
    max_steps: int = Field(-1, description="stop after N optimizer steps; -1 = run all epochs")
    grad_accum: int = Field(1, ge=1, description="micro-batches per optimizer step")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay")
    lora_r: int = Field(16, ge=1, description="LoRA rank (size of the low-rank update)")
    lora_alpha: int = Field(32, ge=1, description="LoRA scale: the update is multiplied by lora_alpha / lora_r")
    lora_dropout: float = Field(0.05, ge=0, lt=1, description="dropout on the LoRA branch's input")
    lora_target_modules: list[str] | str = Field("all-linear", description="module names, or all-linear")
    save_every: int = Field(100, ge=1, description="checkpoint every N steps (under OUT/checkpoints)")
    keep_checkpoints: int = Field(2, ge=1, description="checkpoints kept under OUT/checkpoints")
    device: str = Field("auto", description="auto (CUDA when visible, else CPU), cpu, cuda, cuda:1, mps")
    gradient_checkpointing: bool = Field(False, description="recompute activations in backward: less memory, "
                                         "~30% slower")
    max_minutes: float | None = Field(None, gt=0, description="stop (and save) after this many minutes of training")


class SFTConfig(TrainerSection):
    epochs: float = Field(1.0, gt=0, description="passes over the training conversations (fractions allowed)")
    lr: float = Field(2e-4, gt=0, description="peak learning rate (cosine decay after warmup)")
    batch_size: int = Field(8, ge=1, description="conversations (or packed sequences) per micro-batch")
    max_seq_len: int = Field(512, ge=16, description="tokens per sequence; longer conversations are truncated")
    warmup_ratio: float = Field(0.03, ge=0, le=1, description="share of the steps spent warming up the learning rate")
    packing: bool = Field(False, description="pack several conversations into one sequence")
    lora: bool = Field(False, description="train a LoRA adapter instead of all weights")
    qlora: bool = Field(False, description="4-bit base weights (bitsandbytes, CUDA only) + LoRA")
    val_fraction: float = Field(0.05, ge=0, lt=1, description="share of conversations (by content hash) in validation")
    eval_every: int = Field(50, ge=1, description="validation loss every N steps")
    seed: int = Field(42, description="seed of new weights' initialisation (LoRA, added tokens) and the data order")
    group_by_length: bool = Field(True, description="without packing: batch conversations of similar length (less padding)")
    log_every: int = Field(10, ge=1, description="log training loss every N steps")


class PreferenceSection(TrainerSection):
    """Keys dpo and kto share (each section has its own copy, so the two can be set apart)."""
    beta: float = Field(0.1, gt=0, description="how far the model may move from the reference (the starting model): "
                        "higher = stays closer")
    epochs: float = Field(1.0, gt=0, description="passes over the training examples (fractions allowed)")
    lr: float = Field(5e-6, gt=0, description="peak learning rate (cosine decay after warmup); LoRA usually "
                      "wants ~10x more")
    batch_size: int = Field(4, ge=1, description="examples per micro-batch (a dpo pair counts once)")
    max_length: int = Field(512, ge=16, description="tokens of prompt + answer; longer ones are cut at the end, "
                            "examples whose prompt alone fills it are dropped")
    warmup_ratio: float = Field(0.1, ge=0, le=1, description="share of the steps spent warming up the learning rate")
    precompute_ref: bool = Field(False, description="compute the reference model's log-probs once before training "
                                 "and free it: less memory, no second model while training")
    lora: bool = Field(False, description="train a LoRA adapter; the reference is the same model with the adapter "
                       "disabled (no second copy)")
    qlora: bool = Field(False, description="4-bit base weights (bitsandbytes, CUDA only) + LoRA")
    val_fraction: float = Field(0.05, ge=0, lt=1, description="share of prompts (by content hash) held out for "
                                "validation when no --val file is given")
    eval_every: int = Field(50, ge=1, description="validation every N steps")
    log_every: int = Field(10, ge=1, description="log loss and rewards every N steps")
    seed: int = Field(42, description="seed of the data order and of new LoRA weights")


DPO_LOSSES = Literal["sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard", "aot",
                     "aot_unpaired", "apo_zero", "apo_down", "discopop", "sft", "sigmoid_norm"]


class DPOConfig(PreferenceSection):
    loss_type: DPO_LOSSES = Field("sigmoid", description="TRL's DPO loss: sigmoid (the DPO paper), ipo, hinge, "
                                  "robust, apo_zero, ... (see TRL's DPOConfig)")
    label_smoothing: float = Field(0.0, ge=0, lt=0.5, description="robust/exo losses: the assumed share of pairs "
                                   "whose preference is flipped")


class KTOConfig(PreferenceSection):
    loss_type: Literal["kto", "apo_zero_unpaired"] = Field("kto", description="TRL's KTO loss: kto (the KTO paper) "
                                                           "or apo_zero_unpaired")
    desirable_weight: float = Field(1.0, gt=0, description="weight of the desirable (thumbs-up) answers' loss; "
                                    "raise it when they are fewer than the undesirable ones")
    undesirable_weight: float = Field(1.0, gt=0, description="weight of the undesirable (thumbs-down) answers' loss")


class RewardModelConfig(TrainerSection):
    """`gptsmith reward`: a reward model (one-output classifier head on the starting model) from preference pairs."""
    epochs: float = Field(1.0, gt=0, description="passes over the training pairs (fractions allowed)")
    lr: float = Field(1e-5, gt=0, description="peak learning rate (cosine decay after warmup); LoRA usually wants "
                      "~10x more")
    batch_size: int = Field(4, ge=1, description="pairs per micro-batch")
    max_length: int = Field(512, ge=16, description="tokens of a whole conversation; pairs with a longer one are "
                            "dropped (and counted)")
    warmup_ratio: float = Field(0.1, ge=0, le=1, description="share of the steps spent warming up the learning rate")
    center_rewards_coefficient: float | None = Field(None, ge=0, description="pull rewards towards mean zero "
                                                     "with this weight (e.g. 0.01); null = off")
    lora: bool = Field(False, description="train a LoRA adapter (and the head in full), merged into OUT at the end")
    val_fraction: float = Field(0.1, ge=0, lt=1, description="share of prompts (by content hash) held out to "
                                "measure accuracy when no --val file is given")
    eval_every: int = Field(50, ge=1, description="held-out loss and accuracy every N steps")
    log_every: int = Field(10, ge=1, description="log loss, batch accuracy and margin every N steps")
    seed: int = Field(42, description="seed of the new head's weights, LoRA weights and the data order")


GRPO_LOSSES = Literal["grpo", "dr_grpo", "dapo", "bnpo", "cispo", "sapo"]


class GRPOConfig(TrainerSection):
    """`gptsmith grpo`: reinforcement learning from rewards on the model's own sampled answers (TRL's GRPO)."""
    rewards: list[Literal["exact", "contains", "regex", "numeric"]] = Field(
        default_factory=list, description="verifiable rewards against each prompt's answer: exact, contains, regex "
        "(the answer is the pattern), numeric; 1 when the answer passes, else 0")
    reward_fns: list[str] = Field(default_factory=list, description="Python reward functions, each "
                                  "path/to/file.py:function_name with TRL's signature (prompts, completions, **kwargs) "
                                  "-> list[float]")
    reward_model: str | None = Field(None, description="reward model directory from `gptsmith reward`; its score "
                                     "is one more reward")
    reward_weights: list[float] | None = Field(None, description="one weight per reward, in the order rewards, "
                                               "reward_fns, reward_model; null = all 1")
    num_generations: int = Field(4, ge=2, description="answers sampled per prompt; each is rewarded relative to "
                                 "the others of its group")
    max_completion_length: int = Field(128, ge=1, description="longest sampled answer in tokens")
    temperature: float = Field(1.0, gt=0, description="sampling temperature of the answers (exploration)")
    top_p: float = Field(1.0, gt=0, le=1, description="nucleus sampling mass of the answers, 1 = off")
    beta: float = Field(0.0, ge=0, description="KL penalty towards the starting model; 0 = none (no reference "
                        "model in memory, TRL's default), e.g. 0.04 keeps answers closer to the start")
    epsilon: float = Field(0.2, gt=0, description="clipping range of the policy ratio (as PPO)")
    num_iterations: int = Field(1, ge=1, description="optimisation passes over each batch of sampled answers")
    loss_type: GRPO_LOSSES = Field("dapo", description="TRL's GRPO loss: dapo (token-level, no length bias; "
                                   "TRL's default), grpo, dr_grpo, bnpo, cispo, sapo")
    scale_rewards: Literal["group", "batch", "none"] = Field("group", description="divide advantages by the "
                                                             "reward std of the group, of the batch, or not at all")
    mask_truncated_completions: bool = Field(False, description="leave answers cut at max_completion_length out "
                                             "of the loss")
    epochs: float = Field(1.0, gt=0, description="passes over the prompts (fractions allowed)")
    lr: float = Field(1e-6, gt=0, description="peak learning rate (TRL's default; LoRA and tiny models want "
                      "much more)")
    batch_size: int = Field(8, ge=1, description="sampled answers per micro-batch (prompts x num_generations); "
                            "batch_size x grad_accum must be a multiple of num_generations")
    warmup_ratio: float = Field(0.0, ge=0, le=1, description="share of the steps spent warming up the learning rate")
    lora: bool = Field(False, description="train a LoRA adapter; with beta > 0 the reference is the base with the "
                       "adapter disabled")
    use_vllm: bool = Field(False, description="sample answers with vLLM inside the training process (TRL's "
                           "colocate mode): CUDA and the vllm package needed; off = the model's own generate")
    log_every: int = Field(1, ge=1, description="log loss and reward mean/std every N steps")
    seed: int = Field(42, description="seed of the sampling, the prompt order and new LoRA weights")


class GenerateConfig(Section):
    # A key left null takes the model's generation_config.json value, else gptsmith's default
    # (gptsmith.generation_defaults): SamplingParams.from_config. Null, not "absent from the file", marks a key as
    # unset, so a config saved with every key (gptsmith.yaml beside a model) and loaded again means the same.
    max_new_tokens: int | None = Field(None, ge=1, description="longest answer in tokens; null = the model's "
                                       f"generation_config.json, else {DEFAULTS.max_new_tokens}")
    temperature: float | None = Field(None, ge=0, description="0 = greedy; null = the model's generation_config.json, "
                                      f"else {DEFAULTS.temperature}")
    top_k: int | None = Field(None, ge=0, description="sample from the k likeliest tokens, 0 = off; null = the "
                              f"model's generation_config.json, else {DEFAULTS.top_k}")
    top_p: float | None = Field(None, gt=0, le=1, description="nucleus sampling mass, 1 = off; null = the model's "
                                f"generation_config.json, else {DEFAULTS.top_p}")
    repetition_penalty: float | None = Field(None, gt=0, description="> 1 discourages repeats, 1 = off; null = the "
                                             f"model's generation_config.json, else {DEFAULTS.repetition_penalty}")
    seed: int | None = Field(None, description="random seed for reproducible samples; null = a fresh one each time")


class ServeConfig(Section):
    host: str = Field("127.0.0.1", description="address to bind; 0.0.0.0 serves other machines too (set api_key)")
    port: int = Field(8000, ge=0, le=65535, description="TCP port to listen on")
    db: str = Field("sqlite:///gptsmith.db", description="SQLAlchemy URL of the conversation and feedback store")
    api_key: str | None = Field(None, description="require this key (also read from GPTSMITH_API_KEY)")
    backend_url: str | None = Field(None, description="front another OpenAI-compatible server instead of a local model")
    backend_model: str | None = Field(None, description="model id to ask the backend for; default: the first it lists")
    device: str = Field("auto", description="where the local model runs: auto, cpu, cuda, cuda:1, mps")
    max_batch_size: int = Field(16, ge=1, description="local model: most sequences decoded together in one batch")
    max_tokens_limit: int = Field(2048, ge=1, description="largest max_tokens one request may ask for")
    max_body_bytes: int = Field(1_000_000, ge=1, description="largest request body accepted, in bytes")
    max_messages: int = Field(200, ge=1, description="most messages one chat request may carry")
    max_n: int = Field(8, ge=1, description="most choices (n x prompts) one request may ask for")
    store_flush_seconds: float = Field(0.5, ge=0, description="save a streaming answer's text this often")
    rate_limit_per_minute: int = Field(600, ge=0, description="requests per minute per key; 0 = off")
    stream_interval_s: float = Field(0.02, ge=0, description="local model: send streamed tokens at most this often "
                                     "(first tokens and ends at once); fewer, multi-token SSE chunks cost less CPU "
                                     "under load. 0 = one chunk per token")
    torch_threads: int = Field(0, ge=0, description="CPU threads for the local model's math; 0 = auto: all cores "
                               "but one, which the HTTP event loop needs")
    cors_origins: list[str] = Field(default_factory=list, description="origins (https://app.example) whose pages "
                                    "may call this server from the browser, writes included; empty = none")
    allowed_hosts: list[str] = Field(default_factory=list, description="host names the server answers to besides "
                                     "localhost, 127.0.0.1 and [::1] (a reverse proxy's, a LAN name); '*' = any "
                                     "(turns off the DNS-rebinding check)")
    session_hours: float = Field(168.0, gt=0, description="how long a browser login (the session cookie) lasts")
    auth_failures_per_minute: int = Field(10, ge=0, description="failed logins/API keys allowed per client IP a "
                                          "minute before it gets 429; 0 = no limit")
    watch: bool = Field(False, description="re-index the served assistants' RAG folders while serving (changed "
                        "files only), so edits show up without a restart")
    watch_seconds: float = Field(5.0, gt=0, description="with watch: how often to look for changed files")
    registry: str | None = Field(None, description="model registry folder (`gptsmith models`): serve its live "
                                 "version under the registry's name, switching to a newly promoted one without a restart")
    registry_seconds: float = Field(2.0, gt=0, description="with registry: how often to look for a new live version")


class RagConfig(Section):
    index: str | None = Field(None, description="index directory (written by `rag index`) that query, eval and "
                              "assistants read")
    embedder: str = Field("default", description="embedding model: default (all-MiniLM-L6-v2, shipped), a local "
                          "sentence-transformers dir, a hub id, or an OpenAI-compatible http(s)://HOST/v1[#model] URL")
    chunk_tokens: int = Field(256, ge=16, description="most tokens in one chunk (estimated for subword tokenizers "
                              "such as the embedder's)")
    chunk_overlap: int = Field(32, ge=0, description="tokens a chunk repeats from the end of the previous one")
    top_k: int = Field(5, ge=1, description="chunks a query returns")
    mode: Literal["hybrid", "bm25", "vector"] | None = Field(None, description="retrieval: hybrid (BM25 and "
                                                             "vectors fused by reciprocal rank fusion), bm25 alone, "
                                                             "or vector alone; null = the index's choice (recorded "
                                                             "by `rag eval --save`), else hybrid")
    rerank: str | None = Field(None, description="cross-encoder directory (sentence-transformers) that re-scores "
                               "the candidates; null = no rerank")
    min_score: float | None = Field(None, description="drop hits scoring below this (the score of the last stage: "
                                    "rerank, RRF, BM25 or cosine); null = keep all")
    rrf_k: int = Field(5, ge=1, description="reciprocal rank fusion constant: a hit scores sum 1/(rrf_k + rank) "
                       "(small: a list's top hits stay on top; see rag.retrieve.Settings)")
    candidates: int = Field(20, ge=1, description="hits each retriever fetches before fusion, filters and rerank")


class RefineConfig(Section):
    holdout: float = Field(0.2, ge=0, lt=1, description="share of the new feedback (by content hash) held out to "
                           "evaluate candidate vs live; at least one example when there are two or more")
    method: Literal["auto", "sft", "dpo", "kto"] = Field("auto", description="auto: dpo on pairs, else sft on "
                                                          "corrections, else kto on thumbs (by what there is enough of)")
    min_dpo_pairs: int = Field(4, ge=1, description="fewest training pairs (corrections, regenerations, arena votes) "
                               "for dpo")
    min_sft_examples: int = Field(4, ge=1, description="fewest corrections / thumbs-up answers for sft")
    min_kto_examples: int = Field(8, ge=1, description="fewest thumbs (up and down) for kto")
    accuracy_tolerance: float = Field(0.0, ge=0, le=1, description="held-out preference accuracy may drop by at "
                                      "most this much (absolute)")
    bpb_tolerance: float = Field(0.01, ge=0, description="held-out correction bits-per-byte may rise by at most "
                                 "this share (0.01 = 1%)")
    suite_tolerance: float = Field(0.02, ge=0, description="a regression suite's primary metric may not move the "
                                   "wrong way significantly by more than this (absolute)")
    judge_min_upper: float = Field(0.5, ge=0, le=1, description="with --judge: the upper bound of the candidate's "
                                   "win-rate CI must reach this")
    suites: list[str] = Field(["chat-sanity"], description="regression suites run on candidate and live (as for "
                              "`gptsmith eval --suite`); a built-in one this install lacks is skipped with a note")
    train: dict[str, Any] = Field(default_factory=dict, description="overrides of the chosen method's section for "
                                  "the candidate's training, e.g. {max_steps: 50, lr: 1e-5}")
    promote: bool = Field(True, description="promote a candidate that passes every check (false: decide only)")


class ProjectConfig(Section):
    data: DataConfig = Field(default_factory=DataConfig,
                             description="reading, cleaning, de-duplicating and splitting inputs (prepare, data; on_error: sft, dpo, kto too)")
    tokenizer: TokenizerConfig = Field(default_factory=TokenizerConfig,
                                       description="the byte-level BPE tokenizer (prepare, tokenizer train)")
    model: ModelConfig = Field(default_factory=ModelConfig, description="the model's size and shape (pretrain)")
    pretrain: PretrainConfig = Field(default_factory=PretrainConfig,
                                     description="pretraining on token shards (pretrain, quickstart)")
    sft: SFTConfig = Field(default_factory=SFTConfig,
                           description="supervised fine-tuning on conversations (sft, quickstart)")
    dpo: DPOConfig = Field(default_factory=DPOConfig,
                           description="preference tuning on pairs of answers, chosen over rejected (dpo)")
    kto: KTOConfig = Field(default_factory=KTOConfig,
                           description="preference tuning on answers rated good or bad one by one (kto)")
    reward: RewardModelConfig = Field(default_factory=RewardModelConfig,
                                      description="a reward model from preference pairs (reward)")
    grpo: GRPOConfig = Field(default_factory=GRPOConfig,
                             description="reinforcement learning on sampled answers scored by rewards (grpo)")
    generate: GenerateConfig = Field(default_factory=GenerateConfig,
                                     description="sampling defaults (generate, chat, serve)")
    serve: ServeConfig = Field(default_factory=ServeConfig,
                               description="the OpenAI-compatible server, web UI and store (serve, feedback export)")
    rag: RagConfig = Field(default_factory=RagConfig,
                           description="retrieval over your documents: index, embedder, chunking, search (rag)")
    refine: RefineConfig = Field(default_factory=RefineConfig,
                                 description="the feedback loop: collect, train a candidate, evaluate, promote (refine)")


class ConfigError(ValueError):
    """A config file or override that does not fit the schema; the message says which key and how to fix it."""


def _section(annotation) -> type[BaseModel] | None:
    """The pydantic model inside `X`, `X | None` or `Optional[X]` (a section, optional or not), else None."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        return next((a for a in typing.get_args(annotation) if isinstance(a, type) and issubclass(a, BaseModel)), None)
    return None


def all_keys(model: type[BaseModel] = ProjectConfig, prefix: str = "") -> list[str]:
    """Every valid key of `model` as a dotted path (pretrain.lr, rag.top_k, ...); assistant profiles use it too."""
    keys = []
    for name, field in model.model_fields.items():
        sub = _section(field.annotation)
        keys += all_keys(sub, f"{prefix}{name}.") if sub else [prefix + name]
    return keys


def closest_key(key: str, keys: list[str]) -> str | None:
    """The valid dotted key a mistyped one most likely meant: the closest spelling, else the same name in
    another section (a bare `lr` -> `pretrain.lr`). Also used for assistant profiles."""
    close = difflib.get_close_matches(key, keys, n=1, cutoff=0.5)
    if not close:
        close = [k for k in keys if k.rsplit(".", 1)[-1] == key.rsplit(".", 1)[-1]][:1]
    return close[0] if close else None


def _suggest(key: str) -> str:
    close = closest_key(key, all_keys())
    return f" Did you mean '{close}'?" if close else " Run `gptsmith config show` for every key."


def format_validation_error(err: ValidationError, source, suggest=_suggest) -> str:
    """One line per problem, each naming the file and the dotted key; an unknown key gets `suggest(key)` (the
    closest valid one). Also used for assistant profiles, with their own `suggest`."""
    lines = []
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"])
        if e["type"] == "extra_forbidden":
            lines.append(f"{source}: unknown key '{key}'.{suggest(key)}")
        elif e["type"] == "missing":
            lines.append(f"{source}: '{key}' is required")
        elif not key:  # a check across fields (model validator)
            lines.append(f"{source}: {e['msg'].removeprefix('Value error, ')}")
        else:
            lines.append(f"{source}: '{key}': {e['msg']} (got {e.get('input')!r})")
    return "\n".join(lines)


def parse_value(text: str) -> Any:
    """Command-line values are YAML scalars: 3e-4, true, null, [a, b] all mean what they look like."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def set_dotted(tree: dict, key: str, value: Any) -> None:
    valid = all_keys()
    if key not in valid:
        sections = {k.split(".")[0] for k in valid}
        if key in sections:
            raise ConfigError(f"'{key}' is a section; set one of its keys, e.g. --{key}.<key> VALUE")
        raise ConfigError(f"unknown config key '{key}'.{_suggest(key)}")
    node = tree
    *parents, leaf = key.split(".")
    for p in parents:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise ConfigError(f"'{p}' in the config must be a mapping")
    node[leaf] = value


def parse_overrides(args: list[str]) -> dict[str, Any]:
    """['--pretrain.lr', '3e-4', '--model.n_layer=6'] -> {'pretrain.lr': 3e-4, 'model.n_layer': 6}."""
    out: dict[str, Any] = {}
    i = 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--"):
            raise ConfigError(f"unexpected argument '{arg}'; config overrides look like --section.key VALUE")
        key = arg[2:]
        if "=" in key:
            key, raw = key.split("=", 1)
            i += 1
        else:
            if i + 1 >= len(args) or (args[i + 1].startswith("--") and "." in args[i + 1]):
                raise ConfigError(f"override '--{key}' needs a value, e.g. --{key} VALUE")
            raw = args[i + 1]
            i += 2
        if "." not in key:
            raise ConfigError(f"unknown option '--{key}'.{_suggest(key.replace('-', '_'))}")
        out[key] = parse_value(raw)
    return out


def load_config(path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> ProjectConfig:
    """Load YAML (or defaults when `path` is None), apply dotted overrides, validate."""
    tree: dict = {}
    source = "defaults"
    if path is not None:
        path = Path(path)
        source = str(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            tree = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML: {e}") from e
        if not isinstance(tree, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of sections (data, model, pretrain, ...)")
    for key, value in (overrides or {}).items():
        set_dotted(tree, key, value)
        source = f"{source} + overrides" if "overrides" not in source else source
    try:
        return ProjectConfig.model_validate(tree)
    except ValidationError as e:
        raise ConfigError(format_validation_error(e, source)) from None


CONFIG_HEADER = ("gptsmith config: every key, with what it does above it. Use it with --config FILE; "
                 "a key can also be set on the command line as --section.key VALUE.")


def _comment(text: str, indent: str) -> list[str]:
    return [f"{indent}# {line}" for line in textwrap.wrap(text, 100 - len(indent) - 2)]


def _yaml_entry(key: str, value: Any, indent: str) -> list[str]:
    text = yaml.safe_dump({key: value}, sort_keys=False, allow_unicode=True, default_flow_style=False, width=10**6)
    return [indent + line for line in text.splitlines()]


def to_yaml(cfg: ProjectConfig) -> str:
    """The config as YAML with each key's description (and its default, where the value differs) as a comment
    above it: a file that documents itself and loads back (`load_config`) to the same config."""
    values = cfg.model_dump(mode="json")
    lines = _comment(CONFIG_HEADER, "")
    for section, section_field in ProjectConfig.model_fields.items():
        lines += ["", *_comment(section_field.description or "", ""), f"{section}:"]
        for key, field in section_field.annotation.model_fields.items():
            value = values[section][key]
            default = field.get_default(call_default_factory=True)
            note = "" if value == default else f" (default: {json.dumps(default, ensure_ascii=False)})"
            lines += _comment((field.description or "") + note, "  ") + _yaml_entry(key, value, "  ")
    return "\n".join(lines) + "\n"


def save_config(cfg: ProjectConfig, out_dir: str | Path) -> Path:
    from gptsmith.files import atomic_write_text

    path = Path(out_dir) / CONFIG_FILENAME
    atomic_write_text(path, to_yaml(cfg))
    return path
