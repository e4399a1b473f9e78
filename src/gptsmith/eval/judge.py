"""A judge model rates two answers to one question: which is better, "[[A]]", "[[B]]" or "[[C]]" (a tie).

The prompt is MT-Bench's pairwise judge prompt (FastChat llm_judge "pair-v2"): the judge sees the question and two
answers labelled Assistant A and Assistant B, and is told to end with its verdict in double brackets. How the
verdict is read depends on what the judge is:

- **text** (an OpenAI-compatible URL or an assistant file): the judge writes its explanation and verdict
  (greedy); the verdict is the last "[[A]]", "[[B]]" or "[[C]]" in its text (the final verdict follows the
  explanation, which may quote the format). A text without one is *unparsed* (None): the caller counts it as a
  tie and reports how many there were.
- **log-prob** (a local model folder): no generation. The judge's answer is started with "[[" and the verdict is
  the letter the model finds most likely next: P(A), P(B), P(C) are each the summed next-token probability of
  every token that spells a start of "A]]" ("A", "A]", "A]]", ...), so the reading does not depend on how the
  tokenizer splits the brackets. Always yields a verdict, costs one forward pass per rating, and suits small
  local judges that would not follow the format when generating.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from gptsmith.errors import InputError

# FastChat llm_judge/data/judge_prompts.jsonl, "pair-v2" (single-turn pairwise comparison)
SYSTEM_PROMPT = (
    "Please act as an impartial judge and evaluate the quality of the responses provided by two AI assistants to "
    "the user question displayed below. You should choose the assistant that follows the user's instructions and "
    "answers the user's question better. Your evaluation should consider factors such as the helpfulness, "
    "relevance, accuracy, depth, creativity, and level of detail of their responses. Begin your evaluation by "
    "comparing the two responses and provide a short explanation. Avoid any position biases and ensure that the "
    "order in which the responses were presented does not influence your decision. Do not allow the length of the "
    "responses to influence your evaluation. Do not favor certain names of the assistants. Be as objective as "
    "possible. After providing your explanation, output your final verdict by strictly following this format: "
    "\"[[A]]\" if assistant A is better, \"[[B]]\" if assistant B is better, and \"[[C]]\" for a tie."
)
USER_TEMPLATE = (
    "[User Question]\n{question}\n\n"
    "[The Start of Assistant A's Answer]\n{answer_a}\n[The End of Assistant A's Answer]\n\n"
    "[The Start of Assistant B's Answer]\n{answer_b}\n[The End of Assistant B's Answer]"
)
LETTERS = ("A", "B", "C")
VERDICT_PATTERN = re.compile(r"\[\[([ABC])\]\]")
JUDGE_MAX_TOKENS = 512  # room for MT-Bench's "short explanation" before the verdict


@dataclass
class Judgment:
    verdict: str | None  # "A" or "B" (the position shown to the judge) or "C" (tie); None = no verdict found
    text: str  # the judge's words, or for a log-prob judge the three probabilities


def judge_messages(question: str, answer_a: str, answer_b: str) -> list[dict]:
    return [{"role": "system", "content": SYSTEM_PROMPT},
            {"role": "user", "content": USER_TEMPLATE.format(question=question, answer_a=answer_a,
                                                             answer_b=answer_b)}]


def parse_verdict(text: str) -> str | None:
    """The last [[A]], [[B]] or [[C]] in the judge's text, None when there is none."""
    found = VERDICT_PATTERN.findall(text or "")
    return found[-1] if found else None


def method(target) -> str:
    """"log-prob" for a local model folder, "text" for anything that only answers in words."""
    return "log-prob" if target.engine is not None and target.assistant is None else "text"


def judge_pairs(target, questions: list[str], firsts: list[str], seconds: list[str],
                max_tokens: int = JUDGE_MAX_TOKENS, seed: int = 0) -> list[Judgment]:
    """One judgment per (question, first answer shown as A, second shown as B)."""
    conversations = [judge_messages(q, a, b) for q, a, b in zip(questions, firsts, seconds, strict=True)]
    if method(target) == "log-prob":
        return LogProbJudge(target).rate(conversations)
    answers = target.replies(conversations, max_tokens=max_tokens, temperature=0.0, seed=seed)
    return [Judgment(parse_verdict(a.text), a.text) for a in answers]


class LogProbJudge:
    """Reads the verdict of a local model from its next-token probabilities after "[[" (see the module doc)."""

    def __init__(self, target):
        self.target, self.engine = target, target.engine
        self.letter_tokens = self._letter_tokens()

    def _letter_tokens(self) -> dict[str, list[int]]:
        tokenizer = self.engine.tokenizer
        vocab = len(tokenizer)
        pieces = tokenizer.batch_decode([[i] for i in range(vocab)])
        out = {}
        for letter in LETTERS:
            close = f"{letter}]]"
            out[letter] = [i for i, p in enumerate(pieces) if p and (close.startswith(p) or p.startswith(close))]
            if not out[letter]:
                raise InputError(f"judge {self.target.ref}: its tokenizer cannot spell {letter!r}; use another judge")
        return out

    def rate(self, conversations: list[list[dict]]) -> list[Judgment]:
        return [self._rate_one(messages) for messages in conversations]

    def _rate_one(self, messages: list[dict]) -> Judgment:
        import torch

        engine = self.engine
        ids = self.target.prompt_ids(messages) + engine.encode("[[")
        if len(ids) > engine.max_context:
            raise InputError(f"judge {self.target.ref}: the judge prompt is {len(ids)} tokens but the model's context "
                             f"is {engine.max_context}; use a judge with a longer context, or shorter answers "
                             "(--max-tokens) and prompts")
        with torch.inference_mode():
            logits = engine.model(torch.tensor([ids], device=engine.device)).logits[0, -1].float()
        logprobs = torch.log_softmax(logits, dim=-1)
        scores = torch.stack([torch.logsumexp(logprobs[self.letter_tokens[k]], dim=0) for k in LETTERS])
        probs = torch.softmax(scores, dim=0).tolist()  # renormalised over the three verdicts
        best = LETTERS[max(range(3), key=lambda i: probs[i])]
        detail = " ".join(f"P({k})={p:.3f}" for k, p in zip(LETTERS, probs))
        return Judgment(best, f"[[{best}]] (log-prob verdict: {detail})")
