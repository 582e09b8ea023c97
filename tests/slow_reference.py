"""Reference calculators for the fault tests: one slow enough to be killed in the middle of
(Stillinger–Weber after a pause), one that fails as DFT codes do.

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
        # named by the process that asked (an MPI rank, the oracle worker's parent) and the time
        with open(os.path.join(self.marker_dir, f"call-{os.getppid()}-{time.monotonic_ns()}"), "w"):
            pass
        time.sleep(self.seconds)
        a = self.atoms.copy()
        a.calc = build_calculator("stillinger-weber-si")
        self.results = {"energy": a.get_potential_energy(), "forces": a.get_forces(), "stress": a.get_stress()}


class FlakySW(Calculator):
    """Stillinger–Weber that fails as DFT codes do: the n-th calculation (counted by its marker
    files) raises when n % 5 == 4 and returns NaN forces when n % 10 == 7.
    """

    implemented_properties = ["energy", "forces", "stress"]

    def __init__(self, marker_dir: str, **kwargs):
        super().__init__(**kwargs)
        self.marker_dir = marker_dir

    def calculate(self, atoms=None, properties=("energy",), system_changes=all_changes):
        super().calculate(atoms, properties, system_changes)
        n = len(os.listdir(self.marker_dir)) + 1
        with open(os.path.join(self.marker_dir, f"call-{n:05d}"), "w"):
            pass
        if n % 5 == 4:
            raise RuntimeError(f"SCF not converged (calculation {n})")
        a = self.atoms.copy()
        a.calc = build_calculator("stillinger-weber-si")
        forces = a.get_forces()
        if n % 10 == 7:
            forces[0, 0] = float("nan")
        self.results = {"energy": a.get_potential_energy(), "forces": forces, "stress": a.get_stress()}
