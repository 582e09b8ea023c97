"""Harmonic phonons: force constants from any ASE calculator, and their properties.

Units follow phonopy: frequencies in THz; thermal properties per mole of the
phonopy *primitive cell* (F in kJ/mol, S and C_V in J/K/mol) — the convention
of the MDR benchmark and of the chalcogenide comparison table.
"""

from __future__ import annotations

import contextlib
import copy
import json
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
from ase import Atoms
from ase.calculators.calculator import Calculator as AseCalculator
from phonopy import Phonopy
from phonopy.structure.atoms import PhonopyAtoms

from almd.io import atomic_write
from almd.phonons._calculators import (
    HessianVectorCalculator,
    calculator_label,
    compute_forces,
    get_hessian,
    has_analytic_hessian,
    has_hessian,
    resolve_calculator,
)
from almd.phonons._qpath import high_symmetry_path, path_qpoints
from almd.phonons.datasets import force_constants_from_hessian
from almd.structures import minimum_image

__all__ = [
    "analyse", "build_phonopy", "DEFAULT_TEMPERATURES", "displaced_forces", "has_hvp", "hvp_forces",
    "PhononResult", "phonons", "phonopy_from_calculator", "phonopy_on_dataset", "quiet_auto_primitive",
    "relax_structure", "set_forces_and_fc", "supercell_matrix", "THZ_TO_K", "to_ase_atoms",
    "to_phonopy_atoms", "UNITS",
]

THZ_TO_K = 47.99243073366221  # h·1 THz / k_B
DEFAULT_TEMPERATURES = (0.0, 100.0, 200.0, 300.0, 400.0, 500.0, 600.0, 800.0, 1000.0)
UNITS = {
    "frequency": "THz",
    "omega_max_K": "K (h·ω_max/k_B)",
    "thermal": "per mole of phonopy primitive cells: F kJ/mol, S and C_V J/K/mol",
}


# ---------------------------------------------------------------- conversions
def to_phonopy_atoms(atoms: Atoms) -> PhonopyAtoms:
    return PhonopyAtoms(
        symbols=atoms.get_chemical_symbols(),
        cell=np.array(atoms.cell[:]),
        scaled_positions=atoms.get_scaled_positions(),
        masses=atoms.get_masses(),
    )


def to_ase_atoms(cell: PhonopyAtoms) -> Atoms:
    return Atoms(
        symbols=cell.symbols,
        cell=cell.cell,
        scaled_positions=cell.scaled_positions,
        masses=cell.masses,
        pbc=True,
    )


def supercell_matrix(supercell: int | Sequence[int] | Sequence[Sequence[int]]) -> np.ndarray:
    m = np.asarray(supercell, dtype=int)
    if m.ndim == 0:
        return np.eye(3, dtype=int) * int(m)
    if m.shape == (3,):
        return np.diag(m)
    if m.shape == (3, 3):
        return m
    raise ValueError(f"supercell must be an int, 3 ints or a 3×3 matrix, got {supercell!r}")


# ---------------------------------------------------------------- relaxation
def _single_threaded_blas() -> Any:
    try:  # threadpoolctl arrives with scikit-learn (hiphive); optional here
        from threadpoolctl import threadpool_limits
    except ImportError:
        return contextlib.nullcontext()
    return threadpool_limits(limits=1, user_api="blas")


def relax_structure(
    atoms: Atoms, calculator: str | AseCalculator, fmax: float = 0.005, steps: int = 1000
) -> Atoms:
    """The MDR protocol: FIRE on positions and cell (FrechetCellFilter) keeping the space group."""
    from ase.constraints import FixSymmetry
    from ase.filters import FrechetCellFilter
    from ase.optimize import FIRE

    relaxed = atoms.copy()
    relaxed.calc = resolve_calculator(calculator)
    relaxed.set_constraint(FixSymmetry(relaxed))
    # The cell filter does thousands of 3×3 solves (expm_frechet); multithreaded
    # OpenBLAS on busy shared cores made them ~15× slower.  Only numpy/scipy's BLAS
    # is limited: torch threads through its own OpenMP.
    with _single_threaded_blas():
        FIRE(FrechetCellFilter(relaxed), logfile=None).run(fmax=fmax, steps=steps)
    relaxed.set_constraint()
    out = relaxed.copy()  # drop the calculator: Atoms in, Atoms out
    return out


