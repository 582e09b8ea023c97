"""Folded-supercell Hessian labels: a big supercell's force constants summed over images
onto a small commensurate cell are that small periodic cell's Hessian.
"""

from __future__ import annotations

import numpy as np
import pytest
from ase.build import bulk, make_supercell
from phonopy import Phonopy
from phonopy.harmonic.dynmat_to_fc import get_commensurate_points
from phonopy.harmonic.force_constants import compact_fc_to_full_fc

from almd.data import SI_PBE
from almd.phonons._calculators import stillinger_weber_si
from almd.phonons.datasets import (
    fold_force_constants,
    folded_phonon_hessian,
    force_constants_from_hessian,
    hessian_from_force_constants,
    load_phonon_dataset,
    phonon_hessian,
)
from almd.phonons.harmonic import phonopy_from_calculator, to_ase_atoms

SI_SET = SI_PBE / "phono3py_disp.yaml"  # 64-atom conventional 2×2×2 supercell, VASP PBE
FCC = [[0, 1, 1], [1, 0, 1], [1, 1, 0]]  # 2×2×2 primitive cells written on the conventional cell


def central_difference_hessian(atoms, calc, delta: float = 0.01) -> np.ndarray:
    """(3n, 3n) Hessian of the periodic cell from forces at ±delta Å on each coordinate."""
    n = len(atoms)
    h = np.zeros((3 * n, 3 * n))
    for k in range(3 * n):
        forces = []
        for sign in (1.0, -1.0):
            moved = atoms.copy()
            moved.positions[k // 3, k % 3] += sign * delta
            moved.calc = calc
            forces.append(moved.get_forces().ravel())
        h[:, k] = -(forces[0] - forces[1]) / (2 * delta)
    return h


def assert_symmetric_and_asr(h: np.ndarray, atol: float = 1e-10) -> None:
    n = h.shape[0] // 3
    np.testing.assert_allclose(h, h.T, atol=atol)
    # acoustic sum rule: a rigid translation costs nothing, so Σ_j H[3i+a, 3j+b] = 0
    np.testing.assert_allclose(h.reshape(n, 3, n, 3).sum(axis=2), 0.0, atol=atol)


@pytest.fixture(scope="module")
def si_set():
    """The shipped Si set loaded once, with its full force constants on the 64-atom cell."""
    ph = load_phonon_dataset(SI_SET, is_compact_fc=False)
    big, h = phonon_hessian(ph)
    return ph, big, force_constants_from_hessian(h)


def test_fold_of_128_atom_fc_is_the_16_atom_hessian():
    sw = stillinger_weber_si()
    prim = bulk("Si", "diamond", a=5.431)
    ph = phonopy_from_calculator(prim, sw, supercell=4, method="displacement", primitive=None)
    fc = compact_fc_to_full_fc(ph.primitive, ph.force_constants)
    big = to_ase_atoms(ph.supercell)
    small = make_supercell(prim, 2 * np.eye(3))
    assert (len(big), len(small)) == (128, 16)

    folded = fold_force_constants(fc, big, small)
    direct = central_difference_hessian(small, sw)
    assert folded.shape == (48, 48)
    # both are ±0.01 Å central differences: error ~ u²/6·∂⁴E ≈ 4e-4 eV/Å² measured, max|H| ≈ 18 eV/Å²
    np.testing.assert_allclose(folded, direct, atol=2e-3)
    assert np.abs(direct).max() > 10.0  # a real Hessian, not two zero matrices agreeing
    assert_symmetric_and_asr(folded)


def test_fold_onto_itself_is_the_supercell_hessian(si_set):
    _, big, fc = si_set
    assert len(big) == 64
    assert np.array_equal(fold_force_constants(fc, big, big), hessian_from_force_constants(fc))
    # the same in another atom order: folding maps atoms by position, not by index
    order = np.random.default_rng(0).permutation(len(big))
    folded = fold_force_constants(fc, big, big[order])
    np.testing.assert_array_equal(folded.reshape(64, 3, 64, 3),
                                  hessian_from_force_constants(fc).reshape(64, 3, 64, 3)[order][:, :, order])


@pytest.mark.parametrize(("matrix", "n_atoms"), [([1, 1, 1], 8), (FCC, 16)])
def test_folded_dft_hessian_is_exact_at_commensurate_q(si_set, matrix, n_atoms):
    ph, _, fc = si_set
    small, h = folded_phonon_hessian(ph, matrix)
    assert len(small) == n_atoms and h.shape == (3 * n_atoms, 3 * n_atoms)
    assert_symmetric_and_asr(h)
    # the small cell's modes are the data's phonons at its commensurate q-points (Γ and X for the 8-atom cube)
    harmonic = Phonopy(ph.unitcell, supercell_matrix=ph.supercell_matrix, primitive_matrix=ph.primitive_matrix)
    harmonic.force_constants = fc
    in_primitive = np.rint(np.linalg.inv(ph.primitive_matrix) @ np.asarray(np.diag(matrix) if np.ndim(matrix) == 1
                                                                             else matrix)).astype(int)
    harmonic.run_qpoints(get_commensurate_points(in_primitive), with_dynamical_matrices=True)
    expected = np.sort(np.concatenate([np.linalg.eigvalsh(d) for d in harmonic.qpoints.dynamical_matrices]))
    mass = ph.unitcell.masses[0]  # the data's Si mass (ASE's differs in the 5th digit)
    got = np.sort(np.linalg.eigvalsh(h / mass))
    np.testing.assert_allclose(got, expected, atol=1e-9)
    assert expected.max() > 0.5  # eV/Å²/amu: optical modes present


def test_not_commensurate_raises(si_set):
    ph, big, fc = si_set
    with pytest.raises(ValueError, match=r"\[\[3, 0, 0\], \[0, 1, 0\], \[0, 0, 1\]\] is not commensurate with the data set's supercell \[\[2, 0, 0\]"):
        folded_phonon_hessian(ph, [3, 1, 1])
    small = bulk("Si", "diamond", a=5.466, cubic=True)
    with pytest.raises(ValueError, match="not commensurate"):
        fold_force_constants(fc, big, make_supercell(small, np.diag([3, 1, 1])))
    shifted = big.copy()
    shifted.positions[5] += 0.3
    with pytest.raises(ValueError, match=r"big-cell atom 5 \(Si\).*is on no small-cell site"):
        fold_force_constants(fc, shifted, to_ase_atoms(ph.unitcell))
    other = to_ase_atoms(ph.unitcell)
    other.symbols[0] = "Ge"
    with pytest.raises(ValueError, match="is Si but its small-cell site 0 is Ge"):
        fold_force_constants(fc, big, other)


def test_load_phonon_fold_and_config():
    from almd.finetune import ConfigError, DataError, FinetuneConfig
    from almd.finetune.data import load_phonon

    (sample,) = load_phonon(SI_SET, fold=[1, 1, 1])
    assert len(sample.atoms) == 8 and sample.hessian.shape == (24, 24)
    assert "folded[1, 1, 1]" in sample.name
    (full,) = load_phonon(SI_SET)
    assert len(full.atoms) == 64
    with pytest.raises(DataError, match="not commensurate"):
        load_phonon(SI_SET, fold=[3, 1, 1])

    assert FinetuneConfig.from_dict({"data": {"phonon_fold": [1, 1, 1]}}).data.phonon_fold == [1, 1, 1]
    assert FinetuneConfig.from_dict({}).data.phonon_fold == []
    for bad in ([0, 2, 2], [2, 2]):
        with pytest.raises(ConfigError, match=r"^data\.phonon_fold = .* is not allowed; 3 positive ints") as err:
            FinetuneConfig.from_dict({"data": {"phonon_fold": bad}})
        assert "\n" not in str(err.value)


def test_finetuner_trains_on_the_folded_cell(tmp_path):
    from almd import potentials
    from almd.finetune import FinetuneConfig, Finetuner

    cfg = FinetuneConfig.from_dict({"data": {"phonon": [str(SI_SET)], "phonon_fold": [1, 1, 1]},
                                    "run": {"output": str(tmp_path / "out"), "progress": False}})
    trainer = Finetuner(cfg, potential=potentials.load("sevennet-0"))  # set-up only: no training step
    assert [len(s.atoms) for s in trainer.phonon] == [8]
    assert trainer.phonon[0].hessian.shape == (24, 24)
