"""Is a generated answer right? The four checks shared by `gptsmith eval` generation suites (eval/suites.py) and
`gptsmith grpo`'s verifiable rewards (train/rewards.py), so a suite's {"prompt", "answer"} lines can train what
they test, under exactly the same rules:

    exact     equal after stripping surrounding whitespace; case-sensitive (lm-eval's exact_match default)
    contains  any answer appears in the output (case-sensitive)
    regex     re.search of any answer pattern in the output (write (?i) in the pattern to ignore case)
    numeric   the last number in the output equals an answer within a relative tolerance of 1e-6
              ("1,234.5", "-3", "$20", "15%" are numbers; commas, $ and % are dropped)
"""

from __future__ import annotations

import math
import re

MATCHERS = ("exact", "contains", "regex", "numeric")

# A number as people write it: optional sign (also the Unicode minus), optional $, thousands commas, decimals,
# optional %.
NUMBER = re.compile(r"[-+\u2212]?\$?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?%?|[-+\u2212]?\$?\.\d+%?")
REL_TOL = 1e-6


def _to_float(s: str) -> float:
    return float(s.replace("\u2212", "-").replace("$", "").replace(",", "").replace("%", ""))


def parse_number(text: str) -> float | None:
    """The number a whole string states ("1,234.5", "-3", "$20", "15%"), or None."""
    m = NUMBER.fullmatch(text.strip())
    return _to_float(m.group()) if m else None


def last_number(text: str) -> float | None:
    found = NUMBER.findall(text)
    return _to_float(found[-1]) if found else None


def match_exact(output: str, answers: list[str]) -> bool:
    return any(output.strip() == a.strip() for a in answers)


def match_contains(output: str, answers: list[str]) -> bool:
    return any(a in output for a in answers)


def match_regex(output: str, answers: list[str]) -> bool:
    return any(re.search(a, output) for a in answers)


def match_numeric(output: str, answers: list[str]) -> bool:
    got = last_number(output)
    return got is not None and any(math.isclose(got, parse_number(a), rel_tol=REL_TOL, abs_tol=1e-12)
                                   for a in answers)


MATCH = {"exact": match_exact, "contains": match_contains, "regex": match_regex, "numeric": match_numeric}
