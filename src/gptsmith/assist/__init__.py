"""Assistants: a model customised without training. A profile (profile.py, one YAML file) names a model or an
OpenAI-compatible server, a system prompt, retrieval over the user's documents (gptsmith.rag), few-shot examples
(fewshot.py) and chain of thought (reasoning.py); `Assistant.prepare` (prompt.py) builds the prompt under one
context budget; answer.py generates with a local model or a backend (the CLI's `ask` and `chat --assistant`)."""

from gptsmith.assist.answer import format_dropped, source_dicts
from gptsmith.assist.fewshot import Example, FewShotLibrary
from gptsmith.assist.profile import AssistantError, AssistantProfile, load_assistant
from gptsmith.assist.prompt import Assistant, AssistantPrompt, ContextError, approx_count_tokens
from gptsmith.assist.reasoning import COT_INSTRUCTION, NO_ANSWER, ReasoningFilter, split_reasoning

__all__ = ["COT_INSTRUCTION", "NO_ANSWER", "Assistant", "AssistantError", "AssistantProfile", "AssistantPrompt",
           "ContextError", "Example", "FewShotLibrary", "ReasoningFilter", "approx_count_tokens", "format_dropped",
           "load_assistant", "source_dicts", "split_reasoning"]
