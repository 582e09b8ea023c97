"""The Bayesian lattice-dynamics model as a campaign model (``[model] kind = "lattice-dynamics"``).

The walkers run the posterior mean of a
:class:`~almd.uncertainty.bayes.BayesianForceConstantModel` fitted on the campaign's
labels (BayLMD, methods.md §3). Each frame is scored by the model's *predictive* force
error, per component

    σ² = (Φ S Φᵀ)ᵢᵢ + 1/β        (parameter uncertainty + the misfit the evidence fit estimates)

times a calibration scale s, reduced over atoms as the ensemble's calibrated spread is
(rms, mean or max of the per-atom s·√(mean over x, y, z of σ²)). It estimates the force
error in eV/Å, so the trigger's ``target`` means what it means for the ensemble, and a
model whose misfit lies above the target cannot converge. The evidence fit's 1/β is the
misfit *of the training data*: a model trained on small rattles is over-confident in
hotter MD. The held-out labels (the initial calibration frames and the audits) fit
s² = Σ err² / Σ σ² (never below 1: the posterior is not made more confident than it
is), so a failed audit raises the score, and learning resumes. The sub-block test of convergence uses the
parameter part alone (:mod:`almd.uncertainty.bayes_convergence`): it asks whether more
data would change the model, which the misfit does not answer.

The model is a function of its training structures and settings: its file holds those,
and loading it refits, bit for bit.
"""

from __future__ import annotations

import io
import json
import os
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
from ase import Atoms
from ase.calculators.calculator import all_changes

from almd.io import atomic_write_bytes
from almd.structures import minimum_image
from almd.uncertainty.bayes import BayesianForceConstantModel, EvidenceFit, RefittedModelCalculator
from almd.uncertainty.calibration import reduce_atoms

__all__ = ["LatticeDynamicsCalculator", "LatticeDynamicsModel", "SiteMatchError"]

#: the file format tag of :meth:`LatticeDynamicsModel.save`
FORMAT = "almd-lattice-dynamics-1"


class SiteMatchError(ValueError):
    """The atoms are not a displaced copy of the model's ideal supercell (no one-to-one match)."""


def _atoms_arrays(atoms: Atoms) -> dict[str, np.ndarray]:
    return {"numbers": atoms.numbers, "positions": atoms.positions, "cell": np.asarray(atoms.cell)}


