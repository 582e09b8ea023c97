"""Training samples: labels from files or Atoms, checks before training, energy shifts, self-distillation.

A :class:`Sample` holds one structure and whichever labels it has (energy,
forces, stress, Hessian). Phonon structures are relaxed, so missing force and
stress labels of a Hessian sample are zero (docs/methods.md §1).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from ase import Atoms
from ase.stress import voigt_6_to_full_3x3_stress

from almd.potentials import Potential, build_graph, energy_forces_stress, neighbor_pairs
from almd.potentials.graph import NeighborPairs
from almd.structures import bare

__all__ = [
    "apply_energy_shifts", "as_samples", "check_samples", "composition_shifts", "DataError", "fit_energy_shifts",
    "load_efs", "load_phonon", "load_third_order", "model_labels", "Sample", "sample_from_atoms", "self_distilled",
    "split_validation",
]


class DataError(ValueError):
    """Training data that cannot be used (found before training starts)."""


@dataclass
class Sample:
    atoms: Atoms
    energy: float | None = None  # eV, whole structure
    forces: np.ndarray | None = None  # (n, 3) eV/Å
    stress: np.ndarray | None = None  # (3, 3) eV/Å³, ASE sign
    hessian: np.ndarray | None = None  # (3n, 3n) eV/Å², no mass weighting
    name: str = ""
    # Hessian columns worth drawing; None: any. At a displaced geometry only the columns
    # near the displaced atoms carry the third-order signal Φ3·u (load_third_order).
    columns: tuple[int, ...] | None = None
    # A third-order sample's mirror geometry x − u: its `hessian` is then the odd part Φ3·u
    # and the model's is (H(x+u) − H(x−u))/2, which cancels Φ2 (and the model's error in it)
    # and Φ4·u·u, so the term measures the third order alone.
    mirror: Atoms | None = None
    _pairs: NeighborPairs | None = field(default=None, repr=False)
    _mirror_pairs: NeighborPairs | None = field(default=None, repr=False)

    def pairs(self, cutoff: float) -> NeighborPairs:
        # positions never change during training: one neighbour list per sample
        if self._pairs is None:
            self._pairs = neighbor_pairs(self.atoms, cutoff)
        return self._pairs

    def mirror_pairs(self, cutoff: float) -> NeighborPairs:
        if self._mirror_pairs is None:
            self._mirror_pairs = neighbor_pairs(self.mirror, cutoff)
        return self._mirror_pairs


def sample_from_atoms(atoms: Atoms, name: str = "") -> Sample:
    """Labels from ``atoms.calc.results`` and ``atoms.info['hessian']``."""
    res = dict(atoms.calc.results) if atoms.calc is not None else {}
    stress = res.get("stress")
    if stress is not None:
        stress = np.asarray(stress, dtype=float)
        stress = voigt_6_to_full_3x3_stress(stress) if stress.shape == (6,) else stress.reshape(3, 3)
    hessian = atoms.info.get("hessian")
    forces = res.get("forces")
    # a displaced geometry with third-order labels names its columns; it is not relaxed
    columns = atoms.info.get("hessian_columns")
    columns = None if columns is None else tuple(int(j) for j in columns)
    if hessian is not None:
        hessian = np.asarray(hessian, dtype=float)
        if columns is None:  # relaxed phonon structure: zero forces and stress are labels too
            forces = np.zeros((len(atoms), 3)) if forces is None else forces
            if stress is None and atoms.pbc.all():
                stress = np.zeros((3, 3))
    frame = bare(atoms)
    return Sample(frame, None if res.get("energy") is None else float(res["energy"]),
                  None if forces is None else np.asarray(forces, dtype=float), stress, hessian,
                  name or atoms.get_chemical_formula(), columns=columns)


def _is_phonon_set(path: Path) -> bool:
    return path.is_dir() or ".yaml" in path.name


def _phonon_file(path: Path) -> Path:
    if not path.is_dir():
        return path
    for pattern in ("phono3py_disp.yaml", "phono3py*.yaml*", "phonopy*.yaml*"):
        hits = sorted(path.glob(pattern))
        if hits:
            return hits[0]
    raise DataError(f"{path}: no phonopy/phono3py data set in this folder")


def _frames(path: Path) -> list[Atoms]:
    if path.suffix == ".db":
        from almd.labels.database import LabelDatabase

        return LabelDatabase(path).frames(status="ok")
    import ase.io

    return ase.io.read(str(path), index=":")


def load_phonon(path: str | Path, fold: Sequence[int] | Sequence[Sequence[int]] | None = None) -> list[Sample]:
    """Hessian samples: a phonon data set's perfect supercell with its DFT Hessian, or frames with one.

    Parameters
    ----------
    path : str or Path
        A phonopy / phono3py yaml or folder, or extxyz / ASE db frames with ``info['hessian']``.
    fold : 3 ints or (3, 3) ints, optional
        A supercell of the data set's unit cell, commensurate with its supercell: the sample is
        then that small periodic cell with the data's force constants folded onto it
        (almd.phonons.datasets.folded_phonon_hessian), whose Hessian costs the model far
        fewer atoms. None or empty: the data set's own supercell. Frames are never folded.

    Returns
    -------
    list of Sample
        Samples with a (3n, 3n) Hessian in eV/Å².
    """
    path = Path(path)
    if not path.exists():
        raise DataError(f"phonon data not found: {path}")
    if _is_phonon_set(path):
        from almd.phonons.datasets import folded_phonon_hessian, phonon_hessian

        file = _phonon_file(path)
        if fold is None or len(fold) == 0:
            supercell, h = phonon_hessian(file)
            name = f"{file.parent.name}/{file.name}:supercell"
        else:
            try:
                supercell, h = folded_phonon_hessian(file, fold)
            except ValueError as exc:  # not commensurate, bad matrix: a data problem, found before training
                raise DataError(f"{file}: {exc}") from None
            name = f"{file.parent.name}/{file.name}:folded{np.asarray(fold).tolist()}"
        supercell.info["hessian"] = h
        return [sample_from_atoms(supercell, name)]
    out = [sample_from_atoms(a, f"{path.name}[{i}]") for i, a in enumerate(_frames(path))]
    return [s for s in out if s.hessian is not None]


def load_third_order(path: str | Path, min_signal: float = 0.1, odd: bool = True) -> list[Sample]:
    """Third-order samples of a phono3py data set: each displaced supercell x + u with its
    DFT forces and a Hessian label from the data's force constants, columns restricted to
    where Φ3·u is (almd.phonons.datasets.third_order_hessians).

    ``odd`` (default): the label is Φ3·u and the sample carries its mirror x − u, so the
    term compares the odd part of the model's Hessian, free of its fc2 error (see
    :class:`Sample`). Otherwise the label is the whole H(x+u) = Φ2 + Φ3·u.
    """
    path = Path(path)
    if not path.exists():
        raise DataError(f"phonon data not found: {path}")
    from almd.phonons.datasets import third_order_hessians

    file = _phonon_file(path)
    try:
        frames = third_order_hessians(file, min_signal)
    except ValueError as exc:
        raise DataError(str(exc)) from None
    out = []
    for i, a in enumerate(frames):
        s = sample_from_atoms(a, f"{file.name}:third-order[{a.info.get('index', i)}]")
        if odd:
            s.hessian = a.info["hessian_third_order"]
            s.mirror = a.copy()
            s.mirror.calc = None
            s.mirror.positions = 2 * a.info["perfect_positions"] - a.positions
        out.append(s)
    return out


def load_efs(path: str | Path) -> list[Sample]:
    """EFS samples: extxyz / ASE db frames, or a phonon data set's displaced supercells."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"EFS data not found: {path}")
    if _is_phonon_set(path):
        from almd.phonons.datasets import displaced_supercells

        file = _phonon_file(path)
        return [sample_from_atoms(a, f"{file.name}:displaced[{a.info.get('index', i)}]")
                for i, a in enumerate(displaced_supercells(file))]
    return [sample_from_atoms(a, f"{path.name}[{i}]") for i, a in enumerate(_frames(path))]


