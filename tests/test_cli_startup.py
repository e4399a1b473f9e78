"""The CLI starts fast: parsing arguments and printing help import no heavy library; each command imports what it
needs inside its handler (docs/benchmarks.md, "CLI start-up")."""

import json
import subprocess
import sys

HEAVY = ["torch", "transformers", "lancedb", "sentence_transformers", "trl", "fastapi", "peft", "numpy"]

PROBE = """
import contextlib, io, json, sys
import gptsmith.cli
gptsmith.cli.build_parser()
seen = {"parser": sorted(m for m in HEAVY + ["pydantic"] if m in sys.modules)}
for argv in (["--help"], ["ask", "--help"], ["rag", "query", "--help"], ["serve", "--help"], ["config", "show"]):
    with contextlib.redirect_stdout(io.StringIO()):
        try:
            gptsmith.cli.main(argv)
        except SystemExit:
            pass
    seen[" ".join(argv)] = sorted(m for m in HEAVY + ["pydantic"] if m in sys.modules)
print(json.dumps(seen))
"""


def test_help_and_config_show_import_no_heavy_library():
    # a fresh interpreter: this test process has imported torch long ago
    out = subprocess.run([sys.executable, "-c", f"HEAVY = {HEAVY!r}\n" + PROBE], capture_output=True, text=True,
                         check=True).stdout
    seen = json.loads(out.strip().splitlines()[-1])
    # building the parser and every --help need neither the libraries nor the config schema (pydantic)
    for when in ("parser", "--help", "ask --help", "rag query --help", "serve --help"):
        assert seen[when] == [], (when, seen[when])
    assert seen["config show"] == ["pydantic"]  # the config is what `config show` prints; nothing heavier


def test_commands_over_a_backend_need_no_torch(tmp_path):
    """An OpenAI-compatible backend is used over HTTP: eval, chat and ask of an assistant over one must not pay
    for torch's import (seconds, hundreds of MB) to find out it is not reachable."""
    bot = tmp_path / "bot.yaml"
    bot.write_text("name: bot\nbackend_url: http://127.0.0.1:9/v1\n")
    for argv in (["eval", "--backend", "http://127.0.0.1:9/v1", "--suite", "chat-sanity"],
                 ["chat", "--assistant", str(bot)], ["ask", "--assistant", str(bot), "hello"]):
        code = ("import sys\nfrom gptsmith.cli import main\n"
                f"rc = main({argv!r})\n"
                "print(rc, sorted(m for m in ('torch', 'transformers') if m in sys.modules))")
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, input="")
        assert done.stdout.split("\n")[-2] == "2 []", (argv, done.stdout + done.stderr)
        assert "not reachable" in done.stderr
