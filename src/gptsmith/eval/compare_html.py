"""compare.html: one self-contained page (inline CSS, no scripts, no external URLs) with the summary of a
comparison and every prompt's two answers side by side with both verdicts. Jinja2 autoescapes everything, so an
answer holding markup shows as text."""

from __future__ import annotations

from jinja2 import Environment

TEMPLATE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{{ a.name }} vs {{ b.name }}: gptsmith compare</title>
<style>
body { font: 15px/1.45 system-ui, sans-serif; margin: 2rem auto; max-width: 1200px; padding: 0 1rem; color: #222; }
h1 { font-size: 1.4rem; } h2 { font-size: 1.1rem; margin: 0 0 .4rem; }
table.summary { border-collapse: collapse; margin: 1rem 0; }
table.summary th, table.summary td { border: 1px solid #ccc; padding: .3rem .7rem; text-align: left; }
.meta { color: #555; font-size: .9rem; }
.item { border: 1px solid #ddd; border-radius: 6px; padding: 1rem; margin: 1.2rem 0; }
.prompt, .answer, .judgment { white-space: pre-wrap; word-wrap: break-word; }
.prompt { background: #f6f6f6; padding: .6rem; border-radius: 4px; }
.pair { display: grid; grid-template-columns: 1fr 1fr; gap: 1rem; margin: .8rem 0; }
.answer { border: 1px solid #e3e3e3; padding: .6rem; border-radius: 4px; }
.winner { border-color: #2a8a3e; background: #f0faf2; }
.result { font-weight: 600; }
details { margin-top: .5rem; } summary { cursor: pointer; color: #555; }
</style></head>
<body>
<h1>{{ a.name }} (A) vs {{ b.name }} (B)</h1>
<p class="meta">A: {{ a.kind }} {{ a.ref }}<br>B: {{ b.kind }} {{ b.ref }}<br>
judge: {{ judge.kind }} {{ judge.ref }} ({{ judge_method }} verdicts), each pair judged twice with the answers'
positions swapped; a verdict that changes with the order counts as a tie.<br>
prompts: {{ prompts.source }} ({{ prompts.version }}), {{ n }} judged, created {{ created }}</p>
<table class="summary">
<tr><th>wins A</th><th>ties</th><th>wins B</th><th>win rate A (95% CI)</th>
<th>length-controlled win rate A (95% CI)</th><th>unparsed verdicts</th></tr>
<tr><td>{{ wins_a }}</td><td>{{ ties }}</td><td>{{ wins_b }}</td>
<td>{{ pct(win_rate_a) }} ({{ pct(ci[0]) }} to {{ pct(ci[1]) }})</td>
{% set lc = length_controlled %}
<td>{{ pct(lc.win_rate_a) }} ({{ pct(lc.ci[0]) }} to {{ pct(lc.ci[1]) }})</td>
<td>{{ unparsed }} of {{ 2 * n }}</td></tr>
</table>
<p class="meta">Win rate = (wins + ties / 2) / n. Length control: {{ length_controlled.method }}.</p>
{% for item in items %}
<section class="item" id="item-{{ loop.index }}">
<h2>{{ loop.index }}. prompt {{ item.id }}: <span class="result">{{ result_word(item.result) }}</span></h2>
<div class="prompt">{{ item.prompt }}</div>
<div class="pair">
<div><strong>A: {{ a.name }}</strong>
<div class="answer{{ ' winner' if item.result == 'a' else '' }}">{{ item.answer_a }}</div></div>
<div><strong>B: {{ b.name }}</strong>
<div class="answer{{ ' winner' if item.result == 'b' else '' }}">{{ item.answer_b }}</div></div>
</div>
<div>A's answer shown first: {{ result_word(item.verdict_ab) }} · B's answer shown first:
{{ result_word(item.verdict_ba) }} · result: <span class="result">{{ result_word(item.result) }}</span></div>
<details><summary>the judge's words</summary>
<p><em>A's answer shown first</em></p><div class="judgment">{{ item.judgment_ab }}</div>
<p><em>B's answer shown first</em></p><div class="judgment">{{ item.judgment_ba }}</div>
</details>
</section>
{% endfor %}
</body></html>
"""


def _pct(value) -> str:
    return "n/a" if value is None or value != value else f"{100 * value:.1f}%"


def render_html(result: dict) -> str:
    env = Environment(autoescape=True)
    names = {"a": f"A wins ({result['a']['name']})", "b": f"B wins ({result['b']['name']})", "tie": "tie"}
    template = env.from_string(TEMPLATE)
    return template.render(**result, pct=_pct, result_word=lambda r: names.get(r, r))
