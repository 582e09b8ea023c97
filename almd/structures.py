"""Structures as a reference method sees them: bare copies and content hashes.

The hashes are the cache key shared by the oracle and the label database: the
same structure labelled with the same settings always has the same key.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from typing import Any

import numpy as np
from ase import Atoms

from almd.io import json_default

__all__ = ["bare", "content_hash", "minimum_image", "settings_hash", "settings_json", "structure_hash"]


def bare(atoms: Atoms, magmoms: bool = False) -> Atoms:
    """A copy with species, positions, cell and pbc only (and initial magnetic moments
    with ``magmoms``): what a reference method sees; no calculator, constraints or info.
    """
    extra = {"magmoms": atoms.get_initial_magnetic_moments()} if magmoms else {}
    return Atoms(atoms.numbers, positions=atoms.positions, cell=atoms.cell, pbc=atoms.pbc, **extra)


def minimum_image(d: np.ndarray, cell: np.ndarray, pbc: np.ndarray | None = None) -> np.ndarray:
    """Displacement vectors ``d`` (..., 3) in Å reduced to their nearest periodic image.

    Rounding in fractional coordinates: exact for MD and phonon supercells (cells
    that are not strongly skewed) and vectorised over any leading shape; for
    strongly skewed cells use ``ase.geometry.find_mic``.
    """
    cell = np.asarray(cell, dtype=float)
    d = np.asarray(d, dtype=float)
    frac = np.linalg.solve(cell.T, d.reshape(-1, 3).T).T
    periodic = np.ones(3, dtype=bool) if pbc is None else np.asarray(pbc, dtype=bool)
    frac[:, periodic] -= np.round(frac[:, periodic])
    return (frac @ cell).reshape(d.shape)


def _digest(payload: bytes) -> str:
    return hashlib.sha256(payload).hexdigest()[:24]


def _settings_default(obj: Any) -> Any:
    try:
        return json_default(obj)
    except TypeError:
        pass
    if isinstance(obj, (set, frozenset)):
        return sorted(map(repr, obj))
    if hasattr(obj, "__dict__"):  # e.g. EspressoProfile: by content, not by memory address
        return {"__class__": f"{type(obj).__module__}.{type(obj).__qualname__}", **vars(obj)}
    return repr(obj)


def settings_json(settings: Mapping[str, Any]) -> str:
    """Canonical JSON of reference-method settings (sorted keys; odd objects by content or repr)."""
    try:
        return json.dumps(dict(settings), sort_keys=True, default=_settings_default)
    except (ValueError, TypeError):  # circular or odd objects: fall back to their repr
        return json.dumps(dict(settings), sort_keys=True, default=repr)


def structure_hash(atoms: Atoms, decimals: int = 8) -> str:
    """Hash of what a reference method sees: species, positions, cell, pbc, magmoms.

    Positions are rounded to 1e-8 Å so that float noise from a round trip through
    text formats does not defeat the cache.
    """
    h = hashlib.sha256()
    h.update(np.asarray(atoms.numbers, dtype=np.int64).tobytes())
    for arr in (atoms.positions, atoms.cell.array):
        # + 0.0 turns -0.0 into 0.0, which would otherwise hash differently
        h.update((np.round(np.asarray(arr, dtype=np.float64), decimals) + 0.0).tobytes())
    h.update(np.asarray(atoms.pbc, dtype=np.int8).tobytes())
    magmoms = atoms.get_initial_magnetic_moments()
    if np.any(magmoms):
        h.update((np.round(magmoms, 6) + 0.0).tobytes())
    # Letter prefixes keep the value from ever parsing as a number (ase.db rejects such strings).
    return "x" + h.hexdigest()[:24]


def settings_hash(settings: Mapping[str, Any]) -> str:
    """Hash of reference-method settings (any JSON-like mapping; key order irrelevant)."""
    text = settings_json(settings)
    return "s" + _digest(text.encode())


def content_hash(atoms: Atoms, settings_hash: str) -> str:
    """Cache key of a label: the structure together with the settings that labelled it."""
    return "c" + _digest((structure_hash(atoms) + settings_hash).encode())

