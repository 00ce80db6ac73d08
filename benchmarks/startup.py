"""Benchmark: how long the command line takes to start, next to ``python -c "import torch"``.

The goal (issue 12): ``rankshrink --help`` and ``--version`` take at most half the time of
importing torch, because they import neither torch nor any command. Each round runs every
command once, in turn (interleaved, so machine noise hits them alike), as a fresh process;
reported are the medians over rounds and the median of the per-round ratios to
``import torch``. ``python -c pass`` shows the interpreter's own start-up.

Writes ``benchmarks/results/startup.json`` and ``startup.md``.
Usage: ``python benchmarks/startup.py [--rounds N] [--quick] [--out DIR]``.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from rankshrink._version import __version__  # noqa: E402
from rankshrink.files import atomic_write_json, atomic_write_text  # noqa: E402

COMMANDS = {
    "python -c pass": [sys.executable, "-c", "pass"],
    'python -c "import torch"': [sys.executable, "-c", "import torch"],
    "rankshrink --version": [sys.executable, "-m", "rankshrink", "--version"],
    "rankshrink --help": [sys.executable, "-m", "rankshrink", "--help"],
    "rankshrink report --help": [sys.executable, "-m", "rankshrink", "report", "--help"],
    "rankshrink compress --help": [sys.executable, "-m", "rankshrink", "compress", "--help"],
}
REFERENCE = 'python -c "import torch"'


def _commit() -> str | None:
    try:
        done = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout.strip() or None


def measure(rounds: int) -> dict[str, list[float]]:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", "")}
    times: dict[str, list[float]] = {name: [] for name in COMMANDS}
    for argv in COMMANDS.values():  # warm the file cache once
        subprocess.run(argv, env=env, capture_output=True, check=True)
    for _ in range(rounds):
        for name, argv in COMMANDS.items():
            start = time.perf_counter()
            subprocess.run(argv, env=env, capture_output=True, check=True)
            times[name].append(time.perf_counter() - start)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--quick", action="store_true", help="3 rounds")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = parser.parse_args()
    rounds = 3 if args.quick else args.rounds
    times = measure(rounds)
    reference = times[REFERENCE]
    rows = {}
    for name, values in times.items():
        ratios = [v / r for v, r in zip(values, reference)]
        rows[name] = {"median_s": statistics.median(values), "min_s": min(values),
                      "ratio_to_import_torch": statistics.median(ratios), "seconds": values}
    import torch

    result = {"env": {"rankshrink": __version__, "commit": _commit(), "torch": torch.__version__,
                      "python": platform.python_version(), "machine": platform.machine(),
                      "cpus": os.cpu_count(), "rounds": rounds}, "results": rows}
    out = Path(args.out)
    atomic_write_json(out / "startup.json", result)
    lines = ["# CLI start-up time", "",
             f"rankshrink {__version__} (commit {str(result['env']['commit'])[:10]}), torch {torch.__version__}, "
             f"Python {platform.python_version()}, {os.cpu_count()} CPUs, {rounds} interleaved rounds, each command a "
             "fresh process.", "",
             "| command | median | min | median ratio to `import torch` |", "|---|---:|---:|---:|"]
    for name, row in rows.items():
        lines.append(f"| `{name}` | {row['median_s'] * 1000:.0f} ms | {row['min_s'] * 1000:.0f} ms | "
                     f"{row['ratio_to_import_torch']:.2f} |")
    lines += ["", "Goal: `--help` and `--version` at most 0.5× `import torch` (they import neither torch nor any "
                  "command); a command's own `--help` imports what that command needs."]
    text = "\n".join(lines) + "\n"
    atomic_write_text(out / "startup.md", text)
    print(text)


if __name__ == "__main__":
    main()
