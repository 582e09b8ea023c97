"""Folded-supercell Hessian labels: what a small cell costs the model and what its label keeps.

For a phonopy / phono3py data set, each small supercell of the data's unit cell that is
commensurate with the data's supercell gets the data's force constants folded onto it
(almd.phonons.datasets.fold_force_constants). Per cell the table gives

  * atoms, and the q-points where the folded label is exact (the cell's commensurate q);
  * the model's cost of one Hessian column on that cell, what one PFT step draws: one
    Hessian-vector product for an almd model (``--model``), else two force calls of
    Stillinger–Weber (a central-difference column; the default, cheap);
  * max |Δω| at the commensurate q-points (THz): the folded label reproduces the data
    there (~0 up to round-off);
  * BZ-MAE (THz) over a Γ-centred mesh of the phonons rebuilt from the folded label alone
    (read back as force constants of the small supercell) against the full data's: the
    information the small label loses away from its commensurate q.

    python benchmarks/bench_folding.py [DATASET] [--cells 2,2,2 1,1,1 0,1,1,1,0,1,1,1,0]
                                       [--mesh 16] [--model sevennet-0] [--repeat 5]
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import numpy as np
from ase import Atoms
from phonopy import Phonopy
from phonopy.harmonic.dynmat_to_fc import get_commensurate_points

from almd.data import SI_PBE
from almd.phonons._calculators import resolve_calculator
from almd.phonons.datasets import (
    fold_force_constants,
    force_constants_from_hessian,
    load_phonon_dataset,
    phonon_hessian,
)
from almd.phonons.harmonic import to_ase_atoms

FCC = "0,1,1,1,0,1,1,1,0"  # 2×2×2 primitive cells of an fcc lattice, on its conventional cube


def parse_cell(text: str) -> np.ndarray:
    values = [int(v) for v in text.split(",")]
    if len(values) not in (3, 9):
        raise argparse.ArgumentTypeError(f"a cell is 3 or 9 comma-separated ints, got {text!r}")
    return np.diag(values) if len(values) == 3 else np.array(values).reshape(3, 3)


def own_supercell(ph: Any) -> np.ndarray:
    """The supercell matrix the data's harmonic force constants live on."""
    if hasattr(ph, "phonon_dataset") and ph.phonon_supercell_matrix is not None:
        return np.asarray(ph.phonon_supercell_matrix, dtype=int)
    return np.asarray(ph.supercell_matrix, dtype=int)


