"""Third-order labels: the Hessian Φ2 + Φ3·u that a phono3py data set's own force
constants give at its displaced geometries, checked against an exact Hessian."""

import numpy as np
import pytest
from ase.build import bulk

from almd.dataset import third_order_hessians
from almd.finetune.data import sample_from_atoms
from almd.phonons import resolve_calculator
from almd.phonons._calculators import get_hessian
from almd.phonons.harmonic import to_ase_atoms, to_phonopy_atoms


@pytest.fixture(scope="module")
def sw_phono3py():
    """phono3py's pair displacements (0.03 Å) of 64-atom Si, Stillinger–Weber forces."""
    from phono3py import Phono3py

    calc = resolve_calculator("stillinger-weber-si")
    unit = bulk("Si", "diamond", a=5.431, cubic=True)
    ph3 = Phono3py(to_phonopy_atoms(unit), supercell_matrix=2 * np.eye(3, dtype=int),
                   primitive_matrix="F", log_level=0)
    ph3.generate_displacements(distance=0.03)
    forces = []
    for cell in ph3.supercells_with_displacements:
        atoms = to_ase_atoms(cell)
        atoms.calc = calc
        forces.append(atoms.get_forces())
    ph3.forces = np.array(forces)
    return ph3, calc


def test_label_is_the_hessian_at_the_displaced_geometry(sw_phono3py):
    ph3, calc = sw_phono3py
    frames = third_order_hessians(ph3, symmetrize=False)  # exact forces: symmetrisation adds nothing but a minute
    assert len(frames) == len(ph3.supercells_with_displacements)
    perfect = to_ase_atoms(ph3.supercell)
    h_perfect = get_hessian(calc, perfect)
    for atoms in frames[::20]:
        exact = get_hessian(calc, atoms)
        label = atoms.info["hessian"]
        third = np.abs(exact - h_perfect).max()  # what the displacement changed: Φ3·u (+ O(u²))
        assert third > 0.1  # eV/Å²: a real third-order signal at 0.03 Å
        # the label carries it: its error is a small fraction of the change, where Φ2 alone misses all of it
        assert np.abs(label - exact).max() < 0.05 * third
        # the columns kept for training are the ones the displacement changed
        cols = atoms.info["hessian_columns"]
        moved = np.flatnonzero(np.linalg.norm(atoms.positions - perfect.positions, axis=1) > 1e-3)
        assert {3 * i + c for i in moved for c in range(3)} <= set(cols)
        changed = np.linalg.norm(exact - h_perfect, axis=0)
        assert changed[cols].min() > 0.05 * changed.max()


def test_third_order_sample_keeps_forces_not_relaxed_stress(sw_phono3py):
    ph3, _ = sw_phono3py
    atoms = third_order_hessians(ph3, symmetrize=False)[0]
    s = sample_from_atoms(atoms)
    assert s.hessian is not None and s.columns == tuple(atoms.info["hessian_columns"])
    assert s.stress is None  # a displaced cell is not relaxed: no zero-stress label
    assert np.allclose(s.forces, atoms.get_forces())
