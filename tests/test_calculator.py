"""almd.Calculator as users meet it: against sevenn's own calculator, inside ASE
dynamics and optimisers, with a reused neighbour list, and through phonopy.
"""

from __future__ import annotations

import numpy as np
import pytest
from ase import Atoms, units
from ase.build import bulk
from ase.md.velocitydistribution import MaxwellBoltzmannDistribution
from ase.md.verlet import VelocityVerlet
from ase.optimize import BFGS

import almd
from almd.potentials import UnknownElementError


def test_matches_sevenn_calculator(sevennet32):
    """Same weights, same structure: energies, forces, stress as sevenn's own calculator (float32)."""
    from sevenn.calculator import SevenNetCalculator

    atoms = bulk("Si", "diamond", a=5.43, cubic=True).repeat((2, 1, 1))
    atoms.rattle(0.08, seed=11)
    atoms.calc = sevennet32
    ours = atoms.get_potential_energy(), atoms.get_forces(), atoms.get_stress()
    theirs_atoms = atoms.copy()
    theirs_atoms.calc = SevenNetCalculator("7net-0")
    theirs = theirs_atoms.get_potential_energy(), theirs_atoms.get_forces(), theirs_atoms.get_stress()
    assert ours[0] == pytest.approx(theirs[0], abs=2e-4)
    np.testing.assert_allclose(ours[1], theirs[1], atol=5e-5)
    np.testing.assert_allclose(ours[2], theirs[2], atol=5e-6)
    assert atoms.calc.results["energies"].sum() == pytest.approx(ours[0], abs=1e-3)


def test_nve_conserves_energy_with_reused_neighbour_list():
    """NVE with VelocityVerlet at 1 fs: total energy drifts < 2 meV/atom over 60 steps while
    the neighbour list (skin 0.5 Å) is rebuilt only a few times.
    """
    calc = almd.Calculator("sevennet-0", skin=0.5)
    atoms = bulk("Si", "diamond", a=5.43, cubic=True)
    MaxwellBoltzmannDistribution(atoms, temperature_K=600, rng=np.random.default_rng(1))
    atoms.calc = calc
    dyn = VelocityVerlet(atoms, timestep=1.0 * units.fs)
    energies = []
    dyn.attach(lambda: energies.append(atoms.get_total_energy()), interval=1)
    dyn.run(60)
    drift = (max(energies) - min(energies)) / len(atoms)
    assert drift < 2e-3
    assert calc.neighbors.builds < 10


def test_skin_does_not_change_results():
    """A reused neighbour list (skin) gives the same forces as one rebuilt every call, bit for bit
    (the cache hands out the pairs inside the cutoff in a canonical order).
    """
    base = bulk("Si", "diamond", a=5.43, cubic=True)
    with_skin = almd.Calculator("sevennet-0", dtype="float64", skin=1.0)
    no_skin = almd.Calculator("sevennet-0", dtype="float64", skin=0.0)
    rng = np.random.default_rng(5)
    atoms = base.copy()
    for _ in range(4):
        atoms.positions += rng.normal(0, 0.08, atoms.positions.shape)  # < skin/2 per step overall
        f1 = with_skin.get_forces(atoms)
        f2 = no_skin.get_forces(atoms)
        np.testing.assert_array_equal(f1, f2)
    assert with_skin.neighbors.builds < no_skin.neighbors.builds


def test_bfgs_relaxes_rattled_silicon(sevennet32):
    atoms = bulk("Si", "diamond", a=5.43, cubic=True)
    atoms.rattle(0.05, seed=2)
    atoms.calc = sevennet32
    e0 = atoms.get_potential_energy()
    assert BFGS(atoms, logfile=None).run(fmax=0.01, steps=100)
    assert atoms.get_potential_energy() < e0
    assert np.abs(atoms.get_forces()).max() < 0.01


def test_hessian_is_symmetric_and_obeys_sum_rule(sevennet64, si8):
    h = sevennet64.get_hessian(si8)
    assert h.shape == (24, 24)
    np.testing.assert_allclose(h, h.T, atol=1e-8)
    np.testing.assert_allclose(h.reshape(8, 3, 24).sum(0), 0.0, atol=1e-6)


