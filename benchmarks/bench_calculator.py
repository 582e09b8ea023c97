"""almd.Calculator vs sevenn's own SevenNetCalculator, MD-like repeated calls.

Baseline: ``sevenn.calculator.SevenNetCalculator('7net-0')`` on the same
structures in the same run. Each call follows a small random displacement
(0.01 Å per component), as between MD steps; forces and energy are requested
as ASE dynamics do. Prints time per call and the ratio baseline / almd
(> 1 means almd is faster).

    python benchmarks/bench_calculator.py [--calls 20] [--threads 2]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from ase.build import bulk


def time_calls(calc, atoms, calls: int, seed: int = 0) -> float:
    atoms = atoms.copy()
    atoms.calc = calc
    rng = np.random.default_rng(seed)
    atoms.get_forces()  # warm-up: model load, first neighbour list, allocator
    start = time.perf_counter()
    for _ in range(calls):
        atoms.positions += rng.normal(0.0, 0.01, atoms.positions.shape)
        atoms.get_forces()
    return (time.perf_counter() - start) / calls


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=20)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from sevenn.calculator import SevenNetCalculator

    import almd

    ours, theirs = almd.Calculator("sevennet-0"), SevenNetCalculator("7net-0")
    print(f"threads={args.threads} calls={args.calls} dtype=float32")
    print("| atoms | almd s/call | sevenn s/call | ratio sevenn/almd |")
    print("|---|---|---|---|")
    for reps in (2, 3):
        atoms = bulk("Si", "diamond", a=5.43, cubic=True).repeat(reps)
        atoms.rattle(0.02, seed=1)
        # interleave to share any drift in machine load fairly
        t_ours = min(time_calls(ours, atoms, args.calls), time_calls(ours, atoms, args.calls, 1))
        t_theirs = min(time_calls(theirs, atoms, args.calls), time_calls(theirs, atoms, args.calls, 1))
        print(f"| {len(atoms)} | {t_ours:.4f} | {t_theirs:.4f} | {t_theirs / t_ours:.2f} |")


if __name__ == "__main__":
    main()
