"""Physics checks of almd.phonons with Stillinger–Weber Si (fast) and the VASP PBE Si data."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from ase.build import bulk

from almd import phonons as P
from almd.data import SI_PBE as _packaged_si_pbe

ROOT = Path(__file__).resolve().parents[1]
R_GAS = 8.314462618  # J/K/mol
A_SW = 5.431  # Å, Stillinger–Weber's Si equilibrium lattice constant


SI_PBE = _packaged_si_pbe  # shipped with almd (BSD-3, phono3py's example)
needs_si_pbe = pytest.mark.skipif(SI_PBE is None, reason="si-pbe DFT data not found")


@pytest.fixture(scope="module")
def sw():
    return P.stillinger_weber_si()


@pytest.fixture(scope="module")
def si_prim():
    return bulk("Si", "diamond", a=A_SW)


@pytest.fixture(scope="module")
def sw_result(si_prim, sw):
    return P.phonons(si_prim, sw, 2, method="displacement", mesh=[12, 12, 12],
                     temperatures=[0, 100, 300, 1000, 5000, 20000])


@pytest.fixture(scope="module")
def si_pbe_ref():
    if SI_PBE is None:
        pytest.skip("si-pbe DFT data not found")
    return P.load_reference(SI_PBE)


# ------------------------------------------------------------------ force constants
def test_displacement_fc_match_analytic_hessian(si_prim, sw):
    ph_d = P.phonopy_from_calculator(si_prim, sw, 2, method="displacement", distance=0.01)
    ph_h = P.phonopy_from_calculator(si_prim, sw, 2, method="hessian")
    # phonopy stores compact fc (n_prim, n_super, 3, 3) for displacements, full for the Hessian
    p2s = ph_d.primitive.p2s_map
    fc_h = ph_h.force_constants[p2s]
    scale = np.abs(fc_h).max()
    assert scale > 5.0  # eV/Å², a real stiffness
    # finite differences of 0.01 Å: O(u²) error, far below the entries themselves
    assert np.abs(ph_d.force_constants - fc_h).max() < 1e-3 * scale
    # the Hessian round trip of docs/methods.md
    h = P.hessian_from_force_constants(ph_h.force_constants)
    assert np.allclose(h, h.T, atol=1e-8)
    assert np.array_equal(P.force_constants_from_hessian(h), ph_h.force_constants)


def test_two_displacement_amplitudes_agree(si_prim, sw):
    fc1 = P.phonopy_from_calculator(si_prim, sw, 2, method="displacement", distance=0.01).force_constants
    fc3 = P.phonopy_from_calculator(si_prim, sw, 2, method="displacement", distance=0.03).force_constants
    # anharmonic contamination grows with the amplitude but stays small at 0.03 Å
    assert np.abs(fc1 - fc3).max() < 0.02 * np.abs(fc1).max()


def test_gamma_optical_matches_frozen_phonon(si_prim, sw, sw_result):
    """Γ optical mode straight from forces: sublattices moved ±u along x in the primitive cell."""
    u = 0.005
    ks = []
    for sign in (1, -1):
        a = si_prim.copy()
        a.calc = sw
        a.positions[0, 0] += sign * u
        a.positions[1, 0] -= sign * u
        ks.append(-a.get_forces()[0, 0] / (sign * u))
    k = np.mean(ks)  # eV/Å² restoring constant of one atom, = Φ11 − Φ12
    m = si_prim.get_masses()[0]
    nu = np.sqrt(k / m) * 15.633302  # √(eV/Å²/amu) → THz
    gamma = sorted(sw_result.frequencies_thz["Γ"])
    assert gamma[3:] == pytest.approx([nu] * 3, abs=0.02)
    assert 17.0 < nu < 18.5  # SW silicon overestimates PBE's 15.1 THz
    # acoustic sum rule: three zero modes
    assert np.abs(gamma[:3]).max() < 0.01


def test_high_symmetry_points_fcc(sw_result):
    q = sw_result.qpoints
    assert set(["Γ", "X", "L"]) <= set(q)
    f = sw_result.frequencies_thz
    # degeneracies of the diamond structure: TA at X and L doubly degenerate
    assert f["X"][0] == pytest.approx(f["X"][1], abs=1e-4)
    assert f["L"][0] == pytest.approx(f["L"][1], abs=1e-4)
    assert f["X"][0] > 1.0 and f["L"][0] > 1.0  # no soft modes at the zone boundary


def test_thermal_limits(sw_result):
    t = np.array(sw_result.temperatures_K)
    cv = np.array(sw_result.heat_capacity_J_K_mol)
    s = np.array(sw_result.entropy_J_K_mol)
    f = np.array(sw_result.free_energy_kJ_mol)
    n = sw_result.n_atoms_primitive
    assert n == 2
    assert cv[t == 0][0] == pytest.approx(0.0, abs=1e-6)
    assert np.all(np.diff(cv) > 0) and np.all(np.diff(s) > 0)
    assert np.all(np.diff(f) < 0)  # dF/dT = −S < 0
    assert f[t == 0][0] > 0  # zero-point energy
    # Dulong–Petit: C_V → 3 n R per mole of primitive cells
    assert cv[t == 20000][0] == pytest.approx(3 * n * R_GAS, rel=0.01)
    # S, F, C_V at 300 K come from the same arrays
    th = sw_result.thermal_300K
    assert th["Cv_J_K_mol"] == pytest.approx(cv[t == 300][0])
    assert sw_result.omega_max_K == pytest.approx(sw_result.omega_max_thz * 47.9924, rel=1e-5)


def test_relax_recovers_sw_lattice_constant(sw):
    strained = bulk("Si", "diamond", a=5.50)
    relaxed = P.relax_structure(strained, sw, fmax=0.001)
    a = (relaxed.get_volume() * 4) ** (1 / 3)  # 2-atom fcc cell holds a quarter of the cube
    assert a == pytest.approx(A_SW, abs=2e-3)


def test_mdr_protocol_relaxes_before_displacing(sw, sw_result):
    strained = bulk("Si", "diamond", a=5.50)
    r = P.phonons(strained, sw, 2, relax=True, method="displacement", mesh=[12, 12, 12])
    # after relaxation the strained start gives the equilibrium crystal's phonons
    assert r.frequencies_thz["Γ"][-1] == pytest.approx(sw_result.frequencies_thz["Γ"][-1], abs=0.02)
    assert r.extra["relaxed"] is True


def test_cutoff_margin(sw):
    from almd.phonons._calculators import cutoff_margin, model_cutoff

    rc = model_cutoff(sw)
    assert rc == pytest.approx(3.7712, abs=1e-3)  # SW: a·σ = 1.8 × 2.0951 Å
    # diamond Si: second shell at a/√2 = 3.840 Å, just outside the cutoff
    assert cutoff_margin(bulk("Si", "diamond", a=A_SW), rc) == pytest.approx(A_SW / np.sqrt(2) - rc, abs=1e-6)


def test_compare_with_itself_is_zero_and_json(sw_result, tmp_path):
    c = P.compare(sw_result, sw_result)
    for key in ("omega_max_K_abs_error", "F_kJ_mol_abs_error", "S_J_K_mol_abs_error",
                "Cv_J_K_mol_abs_error", "bz_mae_thz", "band_mae_thz"):
        assert c[key] == pytest.approx(0.0, abs=1e-9), key
    out = tmp_path / "r.json"
    sw_result.to_json(out)
    d = json.loads(out.read_text())
    assert d["frequencies_thz"]["Γ"] == sw_result.frequencies_thz["Γ"]
    assert "phonopy" not in d and "per mole of phonopy primitive cells" in d["units"]["thermal"]
    back = P.PhononResult.from_json(out)
    assert back.phonopy is None and back.thermal_300K == sw_result.thermal_300K
    assert P.compare(back, sw_result)["band_mae_thz"] == pytest.approx(0.0, abs=1e-9)  # from stored bands


class _AutodiffStyle:
    """Stands in for almd.Calculator: forces plus a get_hessian() method, no 'hessian' property."""

    def __init__(self, inner):
        self.inner, self.hessian_calls = inner, 0
        self.implemented_properties = ["energy", "forces"]

    def get_forces(self, atoms):
        return self.inner.get_forces(atoms)

    def get_hessian(self, atoms):
        self.hessian_calls += 1
        return self.inner.get_property("hessian", atoms).toarray()

    def get_hessian_vector_products(self, atoms, vectors):
        h = self.inner.get_property("hessian", atoms).toarray()
        return (np.asarray(vectors).reshape(len(vectors), -1) @ h.T).reshape(np.shape(vectors))

    # just enough of the ASE calculator protocol for Atoms.get_forces()
    def get_property(self, name, atoms, allow_calculation=True):
        return self.inner.get_property(name, atoms, allow_calculation)


def test_get_hessian_contract(si_prim, sw):
    calc = _AutodiffStyle(sw)
    ph_auto = P.phonopy_from_calculator(si_prim, calc, 2)  # autodiff Hessians are costly: auto displaces
    assert calc.hessian_calls == 0 and ph_auto.dataset is not None
    ph_h = P.phonopy_from_calculator(si_prim, calc, 2, method="hessian")
    assert calc.hessian_calls == 1
    fc_h = ph_h.force_constants[ph_auto.primitive.p2s_map]
    assert np.abs(ph_auto.force_constants - fc_h).max() < 1e-3 * np.abs(fc_h).max()
    # −H·u forces on phonopy's own displacements reproduce the Hessian's force constants exactly
    ph_v = P.phonopy_from_calculator(si_prim, calc, 2, method="hvp")
    assert np.abs(ph_v.force_constants - fc_h).max() < 1e-8 * np.abs(fc_h).max()
    with pytest.raises(ValueError, match="no Hessian"):
        P.phonopy_from_calculator(si_prim, P.resolve_calculator("emt"), 2, method="hessian")


# ------------------------------------------------------------------ DFT reference
CHALCOGENIDE = ROOT.parent / "shared" / "data" / "dft" / "chalcogenides-pbe" / "mp-1000.phonopy.yaml.xz"


@pytest.mark.skipif(not CHALCOGENIDE.exists(), reason="chalcogenide DFT data not found")
def test_phonopy_yaml_reference_matches_published_dft():
    """BaTe (mp-1000): our thermal properties of the DFT data vs the published benchmark values."""
    ref = P.load_reference(CHALCOGENIDE)
    r = ref.result(temperatures=[300.0])
    assert r.formula == "BaTe" and len(ref.phonopy.supercell) == 216
    assert r.thermal_300K["S_J_K_mol"] == pytest.approx(103.56, abs=0.3)
    assert r.thermal_300K["Cv_J_K_mol"] == pytest.approx(49.30, abs=0.1)
    assert r.thermal_300K["F_kJ_mol"] == pytest.approx(-15.93, abs=0.1)
    assert r.omega_max_thz == pytest.approx(3.655, abs=0.05)


@needs_si_pbe
def test_si_pbe_reference_gamma_optical(si_pbe_ref):
    r = si_pbe_ref.result(mesh=[8, 8, 8])
    gamma = sorted(r.frequencies_thz["Γ"])
    assert gamma[3:] == pytest.approx([15.09] * 3, abs=0.05)
    assert np.abs(gamma[:3]).max() < 0.01
    assert r.n_atoms_primitive == 2 and len(si_pbe_ref.atoms) == 8


@needs_si_pbe
def test_model_on_reference_displacements(si_pbe_ref):
    model, ref, err = P.phonons_vs_reference(si_pbe_ref, P.stillinger_weber_si(), mesh=[8, 8, 8])
    assert model.mesh == ref.mesh == [8, 8, 8]
    assert model.qpoints == ref.qpoints
    # SW is stiffer than PBE everywhere: positive mean shift, error ≈ shift
    assert err["bz_mean_shift_thz"] > 0.5
    assert err["bz_mae_thz"] == pytest.approx(err["bz_mean_shift_thz"], rel=0.05)
    g = sorted(model.frequencies_thz["Γ"])[-1] - sorted(ref.frequencies_thz["Γ"])[-1]
    assert err["frequencies_thz_abs_error"]["Γ"] == pytest.approx(abs(g) / 2, rel=1e-3)  # 3 zero + 3 shifted modes


@needs_si_pbe
def test_hvp_forces_on_reference_displacements(si_pbe_ref, sw):
    fd, _, _ = P.phonons_vs_reference(si_pbe_ref, sw, mesh=[6, 6, 6])
    exact, _, _ = P.phonons_vs_reference(si_pbe_ref, _AutodiffStyle(sw), method="hvp", mesh=[6, 6, 6])
    # SW is nearly harmonic at 0.03 Å: −H·u and finite differences agree closely, but not exactly
    diff = np.abs(np.array(exact.frequencies_thz["X"]) - fd.frequencies_thz["X"]).max()
    assert 1e-6 < diff < 0.02


# ------------------------------------------------------------------ κ
def test_kappa_sw_matches_phono3py_directly(si_prim, sw):
    from phono3py import Phono3py

    mesh = (5, 5, 5)
    k = P.kappa(si_prim, sw, 2, mesh=mesh)
    assert k.n_supercells > 10
    kx = np.array(k.kappa_W_mK[0])
    assert np.isfinite(kx).all() and kx[0] > 10.0
    assert kx[:3] == pytest.approx([kx[0]] * 3, rel=1e-6)  # cubic: isotropic
    assert np.abs(kx[3:]).max() < 1e-6 * kx[0]

    # The same calculation written out with phono3py's API alone.
    ph3 = Phono3py(P.harmonic.to_phonopy_atoms(si_prim), supercell_matrix=np.eye(3, dtype=int) * 2,
                   primitive_matrix="auto", log_level=0)
    ph3.generate_displacements(distance=0.03)
    forces = []
    for cell in ph3.supercells_with_displacements:
        a = P.harmonic.to_ase_atoms(cell)
        a.calc = sw
        forces.append(a.get_forces())
    ph3.forces = np.array(forces)
    ph3.produce_fc3()
    ph3.produce_fc2()
    ph3.mesh_numbers = list(mesh)
    ph3.init_phph_interaction()
    ph3.run_thermal_conductivity(temperatures=[300.0])
    direct = np.asarray(ph3.thermal_conductivity.kappa)[0, 0, 0]
    assert k.kappa_300K_W_mK == pytest.approx(direct, rel=0.01)


# ------------------------------------------------------------------ CLI
def test_cli_structure(tmp_path):
    from almd.cli import main

    structure = tmp_path / "si.cif"
    bulk("Si", "diamond", a=A_SW).write(structure)
    out, png = tmp_path / "out.json", tmp_path / "bands.png"
    rc = main(["phonons", str(structure), "--calculator", "stillinger-weber-si", "--supercell", "2", "2", "2",
               "--mesh", "8", "8", "8", "--kappa", "--kappa-mesh", "4", "4", "4",
               "--json", str(out), "--plot", str(png)])
    assert rc == 0
    d = json.loads(out.read_text())
    assert {"frequencies_thz", "omega_max_K", "thermal_300K", "kappa_300K_W_mK"} <= set(d)
    assert 10 < d["kappa_300K_W_mK"] < 2000 and np.isfinite(d["kappa_300K_W_mK"])
    assert {"Γ", "X", "L"} <= set(d["frequencies_thz"])
    assert set(d["thermal_300K"]) == {"F_kJ_mol", "S_J_K_mol", "Cv_J_K_mol"}
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@needs_si_pbe
def test_cli_reference(tmp_path):
    from almd.cli import main

    out = tmp_path / "out.json"
    rc = main(["phonons", "--calculator", "stillinger-weber-si", "--reference", str(SI_PBE),
               "--mesh", "8", "8", "8", "--json", str(out), "--plot", str(tmp_path / "b.png")])
    assert rc == 0
    d = json.loads(out.read_text())
    assert sorted(d["reference"]["frequencies_thz"]["Γ"])[-1] == pytest.approx(15.09, abs=0.05)
    for key in ("omega_max_K_abs_error", "F_kJ_mol_abs_error", "S_J_K_mol_abs_error", "Cv_J_K_mol_abs_error",
                "band_mae_thz", "bz_mae_thz"):
        assert d["mae"][key] > 0, key
    # SW's Γ optical mode is ~2.5 THz too high: ω_max error ≈ 2.5 THz × 48 K/THz
    assert 80 < d["mae"]["omega_max_K_abs_error"] < 160
