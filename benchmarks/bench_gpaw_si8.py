"""One real-DFT single point: 8-atom Si, GPAW PBE, PW(300 eV), 2×2×2 k-points, energy + forces.

Used to compare GPAW builds (with and without libxc): run it in each build's venv,
alternating, with the same thread count, and compare the times it prints.

    OMP_NUM_THREADS=1 python benchmarks/bench_gpaw_si8.py [--repeat 2]
"""

from __future__ import annotations

import argparse
import time

from ase.build import bulk


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=2)
    args = parser.parse_args()
    from gpaw import GPAW, PW

    for run in range(args.repeat):
        atoms = bulk("Si", "diamond", a=5.43, cubic=True)
        atoms.rattle(0.02, seed=1)
        atoms.calc = GPAW(mode=PW(300), xc="PBE", kpts=(2, 2, 2), txt=None)
        start = time.perf_counter()
        energy = atoms.get_potential_energy()
        atoms.get_forces()
        print(f"run {run + 1}: {time.perf_counter() - start:.2f} s, E = {energy:.13f} eV")


if __name__ == "__main__":
    main()
