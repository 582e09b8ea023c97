"""Reference phonon data sets (DFT forces on displaced supercells) and comparisons.

Three layouts are understood, as shipped in ../shared/data/dft/:
  * phonopy.yaml(.xz) with a displacement data set and forces (chalcogenides-pbe);
  * phono3py_disp.yaml + FORCES_FC3 (si-pbe), one folder;
  * phono3py_params_*.yaml(.xz) with random displacements (nacl-rd), fitted by symfc.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from ase import Atoms
from ase.calculators.calculator import Calculator as AseCalculator
from phonopy import Phonopy

from almd.phonons._calculators import calculator_label, cutoff_margin, model_cutoff, resolve_calculator
from almd.phonons.harmonic import (
    DEFAULT_TEMPERATURES,
    THZ_TO_K,
    PhononResult,
    analyse,
    build_phonopy,
    displaced_forces,
    hvp_forces,
    phonopy_on_dataset,
    relax_structure,
    set_forces_and_fc,
    to_ase_atoms,
)


@dataclass
class PhononReference:
    """A displacement data set with reference forces: harmonic part, and third order if present."""

    path: str
    phonopy: Phonopy  # DFT fc2 produced, dataset with forces kept
    phono3py: Any = None  # phono3py.Phono3py with the fc3 data set (fc3 not produced until needed)

    @property
    def atoms(self) -> Atoms:
        """The reference unit cell as ASE Atoms."""
        return to_ase_atoms(self.phonopy.unitcell)

    @property
    def supercell_matrix(self) -> np.ndarray:
        return np.asarray(self.phonopy.supercell_matrix)

    def result(self, **analyse_kwargs: Any) -> PhononResult:
        """The reference's own phonon properties (bands, DOS, thermal, ω_max)."""
        return analyse(self.phonopy, f"reference:{Path(self.path).name}", **analyse_kwargs)


def _find_file(folder: Path) -> Path:
    for pattern in ("phono3py_disp.yaml", "phono3py_params*.yaml*", "phono3py*.yaml*", "phonopy_params*.yaml*", "*phonopy*.yaml*"):
        hits = sorted(folder.glob(pattern))
        if hits:
            return hits[0]
    raise FileNotFoundError(f"no phonopy/phono3py data set in {folder}")


def _harmonic_from_phono3py(ph3: Any) -> Phonopy:
    """A Phonopy object holding the fc2 data set of a phono3py data set."""
    if ph3.phonon_supercell_matrix is not None and ph3.phonon_dataset is not None:
        sc, dataset = ph3.phonon_supercell_matrix, copy.deepcopy(ph3.phonon_dataset)
    else:
        sc, dataset = ph3.supercell_matrix, copy.deepcopy(ph3.dataset)
        if "first_atoms" in dataset:
            # fc2 needs only the single displacements; drop the pairs
            dataset["first_atoms"] = [{k: v for k, v in d.items() if k != "second_atoms"} for d in dataset["first_atoms"]]
    ph = Phonopy(ph3.unitcell, supercell_matrix=sc, primitive_matrix=ph3.primitive_matrix, symprec=ph3.symmetry.tolerance)
    ph.dataset = dataset
    if ph3.nac_params is not None:
        ph.nac_params = ph3.nac_params
    forces = ph.forces  # set_forces_and_fc re-sets them: the same path as the model's
    return set_forces_and_fc(ph, forces)


def load_reference(path: str | Path) -> PhononReference:
    """Load a phonopy or phono3py data set with reference forces (file or folder)."""
    path = Path(path)
    file = _find_file(path) if path.is_dir() else path
    if not file.exists():
        raise FileNotFoundError(f"{file}: no such phonon data set (phonopy.yaml, phono3py_disp.yaml or a folder)")
    if "phono3py" in file.name:
        import phono3py

        forces = file.parent / "FORCES_FC3"
        ph3 = phono3py.load(
            file,
            forces_fc3_filename=forces if forces.exists() else None,
            produce_fc=False,
            log_level=0,
        )
        if ph3.forces is None:
            raise ReferenceDataError(f"{file}: a displacement data set without forces (no FORCES_FC3 beside it)")
        return PhononReference(str(file), _harmonic_from_phono3py(ph3), ph3)
    import phonopy

    # Force constants through the same path as the model's (traditional
    # symmetrisation); phonopy.load's symfc projector takes ~30 s per 512-atom cell.
    ph = phonopy.load(file, produce_fc=False, log_level=0)
    try:
        forces = ph.forces
    except RuntimeError:  # phonopy: "forces is not found in displacement-force dataset"
        forces = None
    if forces is None:
        raise ReferenceDataError(f"{file}: a displacement data set without forces; a reference needs the "
                                 "forces of its displaced supercells (phonopy -f, or phonopy.yaml with forces)")
    return PhononReference(str(file), set_forces_and_fc(ph, forces))


class ReferenceDataError(ValueError):
    """A phonon data set that cannot serve as a reference (no forces, unreadable)."""


def as_reference(ref: str | Path | PhononReference) -> PhononReference:
    return ref if isinstance(ref, PhononReference) else load_reference(ref)


