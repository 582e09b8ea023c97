"""A walker's trajectory on disk: extended XYZ, one frame every n MD steps.

Each frame holds positions, momenta and cell, the model's energy, forces and
stress, the calibrated per-atom force uncertainty (``force_uncertainty``,
eV/Å, at steps where the spread was evaluated) and, in its comment line, the
step, the frame score, the temperature and the model version. A frame is
written in one ``write`` and flushed, so a kill leaves at most a torn last
frame. A resumed run first trims the file to the frames up to its checkpoint
(:func:`trim`, the torn frame included) and then re-runs and re-writes the
steps after it: every frame is in the file once.
"""

from __future__ import annotations

import io
import os
import re
from pathlib import Path

import numpy as np
from ase import Atoms
from ase.calculators.singlepoint import SinglePointCalculator

from almd.io import atomic_write

__all__ = ["TrajectoryWriter", "trim"]

_STEP = re.compile(r"(?:^|\s)step=(-?\d+)(?:\s|$)")


class TrajectoryWriter:
    """Appends every ``every``-th MD step of one walker to ``path`` (0: writes nothing)."""

    def __init__(self, path: str | os.PathLike, every: int):
        self.path, self.every = Path(path), int(every)

    def write(self, atoms: Atoms, step: int, score: float | None, temperature: float, model_version: int) -> bool:
        """Append the frame of ``step`` if it is on the schedule; whether it was written."""
        if self.every <= 0 or step % self.every:
            return False
        results = atoms.calc.results
        frame = Atoms(atoms.numbers, positions=atoms.positions, cell=atoms.cell, pbc=atoms.pbc,
                      momenta=atoms.get_momenta())
        stored = {key: results[key] for key in ("energy", "forces", "stress") if key in results}
        frame.calc = SinglePointCalculator(frame, **stored)
        if "forces_std" in results and results.get("uncertainty_age", 0) == 0:
            frame.arrays["force_uncertainty"] = np.asarray(results["forces_std"], dtype=float)
        frame.info.update(step=int(step), temperature=float(temperature), model_version=int(model_version),
                          score=float("nan") if score is None else float(score))
        buffer = io.StringIO()
        from ase.io import write

        write(buffer, frame, format="extxyz")
        with open(self.path, "a") as fh:
            fh.write(buffer.getvalue())
            fh.flush()
        return True


def trim(path: str | os.PathLike, last_step: int) -> int:
    """Keep the whole frames of ``path`` with step <= ``last_step``; the number kept."""
    path = Path(path)
    if not path.exists():
        return 0
    lines = path.read_text().splitlines(keepends=True)
    kept, i = [], 0
    while i < len(lines):
        try:
            n = int(lines[i])
        except ValueError:
            break  # a torn header
        frame = lines[i:i + n + 2]
        if len(frame) < n + 2 or not frame[-1].endswith("\n"):
            break  # a torn last frame
        found = _STEP.search(frame[1])
        if found and int(found.group(1)) <= last_step:
            kept.append("".join(frame))
        i += n + 2
    atomic_write(path, "".join(kept))
    return len(kept)