def as_samples(items: list[Any], role: str) -> list[Sample]:
    return [x if isinstance(x, Sample) else sample_from_atoms(x, f"{role}[{i}]") for i, x in enumerate(items)]


def check_samples(samples: list[Sample], potential: Potential, role: str) -> None:
    """Raise :class:`DataError` for anything that would break or poison training."""
    for s in samples:
        n = len(s.atoms)
        try:
            potential.check_species(s.atoms.numbers)
        except ValueError as exc:
            raise DataError(f"{role} structure {s.name}: {exc}") from None
        if s.energy is None and s.forces is None and s.stress is None and s.hessian is None:
            raise DataError(f"{role} structure {s.name} has no labels (energy, forces, stress or Hessian)")
        for label, value, shape in (("forces", s.forces, (n, 3)), ("stress", s.stress, (3, 3)),
                                    ("hessian", s.hessian, (3 * n, 3 * n))):
            if value is None:
                continue
            if value.shape != shape:
                what = "phonon supercell does not match its structure: " if label == "hessian" else ""
                raise DataError(f"{role} structure {s.name}: {what}{label} has shape {value.shape}, "
                                f"expected {shape} for {n} atoms")
            if not np.isfinite(value).all():
                raise DataError(f"{role} structure {s.name}: {label} label contains NaN or inf")
        if s.energy is not None and not np.isfinite(s.energy):
            raise DataError(f"{role} structure {s.name}: energy label is {s.energy}")


