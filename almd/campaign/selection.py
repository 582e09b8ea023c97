"""Which frames to label once the trigger fires: the highest-scoring ones, de-duplicated.

One uncertainty event spans several consecutive MD frames that are nearly the same
structure; labelling each would spend reference calls on one configuration.
:func:`select_frames` picks by score and skips frames within a structural distance
(:func:`frame_distance`, minimum-image RMSD) of one already picked.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np

from almd.structures import minimum_image

__all__ = ["frame_distance", "select_frames"]


def _positions_and_cell(frame: Any) -> tuple[np.ndarray, np.ndarray | None, np.ndarray]:
    """(positions, cell or None, pbc) from ASE Atoms (duck-typed) or an (N, 3) array."""
    if hasattr(frame, "get_positions"):
        cell = np.asarray(frame.get_cell(), dtype=float)
        pbc = np.asarray(frame.get_pbc(), dtype=bool)
        return np.asarray(frame.get_positions(), dtype=float), cell, pbc
    pos = np.asarray(frame, dtype=float)
    if pos.ndim != 2 or pos.shape[1] != 3:
        raise ValueError(f"frame positions must have shape (N, 3), got {pos.shape}")
    return pos, None, np.zeros(3, dtype=bool)


def frame_distance(a: Any, b: Any, cell: np.ndarray | None = None) -> float:
    """Structural distance (Å): RMSD of positions under the minimum image,
    after removing the mean displacement (a rigid translation is the same structure).

    ``a`` and ``b`` are ASE Atoms or (N, 3) arrays (then ``cell`` gives the
    periodic cell, all directions periodic). Frames with different atom counts are
    infinitely far apart.
    """
    pa, ca, pbc = _positions_and_cell(a)
    pb, _, _ = _positions_and_cell(b)
    if pa.shape != pb.shape:
        return math.inf
    if cell is None:
        cell = ca
    else:
        pbc = np.ones(3, dtype=bool)
    d = pb - pa
    if cell is not None and pbc.any():
        # Minimum image in fractional coordinates (exact for cells that are not
        # too skewed, which is the case for MD supercells).
        d = minimum_image(d, cell, pbc)
    d -= d.mean(axis=0)
    return float(np.sqrt((d * d).sum(axis=1).mean()))


def select_frames(
    scores: Sequence[float],
    frames: Sequence[Any],
    max_frames: int = 1,
    min_distance: float = 0.05,
    cell: np.ndarray | None = None,
) -> list[int]:
    """Pick up to ``max_frames`` frames to label: highest score first, skipping
    any frame within ``min_distance`` (Å, :func:`frame_distance`) of one already
    picked, so one event does not buy several near-identical labels.

    Non-finite scores rank first (they are the frames most in need of a label).
    Ties keep the earlier frame. Returns indices into ``frames``.
    """
    if len(scores) != len(frames):
        raise ValueError(f"{len(scores)} scores for {len(frames)} frames")
    if max_frames < 1:
        raise ValueError(f"max_frames = {max_frames}: must be >= 1")
    if not min_distance >= 0:
        raise ValueError(f"min_distance = {min_distance}: must be >= 0 Å")
    key = [(-(math.inf if not math.isfinite(float(s)) else float(s)), i)
           for i, s in enumerate(scores)]
    picked: list[int] = []
    for _, i in sorted(key):
        if all(frame_distance(frames[j], frames[i], cell) > min_distance for j in picked):
            picked.append(i)
            if len(picked) == max_frames:
                break
    return picked
