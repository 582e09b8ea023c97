"""A reference calculator slow enough to be killed in the middle of (Stillinger–Weber after a pause).

Each calculation first leaves a file in ``marker_dir``, so a test can tell that a
reference call is under way and send its signal then.
"""

from __future__ import annotations

import os
import time

from ase.calculators.calculator import Calculator, all_changes

from almd.references import build_calculator


class SlowSW(Calculator):
    implemented_properties = ["energy", "forces", "stress"]

    def __init__(self, marker_dir: str, seconds: float = 1.0, **kwargs):
        super().__init__(**kwargs)
        self.marker_dir, self.seconds = marker_dir, seconds

    def calculate(self, atoms=None, properties=("energy",), system_changes=all_changes):
        super().calculate(atoms, properties, system_changes)
        with open(os.path.join(self.marker_dir, f"call-{time.monotonic_ns()}"), "w"):
            pass
        time.sleep(self.seconds)
        a = self.atoms.copy()
        a.calc = build_calculator("stillinger-weber-si")
        self.results = {"energy": a.get_potential_energy(), "forces": a.get_forces(), "stress": a.get_stress()}
