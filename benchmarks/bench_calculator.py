"""almd.Calculator vs sevenn's own SevenNetCalculator, MD-like repeated calls.

Baselines: ``sevenn.calculator.SevenNetCalculator('7net-0')`` on the same
structures in the same run, and almd's own calculator on the same model without
the streamlined e3nn graphs (:mod:`almd.potentials.e3nn_graphs`). Each call follows a small random displacement
(0.005 Å per component), as between MD steps; every call asks for what an MD
step with a barostat (or a user's script) asks: ``get_forces()`` then
``get_stress()``. Prints time per call for each size, the ratio baseline / almd
(> 1 means almd is faster) and almd's time per atom.

With ``--npt STEPS`` it times MTK NPT MD steps instead (SevenNet-0, 64-atom Si at
600 K and 1 GPa), almd.Calculator with its 0.5 Å skin against the same calculator
with no skin (a list rebuilt at every step: what any cell change forced before the
skin followed the cell), and prints how often each rebuilt its list.

With ``--compile`` almd's calculator with ``compile=True`` (``torch.compile`` of the
network, compiled once on the first call, whose time is printed) is timed beside them
in the same passes, with its ratio over sevenn's and its time per atom.

    python benchmarks/bench_calculator.py [--calls 10] [--threads 2] [--sizes 2 3 4] [--compile] [--npt 0]
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
    atoms.get_forces(), atoms.get_stress()  # warm-up: model load, first neighbour list, allocator
    start = time.perf_counter()
    for _ in range(calls):
        atoms.positions += rng.normal(0.0, 0.005, atoms.positions.shape)
        atoms.get_forces()
        atoms.get_stress()
    return (time.perf_counter() - start) / calls


def time_npt(calc, atoms, steps: int) -> tuple[float, int]:
    """Seconds per MTK NPT step (600 K, 1 GPa, 1 fs) after one warm-up step, and the list builds."""
    from ase import units
    from ase.md.nose_hoover_chain import MTKNPT
    from ase.md.velocitydistribution import MaxwellBoltzmannDistribution

    atoms = atoms.copy()
    atoms.calc = calc
    MaxwellBoltzmannDistribution(atoms, temperature_K=600, rng=np.random.default_rng(0))
    md = MTKNPT(atoms, 1 * units.fs, temperature_K=600, pressure_au=1.0 * units.GPa, tdamp=50 * units.fs,
                pdamp=250 * units.fs)
    md.run(1)
    builds, start = calc.neighbors.builds, time.perf_counter()
    md.run(steps)
    return (time.perf_counter() - start) / steps, calc.neighbors.builds - builds


def npt(steps: int) -> None:
    import almd

    atoms = bulk("Si", "diamond", a=5.43, cubic=True).repeat(2)
    rows = {"skin 0.5 Å (following the cell)": [], "no skin (rebuilt every step)": []}
    for _ in range(2):  # interleaved, best of two
        for name, skin in zip(rows, (0.5, 0.0)):
            rows[name].append(time_npt(almd.Calculator("sevennet-0", skin=skin), atoms, steps))
    base = min(t for t, _ in rows["no skin (rebuilt every step)"])
    print(f"| MTK NPT, 64 atoms, {steps} steps | s/step | list builds | ratio no-skin/this |\n|---|---|---|---|")
    for name, results in rows.items():
        t, builds = min(results)
        print(f"| {name} | {t:.4f} | {builds} | {base / t:.2f} |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=10)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--sizes", type=int, nargs="+", default=[2, 3, 4],
                        help="conventional-cell repeats (2: 64 atoms, 3: 216, 4: 512, 5: 1000)")
    parser.add_argument("--npt", type=int, default=0, help="time this many NPT MD steps instead")
    parser.add_argument("--compile", action="store_true", help="also time almd.Calculator(compile=True)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.npt:
        return npt(args.npt)

    from sevenn.calculator import SevenNetCalculator

    import almd
    from almd.potentials.sevennet import SevenNet

    ours, theirs = almd.Calculator("sevennet-0"), SevenNetCalculator("7net-0")
    # the same model with e3nn's graphs as generated (almd.potentials.e3nn_graphs not applied)
    plain = almd.Calculator(SevenNet.from_checkpoint("sevennet-0", streamlined=False))
    compiled = almd.Calculator("sevennet-0", compile=True) if args.compile else None
    if compiled is not None:
        atoms = bulk("Si", "diamond", a=5.43, cubic=True).repeat(args.sizes[0])
        atoms.calc = compiled
        start = time.perf_counter()
        atoms.get_forces()  # the first call compiles
        print(f"compile (first call, {len(atoms)} atoms): {time.perf_counter() - start:.1f} s")
    print(f"threads={args.threads} calls={args.calls} dtype=float32, get_forces() + get_stress() per call")
    extra = " almd compiled s/call | ratio sevenn/compiled | compiled ms/atom |" if compiled else ""
    print("| atoms | almd s/call | sevenn s/call | ratio sevenn/almd | almd unstreamlined s/call | ratio "
          f"unstreamlined/almd | almd ms/atom |{extra}")
    print("|---|---|---|---|---|---|---|" + ("---|---|---|" if compiled else ""))
    for reps in args.sizes:
        atoms = bulk("Si", "diamond", a=5.43, cubic=True).repeat(reps)
        atoms.rattle(0.02, seed=1)
        # interleaved, best of two each, to share any drift in machine load fairly
        times: dict[str, list[float]] = {"ours": [], "theirs": [], "plain": [], "compiled": []}
        for seed in (0, 1):
            for name, calc in (("ours", ours), ("theirs", theirs), ("plain", plain), ("compiled", compiled)):
                if calc is not None:
                    times[name].append(time_calls(calc, atoms, args.calls, seed))
        a, b, c = min(times["ours"]), min(times["theirs"]), min(times["plain"])
        row = f"| {len(atoms)} | {a:.4f} | {b:.4f} | {b / a:.2f} | {c:.4f} | {c / a:.2f} | {1e3 * a / len(atoms):.3f} |"
        if compiled is not None:
            d = min(times["compiled"])
            row += f" {d:.4f} | {b / d:.2f} | {1e3 * d / len(atoms):.3f} |"
        print(row, flush=True)


if __name__ == "__main__":
    main()
