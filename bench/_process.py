"""What the benchmarks share: a command timed in a fresh process under ``/usr/bin/time -v``."""

from __future__ import annotations

import re
import subprocess
import sys
import time


def timed(cmd: list[str]) -> tuple[str, dict]:
    """Run ``cmd`` under /usr/bin/time -v: (its stdout, {wall_s, cpu_s, max_rss_gb}); exit on failure."""
    start = time.perf_counter()
    proc = subprocess.run(["/usr/bin/time", "-v", *cmd], capture_output=True, text=True)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        sys.exit(f"failed: {' '.join(cmd)}\n{proc.stderr[-3000:]}")
    rss_kb = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", proc.stderr).group(1))
    cpu = sum(float(re.search(rf"{k} time \(seconds\): ([\d.]+)", proc.stderr).group(1)) for k in ("User", "System"))
    return proc.stdout, {"wall_s": wall, "cpu_s": cpu, "max_rss_gb": rss_kb / 2**20}
