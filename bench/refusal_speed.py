"""What does a refused command cost? ``forgetdiag recover ... --json <checkpoint>/x.json`` must be
refused (exit 2, one line) before any model code is imported, in well under a second.

Times, in fresh processes, alternating round by round:

* the refused command (its output inside the checkpoint it reads);
* the baseline: ``python -c "import torch"``, what the refusal cost when the CLI imported torch
  at start;
* the interpreter alone (``python -c pass``).

Prints the medians and the ratio refusal / torch import (target: the refusal under 1 s and
below the torch import alone).

Usage::

    python bench/refusal_speed.py [--rounds 7]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RUN = "sample_checkpoints/spurious"
REFUSED = [
    sys.executable,
    "-m",
    "forgetdiag",
    "recover",
    f"{RUN}/checkpoint-0",
    f"{RUN}/checkpoint-50",
    "--probe",
    "sample_checkpoints/probes/task0_heldout.jsonl",
    "--json",
    f"{RUN}/checkpoint-0/x.json",
]
COMMANDS = {
    "refused recover": (REFUSED, 2),
    "import torch": ([sys.executable, "-c", "import torch"], 0),
    "python alone": ([sys.executable, "-c", "pass"], 0),
}


def wall(argv: list[str], expected: int) -> float:
    start = time.perf_counter()
    proc = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if proc.returncode != expected:
        sys.exit(f"{argv}: exit {proc.returncode}, expected {expected}: {proc.stderr.strip()}")
    if expected == 2 and proc.stderr.count("\n") != 1:
        sys.exit(f"the refusal printed more than one line: {proc.stderr!r}")
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()
    times: dict[str, list[float]] = {name: [] for name in COMMANDS}
    for _ in range(args.rounds):
        for name, (argv, expected) in COMMANDS.items():
            times[name].append(wall(argv, expected))
    medians = {name: statistics.median(values) for name, values in times.items()}
    for name, values in times.items():
        print(f"{name:>16}: median {medians[name]:.2f} s over {args.rounds} runs ({min(values):.2f}-{max(values):.2f})")
    ratio = medians["refused recover"] / medians["import torch"]
    met = medians["refused recover"] < 1.0 and ratio < 1.0
    print(
        f"refusal / torch import: {ratio:.2f} (target: refusal under 1 s and below the torch import): {'met' if met else 'NOT met'}"
    )


if __name__ == "__main__":
    main()
