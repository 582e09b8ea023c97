"""``almd finetune --phonon DATASET``: the default phonon fine-tune of one material, no tuning.

The recipe (``almd/data/phonon_recipe.toml``) trains SevenNet-0 on the data set's DFT
Hessian (PFT: random Hessian columns with zero forces and stress at the DFT geometry),
validated on fixed held-out columns, for a wall-time budget. By default the data's force
constants are folded onto a smaller commensurate supercell (:func:`auto_fold`): a label
of the same force constants at the small cell's q-points, at a fraction of the cost per
column. The kept model is the best on the validation columns (fixed before the run).
Afterwards the phonons of the base and the kept model are compared with the data set's
own (its displacements, at the DFT geometry): ``OUTPUT/phonon_report.json``. With ``kappa``
(a phono3py data set) the report also gives κ(300 K) of the data, the base and the kept model,
each from its own forces on the data's displaced supercells (phono3py, RTA).
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np

from almd.finetune.config import FinetuneConfig

if TYPE_CHECKING:
    from almd.phonons.reference import PhononReference

__all__ = ["RECIPE", "auto_fold", "kappa_300K", "phonon_recipe", "run_phonon_recipe"]

#: the recipe's settings file (copy it to change them)
RECIPE = Path(__file__).resolve().parent.parent / "data" / "phonon_recipe.toml"
#: the errors the report gives (keys of almd.phonons.reference.compare)
METRICS = ("omega_max_K_abs_error", "omega_max_thz_abs_error", "F_kJ_mol_abs_error", "S_J_K_mol_abs_error", "Cv_J_K_mol_abs_error",
           "band_mae_thz", "bz_mae_thz")


def auto_fold(dataset: str | Path) -> list[int]:
    """The small supercell the recipe folds onto: each direction of a diagonal data supercell
    halved where it is even (4×4×4 → 2×2×2: 8× fewer atoms per column), kept where it is odd.

    Returns [] (no fold) for a non-diagonal supercell or when nothing halves.
    """
    from almd.finetune.data import DataError, _phonon_file
    from almd.phonons.datasets import load_phonon_dataset

    path = Path(dataset)
    if not path.exists():
        raise DataError(f"phonon data not found: {path}")
    matrix = np.asarray(load_phonon_dataset(_phonon_file(path)).supercell_matrix, dtype=int)
    if np.count_nonzero(matrix - np.diag(np.diag(matrix))):
        return []
    diagonal = [int(n) for n in np.diag(matrix)]
    small = [n // 2 if n % 2 == 0 else n for n in diagonal]
    return [] if small == diagonal else small


def phonon_recipe(dataset: str | Path, budget: float, output: str | Path,
                  fold: str | Sequence[int] = "auto", steps: int | None = None,
                  seed: int | None = None) -> FinetuneConfig:
    """The recipe's settings for ``dataset`` (phonopy / phono3py yaml or folder).

    Parameters
    ----------
    budget : float
        Wall time of the training in s (> 0).
    fold : "auto", "none" or 3 ints
        The supercell of the data set's unit cell the labels are folded onto (see :func:`auto_fold`).
    steps : int, optional
        The most training steps (the recipe's own: more than the budget allows).
    seed : int, optional
        The seed of the column draws (the recipe's own: 0).
    """
    from almd.settings import bad

    if not budget > 0:
        raise bad("--budget", budget, "minutes > 0")
    if isinstance(fold, str):
        if fold not in ("auto", "none"):
            raise bad("--fold", fold, "auto, none or three integers n1,n2,n3")
        fold = auto_fold(dataset) if fold == "auto" else []
    cfg = FinetuneConfig.from_toml(RECIPE)
    cfg = dataclasses.replace(
        cfg, data=dataclasses.replace(cfg.data, phonon=[str(dataset)], phonon_fold=list(fold)),
        run=dataclasses.replace(cfg.run, budget=float(budget), output=str(output),
                                steps=cfg.run.steps if steps is None else steps,
                                seed=cfg.run.seed if seed is None else seed))
    cfg.validate()
    return cfg


def phonon_errors(dataset: str | Path | PhononReference, model: Any) -> dict[str, float]:
    """A model's phonon errors against ``dataset`` (its own displacements; K, kJ/mol, J/K/mol, THz)."""
    from almd.phonons.reference import phonons_vs_reference
    from almd.potentials.calculator import Calculator

    _, _, errors = phonons_vs_reference(dataset, Calculator(model))
    return {k: float(errors[k]) for k in METRICS if k in errors}


def kappa_300K(reference: PhononReference, model: Any | None, mesh: Sequence[int]) -> float:
    """κ(300 K) in W/m·K from a model's forces (None: the data's own) on the data's third-order supercells."""
    from almd.phonons.kappa import kappa
    from almd.potentials.calculator import Calculator

    return kappa(reference, None if model is None else Calculator(model), mesh=mesh).kappa_300K_W_mK


def run_phonon_recipe(dataset: str | Path, budget: float, output: str | Path,
                      fold: str | Sequence[int] = "auto", steps: int | None = None,
                      kappa_mesh: Sequence[int] | None = None, seed: int | None = None) -> dict[str, Any]:
    """Fine-tune on ``dataset`` with the recipe, then report the phonon errors of the base and
    the kept model (written to ``OUTPUT/phonon_report.json`` and returned).

    ``kappa_mesh`` (3 ints): also κ(300 K) on that q-mesh, of the data, the base and the kept
    model (``kappa_300K_W_mK``); the data set must hold phono3py's third-order displacements.
    """
    from almd.finetune.trainer import Finetuner
    from almd.io import atomic_write
    from almd.phonons.reference import as_reference
    from almd.settings import bad

    cfg = phonon_recipe(dataset, budget, output, fold, steps, seed)
    reference = as_reference(str(dataset))  # read once: the errors and every κ are computed on it
    # before the training: a data set without fc3 data cannot give κ
    if kappa_mesh is not None and (len(kappa_mesh) != 3 or min(kappa_mesh) < 1):
        raise bad("--kappa", list(kappa_mesh), "three positive ints (the q-mesh)")
    if kappa_mesh is not None and reference.phono3py is None:
        raise bad("--kappa", str(dataset), "a phono3py data set (its third-order displacements and forces)")
    start = time.perf_counter()
    result = Finetuner(cfg).fit()
    trained = time.perf_counter() - start
    report = {"dataset": str(dataset), "fold": cfg.data.phonon_fold, "budget_s": cfg.run.budget, "seed": cfg.run.seed,
              "train_s": round(trained, 1), "steps": result.steps_done, "best_step": result.best_step,
              "stop_reason": result.stop_reason, "model": str(result.model_path),
              "validation": {"before": result.initial_validation, "best": result.best_validation},
              "base": phonon_errors(reference, cfg.model.name),
              "final": phonon_errors(reference, str(result.model_path))}
    if kappa_mesh is not None:
        report["kappa_mesh"] = list(kappa_mesh)
        report["kappa_300K_W_mK"] = {name: kappa_300K(reference, model, kappa_mesh) for name, model in
                                     (("data", None), ("base", cfg.model.name), ("final", str(result.model_path)))}
    atomic_write(Path(output) / "phonon_report.json", json.dumps(report, indent=1))
    return report