def test_gamma_phonons_agree_with_phonopy_finite_displacements(sevennet64):
    """Si at Γ: frequencies from get_hessian vs phonopy's finite displacements through the same calculator."""
    from phonopy import Phonopy
    from phonopy.structure.atoms import PhonopyAtoms

    prim = bulk("Si", "diamond", a=5.43)
    unit = PhonopyAtoms(symbols=prim.get_chemical_symbols(), cell=prim.cell.array,
                        scaled_positions=prim.get_scaled_positions())
    # Γ needs no supercell: the periodic primitive cell carries all its images
    phonon = Phonopy(unit, supercell_matrix=np.eye(3, dtype=int))
    # SevenNet-0's energy surface at the perfect crystal stops being quadratic beyond
    # ~0.002 Å (measured: curvature 9.385 eV/Å² up to 0.002 Å, 9.27 at 0.01 Å), so the
    # comparison with the exact Hessian uses small displacements in float64.
    phonon.generate_displacements(distance=0.001)
    forces = []
    for sc in phonon.supercells_with_displacements:
        a = Atoms(sc.symbols, cell=sc.cell, scaled_positions=sc.scaled_positions, pbc=True)
        forces.append(sevennet64.get_forces(a))
    phonon.forces = forces
    phonon.produce_force_constants()
    fd_freqs = gamma(phonon)

    sc = phonon.supercell
    supercell = Atoms(sc.symbols, cell=sc.cell, scaled_positions=sc.scaled_positions, pbc=True)
    n = len(supercell)
    h = sevennet64.get_hessian(supercell)
    phonon.force_constants = h.reshape(n, 3, n, 3).swapaxes(1, 2)
    hvp_freqs = gamma(phonon)
    np.testing.assert_allclose(np.sort(hvp_freqs), np.sort(fd_freqs), atol=0.01)  # THz
    assert np.sort(hvp_freqs)[-1] > 10.0  # the optical mode is there (DFT: 15.09 THz)
    np.testing.assert_allclose(np.sort(hvp_freqs)[:3], 0.0, atol=0.05)  # acoustic at Γ


def gamma(phonon) -> np.ndarray:
    phonon.run_qpoints([[0, 0, 0]])
    return phonon.get_qpoints_dict()["frequencies"][0]


def test_unknown_element_names_it():
    calc = almd.Calculator("sevennet-0")
    atoms = Atoms("SiOg", positions=[[0, 0, 0], [0, 0, 2.2]], cell=[10, 10, 10], pbc=True)
    atoms.calc = calc
    with pytest.raises(UnknownElementError, match="Og"):
        atoms.get_potential_energy()


def test_unknown_model_name_lists_known():
    with pytest.raises(FileNotFoundError, match="sevennet-0"):
        almd.Calculator("no-such-model")


def test_hessian_vector_products_match_full_hessian(sevennet64, si2):
    h = sevennet64.get_hessian(si2)
    vectors = np.random.default_rng(0).normal(size=(4, len(si2), 3))
    hv = sevennet64.get_hessian_vector_products(si2, vectors)
    np.testing.assert_allclose(hv.reshape(4, -1), vectors.reshape(4, -1) @ h.T, atol=1e-9)


def test_mace_matches_mace_calculator():
    """A MACE model through almd's graph gives what mace-torch's own calculator gives."""
    pytest.importorskip("mace")
    import copy

    import torch
    from mace.calculators import MACECalculator

    from almd.potentials.mace import small_random_mace

    default = torch.get_default_dtype()
    try:
        pot = small_random_mace([14, 6], cutoff=4.5, seed=1).double()
        reference = MACECalculator(models=copy.deepcopy(pot.model), default_dtype="float64")
    finally:
        torch.set_default_dtype(default)  # MACECalculator changes the global default
    atoms = bulk("SiC", "zincblende", a=4.36, cubic=True)
    atoms.rattle(0.05, seed=7)
    theirs = atoms.copy()
    theirs.calc = reference
    atoms.calc = almd.Calculator(pot, dtype="float64")
    assert atoms.get_potential_energy() == pytest.approx(theirs.get_potential_energy(), abs=1e-10)
    np.testing.assert_allclose(atoms.get_forces(), theirs.get_forces(), atol=1e-10)
    np.testing.assert_allclose(atoms.get_stress(), theirs.get_stress(), atol=1e-10)