def split_validation(samples: list[Sample], fraction: float) -> tuple[list[Sample], list[Sample]]:
    """Deterministic split by structure content (same structure, same side, every run)."""
    from almd.labels.database import assign_split
    from almd.structures import structure_hash

    train, val = [], []
    for s in samples:
        (val if assign_split(structure_hash(s.atoms), fraction) == "validation" else train).append(s)
    return train, val


def model_labels(potential: Potential, atoms: list[Atoms], dtype: torch.dtype) -> list[dict[str, np.ndarray]]:
    """Energy, forces and stress of ``potential`` (no parameter graph)."""
    out = []
    for a in atoms:
        r = energy_forces_stress(potential, build_graph(a, potential.cutoff, dtype), stress=bool(a.pbc.all()))
        out.append({k: v.detach().double().numpy() for k, v in r.items()})
    return out


def fit_energy_shifts(potential: Potential, samples: list[Sample], dtype: torch.dtype) -> dict[int, float]:
    """Per-element energy offsets s_Z (linear in composition) that best map the model's
    energies onto the labels' (a different DFT code/pseudopotential shifts each element).
    """
    labelled = [s for s in samples if s.energy is not None]
    if not labelled:
        return {}
    with torch.no_grad():  # energies alone: no backward pass
        model = np.array([float(energy_forces_stress(potential, build_graph(s.atoms, potential.cutoff, dtype),
                                                     forces=False, stress=False)["energy"].sum())
                          for s in labelled])
    return composition_shifts([s.atoms.numbers for s in labelled], np.array([s.energy for s in labelled]) - model)


def composition_shifts(numbers: list[np.ndarray], residuals: np.ndarray) -> dict[int, float]:
    """Offsets s_Z minimising Σ_c (r_c − Σ_Z N_cZ s_Z)² over structures c with atomic numbers
    ``numbers[c]`` and energy residuals r_c (label − model, eV); the minimum-norm solution
    when the compositions do not separate the elements (one composition).
    """
    species = sorted({int(z) for nums in numbers for z in nums})
    counts = np.array([[np.sum(np.asarray(nums) == z) for z in species] for nums in numbers], dtype=float)
    shifts, *_ = np.linalg.lstsq(counts, np.asarray(residuals, float), rcond=None)
    return {z: float(v) for z, v in zip(species, shifts)}


def apply_energy_shifts(potential: Potential, shifts: dict[int, float]) -> None:
    """Add s_Z to the backbone's per-element energy (in place; exported with the model)."""
    if not shifts:
        return
    try:
        potential.add_energy_shifts(shifts)
    except (NotImplementedError, ValueError) as exc:
        raise DataError(f"{exc}; set data.fit_energy_shifts = false") from None


def self_distilled(potential: Potential, samples: list[Sample], count: int, rattle: float,
                   strain: float, seed: int, dtype: torch.dtype) -> list[Sample]:
    """Replay data from the frozen base model: training structures rattled and strained,
    labelled by the model *before* training, so co-training pulls towards what it knew.
    """
    if not samples or count < 1:
        return []
    rng = np.random.default_rng(seed + 7919)
    frames = []
    for k in range(count):
        a = samples[k % len(samples)].atoms.copy()
        if a.pbc.all() and strain > 0:
            eps = rng.uniform(-strain, strain, (3, 3))
            a.set_cell(a.cell.array @ (np.eye(3) + 0.5 * (eps + eps.T)), scale_atoms=True)
        a.positions += rng.normal(0.0, rattle, a.positions.shape)
        frames.append(a)
    out = []
    for k, (a, r) in enumerate(zip(frames, model_labels(potential, frames, dtype))):
        stress = r["stress"][0] if "stress" in r else None
        out.append(Sample(a, float(r["energy"].sum()), r["forces"], stress, None, f"self-distilled[{k}]"))
    return out
