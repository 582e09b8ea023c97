"""almd.Calculator(compile=True): torch.compile of the network gives the model's own numbers.

A file of its own so that the compilation (minutes on a machine without inductor's cache)
runs on one pytest worker while the other goes on.
"""

from __future__ import annotations

import numpy as np
import pytest
from ase.build import bulk

import almd


def test_compiled_calculator_matches_eager_and_keeps_hessians(sevennet32):
    """compile=True: the same energy, forces and stress as the eager model (float32), for cells of
    two sizes from one compilation (dynamic shapes), and Hessians from the eager model (the compiled graph has no double backward).
    """
    compiled = almd.Calculator("sevennet-0", compile=True)
    for repeat, seed in (((1, 1, 1), 3), ((2, 1, 1), 4)):
        atoms = bulk("Si", "diamond", a=5.43, cubic=True).repeat(repeat)
        atoms.rattle(0.05, seed=seed)
        eager = atoms.copy()
        eager.calc = sevennet32
        atoms.calc = compiled
        assert atoms.get_potential_energy() == pytest.approx(eager.get_potential_energy(), abs=1e-4)
        np.testing.assert_allclose(atoms.get_forces(), eager.get_forces(), atol=1e-4)
        np.testing.assert_allclose(atoms.get_stress(), eager.get_stress(), atol=1e-5)
    hessian = compiled.get_hessian(atoms)
    np.testing.assert_allclose(hessian, sevennet32.get_hessian(atoms), rtol=1e-5, atol=1e-4)  # float32 sums
