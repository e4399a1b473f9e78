"""compare.html: one self-contained page (inline CSS, no scripts, no external URLs) with the summary of a
comparison and every prompt's two answers side by side with both verdicts. Jinja2 autoescapes everything, so an
answer holding markup shows as text. The page itself is templates/compare.html.j2."""

from __future__ import annotations

from jinja2 import Environment, PackageLoader


def _pct(value) -> str:
    return "n/a" if value is None or value != value else f"{100 * value:.1f}%"


def render_html(result: dict) -> str:
    env = Environment(loader=PackageLoader("gptsmith.eval", "templates"), autoescape=True)
    names = {"a": f"A wins ({result['a']['name']})", "b": f"B wins ({result['b']['name']})", "tie": "tie"}
    template = env.get_template("compare.html.j2")
    return template.render(**result, pct=_pct, result_word=lambda r: names.get(r, r))