# ---------------------------------------------------------------- force constants
@contextlib.contextmanager
def quiet_auto_primitive() -> Iterator[None]:
    """Phonopy 4 warns whenever primitive_matrix='auto' finds a non-identity matrix; here 'auto' is a choice."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="primitive_matrix defaulted")
        yield


def build_phonopy(
    atoms: Atoms | PhonopyAtoms,
    supercell: int | Sequence[int] | Sequence[Sequence[int]] = 2,
    primitive: str | np.ndarray | None = "auto",
    symprec: float = 1e-5,
) -> Phonopy:
    unit = atoms if isinstance(atoms, PhonopyAtoms) else to_phonopy_atoms(atoms)
    with quiet_auto_primitive():
        return Phonopy(unit, supercell_matrix=supercell_matrix(supercell), primitive_matrix=primitive, symprec=symprec)


def _is_random_dataset(dataset: dict | None) -> bool:
    # Type-2 data sets (random displacements) store arrays, not per-atom entries:
    # they need a fitting force-constant solver (symfc) rather than phonopy's default.
    return bool(dataset) and "first_atoms" not in dataset and "displacements" in dataset


def set_forces_and_fc(ph: Phonopy, forces: np.ndarray, fc_calculator: str | None = None) -> Phonopy:
    ph.forces = forces
    if fc_calculator is None and _is_random_dataset(ph.dataset):
        fc_calculator = "symfc"
    # Compact force constants (n_prim, n_super, 3, 3): the 216–768-atom reference
    # supercells would otherwise spend most of their time building the full array.
    ph.produce_force_constants(fc_calculator=fc_calculator, calculate_full_force_constants=False, show_drift=False)
    if fc_calculator in (None, "traditional"):
        # The MDR protocol symmetrises force constants (translational invariance,
        # index permutation); symfc's fit is symmetric already.
        ph.symmetrize_force_constants()
    return ph


def displaced_forces(ph: Phonopy, calc: AseCalculator, subtract_residual: bool = True) -> np.ndarray:
    """Model forces on ph's displaced supercells.

    Forces of the undisplaced supercell are subtracted: off the model's own
    minimum (e.g. at the DFT geometry) they are not zero, and with 0.01 Å
    displacements a 0.01 eV/Å residual would be a 1 eV/Å² error in the force constants.
    """
    cells = [to_ase_atoms(c) for c in ph.supercells_with_displacements]
    forces = compute_forces(cells, calc)
    if subtract_residual:
        forces = forces - compute_forces([to_ase_atoms(ph.supercell)], calc)[0]
    return forces


def phonopy_from_calculator(
    atoms: Atoms,
    calculator: str | AseCalculator,
    supercell: int | Sequence[int] | Sequence[Sequence[int]] = 2,
    *,
    distance: float = 0.01,
    method: str = "auto",
    primitive: str | np.ndarray | None = "auto",
    subtract_residual: bool = True,
    plusminus: bool | str = "auto",
) -> Phonopy:
    """A Phonopy object with force constants from the calculator.

    method: "displacement" (phonopy finite displacements of `distance` Å),
    "hessian" (the calculator's own Hessian of the perfect supercell: almd's
    autodiff `get_hessian` or matscipy's analytic one), "auto" (the Hessian only
    when it is analytic and cheap; autodiff Hessians of large supercells cost
    3N Hessian-vector products, more than a handful of displacements),
    "hvp" (phonopy's displacements with forces −H·u from the calculator's
    `get_hessian_vector_products`: exact harmonic forces, one product each.
    It can matter: SevenNet-0's energy surface of Si at a = 5.43 Å is not
    quadratic on the 0.01 Å scale — 0.01 Å central differences differ from its
    exact Hessian by 0.16 eV/Å² (1.7 %) — although at PBE's 5.466 Å by only 0.001).
    plusminus: phonopy's choice ("auto": −u only where symmetry cannot supply
    it); True forces central differences at twice the cost.
    """
    calc = resolve_calculator(calculator)
    ph = build_phonopy(atoms, supercell, primitive)
    if method not in ("auto", "hessian", "hvp", "displacement"):
        raise ValueError(f"method must be auto, hessian, hvp or displacement, got {method!r}")
    if method == "hessian" and not has_hessian(calc):
        raise ValueError(f"{calculator_label(calculator)} has no Hessian; use method='displacement'")
    if method == "hvp" and not has_hvp(calc):
        raise ValueError(f"{calculator_label(calculator)} has no Hessian-vector products; use method='displacement'")
    use_hessian = method == "hessian" or (method == "auto" and has_analytic_hessian(calc))
    if use_hessian:
        ph.force_constants = force_constants_from_hessian(get_hessian(calc, to_ase_atoms(ph.supercell)))
        return ph
    ph.generate_displacements(distance=distance, is_plusminus=plusminus)
    if method == "hvp":
        # exact harmonic forces -H·u of phonopy's symmetry-reduced displacements:
        # one Hessian-vector product each, no finite-difference error
        return set_forces_and_fc(ph, hvp_forces(ph, calc))
    return set_forces_and_fc(ph, displaced_forces(ph, calc, subtract_residual))


def has_hvp(calc: AseCalculator) -> bool:
    return isinstance(calc, HessianVectorCalculator)


def hvp_forces(ph: Phonopy, calc: AseCalculator) -> np.ndarray:
    """Forces -H·u of ph's displacements from the calculator's Hessian-vector products."""
    perfect = to_ase_atoms(ph.supercell)
    us = np.array([c.positions - ph.supercell.positions for c in ph.supercells_with_displacements])
    us = minimum_image(us, ph.supercell.cell)
    return -calc.get_hessian_vector_products(perfect, us)


def phonopy_on_dataset(
    reference: Phonopy,
    calculator: str | AseCalculator,
    subtract_residual: bool = True,
    method: str = "displacement",
) -> Phonopy:
    """The model on exactly the reference's supercell and displacement set.

    method "displacement": the model's forces on the displaced supercells (what
    the DFT did); "hvp": exact harmonic forces −H·u for the same displacements.
    """
    calc = resolve_calculator(calculator)
    if method not in ("displacement", "hvp"):
        raise ValueError(f"method must be displacement or hvp, got {method!r}")
    if method == "hvp" and not has_hvp(calc):
        raise ValueError(f"{calculator_label(calculator)} has no Hessian-vector products")
    # A shallow copy shares the cells and the symmetry search (15–30 s for the
    # 512-atom reference supercells); everything the model changes — data set,
    # forces, force constants, dynamical matrix — is replaced, not mutated.
    ph = copy.copy(reference)
    dataset = {k: v for k, v in reference.dataset.items() if k not in ("forces", "supercell_energies")}
    if "first_atoms" in dataset:
        dataset["first_atoms"] = [{k: v for k, v in d.items() if k != "forces"} for d in dataset["first_atoms"]]
    ph.dataset = copy.deepcopy(dataset)
    # Born charges and ε∞ (if any) stay the reference's: they are electronic and a
    # force field cannot supply them.
    forces = hvp_forces(ph, calc) if method == "hvp" else displaced_forces(ph, calc, subtract_residual)
    return set_forces_and_fc(ph, forces)


# ---------------------------------------------------------------- results
@dataclass
class PhononResult:
    """Harmonic phonon properties of one structure with one calculator (or DFT)."""

    label: str
    formula: str
    n_atoms_primitive: int
    supercell_matrix: list[list[int]]
    qpoints: dict[str, list[float]]
    frequencies_thz: dict[str, list[float]]
    omega_max_thz: float
    omega_max_K: float
    omega_min_thz: float
    mesh: list[int]
    temperatures_K: list[float]
    free_energy_kJ_mol: list[float]
    entropy_J_K_mol: list[float]
    heat_capacity_J_K_mol: list[float]
    thermal_300K: dict[str, float]
    band: dict[str, Any]
    dos: dict[str, list[float]]
    units: dict[str, str] = field(default_factory=lambda: dict(UNITS))
    kappa_300K_W_mK: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    # Kept for plots and like-for-like comparison; not serialised.
    phonopy: Phonopy | None = field(default=None, repr=False, compare=False)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready fields (the Phonopy object is left out)."""
        plain = {k: v for k, v in self.__dict__.items() if k != "phonopy"}
        return json.loads(json.dumps(plain, default=_json_default))

    def to_json(self, path: str | Path | None = None, indent: int = 1) -> str:
        text = json.dumps(self.to_dict(), indent=indent)
        if path is not None:
            atomic_write(Path(path), text)
        return text

    @classmethod
    def from_json(cls, source: str | Path) -> "PhononResult":
        """Read back a result written by to_json (a path or the JSON text); no Phonopy object."""
        text = Path(source).read_text() if not str(source).lstrip().startswith("{") else str(source)
        d = json.loads(text)
        return cls(**{k: v for k, v in d.items() if k in cls.__dataclass_fields__})


