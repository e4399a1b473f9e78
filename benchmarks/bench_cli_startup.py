"""CLI start-up: wall time and imported modules of `gptsmith --help`, `gptsmith ask --help` and `gptsmith config
show`, for one or more source trees (a baseline checkout and this one), measured in the same run.

Each run is a fresh `python -c "from gptsmith.cli import main; main(ARGS)"` with the tree's src/ first on
PYTHONPATH (what the `gptsmith` script does); runs of the trees are interleaved `--repeats` times and the median is
shown, so a busy machine slows every tree alike. `import s` is Python's own -X importtime total for
`gptsmith.cli` (the module and what it imports) in one more run per tree.

    python benchmarks/bench_cli_startup.py --src /path/to/baseline/src --src src
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time

COMMANDS = (["--help"], ["ask", "--help"], ["config", "show"])
HEAVY = ("torch", "transformers", "lancedb", "sentence_transformers", "trl", "fastapi", "pydantic", "numpy")
PROBE = """
import sys, io, contextlib
from gptsmith.cli import main
with contextlib.redirect_stdout(io.StringIO()):
    try:
        main({args!r})
    except SystemExit:
        pass
print("MODULES", len(sys.modules), [m for m in {heavy!r} if m in sys.modules])
"""


def run(src: str, args: list[str]) -> tuple[float, str]:
    env = {**os.environ, "PYTHONPATH": os.path.abspath(src), "HF_HUB_OFFLINE": "1"}
    t0 = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", PROBE.format(args=args, heavy=HEAVY)], env=env, check=True,
                         capture_output=True, text=True).stdout
    return time.perf_counter() - t0, out.strip().splitlines()[-1]


def import_seconds(src: str) -> float:
    env = {**os.environ, "PYTHONPATH": os.path.abspath(src)}
    err = subprocess.run([sys.executable, "-X", "importtime", "-c", "import gptsmith.cli"], env=env, check=True,
                         capture_output=True, text=True).stderr
    line = next(x for x in err.splitlines() if re.search(r"\|\s*gptsmith\.cli$", x))
    return int(line.split("|")[1]) / 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--src", action="append", required=True, help="a source tree's src/ (repeat: baseline first)")
    ap.add_argument("--repeats", type=int, default=7)
    a = ap.parse_args()
    times: dict = {(s, i): [] for s in a.src for i in range(len(COMMANDS))}
    seen: dict = {}
    for _ in range(a.repeats):
        for i, cmd in enumerate(COMMANDS):
            for s in a.src:
                dt, modules = run(s, cmd)
                times[s, i].append(dt)
                seen[s, i] = modules
    rows = []
    for s in a.src:
        imp = statistics.median(import_seconds(s) for _ in range(3))
        for i, cmd in enumerate(COMMANDS):
            rows.append({"src": s, "command": "gptsmith " + " ".join(cmd),
                         "median_s": round(statistics.median(times[s, i]), 3), "import_gptsmith_cli_s": round(imp, 3),
                         "modules": seen[s, i]})
    for r in rows:
        print(json.dumps(r))


if __name__ == "__main__":
    main()
