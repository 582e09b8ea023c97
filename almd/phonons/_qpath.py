"""High-symmetry points and band paths without seekpath.

A small table in the *conventional* reciprocal basis per Bravais lattice,
mapped to the fractional coordinates of whichever primitive cell phonopy uses
through spglib's transformation matrix: with (a_s b_s c_s) = (a b c) P⁻¹,
a wave vector's fractional coordinates transform as q_prim = Pᵀ q_conv.
Lattices outside the table get Γ and the zone-face centres of the primitive
reciprocal cell, which is enough for a like-for-like comparison.
"""

from __future__ import annotations

import numpy as np
import spglib

__all__ = ["bravais_key", "high_symmetry_path", "path_qpoints"]

_TABLE: dict[str, tuple[dict[str, tuple[float, float, float]], list[list[str]]]] = {
    "cF": (
        {"Γ": (0, 0, 0), "X": (0, 1, 0), "W": (0.5, 1, 0), "K": (0.75, 0.75, 0), "L": (0.5, 0.5, 0.5)},
        [["Γ", "X", "W", "K", "Γ", "L"]],
    ),
    "cP": (
        {"Γ": (0, 0, 0), "X": (0, 0.5, 0), "M": (0.5, 0.5, 0), "R": (0.5, 0.5, 0.5)},
        [["Γ", "X", "M", "Γ", "R", "X"]],
    ),
    "cI": (
        {"Γ": (0, 0, 0), "H": (0, 0, 1), "N": (0.5, 0.5, 0), "P": (0.5, 0.5, 0.5)},
        [["Γ", "H", "N", "Γ", "P", "H"]],
    ),
    "hP": (
        {"Γ": (0, 0, 0), "M": (0.5, 0, 0), "K": (1 / 3, 1 / 3, 0), "A": (0, 0, 0.5), "L": (0.5, 0, 0.5), "H": (1 / 3, 1 / 3, 0.5)},
        [["Γ", "M", "K", "Γ", "A", "L", "H", "A"]],
    ),
    "tP": (
        {"Γ": (0, 0, 0), "X": (0, 0.5, 0), "M": (0.5, 0.5, 0), "Z": (0, 0, 0.5), "R": (0, 0.5, 0.5), "A": (0.5, 0.5, 0.5)},
        [["Γ", "X", "M", "Γ", "Z", "R", "A", "Z"]],
    ),
    "oP": (
        {"Γ": (0, 0, 0), "X": (0.5, 0, 0), "Y": (0, 0.5, 0), "Z": (0, 0, 0.5), "S": (0.5, 0.5, 0), "U": (0.5, 0, 0.5), "T": (0, 0.5, 0.5), "R": (0.5, 0.5, 0.5)},
        [["Γ", "X", "S", "Y", "Γ", "Z", "U", "R", "T", "Z"]],
    ),
}

_GENERIC = (
    {"Γ": (0, 0, 0), "B1": (0.5, 0, 0), "B2": (0, 0.5, 0), "B3": (0, 0, 0.5), "B123": (0.5, 0.5, 0.5)},
    [["B1", "Γ", "B2"], ["B3", "Γ", "B123"]],
)


def bravais_key(lattice: np.ndarray, positions: np.ndarray, numbers: np.ndarray, symprec: float = 1e-5) -> tuple[str, np.ndarray]:
    """("cF", P) etc.: crystal family + centring of the cell, and spglib's transformation matrix."""
    ds = spglib.get_symmetry_dataset((lattice, positions, numbers), symprec=symprec)
    if ds is None:
        return "aP", np.eye(3)
    n = ds.number
    centring = ds.international[0]
    family = "a" if n <= 2 else "m" if n <= 15 else "o" if n <= 74 else "t" if n <= 142 else "h" if n <= 194 else "c"
    if family == "h" and centring == "R":
        return "hR", np.asarray(ds.transformation_matrix, float)
    return family + centring, np.asarray(ds.transformation_matrix, float)


def high_symmetry_path(
    lattice: np.ndarray, positions: np.ndarray, numbers: np.ndarray, symprec: float = 1e-5
) -> tuple[dict[str, list[float]], list[list[str]]]:
    """Named points (fractional, primitive reciprocal basis) and the band path as label lists."""
    key, p = bravais_key(lattice, positions, numbers, symprec)
    if key in _TABLE:
        points, path = _TABLE[key]
        mapped = {k: (p.T @ np.asarray(v, float)).tolist() for k, v in points.items()}
    else:
        points, path = _GENERIC
        mapped = {k: list(map(float, v)) for k, v in points.items()}
    return mapped, [list(seg) for seg in path]


def path_qpoints(points: dict[str, list[float]], path: list[list[str]], npoints: int = 41) -> tuple[list[np.ndarray], list[tuple[str, str]]]:
    """phonopy-style list of band segments (each npoints × 3) with their end labels."""
    bands, labels = [], []
    for seg in path:
        for a, b in zip(seg[:-1], seg[1:]):
            qa, qb = np.asarray(points[a]), np.asarray(points[b])
            bands.append(qa + np.linspace(0.0, 1.0, npoints)[:, None] * (qb - qa))
            labels.append((a, b))
    return bands, labels
