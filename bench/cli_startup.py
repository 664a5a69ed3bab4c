"""How fast the ``prunekit`` command answers, side by side with a bare interpreter (issue 16).

Times ``prunekit --help``, ``prunekit prune --help`` and ``prunekit plugins`` against ``python -c pass``
in the same run, interleaved (the machine is shared: each round runs every command once, in turn), and
prints medians in seconds and as a ratio to ``python -c pass``. A command that imports torch takes
seconds; the goal is at most 1 s for ``prunekit --help``.

    python bench/cli_startup.py --runs 9

Each command also reports whether it imported torch, transformers or torchao (``-X importtime``), so a
slow run is told apart from a heavy import.
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

HEAVY = ("torch", "transformers", "torchao")
TARGET_S = 1.0


def commands() -> dict[str, list[str]]:
    prunekit = Path(sys.executable).parent / "prunekit"
    if not prunekit.is_file():
        raise SystemExit(f"no prunekit script next to {sys.executable}: pip install -e . first")
    return {
        "python -c pass": [sys.executable, "-c", "pass"],
        "prunekit --help": [str(prunekit), "--help"],
        "prunekit prune --help": [str(prunekit), "prune", "--help"],
        "prunekit plugins": [str(prunekit), "plugins"],
    }


def run_once(argv: list[str]) -> float:
    t0 = time.perf_counter()
    subprocess.run(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True)
    return time.perf_counter() - t0


def heavy_imports(argv: list[str]) -> list[str]:
    """The heavy top-level modules a command imports (read from ``python -X importtime``)."""
    if Path(argv[0]).name == "prunekit":  # the console script is a Python file: run it under -X importtime
        argv = [sys.executable, "-X", "importtime", "-m", "prunekit_core.cli", *argv[1:]]
    else:
        argv = [argv[0], "-X", "importtime", *argv[1:]]
    proc = subprocess.run(argv, capture_output=True, text=True, check=True)
    found = {line.rsplit("|", 1)[-1].strip() for line in proc.stderr.splitlines() if "|" in line}
    return [m for m in HEAVY if m in found]


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--runs", type=int, default=9, help="interleaved rounds (default 9)")
    args = parser.parse_args()
    cmds = commands()
    env_threads = os.environ.get("OMP_NUM_THREADS", "unset")
    print(
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, OMP_NUM_THREADS={env_threads}"
    )
    print(f"python: {sys.version.split()[0]} ({sys.executable})")
    for argv in cmds.values():  # warm the file cache once; not timed
        run_once(argv)
    times: dict[str, list[float]] = {name: [] for name in cmds}
    for _ in range(args.runs):
        for name, argv in cmds.items():
            times[name].append(run_once(argv))
    base = statistics.median(times["python -c pass"])
    print(f"\nmedians of {args.runs} interleaved runs:\n")
    print(f"| command | median s | min s | max s | x python -c pass | imports {'/'.join(HEAVY)} |")
    print("|---|---:|---:|---:|---:|---|")
    for name, argv in cmds.items():
        ts = times[name]
        med = statistics.median(ts)
        heavy = ", ".join(heavy_imports(argv)) or "none"
        print(f"| `{name}` | {med:.3f} | {min(ts):.3f} | {max(ts):.3f} | {med / base:.1f}x | {heavy} |")
    help_s = statistics.median(times["prunekit --help"])
    verdict = "meets" if help_s <= TARGET_S else "MISSES"
    print(
        f"\nprunekit --help: {help_s:.3f} s median, {help_s / base:.1f}x python -c pass ({base:.3f} s); {verdict} "
        f"the {TARGET_S:g} s goal"
    )
    return 0 if help_s <= TARGET_S else 1


if __name__ == "__main__":
    sys.exit(main())
