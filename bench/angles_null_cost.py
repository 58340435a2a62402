"""What the data-informed null costs: ``angles`` on a sample run, weights only (the default)
and with ``--probe``, in the same process. Prints each phase and the ratio to weights only.

    PYTHONPATH=$PWD python bench/angles_null_cost.py [--run sample_checkpoints/spurious]
        [--probe sample_checkpoints/probes/task1_spurious.jsonl] [--items 1500]
"""

import argparse
import time

from forgetdiag import compute_angles
from forgetdiag.probes import Probe, load_probe

parser = argparse.ArgumentParser()
parser.add_argument("--run", default="sample_checkpoints/spurious")
parser.add_argument("--probe", default="sample_checkpoints/probes/task1_spurious.jsonl")
parser.add_argument("--items", type=int, default=None, help="use only the first N probe items")
args = parser.parse_args()
probe = load_probe(args.probe)
if args.items is not None:
    probe = Probe(probe.name, probe.items[: args.items])

start = time.perf_counter()
plain = compute_angles(args.run)
weights_only = time.perf_counter() - start
start = time.perf_counter()
informed = compute_angles(args.run, probe=probe)
with_probe = time.perf_counter() - start
starts = len({p.b.i for p in informed.pairs})
print(f"{args.run}: {len(plain.checkpoints)} checkpoints, {len(plain.pairs)} pairs, {len(probe)} probe items")
print(f"weights only: {weights_only:.1f} s (angles phase {plain.timings['angles']:.1f} s)")
print(
    f"with --probe: {with_probe:.1f} s = angles {informed.timings['angles']:.1f} s + activation passes "
    f"({starts} checkpoints) {informed.timings['activations']:.1f} s + Monte Carlo null "
    f"{informed.timings['data_null']:.1f} s"
)
print(f"ratio with --probe / weights only: {with_probe / weights_only:.1f}x")
