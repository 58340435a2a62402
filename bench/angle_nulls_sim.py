"""The simulation behind the data-informed null of ``angles`` (docs/angles.md, "Which null").

Two unrelated updates X^T G1, X^T G2 of a layer with hidden size d: X's second moment has
eigenvalues i^-alpha, G independent Gaussian with n columns; each update keeps its top 32
directions. Prints the mean per-direction angle for alpha = 1 and 1.5 (forgetdiag.nulls'
Monte Carlo) against the isotropic null of the same ranks.

    PYTHONPATH=$PWD python bench/angle_nulls_sim.py [--d 128] [--rank 32] [--n 256 384 512]
"""

import argparse

import numpy as np

from forgetdiag.nulls import baseline_direction_angle, data_null

parser = argparse.ArgumentParser()
parser.add_argument("--d", type=int, default=128)
parser.add_argument("--rank", type=int, default=32)
parser.add_argument("--n", type=int, nargs="+", default=[256, 384, 512])
parser.add_argument("--samples", type=int, default=16)
args = parser.parse_args()
i = np.arange(1, args.d + 1, dtype=float)
print(f"isotropic null (rank {args.rank} in d={args.d}): {baseline_direction_angle(args.rank, args.d):.1f} deg")
for n in args.n:
    row = [
        f"{data_null(i**-alpha, n, args.rank, args.rank, samples=args.samples).mean_deg:.1f}" for alpha in (1.0, 1.5)
    ]
    print(f"n = {n}: i^-1 {row[0]} deg, i^-1.5 {row[1]} deg")