def test_forces_then_stress_is_one_model_call(sevennet64, si8):
    """ASE asks for stress after forces (NPT, optimisers with a cell filter): one forward and
    one backward answer both, and the stress is the strain derivative of the energy.
    """
    calls = []
    forward = sevennet64.potential.forward_with_atomic
    sevennet64.potential.forward_with_atomic = lambda graph: calls.append(1) or forward(graph)
    try:
        atoms = si8.copy()
        atoms.calc = sevennet64
        atoms.get_forces()
        stress = atoms.get_stress(voigt=False)
        assert len(calls) == 1
    finally:
        sevennet64.potential.forward_with_atomic = forward
    # σ = (1/V) ∂E/∂ε against central differences of a homogeneous strain of the cell
    h, volume = 1e-5, atoms.get_volume()
    for a, b in [(0, 0), (1, 2)]:
        energies = []
        for sign in (1, -1):
            eps = np.zeros((3, 3))
            eps[a, b] = eps[b, a] = sign * h / (2 if a != b else 1)
            strained = atoms.copy()
            strained.set_cell(atoms.cell.array @ (np.eye(3) + eps), scale_atoms=True)
            strained.calc = sevennet64
            energies.append(strained.get_potential_energy())
        derivative = (energies[0] - energies[1]) / (2 * h) / volume
        assert derivative == pytest.approx(stress[a, b], abs=1e-6)


def test_sevennet_mf0_runs_its_pbe_fidelity(tmp_path, si8):
    """SevenNet-MF-0 (multi-fidelity) through almd.Calculator: its PBE modality, as sevenn's own
    calculator gives it with modal="PBE", and kept when the model is saved and loaded again.
    """
    from sevenn.calculator import SevenNetCalculator

    from almd import potentials

    ours, theirs = si8.copy(), si8.copy()
    ours.calc = almd.Calculator("sevennet-mf-0")
    theirs.calc = SevenNetCalculator("7net-mf-0", modal="PBE")
    assert ours.get_potential_energy() == pytest.approx(theirs.get_potential_energy(), abs=1e-4)
    np.testing.assert_allclose(ours.get_forces(), theirs.get_forces(), atol=1e-4)
    np.testing.assert_allclose(ours.get_stress(), theirs.get_stress(), atol=1e-5)
    path = potentials.save(ours.calc.potential, tmp_path / "mf0.pt")
    again = si8.copy()
    again.calc = almd.Calculator(model=path)
    assert again.calc.potential.modality == "PBE"
    assert again.get_potential_energy() == pytest.approx(ours.get_potential_energy(), abs=1e-5)


def test_the_neighbour_list_survives_a_small_cell_change_and_stays_exact():
    """NPT moves the cell every step: within the skin's bound the cached list gives exactly the
    pairs a fresh build finds (strained and rattled cells, sheared too); beyond it, it is rebuilt.
    """
    from almd.potentials.calculator import NeighborCache
    from almd.potentials.graph import neighbor_pairs

    def pairs(p):
        order = np.lexsort((p.shifts[:, 2], p.shifts[:, 1], p.shifts[:, 0], p.j, p.i))
        return np.column_stack([p.i[order], p.j[order], p.shifts[order]])

    cutoff = 5.0
    cache = NeighborCache(cutoff, skin=0.5)
    start = bulk("Si", "diamond", a=5.431, cubic=True).repeat(2)
    start.rattle(0.02, seed=1)
    cache.get(start)
    rng = np.random.default_rng(0)
    for strain in (0.01, -0.02, 0.03):
        atoms = start.copy()
        eps = strain * (np.eye(3) + 0.3 * rng.standard_normal((3, 3)))  # with shear
        atoms.set_cell(atoms.cell.array @ (np.eye(3) + eps), scale_atoms=True)
        atoms.positions += rng.normal(0, 0.02, atoms.positions.shape)
        fresh = neighbor_pairs(atoms, cutoff)
        inside = np.flatnonzero(np.linalg.norm(atoms.positions[fresh.j] - atoms.positions[fresh.i]
                                               + fresh.shifts @ atoms.cell.array, axis=1) < cutoff)
        expected = pairs(type(fresh)(fresh.i[inside], fresh.j[inside], fresh.shifts[inside]))
        np.testing.assert_array_equal(pairs(cache.get(atoms)), expected)
        if strain == 0.01:  # bound ≈ 2·0.07 + 5.5·0.016 ≈ 0.23 Å of the 0.5 Å skin: reused
            assert cache.builds == 1
    squeezed = start.copy()
    squeezed.set_cell(start.cell.array * 0.9, scale_atoms=True)  # 10 %: beyond any skin
    cache.get(squeezed)
    assert cache.builds >= 2