class LatticeDynamicsModel:
    """A force-constant expansion of one supercell, with the campaign model's interface.

    Parameters
    ----------
    unit : Atoms
        The crystal's unit (or primitive) cell; hiphive finds the primitive cell.
    ideal : Atoms
        The ideal supercell the walkers move in (a repeat of ``unit``).
    cutoffs : sequence of float
        Cluster cutoffs in Å for orders 2, 3, … (hiphive's convention).
    score : str
        Reduction over atoms of the per-atom predictive error: rms, mean or max.
    """

    FILE_NAME = ("lattice-dynamics", ".npz")  #: stem and suffix of its checkpoint files

    def __init__(self, unit: Atoms, ideal: Atoms, cutoffs: Sequence[float], score: str = "rms") -> None:
        self.unit, self.ideal = unit.copy(), ideal.copy()
        self.cutoffs = [float(c) for c in cutoffs]
        self.score = score
        self.bayes = BayesianForceConstantModel(self.unit, self.cutoffs, supercell=self.ideal)
        self.trained: list[Atoms] = []  #: training structures in the order learnt (with forces)
        self.held_out: list[Atoms] = []  #: labels the calibration scale is fitted on (never trained on)
        self.scale = 1.0  #: calibration scale s of the predictive error (>= 1)

    # ------------------------------------------------------------ the campaign model interface
    def check_species(self, numbers: Sequence[int]) -> None:
        """Refuse atoms that cannot be the ideal supercell's (the expansion is in its displacements)."""
        numbers = np.sort(np.asarray(numbers))
        if not np.array_equal(numbers, np.sort(self.ideal.numbers)):
            got = Atoms(numbers).get_chemical_formula()
            raise ValueError(f"the lattice-dynamics model describes displacements of its {len(self.ideal)}-atom "
                             f"supercell ({self.ideal.get_chemical_formula()}); got {len(numbers)} atoms ({got})")

    def fit(self, frames: Iterable[Atoms], append: bool = True) -> None:
        """Add labelled ``frames`` (forces in ``get_forces()``) and refit (evidence maximised).

        An undisplaced frame is skipped: the expansion predicts zero force there whatever its
        parameters, so its rows would only shrink the fitted noise 1/β.
        """
        frames = [self._in_site_order(a) for a in frames]
        frames = [a for a in frames if np.abs(minimum_image(a.positions - self.ideal.positions,
                                                            self.ideal.cell)).max() > 1e-6]
        if not append:
            self.trained = []
            self.bayes.fit(frames, ideal=self.ideal)
        else:
            self.bayes.add(frames, ideal=self.ideal)
        self.trained += frames
        self._fit_scale()

    def calibrate(self, frames: Iterable[Atoms]) -> dict[str, float]:
        """Add held-out labelled ``frames`` and refit the scale s; returns the held-out force RMSE and
        the mean predictive error before and after scaling (eV/Å).
        """
        self.held_out += [self._in_site_order(a) for a in frames]
        return self._fit_scale()

    def _fit_scale(self) -> dict[str, float]:
        if not self.held_out or self.bayes.fit_result is None:
            return {}
        self.scale = 1.0
        sq_error = sq_sigma = 0.0
        for atoms in self.held_out:
            forces, sigma, _ = self.evaluate(atoms)
            sq_error += float(np.sum((np.asarray(atoms.get_forces()) - forces) ** 2)) / 3.0  # per atom, like σ²
            sq_sigma += float(np.sum(sigma**2))
        self.scale = max(1.0, float(np.sqrt(sq_error / sq_sigma)))
        n = sum(len(a) for a in self.held_out)
        return {"heldout_rmse": float(np.sqrt(sq_error / n)), "predicted_rmse": float(np.sqrt(sq_sigma / n)),
                "scale": self.scale}

    def evaluate(self, atoms: Atoms) -> tuple[np.ndarray, np.ndarray, float]:
        """Posterior mean forces (N, 3) eV/Å, each atom's predictive error (N,) eV/Å, energy (eV, from
        the ideal supercell), in the order of ``atoms``.
        """
        order = self._site_order(atoms)
        mapped = atoms[order]
        forces, std, energy = self.bayes.evaluate(mapped, ideal=self.ideal)
        sigma = self.scale * np.sqrt((std**2).mean(axis=1) + 1.0 / self.bayes.fit_result.beta)
        back = np.argsort(order)
        return forces[back], sigma[back], energy

    def predict(self, atoms: Atoms) -> dict[str, Any]:
        """Energy, forces and per-atom predictive error of ``atoms`` (as ``Ensemble.predict``)."""
        forces, sigma, energy = self.evaluate(atoms)
        return {"energy": energy, "forces": forces, "forces_std": sigma,
                "uncertainty": reduce_atoms(sigma, self.score)}

    def calculator(self) -> "LatticeDynamicsCalculator":
        """An ASE calculator of this model for a walker."""
        return LatticeDynamicsCalculator(self)

    def head_state(self) -> dict[str, Any]:
        """The fitted posterior, for the other MPI ranks (:meth:`load_head_state`)."""
        fit = self.bayes.fit_result
        return {"fit": {key: getattr(fit, key) for key in EvidenceFit.__dataclass_fields__}, "scale": self.scale}

    def load_head_state(self, state: dict[str, Any]) -> None:
        """Predict with the posterior (and scale) of another rank's model from here on."""
        self.bayes.fit_result, self.scale = EvidenceFit(**state["fit"]), float(state["scale"])
        self.bayes.version += 1

    @property
    def version(self) -> int:
        """Incremented by every refit (a calculator's cached results go stale)."""
        return self.bayes.version

    # ------------------------------------------------------------ files
    def save(self, path: str | os.PathLike) -> Path:
        """Settings and training structures in one ``.npz`` file (written atomically)."""
        meta = {"format": FORMAT, "cutoffs": self.cutoffs, "score": self.score}
        arrays = {f"unit_{k}": v for k, v in _atoms_arrays(self.unit).items()}
        arrays |= {f"ideal_{k}": v for k, v in _atoms_arrays(self.ideal).items()}
        for name, frames in (("train", self.trained), ("held_out", self.held_out)):
            n = len(frames)
            arrays[f"{name}_positions"] = np.array([a.positions for a in frames]).reshape(n, len(self.ideal), 3)
            arrays[f"{name}_forces"] = np.array([a.get_forces() for a in frames]).reshape(n, len(self.ideal), 3)
            arrays[f"{name}_cells"] = np.array([np.asarray(a.cell) for a in frames]).reshape(n, 3, 3)
        buffer = io.BytesIO()
        np.savez(buffer, meta=np.array(json.dumps(meta)), **arrays)
        return atomic_write_bytes(path, buffer.getvalue())

    @classmethod
    def load(cls, path: str | os.PathLike) -> "LatticeDynamicsModel":
        """The model of :meth:`save`, refitted on its structures in their order (the same posterior)."""
        from ase.calculators.singlepoint import SinglePointCalculator

        with np.load(path, allow_pickle=False) as data:
            meta = json.loads(str(data["meta"]))
            if meta.get("format") != FORMAT:
                raise ValueError(f"{path}: not a lattice-dynamics model file (format {meta.get('format')!r})")
            unit, ideal = (Atoms(data[f"{p}_numbers"], positions=data[f"{p}_positions"], cell=data[f"{p}_cell"],
                                 pbc=True) for p in ("unit", "ideal"))
            model = cls(unit, ideal, meta["cutoffs"], meta["score"])
            frames: dict[str, list[Atoms]] = {"train": [], "held_out": []}
            for name, part in frames.items():
                for positions, forces, cell in zip(data[f"{name}_positions"], data[f"{name}_forces"],
                                                   data[f"{name}_cells"]):
                    atoms = Atoms(ideal.numbers, positions=positions, cell=cell, pbc=True)
                    atoms.calc = SinglePointCalculator(atoms, forces=forces)
                    part.append(atoms)
        model.held_out = frames["held_out"]
        if frames["train"]:
            model.fit(frames["train"], append=False)  # refits the scale on the held-out frames too
        return model

    # ------------------------------------------------------------ atom order
    def _site_order(self, atoms: Atoms) -> np.ndarray:
        """``order`` with ``atoms[order][i]`` near ideal site i (phonopy's supercells list their atoms
        in another order than ``Atoms.repeat``).
        """
        self.check_species(atoms.numbers)
        identity = np.arange(len(atoms))
        d = minimum_image(atoms.positions - self.ideal.positions, self.ideal.cell)
        if np.abs(d).max() < 0.5 and np.array_equal(atoms.numbers, self.ideal.numbers):
            return identity  # an MD frame of this supercell
        # nearest atom to each ideal site under the minimum image; must be one atom per site
        pair = atoms.positions[None, :, :] - self.ideal.positions[:, None, :]  # (site, atom, 3)
        dist = np.linalg.norm(minimum_image(pair.reshape(-1, 3), self.ideal.cell), axis=1).reshape(pair.shape[:2])
        order = dist.argmin(axis=1)
        if len(set(order.tolist())) != len(order) or not np.array_equal(atoms.numbers[order], self.ideal.numbers):
            raise SiteMatchError("the atoms are not a displaced copy of the model's ideal supercell "
                                 "(no one-to-one match of atoms to its sites)")
        return order

    def _in_site_order(self, atoms: Atoms) -> Atoms:
        from ase.calculators.singlepoint import SinglePointCalculator

        order = self._site_order(atoms)
        mapped = Atoms(atoms.numbers[order], positions=atoms.positions[order], cell=atoms.cell, pbc=atoms.pbc)
        mapped.calc = SinglePointCalculator(mapped, forces=np.asarray(atoms.get_forces())[order])
        return mapped


class LatticeDynamicsCalculator(RefittedModelCalculator):
    """ASE calculator of a :class:`LatticeDynamicsModel`: the posterior mean's energy and forces,
    each atom's predictive error ``forces_std`` (eV/Å) and the frame's score ``uncertainty`` (eV/Å)
    at every call, at no extra cost. A refit of the model makes cached results stale. Atoms that
    left their sites (no one-to-one match) get non-finite results, which a walker treats as a
    blow-up (rolled back, the frame labelled), not an exception.
    """

    implemented_properties = ["energy", "forces", "forces_std", "uncertainty"]

    def calculate(self, atoms: Atoms | None = None, properties: Sequence[str] = ("energy",),
                  system_changes: Sequence[str] = all_changes) -> None:
        super().calculate(atoms, properties, system_changes)
        self._version = self.model.version
        try:
            self.results.update(self.model.predict(self.atoms))
        except SiteMatchError:
            n = len(self.atoms)
            self.results.update(energy=np.nan, forces=np.full((n, 3), np.nan), forces_std=np.full(n, np.inf),
                                uncertainty=np.inf)
