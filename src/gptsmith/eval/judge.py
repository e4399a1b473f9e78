"""A judge model rates two answers to one question: which is better, "[[A]]", "[[B]]" or "[[C]]" (a tie).

How the verdict is reached depends on what the judge is:

- **text** (an OpenAI-compatible URL or an assistant file): MT-Bench's pairwise judge prompt (FastChat llm_judge
  "pair-v2"): the judge sees the question and both answers labelled Assistant A and Assistant B, writes its
  explanation and verdict (greedy); the verdict is the last "[[A]]", "[[B]]" or "[[C]]" in its text (the final
  verdict follows the explanation, which may quote the format). A text without one is *unparsed* (None): the
  caller counts it as a tie and reports how many there were.
- **reference-likelihood** (a local model folder): MT-Bench's reference-guided grading done as a likelihood, for
  judges too small to follow a judge prompt. The judge first answers the question itself (greedy, at most
  REFERENCE_MAX_TOKENS tokens): that is the reference. Each candidate answer is then scored on its own as
  log p(answer + end of turn | system: "a correct answer is: <reference>", user: question), summed over the
  answer's tokens under the judge's chat template: how readily the judge, primed with what it believes the answer
  is, would give that answer itself. The answer with the higher score wins when it leads by at least
  TIE_MARGIN_NATS (ln 2: the judge finds it at least twice as likely); closer scores are a tie ("[[C]]"), as are
  identical answers (equal scores by construction).

  Why this reading: reading MT-Bench's pairwise letter after "[[" from SmolLM2-135M-Instruct's next-token
  probabilities follows the position shown (~1 nat) and not the answers (< 0.2 nat), over four prompt variants;
  single-answer ratings after "[[" carried no signal either. Calibrated scoring (PMI against a content-free
  question, Holtzman et al. 2021, Zhao et al. 2021) measured worse than the plain sum on obvious items: it
  punishes right answers whose words are likely anyway ("Bonjour.", "Paris."). The reference-guided sum ranked
  14 of 14 obvious items right (docs/benchmarks.md, "Offline judge").

  Known biases: (1) length: a summed log-probability favours short answers (each token costs nats), so a terse
  answer can beat a fuller right one; compare's length-controlled win rate is the place to read around it.
  (2) the judge's own knowledge: a wrong reference misleads it, and it favours answers worded like its own
  (self-preference), so a model should not judge itself. (3) surface form: paraphrases of the same answer score
  differently. Position bias is absent by construction: each answer is scored alone, so both orders agree.
  Costs one short generation per question and one forward pass per distinct answer (cached across orders).
"""

from __future__ import annotations

import math
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
VERDICT_PATTERN = re.compile(r"\[\[([ABC])\]\]")
JUDGE_MAX_TOKENS = 512  # room for MT-Bench's "short explanation" before the verdict

# The likelihood reading (see the module doc)
REFERENCE_MAX_TOKENS = 48  # a short reference: the gist of the judge's answer, not an essay to pay for on CPU
REFERENCE_SYSTEM = "You are a careful judge. A correct answer to the user's question is: {reference}"
TIE_MARGIN_NATS = math.log(2)  # closer than "twice as likely" is a tie: no verdict from a near coin-flip


@dataclass
class Judgment:
    verdict: str | None  # "A" or "B" (the position shown to the judge) or "C" (tie); None = no verdict found
    text: str  # the judge's words, or for a likelihood judge its two scores and its reference answer


def judge_messages(question: str, answer_a: str, answer_b: str) -> list[dict]:
    return [{"role": "system", "content": SYSTEM_PROMPT},
            {"role": "user", "content": USER_TEMPLATE.format(question=question, answer_a=answer_a,
                                                             answer_b=answer_b)}]


def parse_verdict(text: str) -> str | None:
    """The last [[A]], [[B]] or [[C]] in the judge's text, None when there is none."""
    found = VERDICT_PATTERN.findall(text or "")
    return found[-1] if found else None


def method(target) -> str:
    """"reference-likelihood" for a local model folder, "text" for anything that only answers in words."""
    return "reference-likelihood" if target.engine is not None and target.assistant is None else "text"


def judge_pairs(target, questions: list[str], firsts: list[str], seconds: list[str],
                max_tokens: int = JUDGE_MAX_TOKENS, seed: int = 0) -> list[Judgment]:
    """One judgment per (question, first answer shown as A, second shown as B)."""
    return pair_judge(target, max_tokens, seed)(questions, firsts, seconds)


