"""Phonon labels made by the campaign itself: finite displacements of its start structure.

At bootstrap the start structure's unit cell and the campaign's supercell go to
phonopy, which picks its symmetry-reduced single-atom displacements (one for
diamond Si). The reference labels each displaced supercell (they count as
reference calls and are stored in ``labels.db`` with ``source = "phonon"``); the
forces make the reference's force constants, kept as a phonopy file
``OUTPUT/phonons/phonopy_params.yaml``. That file is a phonon set like any other:
every fine-tune round draws Hessian columns of its perfect supercell (PFT,
:func:`almd.finetune.data.load_phonon`), and the summary compares the base
model's and the final model's phonons with it (ω_max, F, S, C_V at 300 K, band
and Brillouin-zone MAE).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import numpy as np
from ase import Atoms
from ase.calculators.calculator import Calculator as AseCalculator

from almd.campaign.config import CampaignConfig, unit_structure

if TYPE_CHECKING:
    from almd.campaign.loop import Campaign

__all__ = ["PHONON_FILE", "PHONON_METRICS", "bootstrap_phonons", "displacement_set", "phonon_errors", "phonon_labels"]

#: the reference's phonon set, relative to the run directory
PHONON_FILE = Path("phonons") / "phonopy_params.yaml"
#: the errors a summary reports (keys of almd.phonons.reference.compare)
PHONON_METRICS = ("omega_max_K_abs_error", "F_kJ_mol_abs_error", "S_J_K_mol_abs_error",
                  "Cv_J_K_mol_abs_error", "band_mae_thz", "bz_mae_thz")


def displacement_set(config: CampaignConfig) -> Any:
    """Phonopy with the symmetry-reduced displacements of the campaign's supercell (no forces yet)."""
    from almd.phonons.harmonic import build_phonopy

    s = config.system
    ph = build_phonopy(unit_structure(config), s.supercell * 3 if len(s.supercell) == 1 else s.supercell)
    ph.generate_displacements(distance=config.learning.phonon_distance)
    return ph


def phonon_labels(config: CampaignConfig, output: Path, label: Callable[[list[Atoms]], list[Atoms]],
                  keep: list[Atoms] | None = None) -> Path | None:
    """Label the displaced supercells with ``label`` (the campaign's labeller, which stores
    each outcome) and write the reference's phonon set; None if a calculation failed
    (recorded in the database: the campaign then learns without phonon labels).
    ``keep``: a list that receives the labelled cells (the perfect one first).
    """
    from almd.phonons.harmonic import to_ase_atoms

    ph = displacement_set(config)
    cells = [to_ase_atoms(ph.supercell)] + [to_ase_atoms(c) for c in ph.supercells_with_displacements]
    labelled = label(cells)
    if len(labelled) != len(cells):
        return None
    if keep is not None:
        keep.extend(labelled)
    forces = np.array([a.get_forces() for a in labelled])
    ph.forces = forces[1:] - forces[0]  # the perfect cell's residual force is not a force constant
    path = output / PHONON_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.yaml")
    ph.save(str(tmp), settings={"force_sets": True, "displacements": True, "force_constants": False})
    tmp.replace(path)  # whole or absent: a resumed run that finds it can use it
    return path


def phonon_errors(path: str | Path, calculator: AseCalculator, name: str | None = None) -> dict[str, float]:
    """Errors of ``calculator``'s phonons against the reference set at ``path`` (on its own
    displacements; units: K, kJ/mol, J/K/mol per mole of primitive cells, THz).

    ``name``: also keep the bands and DOS of the model and the reference beside ``path``
    (``name.json``, ``reference.json``) for ``almd report``'s phonon plot.
    """
    from almd.phonons.reference import phonons_vs_reference

    model, reference, errors = phonons_vs_reference(str(path), calculator)
    if name is not None:
        model.label, reference.label = f"{name} model", "reference"
        model.to_json(Path(path).parent / f"{name}.json")
        reference.to_json(Path(path).parent / "reference.json")
    return {k: float(errors[k]) for k in PHONON_METRICS if k in errors}


def bootstrap_phonons(campaign: Campaign) -> tuple[dict[str, Any], list[Atoms]]:
    """The campaign's phonon labels (stored, kept as a phonopy file) and the base model's errors
    against them, for ``campaign.json`` (empty if a reference calculation failed), and the
    labelled cells (the perfect supercell first; empty if one failed).
    """
    from almd.potentials.calculator import Calculator

    def label(cells: list[Atoms]) -> list[Atoms]:
        return campaign._label(cells, walker=-1, step=0, reason="phonon", splits=["phonon"] * len(cells))

    cells: list[Atoms] = []
    path = phonon_labels(campaign.config, campaign.output, label, keep=cells)
    if path is None:
        return {}, []
    model = campaign.config.model
    with campaign._timed("phonons"):
        base = phonon_errors(path, Calculator(model.backbone, dtype=model.dtype), name="base")
    return {"file": str(PHONON_FILE), "base": base}, cells
