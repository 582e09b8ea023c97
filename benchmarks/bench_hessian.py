"""Full Hessian of 64-atom Si: almd's batched Hessian-vector products vs phonopy finite displacements.

Baselines, measured in the same run through the same almd.Calculator (float64):
  * phonopy finite displacements (0.01 Å, symmetry-reduced: 1 supercell for Si);
  * plain finite differences of forces without symmetry (6N force calls, ±0.001 Å) --
    what a Hessian costs without phonopy's symmetry.
Prints times, ratios (baseline / almd) and the agreement of the force constants
(max |ΔΦ| in eV/Å² and Γ/X frequencies in THz).

    python benchmarks/bench_hessian.py [--threads 2] [--chunk 1] [--skip-plain-fd]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from ase import Atoms
from ase.build import bulk
from phonopy import Phonopy
from phonopy.structure.atoms import PhonopyAtoms


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--chunk", type=int, default=1)
    parser.add_argument("--skip-plain-fd", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    import almd

    calc = almd.Calculator("sevennet-0", dtype="float64", skin=0.0)
    unit = bulk("Si", "diamond", a=5.43, cubic=True)
    phonon = Phonopy(PhonopyAtoms(symbols=unit.get_chemical_symbols(), cell=unit.cell.array,
                                  scaled_positions=unit.get_scaled_positions()),
                     supercell_matrix=np.diag([2, 2, 2]),
                     primitive_matrix=[[0, 0.5, 0.5], [0.5, 0, 0.5], [0.5, 0.5, 0]])
    sc = phonon.supercell
    supercell = Atoms(sc.symbols, cell=sc.cell, scaled_positions=sc.scaled_positions, pbc=True)
    n = len(supercell)
    calc.get_forces(supercell)  # warm-up

    t0 = time.perf_counter()
    h = calc.get_hessian(supercell, chunk=args.chunk)
    t_hvp = time.perf_counter() - t0
    fc_hvp = h.reshape(n, 3, n, 3).swapaxes(1, 2)

    t0 = time.perf_counter()
    phonon.generate_displacements(distance=0.01)
    forces = [calc.get_forces(Atoms(d.symbols, cell=d.cell, scaled_positions=d.scaled_positions, pbc=True))
              for d in phonon.supercells_with_displacements]
    phonon.forces = forces
    phonon.produce_force_constants()
    t_phonopy = time.perf_counter() - t0
    fc_fd = phonon.force_constants.copy()

    def freqs(fc):
        phonon.force_constants = fc
        phonon.run_qpoints([[0, 0, 0], [0.5, 0, 0.5]])
        return phonon.get_qpoints_dict()["frequencies"]

    # phonopy's symmetry-reduced displacements with exact -H·u forces (one HVP each)
    from almd.phonons.harmonic import hvp_forces, set_forces_and_fc
    t0 = time.perf_counter()
    set_forces_and_fc(phonon, hvp_forces(phonon, calc))
    t_sym_hvp = time.perf_counter() - t0
    fc_sym_hvp = phonon.force_constants.copy()

    f_hvp, f_fd = freqs(fc_hvp), freqs(fc_fd)
    print(f"64-atom Si, SevenNet-0 float64, threads={args.threads}")
    print("| method | calls | time s | ratio (method / HVP) |")
    print("|---|---|---|---|")
    print(f"| almd batched HVP (chunk {args.chunk}) | {3 * n} HVPs | {t_hvp:.1f} | 1.00 |")
    print(f"| phonopy FD 0.01 Å (symmetry) | {len(forces)} force calls | {t_phonopy:.2f} | {t_phonopy / t_hvp:.3f} |")
    print(f"| phonopy symmetry + exact HVP forces | {len(forces)} HVPs | {t_sym_hvp:.2f} | {t_sym_hvp / t_hvp:.3f} |")
    if not args.skip_plain_fd:
        t0 = time.perf_counter()
        step, cols = 1e-3, []
        for k in range(3 * n):
            a, b = supercell.copy(), supercell.copy()
            a.positions[k // 3, k % 3] += step
            b.positions[k // 3, k % 3] -= step
            cols.append(-(calc.get_forces(a) - calc.get_forces(b)).reshape(-1) / (2 * step))
        t_plain = time.perf_counter() - t0
        h_plain = np.array(cols).T
        print(f"| plain central FD ±0.001 Å (no symmetry) | {6 * n} force calls | {t_plain:.1f} | {t_plain / t_hvp:.2f} |")
        print(f"max |H_hvp - H_plainFD| = {np.abs(h - h_plain).max():.2e} eV/Å²")
    print(f"max |Φ_hvp - Φ_phonopy(0.01 Å)| = {np.abs(fc_hvp - fc_fd).max():.3f} eV/Å²")
    f_sym = freqs(fc_sym_hvp)  # compact fc (symmetry-reduced rows): compare frequencies
    print(f"max |ω_hvp - ω_symmetry+HVP| at Γ, X = {np.abs(f_hvp - f_sym).max():.2e} THz")
    print(f"Γ optical: HVP {f_hvp[0].max():.3f} THz, phonopy {f_fd[0].max():.3f} THz; "
          f"X max: HVP {f_hvp[1].max():.3f}, phonopy {f_fd[1].max():.3f} THz")


if __name__ == "__main__":
    main()
