"""How the recover verdict moves with the recovery budget, on the shipped samples.

For each run (the spurious and the real sample, each with its control and recovery probe) and
each budget in a small grid of learning rates and epochs, one ``recover`` of the run's named
after-checkpoint: the accuracy recovered, the before-model recovered the same way, the control's
gain, the spurious fraction with its 95% interval and the verdict. The default budget for a model
of this size (1.1M parameters: lr 1e-4, one epoch) is marked. What it shows is in docs/recover.md.

Usage::

    python bench/recovery_budget.py [--lrs 3e-5,1e-4,3e-4] [--epochs 1,3] [--runs spurious,real]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from forgetdiag import RecoverySettings, load_probe, load_run, recover

SAMPLES = Path(__file__).resolve().parents[1] / "sample_checkpoints"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lrs", default="3e-5,1e-4,3e-4")
    parser.add_argument("--epochs", default="1,3")
    parser.add_argument("--runs", default="spurious,real")
    args = parser.parse_args()
    print(
        "| run | lr | epochs | steps | after | recovered | before recovered | control gain | "
        "spurious fraction [95%] | verdict | seconds |"
    )
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- | ---: |")
    for run in args.runs.split(","):
        spec = load_run(SAMPLES / run)
        old, rec = load_probe(spec.probes["old"]), load_probe(spec.probes["recovery"])
        for lr in (float(x) for x in args.lrs.split(",")):
            for epochs in (int(x) for x in args.epochs.split(",")):
                start = time.perf_counter()
                r = recover(
                    spec.before,
                    spec.after,
                    old,
                    control=spec.control,
                    recovery_probe=rec,
                    settings=RecoverySettings(lr=lr, epochs=epochs),
                )
                d, acc = r.decision, r.accuracy()
                low, high = d.intervals.get("spurious_fraction", (float("nan"),) * 2)
                fraction = "–" if d.spurious_fraction is None else f"{d.spurious_fraction:.2f} [{low:.2f}, {high:.2f}]"
                verdict = " or ".join(d.possible_verdicts) if not d.decisive else d.verdict
                mark = " (default)" if lr == 1e-4 and epochs == 1 else ""
                print(
                    f"| {run} | {lr:g}{mark} | {epochs} | {r.steps} | {acc['after']:.3f} | {acc['recovered']:.3f} | "
                    f"{acc['before_recovered']:.3f} | {d.control_gain:+.3f} | {fraction} | {verdict} | "
                    f"{time.perf_counter() - start:.0f} |",
                    flush=True,
                )


if __name__ == "__main__":
    main()