def pair_judge(target, max_tokens: int = JUDGE_MAX_TOKENS, seed: int = 0):
    """A function (questions, firsts, seconds) -> judgments for this judge. Call it for both orders: a
    likelihood judge keeps its references and scores between calls, so the second order costs nothing."""
    if method(target) == "reference-likelihood":
        return LikelihoodJudge(target).judge

    def text_judge(questions, firsts, seconds):
        conversations = [judge_messages(q, a, b) for q, a, b in zip(questions, firsts, seconds, strict=True)]
        answers = target.replies(conversations, max_tokens=max_tokens, temperature=0.0, seed=seed)
        return [Judgment(parse_verdict(a.text), a.text) for a in answers]

    return text_judge


class LikelihoodJudge:
    """Reference-guided likelihood verdicts of a local model (see the module doc)."""

    def __init__(self, target):
        self.target, self.engine = target, target.engine
        self.references: dict[str, str] = {}
        self.scores: dict[tuple[str, str], float] = {}

    def judge(self, questions: list[str], firsts: list[str], seconds: list[str]) -> list[Judgment]:
        self._references(questions)
        out = []
        for q, a, b in zip(questions, firsts, seconds, strict=True):
            score_a, score_b = self.score(q, a), self.score(q, b)
            verdict = "C" if abs(score_a - score_b) < TIE_MARGIN_NATS else ("A" if score_a > score_b else "B")
            out.append(Judgment(verdict, f"[[{verdict}]] (reference-likelihood: log p(A) = {score_a:.2f}, "
                                         f"log p(B) = {score_b:.2f} nats; a tie under {TIE_MARGIN_NATS:.2f}; "
                                         f"reference: {self.references[q]!r})"))
        return out

    def _references(self, questions: list[str]) -> None:
        """The judge's own greedy answer to each question not yet answered, generated in batches."""
        todo = list(dict.fromkeys(q for q in questions if q not in self.references))
        for q in todo:
            self._check_fits(self._user(q), REFERENCE_MAX_TOKENS, "the question")
        if todo:
            replies = self.target.replies([self._user(q) for q in todo], max_tokens=REFERENCE_MAX_TOKENS,
                                          temperature=0.0)
            self.references.update((q, r.text.strip()) for q, r in zip(todo, replies))

    @staticmethod
    def _user(question: str) -> list[dict]:
        return [{"role": "user", "content": question}]

    def messages(self, question: str) -> list[dict]:
        """The context each answer is scored in: the reference as the system prompt, then the question."""
        return [{"role": "system", "content": REFERENCE_SYSTEM.format(reference=self.references[question])},
                {"role": "user", "content": question}]

    def score(self, question: str, answer: str) -> float:
        """Summed log-probability (nats) of the answer and its end of turn, given the question and reference."""
        key = (question, answer)
        if key not in self.scores:
            self.scores[key] = self._score(self.messages(question), answer)
        return self.scores[key]

    def _check_fits(self, messages: list[dict], extra: int, what: str) -> None:
        needed = len(self.target.prompt_ids(messages)) + extra
        if needed > self.engine.max_context:
            raise InputError(f"judge {self.target.ref}: {what} and the reference take {needed} tokens but the "
                             f"model's context is {self.engine.max_context}; use a judge with a longer context, "
                             "or shorter prompts")

    def _answer_ids(self, messages: list[dict], answer: str) -> tuple[list[int], list[int]]:
        """(prompt ids, answer ids): the answer as the chat template writes an assistant turn, end of turn
        included (a complete answer should end there); a template that does not extend the prompt, or a model
        without one, gets the answer's plain tokens and the end-of-sequence token."""
        from gptsmith.tokenizer import encode_chat

        engine = self.engine
        prompt = self.target.prompt_ids(messages)
        if self.target.is_chat:
            full = encode_chat(engine.tokenizer, messages + [{"role": "assistant", "content": answer}]).input_ids
            if full[:len(prompt)] == prompt and len(full) > len(prompt):
                return prompt, full[len(prompt):]
        eos = engine.tokenizer.eos_token_id
        return prompt, engine.encode(answer) + ([eos] if eos is not None else [])

    def _score(self, messages: list[dict], answer: str) -> float:
        import torch

        engine = self.engine
        prompt, answer_ids = self._answer_ids(messages, answer)
        if len(prompt) + len(answer_ids) > engine.max_context:
            raise InputError(f"judge {self.target.ref}: an answer with the question and the reference takes "
                             f"{len(prompt) + len(answer_ids)} tokens but the model's context is "
                             f"{engine.max_context}; use a judge with a longer context, or shorter answers "
                             "(--max-tokens) and prompts")
        with torch.inference_mode():
            logits = engine.model(torch.tensor([prompt + answer_ids], device=engine.device)).logits[0]
        logprobs = torch.log_softmax(logits[len(prompt) - 1:-1].float(), dim=-1)
        targets = torch.tensor(answer_ids, device=logprobs.device)[:, None]
        return float(logprobs.gather(1, targets).sum())
