"""Calculators for phonon work: name resolution, forces on supercells, Hessians.

Only ASE objects cross this boundary; torch is imported lazily by whichever
calculator needs it, never here.
"""

from __future__ import annotations

from typing import Any, Protocol, Sequence, runtime_checkable

import numpy as np
from ase import Atoms
from ase.calculators.calculator import Calculator as AseCalculator

__all__ = [
    "calculator_label", "compute_forces", "cutoff_margin", "get_hessian",
    "has_analytic_hessian", "has_hessian", "HessianCalculator", "HessianVectorCalculator",
    "model_cutoff", "resolve_calculator", "stillinger_weber_si",
]


@runtime_checkable
class HessianCalculator(Protocol):
    """A calculator that gives the whole supercell Hessian (almd.Calculator: by autodiff)."""

    def get_hessian(self, atoms: Atoms) -> np.ndarray:
        """(3N, 3N) Hessian in eV/Å², atom-major, no mass weighting."""


@runtime_checkable
class HessianVectorCalculator(Protocol):
    """A calculator that gives Hessian-vector products H·u without the whole Hessian."""

    def get_hessian_vector_products(self, atoms: Atoms, vectors: np.ndarray) -> np.ndarray:
        """(k, N, 3) products H·u for k displacement patterns u of shape (N, 3), eV/Å."""


def stillinger_weber_si() -> AseCalculator:
    """Matscipy's Stillinger–Weber silicon (PRB 31, 5262), analytic Hessian included."""
    from almd.references import build_calculator

    return build_calculator("stillinger-weber-si")


def resolve_calculator(name: str | AseCalculator, **kwargs: Any) -> AseCalculator:
    """Turn a name into an ASE calculator.

    An object passes through; a reference preset (``almd.references.PRESETS``) or
    "module:Class" goes to ``almd.references.build_calculator``; anything else is a
    model name or path for ``almd.Calculator`` (e.g. "sevennet-0").
    """
    if not isinstance(name, str):
        return name
    from almd.references import PRESETS, build_calculator

    key = name.strip()
    if key.lower() in PRESETS or ":" in key:
        return build_calculator(key, **kwargs)
    from pathlib import Path

    from almd.potentials.calculator import Calculator
    from almd.potentials.sevennet import PRETRAINED

    if not Path(key).is_file() and key.lower() not in PRETRAINED:
        raise ValueError(f"calculator {name!r} is not allowed: a reference preset ({', '.join(PRESETS)}), "
                         f"'module:Class', a model file or a pretrained model ({', '.join(PRETRAINED)})")
    return Calculator(model=key, **kwargs)


def calculator_label(calc: str | AseCalculator) -> str:
    if isinstance(calc, str):
        return calc
    return getattr(calc, "name", None) or type(calc).__name__


def compute_forces(
    structures: Sequence[Atoms], calc: AseCalculator, progress: bool = False
) -> np.ndarray:
    """Forces (n_structures, n_atoms, 3) in eV/Å; one calculator, structures in order."""
    out = []
    for i, atoms in enumerate(structures):
        atoms = atoms.copy()
        atoms.calc = calc
        out.append(np.array(atoms.get_forces(), dtype=float))
        if progress and (i + 1) % 10 == 0:
            print(f"  forces {i + 1}/{len(structures)}", flush=True)
    return np.array(out)


def has_hessian(calc: AseCalculator) -> bool:
    """True if the calculator gives an analytic or autodiff Hessian."""
    return isinstance(calc, HessianCalculator) or has_analytic_hessian(calc)


def has_analytic_hessian(calc: AseCalculator) -> bool:
    """A closed-form Hessian (matscipy) costs about one force call; an autodiff one
    costs 3N Hessian-vector products, far more than phonopy's few displacements.
    """
    return "hessian" in getattr(calc, "implemented_properties", ())


def get_hessian(calc: AseCalculator, atoms: Atoms) -> np.ndarray:
    """Supercell Hessian d²E/dx_i dx_j, (3N, 3N), eV/Å², atom-major, no mass weighting."""
    atoms = atoms.copy()
    atoms.calc = calc
    if isinstance(calc, HessianCalculator):
        h = calc.get_hessian(atoms)
    else:  # matscipy returns a scipy sparse (BSR) matrix
        h = calc.get_property("hessian", atoms)
    if hasattr(h, "toarray"):
        h = h.toarray()
    h = np.asarray(h, dtype=float)
    n = 3 * len(atoms)
    if h.shape != (n, n):
        raise ValueError(f"Hessian has shape {h.shape}, expected {(n, n)}")
    return h


def model_cutoff(calc: AseCalculator) -> float | None:
    """The interaction cutoff (Å) of an almd or sevenn model, if it says."""
    for owner in (getattr(calc, "potential", None), calc):
        value = getattr(owner, "cutoff", None)
        if isinstance(value, (int, float)):
            return float(value)
    return None


def cutoff_margin(atoms: Atoms, cutoff: float) -> float:
    """Smallest |d − cutoff| over interatomic distances d (Å).

    A neighbour shell within a displacement amplitude of the cutoff makes finite
    displacements cross it: the force constants then pick up the cutoff
    envelope's kink (seen with SevenNet-0 on BaTe relaxed to a/√2 = 5.002 Å,
    5.0 Å cutoff: imaginary X modes by finite differences, none by its Hessian).
    """
    from ase.neighborlist import neighbor_list

    d = neighbor_list("d", atoms, cutoff + 0.5)
    return float(np.min(np.abs(d - cutoff))) if len(d) else float("inf")
