"""Cost per MD step of a K-member ensemble vs one model, 64-atom Si, SevenNet-0.

Baseline (named): one model, ``almd.Calculator('sevennet-0')``, one MD step
(energy, forces, stress). Rows, each as time per step and ratio to the baseline:

  one model          almd.Calculator (baseline)
  ensemble, every    EnsembleCalculator: shared trunk forward + K backwards (exact
                     member forces and spread at every step)
  ensemble, 1/n      spread every n-th step, the member mean (1 backward) otherwise
  ensemble, mean     the mean only (lower bound of 1/n for large n)
  K models, naive    K independent almd.Calculators, one call each per step

Velocity-Verlet steps, 1 fs; timings are the best of the repeats and the rows
are interleaved per repeat (the machine is shared, the load drifts).

    OMP_NUM_THREADS=1 python benchmarks/bench_ensemble.py [--k 4] [--steps 5] [--repeats 3] [--every 4]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from ase import units
from ase.build import bulk
from ase.md.velocitydistribution import MaxwellBoltzmannDistribution
from ase.md.verlet import VelocityVerlet

import almd
from almd import potentials
from almd.uncertainty import Ensemble, EnsembleCalculator


class _Naive:
    """K independent models stepped together: forces = mean of K full calls."""

    def __init__(self, calcs):
        self.calcs = calcs

    def attach(self, atoms):
        from ase.calculators.calculator import Calculator

        outer = self

        class Mean(Calculator):
            implemented_properties = ["energy", "forces"]

            def calculate(self, atoms=None, properties=("energy",), system_changes=()):
                super().calculate(atoms, properties, system_changes)
                res = []
                for c in outer.calcs:
                    c.calculate(self.atoms, ["energy", "forces"], system_changes)
                    res.append(c.results)
                self.results = {"energy": np.mean([r["energy"] for r in res]),
                                "forces": np.mean([r["forces"] for r in res], 0)}

        atoms.calc = Mean()


def time_md(atoms, setup, steps: int) -> float:
    atoms = atoms.copy()
    setup(atoms)
    md = VelocityVerlet(atoms, 1.0 * units.fs)
    md.run(1)  # warm-up: first neighbour list, allocator
    start = time.perf_counter()
    md.run(steps)
    return (time.perf_counter() - start) / steps


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--every", type=int, default=4)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    atoms = bulk("Si", "diamond", a=5.431, cubic=True).repeat(2)
    MaxwellBoltzmannDistribution(atoms, temperature_K=600, rng=np.random.default_rng(0))
    backbone = potentials.load("sevennet-0")
    ens = Ensemble(backbone, k=args.k)
    rng = np.random.default_rng(1)
    ens.weights += 0.01 * ens.weights.abs().mean() * torch.as_tensor(rng.standard_normal(ens.weights.shape),
                                                                      dtype=ens.weights.dtype)  # members differ
    naive = _Naive([almd.Calculator("sevennet-0") for _ in range(args.k)])

    def set_calc(make):
        return lambda a: setattr(a, "calc", make())

    rows = {
        "one model (baseline)": set_calc(lambda: almd.Calculator(backbone)),
        f"ensemble K={args.k}, spread every step": set_calc(lambda: EnsembleCalculator(ens)),
        f"ensemble K={args.k}, spread every {args.every}th step": set_calc(
            lambda: EnsembleCalculator(ens, uncertainty_every=args.every)),
        f"ensemble K={args.k}, mean only": set_calc(lambda: EnsembleCalculator(ens, uncertainty_every=10**9)),
        f"{args.k} independent models (naive)": naive.attach,
    }
    best = {name: float("inf") for name in rows}
    for _ in range(args.repeats):
        for name, setup in rows.items():
            best[name] = min(best[name], time_md(atoms, setup, args.steps))
    base = best["one model (baseline)"]
    print(f"\n64-atom Si, SevenNet-0 float32, {args.threads} thread(s), best of {args.repeats}×{args.steps} MD steps\n")
    print("| calculator | s / MD step | ratio vs one model |")
    print("|---|---|---|")
    for name, t in best.items():
        print(f"| {name} | {t:.3f} | {t / base:.2f} |")


if __name__ == "__main__":
    main()
