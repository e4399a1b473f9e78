"""Rewards for `gptsmith grpo`, in TRL's reward-function shape: `f(prompts, completions, **columns) -> list[float]`,
one float per completion; TRL passes every other column of the prompts file (here "answer") as a keyword list.

Verifiable rewards a user picks without code (`--reward KIND`), each 1.0 when the completion passes, else 0.0,
against the row's "answer" (a string, a number, or a list of them: any one may match):
    exact     the completion equals an answer after stripping surrounding whitespace (case-sensitive)
    contains  an answer appears in the completion (case-sensitive)
    regex     re.search of the answer pattern in the completion (write (?i) in the pattern to ignore case)
    numeric   the last number in the completion equals the answer within a relative tolerance of 1e-6
              ("1,234.5", "-3", "$20", "15%" are numbers; commas, $ and % are dropped)
These are the generation matchers of `gptsmith eval` suites (gptsmith/matching.py, the one copy of the rules), so a
suite's {"prompt", "answer"} lines can train what they test.

Also: a Python function from a file (`--reward-fn path/to/file.py:function_name`, called exactly as TRL calls it),
and a reward model from `gptsmith reward` (`--reward-model DIR`, train/reward.py's scorer).
"""

from __future__ import annotations

import importlib.util
import inspect
import re
import sys
from pathlib import Path

from gptsmith.errors import InputError
from gptsmith.matching import MATCH, MATCHERS, last_number, parse_number  # noqa: F401 (the rules: matching.py)


def answer_list(answer) -> list[str]:
    """A row's "answer" as the list of acceptable answers: a string, a number, or a list of them."""
    from numpy import format_float_positional

    values = answer if isinstance(answer, list) else [answer]
    # floats written out in full (1e-07 -> "0.0000001"): the number rules read no exponents
    return [v if isinstance(v, str) else format_float_positional(v, trim="-") if isinstance(v, float) else str(v)
            for v in values]


def check_answer(kind: str, answer, where: str) -> str | None:
    """Why `answer` cannot be checked by the `kind` matcher (a sentence naming the fix), or None when it can."""
    values = answer if isinstance(answer, list) else [answer]
    if answer is None or not values or not all(
            (isinstance(v, str) and v) or (isinstance(v, (int, float)) and not isinstance(v, bool)) for v in values):
        return (f'{where}: --reward {kind} needs an "answer" on every line (a non-empty string, a number, or a list '
                f'of them), got {answer!r}; add one, or give the answers with --answers FILE')
    for a in answer_list(answer):
        if kind == "regex":
            try:
                re.compile(a)
            except re.error as e:
                return (f'{where}: "answer" {a!r} is not a valid regular expression ({e}), which --reward regex '
                        "needs; fix the pattern (Python re syntax)")
        if kind == "numeric" and parse_number(a) is None:
            return (f'{where}: "answer" {a!r} is not a number, which --reward numeric needs (e.g. "42", "-3.5", '
                    '"1,000")')
    return None


def completion_text(completion) -> str:
    """The text of one completion as TRL hands it over: a string, or (chat prompts) a list of assistant messages."""
    if isinstance(completion, str):
        return completion
    return "".join(m["content"] for m in completion if isinstance(m.get("content"), str))


def matcher_reward(kind: str):
    """The TRL reward function for `--reward kind`, named after it (TRL logs rewards/<name>/mean and /std)."""
    if kind not in MATCH:
        raise InputError(f"--reward {kind!r} is not one of {', '.join(MATCHERS)}")
    match = MATCH[kind]

    def reward(prompts, completions, answer, **kwargs) -> list[float]:
        return [float(match(completion_text(c), answer_list(a))) for c, a in zip(completions, answer)]

    reward.__name__ = kind
    return reward


def load_reward_fn(spec: str):
    """The function named by `path/to/file.py:function_name`, checked to take TRL's arguments (prompts,
    completions, **kwargs: TRL also passes completion_ids, trainer_state and every extra column of the data)."""
    path, sep, name = str(spec).rpartition(":")
    if not sep or not path or not name.isidentifier():
        raise InputError(f"--reward-fn {spec!r}: write it as path/to/file.py:function_name")
    file = Path(path)
    if not file.is_file():
        raise InputError(f"--reward-fn {spec!r}: no such file {file}")
    module_name = f"gptsmith_reward_{abs(hash(str(file.resolve())))}"
    module_spec = importlib.util.spec_from_file_location(module_name, file)
    if module_spec is None:
        raise InputError(f"--reward-fn {spec!r}: {file} is not a Python file (give a .py file)")
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[module_name] = module  # so the function pickles (TRL and dataloader workers may need it)
    try:
        module_spec.loader.exec_module(module)
    except Exception as e:  # the user's code: any error it raises is theirs to fix, shown as such
        del sys.modules[module_name]
        raise InputError(f"--reward-fn {spec!r}: importing {file} failed: {type(e).__name__}: {e}") from None
    fn = getattr(module, name, None)
    if fn is None:
        defined = sorted(k for k, v in vars(module).items() if inspect.isfunction(v) and v.__module__ == module_name)
        raise InputError(f"--reward-fn {spec!r}: {file} has no function {name!r}"
                         + (f" (it defines: {', '.join(defined)})" if defined else ""))
    if not callable(fn):
        raise InputError(f"--reward-fn {spec!r}: {name} in {file} is a {type(fn).__name__}, not a function")
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return fn
    if not any(p.kind is p.VAR_KEYWORD for p in params):
        raise InputError(f"--reward-fn {spec!r}: {name} must accept **kwargs: TRL calls it as {name}(prompts=..., "
                         "completions=..., completion_ids=..., trainer_state=..., <each extra column>=...); "
                         f"write def {name}(prompts, completions, **kwargs) -> list[float]")
    return fn


class RewardModelReward:
    """A reward model from `gptsmith reward` as a TRL reward function: each prompt + completion conversation goes
    through the reward model's chat template exactly as it was trained (reward.score's encoding), and its scalar
    output is the reward. Runs on the policy's device."""

    def __init__(self, reward_dir: str, device: str = "cpu", batch_size: int = 16):
        from gptsmith.train.reward import load_reward_model

        self.reward_dir = str(reward_dir)
        self.model, self.tokenizer = load_reward_model(reward_dir, device)
        self.batch_size = batch_size
        self.__name__ = "reward_model"

    def __call__(self, prompts, completions, **kwargs) -> list[float]:
        from gptsmith.train.reward import score_loaded

        conversations = [_as_messages(p, "user") + _as_messages(c, "assistant") for p, c in zip(prompts, completions)]
        return score_loaded(self.model, self.tokenizer, conversations, self.batch_size)


def _as_messages(x, role: str) -> list[dict]:
    return [{"role": role, "content": x}] if isinstance(x, str) else list(x)
