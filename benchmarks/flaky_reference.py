"""Stillinger–Weber silicon that fails as DFT codes do, the same way in every run.

A frame whose content digit (a hash of its positions, 0–9) is 0 or 1 fails its first
attempt (an "SCF" error; the retry succeeds: one frame in five costs two attempts); a
frame whose digit is 7 always returns NaN forces (one in ten is recorded as failed).
Whether a frame fails depends on the frame alone, not on the order of the calls, so an
interrupted run and an uninterrupted one meet the same failures. ``marker_dir`` keeps
which frames have had their first attempt.
"""

from __future__ import annotations

import hashlib
import os

import numpy as np
from ase.calculators.calculator import Calculator, all_changes

from almd.references import build_calculator


class FlakySW(Calculator):
    implemented_properties = ["energy", "forces", "stress"]

    def __init__(self, marker_dir: str, **kwargs):
        super().__init__(**kwargs)
        self.marker_dir = marker_dir

    def calculate(self, atoms=None, properties=("energy",), system_changes=all_changes):
        super().calculate(atoms, properties, system_changes)
        digest = hashlib.sha256(np.round(self.atoms.positions, 8).tobytes()).hexdigest()
        digit = int(digest, 16) % 10
        marker = os.path.join(self.marker_dir, digest)
        first = not os.path.exists(marker)
        open(marker, "a").close()
        if digit in (0, 1) and first:
            raise RuntimeError("SCF not converged (first attempt)")
        a = self.atoms.copy()
        a.calc = build_calculator("stillinger-weber-si")
        forces = a.get_forces()
        if digit == 7:
            forces[0, 0] = np.nan
        self.results = {"energy": a.get_potential_energy(), "forces": forces, "stress": a.get_stress()}