def _json_default(o: Any) -> Any:
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def _at_temperature(temps: np.ndarray, values: np.ndarray, t: float) -> float:
    return float(np.interp(t, temps, values))


def analyse(
    ph: Phonopy,
    label: str = "",
    *,
    mesh: float | Sequence[int] = 100.0,
    temperatures: Sequence[float] = DEFAULT_TEMPERATURES,
    qpoints: dict[str, list[float]] | None = None,
    path: list[list[str]] | None = None,
    band_npoints: int = 41,
) -> PhononResult:
    """Frequencies at named q-points, bands, DOS, ω_max and thermal properties of a Phonopy object with fc."""
    prim = ph.primitive
    if qpoints is None or path is None:
        auto_points, auto_path = high_symmetry_path(prim.cell, prim.scaled_positions, prim.numbers)
        qpoints = qpoints or auto_points
        path = path or auto_path
    names = list(qpoints)
    ph.run_qpoints([qpoints[n] for n in names])
    freqs = ph.qpoints.frequencies

    bands, labels = path_qpoints(qpoints, path, band_npoints)
    ph.run_band_structure(bands)
    band = {
        "segments": [list(lab) for lab in labels],
        "qpoints": [b.tolist() for b in bands],
        "distances": [d.tolist() for d in ph.band_structure.distances],
        "frequencies_thz": [f.tolist() for f in ph.band_structure.frequencies],
    }

    temps = np.array(sorted(set(float(t) for t in temperatures) | {300.0}))
    ph.run_mesh(mesh, is_gamma_center=True)
    mesh_freqs = ph.mesh.frequencies
    with warnings.catch_warnings():
        # phonopy warns that the three zero acoustic modes at Γ enter the sums; their
        # contribution is what the MDR and chalcogenide references include too.
        warnings.simplefilter("ignore")
        ph.run_thermal_properties(temperatures=temps)
    tp = ph.thermal_properties
    ph.run_total_dos()
    dos = ph.total_dos

    omega_max = float(np.max(mesh_freqs))
    result = PhononResult(
        label=label,
        formula=to_ase_atoms(prim).get_chemical_formula(),
        n_atoms_primitive=len(prim),
        supercell_matrix=np.asarray(ph.supercell_matrix).tolist(),
        qpoints={n: np.round(qpoints[n], 10).tolist() for n in names},
        frequencies_thz={n: np.round(f, 6).tolist() for n, f in zip(names, freqs)},
        omega_max_thz=omega_max,
        omega_max_K=omega_max * THZ_TO_K,
        omega_min_thz=float(np.min(mesh_freqs)),
        mesh=[int(x) for x in ph.mesh_numbers],
        temperatures_K=temps.tolist(),
        free_energy_kJ_mol=tp.free_energy.tolist(),
        entropy_J_K_mol=tp.entropy.tolist(),
        heat_capacity_J_K_mol=tp.heat_capacity.tolist(),
        thermal_300K={
            "F_kJ_mol": _at_temperature(temps, tp.free_energy, 300.0),
            "S_J_K_mol": _at_temperature(temps, tp.entropy, 300.0),
            "Cv_J_K_mol": _at_temperature(temps, tp.heat_capacity, 300.0),
        },
        band=band,
        dos={"frequency_thz": dos.frequency_points.tolist(), "dos": dos.dos.tolist()},
        phonopy=ph,
    )
    return result


def phonons(
    atoms: Atoms,
    calculator: str | AseCalculator,
    supercell: int | Sequence[int] | Sequence[Sequence[int]] = 2,
    *,
    relax: bool = False,
    fmax: float = 0.005,
    distance: float = 0.01,
    method: str = "auto",
    plusminus: bool | str = "auto",
    primitive: str | np.ndarray | None = "auto",
    mesh: float | Sequence[int] = 100.0,
    temperatures: Sequence[float] = DEFAULT_TEMPERATURES,
) -> PhononResult:
    """Phonons of `atoms` with `calculator` (an ASE calculator or a name for resolve_calculator)."""
    calc = resolve_calculator(calculator)
    if relax:
        atoms = relax_structure(atoms, calc, fmax=fmax)
    ph = phonopy_from_calculator(atoms, calc, supercell, distance=distance, method=method, primitive=primitive,
                                 plusminus=plusminus)
    result = analyse(ph, calculator_label(calculator), mesh=mesh, temperatures=temperatures)
    used = "hessian" if ph.dataset is None else ("hvp" if method == "hvp" else "displacement")
    result.extra.update({"relaxed": relax, "method": used})
    return result