def phonons_vs_reference(
    reference: str | Path | PhononReference,
    calculator: str | AseCalculator,
    *,
    relax: bool = False,
    fmax: float = 0.005,
    distance: float = 0.01,
    method: str = "displacement",
    mesh: float | Sequence[int] = 100.0,
    temperatures: Sequence[float] = DEFAULT_TEMPERATURES,
) -> tuple[PhononResult, PhononResult, dict[str, Any]]:
    """(model, reference, comparison) on the reference's structure and supercell.

    Default: the model's forces on the reference's own displaced supercells.
    relax=True is the MDR protocol: relax with the model (symmetry kept), then
    new `distance` Å displacements on the same supercell matrix.
    method="hvp" replaces the model's finite-difference forces by exact −H·u.
    """
    ref = as_reference(reference)
    calc = resolve_calculator(calculator)
    ref_result = ref.result(mesh=mesh, temperatures=temperatures)
    if relax:
        atoms = relax_structure(ref.atoms, calc, fmax=fmax)
        ph = build_phonopy(atoms, ref.supercell_matrix, ref.phonopy.primitive_matrix)
        ph.generate_displacements(distance=distance)
        set_forces_and_fc(ph, hvp_forces(ph, calc) if method == "hvp" else displaced_forces(ph, calc))
        if ref.phonopy.nac_params is not None:
            ph.nac_params = ref.phonopy.nac_params
    else:
        ph = phonopy_on_dataset(ref.phonopy, calc, method=method)
    # Same named points, band path and mesh as the reference, for a like-for-like comparison.
    model = analyse(
        ph,
        calculator_label(calculator),
        mesh=ref_result.mesh,
        temperatures=temperatures,
        qpoints=ref_result.qpoints,
        path=_path_from_segments(ref_result.band["segments"]),
    )
    model.extra["relaxed"] = relax
    model.extra["method"] = method
    model.extra["volume_per_atom"] = float(np.linalg.det(ph.unitcell.cell)) / len(ph.unitcell)
    rc = model_cutoff(calc)
    if rc is not None:
        model.extra["cutoff_margin_A"] = cutoff_margin(to_ase_atoms(ph.unitcell), rc)
    return model, ref_result, compare(model, ref_result)


def _path_from_segments(segments: list[list[str]]) -> list[list[str]]:
    path: list[list[str]] = []
    for a, b in segments:
        if path and path[-1][-1] == a:
            path[-1].append(b)
        else:
            path.append([a, b])
    return path


def _mesh_frequencies(result: PhononResult, mesh: Sequence[int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(irreducible q-points, weights, frequencies) of result on a Γ-centred mesh."""
    ph = result.phonopy
    ph.run_mesh(list(mesh), is_gamma_center=True)
    return ph.mesh.qpoints, ph.mesh.weights, ph.mesh.frequencies


def _frequencies_at(result: PhononResult, qpoints: np.ndarray) -> np.ndarray:
    result.phonopy.run_qpoints(qpoints)
    return result.phonopy.qpoints.frequencies


def compare(result: PhononResult, reference: PhononResult) -> dict[str, Any]:
    """Errors of `result` against `reference` (MDR metrics at 300 K plus frequency MAEs).

    Absolute errors per structure: ω_max in K and THz, F (kJ/mol), S and C_V
    (J/K/mol) per mole of primitive cells; band MAE along the reference's path and
    BZ MAE on the reference's mesh (weighted), both in THz and mode by mode
    (frequencies sorted at each q).  Signed differences are model − reference.
    """
    out: dict[str, Any] = {"units": "THz, K, kJ/mol, J/K/mol (per mole of primitive cells)"}
    out["omega_max_K_abs_error"] = abs(result.omega_max_K - reference.omega_max_K)
    out["omega_max_thz_abs_error"] = abs(result.omega_max_thz - reference.omega_max_thz)
    for key in ("F_kJ_mol", "S_J_K_mol", "Cv_J_K_mol"):
        diff = result.thermal_300K[key] - reference.thermal_300K[key]
        out[f"{key}_abs_error"] = abs(diff)
        out[f"{key}_signed_error"] = diff
    out["frequencies_thz_abs_error"] = {
        name: float(np.mean(np.abs(np.subtract(result.frequencies_thz[name], f))))
        for name, f in reference.frequencies_thz.items()
        if name in result.frequencies_thz
    }
    if result.phonopy is not None and reference.phonopy is not None:
        q, w, f_ref = _mesh_frequencies(reference, reference.mesh)
        f_mod = _frequencies_at(result, q)
        err = np.abs(f_mod - f_ref).mean(axis=1)
        out["bz_mae_thz"] = float(np.sum(w * err) / np.sum(w))
        out["bz_mean_shift_thz"] = float(np.sum(w * (f_mod - f_ref).mean(axis=1)) / np.sum(w))
        qb = np.concatenate([np.asarray(b) for b in reference.band["qpoints"]])
        out["band_mae_thz"] = float(np.mean(np.abs(_frequencies_at(result, qb) - _frequencies_at(reference, qb))))
    else:  # results read back from JSON: stored band frequencies on the same path
        fb_m = np.concatenate([np.asarray(f) for f in result.band["frequencies_thz"]])
        fb_r = np.concatenate([np.asarray(f) for f in reference.band["frequencies_thz"]])
        if fb_m.shape == fb_r.shape:
            out["band_mae_thz"] = float(np.mean(np.abs(fb_m - fb_r)))
    return out


__all__ = ["PhononReference", "ReferenceDataError", "load_reference", "as_reference", "phonons_vs_reference", "compare", "THZ_TO_K"]
