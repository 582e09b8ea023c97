"""Third-order force constants and lattice thermal conductivity through phono3py (RTA).

Sources: a reference phono3py data set (its DFT forces, or a calculator's forces
on the same displaced supercells), or any structure + calculator (phono3py's own
displacements).  Forces on the displaced supercells are the only calculator work.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
from ase import Atoms
from ase.calculators.calculator import Calculator as AseCalculator

from almd.phonons._calculators import calculator_label, compute_forces, resolve_calculator
from almd.phonons.harmonic import (
    _is_random_dataset,
    quiet_auto_primitive,
    supercell_matrix,
    to_ase_atoms,
    to_phonopy_atoms,
)
from almd.phonons.reference import PhononReference, as_reference

__all__ = ["kappa", "KappaResult"]


@dataclass
class KappaResult:
    label: str
    mesh: list[int]
    temperatures_K: list[float]
    kappa_W_mK: list[list[float]]  # per temperature: xx, yy, zz, yz, xz, xy
    kappa_scalar_W_mK: list[float]  # (xx + yy + zz) / 3
    n_supercells: int
    seconds: dict[str, float] = field(default_factory=dict)

    @property
    def kappa_300K_W_mK(self) -> float:
        return float(np.interp(300.0, self.temperatures_K, self.kappa_scalar_W_mK))

    def to_dict(self) -> dict[str, Any]:
        return {**self.__dict__, "kappa_300K_W_mK": self.kappa_300K_W_mK}


def _strip_forces(dataset: dict) -> dict:
    ds = copy.deepcopy(dataset)
    ds.pop("forces", None)
    ds.pop("supercell_energies", None)
    for d1 in ds.get("first_atoms", []):
        d1.pop("forces", None)
        for d2 in d1.get("second_atoms", []):
            d2.pop("forces", None)
    return ds


def _forces_for(cells: Sequence[Any], calc: AseCalculator, natom: int, residual: np.ndarray) -> np.ndarray:
    """Forces on phono3py's supercells; None entries (pairs beyond a cutoff) get zeros, as phono3py expects."""
    todo = [i for i, c in enumerate(cells) if c is not None]
    forces = np.zeros((len(cells), natom, 3))
    if todo:
        forces[todo] = compute_forces([to_ase_atoms(cells[i]) for i in todo], calc) - residual
    return forces


def kappa(
    source: Atoms | PhononReference | str,
    calculator: str | AseCalculator | None = None,
    supercell: int | Sequence[int] | Sequence[Sequence[int]] | None = 2,
    *,
    mesh: Sequence[int] = (11, 11, 11),
    temperatures: Sequence[float] = (300.0,),
    distance: float = 0.03,
    cutoff_pair_distance: float | None = None,
    primitive: str | np.ndarray | None = "auto",
    subtract_residual: bool = True,
) -> KappaResult:
    """κ (W/m·K) in the relaxation-time approximation, isotope scattering off.

    source: Atoms (with `supercell`), or a reference data set / path.  With a
    reference and no calculator the reference's own forces are used; with a
    calculator its forces on the reference's displaced supercells (if the
    reference has third-order data) or on phono3py's own displacements.
    """
    from phono3py import Phono3py

    t0 = time.perf_counter()
    ref: PhononReference | None = None
    if isinstance(source, (str, PhononReference)) or hasattr(source, "__fspath__"):
        ref = as_reference(source)
    if ref is not None and ref.phono3py is not None:
        base = ref.phono3py
        ph3 = Phono3py(
            base.unitcell,
            supercell_matrix=base.supercell_matrix,
            primitive_matrix=base.primitive_matrix,
            phonon_supercell_matrix=base.phonon_supercell_matrix,
            symprec=base.symmetry.tolerance,
            log_level=0,
        )
        ph3.dataset = base.dataset if calculator is None else _strip_forces(base.dataset)
        if base.phonon_supercell_matrix is not None:
            ph3.phonon_dataset = base.phonon_dataset if calculator is None else _strip_forces(base.phonon_dataset)
        if base.nac_params is not None:
            ph3.nac_params = base.nac_params
    else:
        if calculator is None:
            raise ValueError("a calculator is needed without a third-order reference data set")
        if ref is not None:
            unit, sc = ref.phonopy.unitcell, ref.supercell_matrix
            primitive = ref.phonopy.primitive_matrix
        else:
            unit, sc = to_phonopy_atoms(source), supercell_matrix(supercell)
        with quiet_auto_primitive():
            ph3 = Phono3py(unit, supercell_matrix=sc, primitive_matrix=primitive, log_level=0)
        ph3.generate_displacements(distance=distance, cutoff_pair_distance=cutoff_pair_distance)
        if ref is not None and ref.phonopy.nac_params is not None:
            ph3.nac_params = ref.phonopy.nac_params

    n_cells = len(ph3.supercells_with_displacements)
    if calculator is not None:
        calc = resolve_calculator(calculator)
        natom = len(ph3.supercell)
        residual = compute_forces([to_ase_atoms(ph3.supercell)], calc)[0] if subtract_residual else 0.0
        ph3.forces = _forces_for(ph3.supercells_with_displacements, calc, natom, residual)
        if ph3.phonon_supercell_matrix is not None:
            pres = compute_forces([to_ase_atoms(ph3.phonon_supercell)], calc)[0] if subtract_residual else 0.0
            ph3.phonon_forces = _forces_for(ph3.phonon_supercells_with_displacements, calc, len(ph3.phonon_supercell), pres)
            n_cells += len(ph3.phonon_supercells_with_displacements)
    t_forces = time.perf_counter()

    # Random displacements need a fit (symfc); single/pair displacements are solved
    # directly and then symmetrised, as phono3py's command line does.
    fc_calc = "symfc" if _is_random_dataset(ph3.dataset) else None
    ph3.produce_fc3(fc_calculator=fc_calc)
    if fc_calc is None:
        ph3.symmetrize_fc3()
    fc2_calc = "symfc" if _is_random_dataset(ph3.phonon_dataset or ph3.dataset) else None
    ph3.produce_fc2(fc_calculator=fc2_calc)
    if fc2_calc is None:
        ph3.symmetrize_fc2()
    t_fc = time.perf_counter()

    ph3.mesh_numbers = list(mesh)
    ph3.init_phph_interaction()
    ph3.run_thermal_conductivity(temperatures=list(map(float, temperatures)), is_isotope=False)
    tc = ph3.thermal_conductivity
    k = np.asarray(tc.kappa)[0]  # first (only) smearing setting: tetrahedron method
    t_end = time.perf_counter()
    label = "reference" if calculator is None else calculator_label(calculator)
    return KappaResult(
        label=label,
        mesh=[int(m) for m in mesh],
        temperatures_K=[float(t) for t in tc.temperatures],
        kappa_W_mK=k.tolist(),
        kappa_scalar_W_mK=k[:, :3].mean(axis=1).tolist(),
        n_supercells=n_cells,
        seconds={"forces": t_forces - t0, "force_constants": t_fc - t_forces, "kappa": t_end - t_fc},
    )
