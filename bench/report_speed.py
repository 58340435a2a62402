"""How long ``forgetdiag report`` takes on a shipped sample, against the same analyses in sequence.

In one run, on ``sample_checkpoints/spurious`` (or ``--run``):

(a) the README's main command, ``forgetdiag report RUN``, in a fresh process under
    ``/usr/bin/time -v``: wall time, CPU time, peak resident memory, the verdict, and each
    analysis's own time from the report's JSON (``timings_s``);
(b) the baseline: the same report through the Python API with ``overlap=False`` (recover, then
    angles, landscape and features, one after the other), also in a fresh process.

It prints both wall times, their ratio, and the target: a report on a shipped sample in under
two minutes on a 2-core CPU. Both runs give the same numbers (tests/test_report.py checks it).

Usage::

    python bench/report_speed.py [--run sample_checkpoints/spurious] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

from _process import timed

TARGET_S = 120.0
SEQUENTIAL = """
import json, sys, time
from forgetdiag import load_run
from forgetdiag.analyses.report import ReportSettings, build_report
start = time.perf_counter()
result = build_report(load_run(sys.argv[1]), settings=ReportSettings(overlap=False))
print(json.dumps({"wall_s": time.perf_counter() - start, "timings_s": result.timings,
                  "verdict": result.verdict}))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--run", type=Path, default=Path(__file__).resolve().parents[1] / "sample_checkpoints" / "spurious"
    )
    parser.add_argument("--workdir", type=Path, default=None, help="where the report is written (default: a temp dir)")
    args = parser.parse_args()
    work = args.workdir or Path(tempfile.mkdtemp(prefix="report_speed."))
    work.mkdir(parents=True, exist_ok=True)

    page, data = work / "report.html", work / "report.json"
    _, ours = timed(
        [
            sys.executable,
            "-m",
            "forgetdiag",
            "report",
            str(args.run),
            "--out",
            str(page),
            "--json",
            str(data),
            "--quiet",
        ]
    )
    report = json.loads(data.read_text())
    out, base = timed([sys.executable, "-c", SEQUENTIAL, str(args.run)])
    sequential = json.loads(out.strip().splitlines()[-1])

    timings = dict(report["timings_s"])
    in_process = timings.pop("total")  # the report's own wall time; the rest are its analyses
    split = ", ".join(f"{k} {v:.1f} s" for k, v in timings.items())
    print(f"run: {args.run}")
    print(
        f"(a) forgetdiag report: {ours['wall_s']:.1f} s wall ({ours['cpu_s']:.0f} s CPU), peak RSS "
        f"{ours['max_rss_gb']:.2f} GB; verdict {report['verdict']}"
    )
    print(f"    analyses: {split} (sum {sum(timings.values()):.1f} s; in-process wall {in_process:.1f} s)")
    print(
        f"(b) the same analyses one after the other (API, overlap=False): {base['wall_s']:.1f} s wall "
        f"({base['cpu_s']:.0f} s CPU); verdict {sequential['verdict']}"
    )
    print(f"report / sequential: {ours['wall_s'] / base['wall_s']:.2f}x wall time")
    met = "met" if ours["wall_s"] < TARGET_S else "NOT met"
    print(f"target: a report on a shipped sample in under {TARGET_S:.0f} s: {ours['wall_s']:.1f} s ({met})")
    print(f"report written to {page}")


if __name__ == "__main__":
    main()
