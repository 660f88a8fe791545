"""Cost of drawing one global batch of row indices, as the dataset grows: the sampler against recomputing the
epoch's permutation every step (what it did before it kept the permutation per epoch).

    python bench/sampler.py --rows 1000000 10000000 --global-batch-size 512 --steps 50
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from vectorlm.data.loader import GlobalBatchSampler


def recompute_every_step(num_rows: int, batch: int, seed: int, step: int) -> np.ndarray:
    start = step * batch % (num_rows - num_rows % batch)
    return np.random.default_rng([seed, 0]).permutation(num_rows)[start : start + batch]


def ms_per_step(draw, steps: int) -> float:
    start = time.perf_counter()
    for step in range(steps):
        draw(step)
    return (time.perf_counter() - start) / steps * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, nargs="+", default=[1_000_000, 10_000_000])
    parser.add_argument("--global-batch-size", type=int, default=512)
    parser.add_argument("--steps", type=int, default=50)
    args = parser.parse_args()
    print(f"{'rows':>12} {'sampler ms/step':>16} {'(first step)':>13} {'recompute ms/step':>18}")
    for rows in args.rows:
        sampler = GlobalBatchSampler(rows, global_batch_size=args.global_batch_size, seed=0)
        first = ms_per_step(lambda _, s=sampler: s.next_batch(), 1)
        steady = ms_per_step(lambda _, s=sampler: s.next_batch(), args.steps)
        old = ms_per_step(lambda step, n=rows: recompute_every_step(n, args.global_batch_size, 0, step),
                          max(3, args.steps // 10))  # fmt: skip
        print(f"{rows:>12,} {steady:>16.4f} {first:>13.1f} {old:>18.1f}")


if __name__ == "__main__":
    main()
