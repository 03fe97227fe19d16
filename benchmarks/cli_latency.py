"""How long the command line takes to answer or refuse (issue 22), each command a fresh process as
a user runs it, wall time from start to exit.

- `inspect default`, `plan default`: cold (no stored answer: ANYQUANT_NO_ANSWER_CACHE=1, so the
  config, the safetensors headers and a meta-device skeleton are read, with torch and
  transformers imported) and warm (the same question again: the stored answer, anyquant/answers.py);
- refusals of a misspelt `--method` and `--dtype`, checked before anything heavy is imported.

The default model must be converted already (`make demo` or any command on `default` does it).

  python benchmarks/cli_latency.py [--repeats 3] [--out benchmarks/results/cli_latency.json]

Prints a table and writes JSON (median and every run, machine load before the runs, versions).
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata as md
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ANYQUANT = [sys.executable, "-m", "anyquant.cli"]

CASES = [
    # name, arguments, cold (no stored answer), expected exit status
    ("inspect default, cold", ["inspect", "default"], True, 0),
    ("inspect default, warm", ["inspect", "default"], False, 0),
    ("plan default, cold", ["plan", "default"], True, 0),
    ("plan default, warm", ["plan", "default"], False, 0),
    ("quantize --method nf5 (refused)", ["quantize", "default", "--method", "nf5", "--out", "/tmp/x"], False, 2),
    ("quantize --dtype bf16 (refused)", ["quantize", "default", "--dtype", "bf16", "--out", "/tmp/x"], False, 2),
]


def one(args: list[str], cold: bool, expect: int) -> float:
    env = dict(os.environ)
    if cold:
        env["ANYQUANT_NO_ANSWER_CACHE"] = "1"
    t = time.perf_counter()
    r = subprocess.run(ANYQUANT + args, env=env, capture_output=True, text=True, timeout=600)
    wall = time.perf_counter() - t
    if r.returncode != expect:
        raise SystemExit(f"anyquant {' '.join(args)}: exit {r.returncode}, expected {expect}:\n{r.stderr[-2000:]}")
    return wall


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", type=Path, default=HERE / "results" / "cli_latency.json")
    a = ap.parse_args()
    # one warm-up of each question, so that "warm" rows find their stored answer
    for _, args, _, expect in CASES:
        one(args, False, expect)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    rows = []
    for name, args, cold, expect in CASES:
        runs = [round(one(args, cold, expect), 3) for _ in range(a.repeats)]
        rows.append({"command": "anyquant " + " ".join(args), "case": name, "median_s": statistics.median(runs),
                     "runs_s": runs})
    result = {
        "benchmark": "cli_latency",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.python_version()}",
        "load_average_1min_before": load,
        "versions": {p: md.version(p) for p in ("anyquant", "torch", "transformers")},
        "definitions": {"cold": "ANYQUANT_NO_ANSWER_CACHE=1: the question is answered from the files",
                        "warm": "the same question asked before: its stored answer (anyquant/answers.py)",
                        "median_s": "wall time of the process, start to exit, median of the runs"},
        "rows": rows,
    }
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(result, indent=2) + "\n")
    print("| command | median s | runs (s) |\n|---|---|---|")
    for r in rows:
        print(f"| {r['case']} | {r['median_s']:.2f} | {', '.join(f'{x:.2f}' for x in r['runs_s'])} |")
    print(f"load average before: {load}; wrote {a.out}")


if __name__ == "__main__":
    main()