def default_cells(own: np.ndarray) -> list[np.ndarray]:
    """The data's own supercell, its half (if diagonal and even), the unit cell and the fcc 2×2×2."""
    cells = [own]
    if np.count_nonzero(own - np.diag(np.diag(own))) == 0 and np.all(np.diag(own) % 2 == 0):
        cells.append(own // 2)
    cells += [np.eye(3, dtype=int), parse_cell(FCC)]
    unique: list[np.ndarray] = []
    for c in cells:
        if not any(np.array_equal(c, u) for u in unique):
            unique.append(c)
    return unique


def harmonic(ph: Any, matrix: np.ndarray, fc_big: np.ndarray, big: Atoms) -> Phonopy:
    """Phonopy on ``matrix`` × the data's unit cell, force constants the data's folded onto it."""
    out = Phonopy(ph.unitcell, supercell_matrix=matrix, primitive_matrix=ph.primitive_matrix)
    # folding onto phonopy's own supercell: atom order by position, so no order is assumed
    out.force_constants = force_constants_from_hessian(fold_force_constants(fc_big, big, to_ase_atoms(out.supercell)))
    if getattr(ph, "nac_params", None) is not None:
        out.nac_params = ph.nac_params  # Born charges are the data's, on both sides
    return out


def column_seconds(calc: Any, atoms: Atoms, repeat: int, delta: float = 0.01) -> tuple[float, str]:
    """Median wall time of one Hessian column of ``atoms``, and how it was computed."""
    u = np.zeros((1, len(atoms), 3))
    u[0, 0, 0] = 1.0
    hvp = hasattr(calc, "get_hessian_vector_products")

    def one() -> None:
        if hvp:
            calc.get_hessian_vector_products(atoms, u)
            return
        for sign in (1.0, -1.0):  # central difference: the column from two force calls
            moved = atoms.copy()
            moved.positions[0, 0] += sign * delta
            moved.calc = calc
            moved.get_forces()

    one()  # warm-up: model load, first neighbour list
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        one()
        times.append(time.perf_counter() - start)
    return float(np.median(times)), "HVP" if hvp else "2 forces"


def bz_mae(model: Phonopy, reference: Phonopy, mesh: int) -> float:
    """Weighted mean |Δω| (THz) over the reference's irreducible Γ-centred mesh, modes sorted."""
    reference.run_mesh([mesh] * 3, is_gamma_center=True)
    q, w, f_ref = reference.mesh.qpoints, reference.mesh.weights, reference.mesh.frequencies
    model.run_qpoints(q)
    err = np.abs(model.qpoints.frequencies - f_ref).mean(axis=1)
    return float(np.sum(w * err) / np.sum(w))


def commensurate_error(model: Phonopy, reference: Phonopy, matrix: np.ndarray) -> tuple[int, float]:
    """(number of commensurate q, max |Δω| there in THz) of ``matrix``'s supercell."""
    in_primitive = np.rint(np.linalg.inv(reference.primitive_matrix) @ matrix).astype(int)
    q = get_commensurate_points(in_primitive)
    model.run_qpoints(q)
    reference.run_qpoints(q)
    return len(q), float(np.abs(model.qpoints.frequencies - reference.qpoints.frequencies).max())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dataset", nargs="?", default=str(SI_PBE / "phono3py_disp.yaml"),
                        help="phonopy / phono3py yaml (default: the shipped VASP PBE Si set)")
    parser.add_argument("--cells", nargs="+", type=parse_cell, default=None,
                        help="small supercells of the unit cell: 3 or 9 comma-separated ints each")
    parser.add_argument("--mesh", type=int, default=16, help="Γ-centred mesh for the BZ-MAE")
    parser.add_argument("--model", default=None, help="an almd model (e.g. sevennet-0); default Stillinger–Weber")
    parser.add_argument("--repeat", type=int, default=5, help="timed Hessian columns per cell (median)")
    args = parser.parse_args()

    ph = load_phonon_dataset(args.dataset, is_compact_fc=False)
    big, h = phonon_hessian(ph)
    fc = force_constants_from_hessian(h)
    own = own_supercell(ph)
    reference = harmonic(ph, own, fc, big)
    calc = resolve_calculator(args.model or "stillinger-weber-si")
    print(f"{args.dataset}: {len(big)}-atom supercell {own.tolist()}; model {args.model or 'stillinger-weber-si'}; "
          f"BZ mesh {args.mesh}³")
    header = f"{'cell':<18} {'atoms':>5} {'q exact':>7} {'fold ms':>8} {'column ms':>10} {'via':>8} " \
             f"{'max|Δω| at q':>13} {'BZ-MAE THz':>11}"
    print(header)
    print("-" * len(header))
    for matrix in args.cells or default_cells(own):
        diagonal = np.count_nonzero(matrix - np.diag(np.diag(matrix))) == 0
        name = "×".join(map(str, np.diag(matrix))) if diagonal else "/".join(",".join(map(str, r)) for r in matrix)
        start = time.perf_counter()
        try:
            small = harmonic(ph, matrix, fc, big)
        except ValueError as exc:
            print(f"{name:<18} not usable: {exc}")
            continue
        fold_ms = 1e3 * (time.perf_counter() - start)  # includes phonopy's symmetry search of the small cell
        seconds, via = column_seconds(calc, to_ase_atoms(small.supercell), args.repeat)
        n_q, at_q = commensurate_error(small, reference, matrix)
        print(f"{name:<18} {len(small.supercell):>5} {n_q:>7} {fold_ms:>8.1f} {1e3 * seconds:>10.2f} {via:>8} "
              f"{at_q:>13.1e} {bz_mae(small, reference, args.mesh):>11.4f}")


if __name__ == "__main__":
    main()
