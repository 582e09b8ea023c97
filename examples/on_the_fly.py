"""On-the-fly learning in your own ASE script: ``almd.OnTheFlyCalculator`` in a plain Langevin loop.

64-atom silicon at 900 K, Stillinger–Weber as the reference (no DFT needed), a
SevenNet-0 ensemble as the model. The calculator answers with the model while
its calibrated uncertainty is under the target and with the reference when
the trigger calls; every label goes to ``otf-si/labels.db``. At the end the
force error on held-out Stillinger–Weber frames (from a separate run, never
labelled by the calculator) is compared with SevenNet-0's alone.

Run it as ``python examples/on_the_fly.py [--steps 300] [--output otf-si]``; run it
again with the same ``--output`` and it resumes from that folder. The guard
``if __name__ == "__main__"`` is needed: the reference runs in worker processes.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
from ase import units
from ase.build import bulk
from ase.calculators.singlepoint import SinglePointCalculator
from ase.md.langevin import Langevin
from ase.md.velocitydistribution import Stationary

import almd
from almd.phonons import stillinger_weber_si

TEMPERATURE = 900.0  # K


def silicon():
    return bulk("Si", "diamond", a=5.43, cubic=True).repeat(2)  # 64 atoms


def held_out_frames(n: int = 8, spacing: int = 25, seed: int = 2024) -> list:
    """Frames of an independent Stillinger–Weber run at the same temperature, labelled by SW."""
    atoms = silicon()
    atoms.calc = stillinger_weber_si()
    _thermalise(atoms, seed)
    dyn = Langevin(atoms, 2 * units.fs, temperature_K=TEMPERATURE, friction=0.01, rng=np.random.default_rng(seed))
    dyn.run(100)  # away from the perfect crystal
    frames = []
    for _ in range(n):
        dyn.run(spacing)
        frame = silicon()
        frame.positions = atoms.positions
        frame.calc = SinglePointCalculator(frame, energy=atoms.get_potential_energy(), forces=atoms.get_forces())
        frames.append(frame)
    return frames


def force_rmse(calc, frames: list) -> float:
    errors = [calc.get_forces(f.copy()) - f.get_forces() for f in frames]
    return float(np.sqrt(np.mean(np.square(errors))))


def _thermalise(atoms, seed: int) -> None:
    from ase.md.velocitydistribution import MaxwellBoltzmannDistribution

    MaxwellBoltzmannDistribution(atoms, temperature_K=TEMPERATURE, rng=np.random.default_rng(seed))
    Stationary(atoms)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300, help="MD steps (2 fs)")
    parser.add_argument("--output", default="otf-si", help="the calculator's folder (resumed if it exists)")
    args = parser.parse_args()

    frames = held_out_frames()
    base = force_rmse(almd.Calculator("sevennet-0"), frames)

    t0 = time.perf_counter()
    # a tight target (eV/Å), so that a few hundred steps show the learning; the default is 0.05
    calc = almd.OnTheFlyCalculator("stillinger-weber-si", args.output, target=0.03)
    atoms = silicon()
    atoms.calc = calc
    _thermalise(atoms, seed=7)
    dyn = Langevin(atoms, 2 * units.fs, temperature_K=TEMPERATURE, friction=0.01, rng=np.random.default_rng(7))

    def report() -> None:
        r = calc.results
        print(f"step {calc.steps:4d}  {r['source']:9s}  uncertainty {r['uncertainty']:.3f} eV/Å  "
              f"calls {calc.calls:3d}  labels {calc.labels:3d}  refits {calc.refits:3d}  "
              f"{time.perf_counter() - t0:6.0f} s", flush=True)

    dyn.attach(report, interval=25)
    dyn.run(args.steps)
    calc.close()

    after = calc.held_out_force_rmse(frames)
    print(f"\n{calc.steps} steps: {calc.calls} answered by the reference, {calc.labels} labels "
          f"({calc.failures} failed), {calc.refits} refits, {time.perf_counter() - t0:.0f} s")
    print(f"held-out force RMSE on {len(frames)} SW frames at {TEMPERATURE:.0f} K: "
          f"SevenNet-0 alone {base:.3f} eV/Å -> on-the-fly model {after:.3f} eV/Å")


if __name__ == "__main__":
    main()
