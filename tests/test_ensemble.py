"""Ensemble of readout heads on one frozen backbone (SevenNet-0, MACE): members, gradients, calibration, files, ASE."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from ase import units
from ase.build import bulk
from ase.calculators.singlepoint import SinglePointCalculator
from ase.md.verlet import VelocityVerlet

from almd.references import build_calculator
from almd.uncertainty import Calibration, Ensemble, EnsembleCalculator, coverage, spearman
from almd.uncertainty.calibration import isotonic_fit


def si8(rattle: float = 0.05, seed: int = 0):
    atoms = bulk("Si", "diamond", a=5.431, cubic=True)
    atoms.rattle(rattle, seed=seed)
    return atoms


def sw_labelled(atoms):
    atoms = atoms.copy()
    atoms.calc = build_calculator("stillinger-weber-si")
    atoms.calc = SinglePointCalculator(atoms, energy=atoms.get_potential_energy(), forces=atoms.get_forces())
    return atoms


@pytest.fixture(scope="module")
def backbone():
    # loaded once: loading SevenNet-0 costs more than everything a test does with it
    from almd import potentials

    torch.set_num_threads(1)
    return potentials.load("sevennet-0")


@pytest.fixture(scope="module")
def fitted(backbone):
    ens = Ensemble(backbone, k=3, rank=4, seed=7)
    frames = [sw_labelled(si8(0.1, seed=s)) for s in range(3)]
    stats = ens.fit(frames)
    return ens, frames, stats



def assert_member_forces_are_gradients(ens, atoms, components, h: float = 1e-4) -> None:
    """Every member's force = −∂E_k/∂x by central differences (float64 copy: FD needs it)."""
    ens64 = copy.deepcopy(ens).to(torch.float64)
    forces = ens64.evaluate(ens64.graph(atoms))["forces"].detach().numpy()
    for atom, axis in components:
        energies = []
        for sign in (1, -1):
            shifted = atoms.copy()
            shifted.positions[atom, axis] += sign * h
            energies.append(ens64.evaluate(ens64.graph(shifted))["energy"].detach().numpy()[:, 0])
        fd = -(energies[0] - energies[1]) / (2 * h)
        assert np.allclose(forces[:, atom, axis], fd, atol=1e-6), (forces[:, atom, axis], fd)

def test_pretrained_head_reproduces_backbone(backbone):
    ens = Ensemble(backbone, k=2)
    graph = ens.graph(si8())
    e_backbone = float(ens.backbone(graph))
    out = ens.evaluate(ens.graph(si8()), members=True)
    assert np.allclose(out["energy"].detach().numpy(), e_backbone, atol=2e-4)


def test_identical_members_have_zero_spread(backbone):
    ens = Ensemble(backbone, k=3)  # unfitted: every member is the pretrained readout
    pred = ens.predict(si8())
    assert np.all(pred["forces_std_raw"] == 0) and pred["uncertainty"] == 0


def test_members_differ_and_mean_is_their_average(fitted):
    ens, frames, stats = fitted
    atoms = si8(0.08, seed=11)
    members = ens.evaluate(ens.graph(atoms), members=True)
    mean = ens.evaluate(ens.graph(atoms), members=False)
    f = members["forces"].detach().numpy()
    assert np.abs(f[0] - f[1]).max() > 1e-4  # bootstrap resamples gave different heads
    assert np.allclose(mean["forces"].detach().numpy(), f.mean(0), atol=1e-5)
    assert np.allclose(float(mean["energy"]), members["energy"].detach().numpy().mean(), atol=1e-4)
    pred = ens.predict(atoms)
    assert pred["forces_std_raw"].shape == (len(atoms),) and pred["uncertainty_raw"] > 0
    assert pred["uncertainty_raw"] == pytest.approx(pred["forces_std_raw"].max())


def test_fit_learns_the_reference(fitted, backbone):
    ens, frames, stats = fitted
    pretrained = Ensemble(backbone, k=2)
    test = sw_labelled(si8(0.1, seed=21))
    err_before = np.abs(pretrained.predict(test)["forces"] - test.get_forces()).mean()
    err_after = np.abs(ens.predict(test)["forces"] - test.get_forces()).mean()
    assert stats["frames"] == 3
    assert err_after < 0.7 * err_before


def test_member_forces_are_minus_energy_gradient(fitted):
    ens, _, _ = fitted
    assert_member_forces_are_gradients(ens, si8(0.05, seed=3), [(0, 0), (3, 1), (6, 2)])


def test_calibration_recovers_known_scale():
    rng = np.random.default_rng(0)
    sigma = rng.uniform(0.01, 0.3, size=(4000, 1))
    errors = 2.5 * sigma * rng.standard_normal((4000, 3))
    cal = Calibration()
    cal.update(errors[:2000], sigma[:2000])
    cal.update(errors[2000:], sigma[2000:])  # refit as labels arrive
    assert cal.scale == pytest.approx(2.5, rel=0.03)
    assert coverage(errors, cal.sigma(sigma)) == pytest.approx(0.683, abs=0.02)
    quant = Calibration(fit="quantile")
    quant.update(errors, sigma)
    assert quant.scale == pytest.approx(2.5, rel=0.05)
    # per-frame isotonic map: monotone, and proportional (not flat) beyond the data
    scores = rng.uniform(0.01, 0.1, 50)
    rmse = 3 * scores + 0.01 * rng.standard_normal(50)
    x, y = isotonic_fit(scores, rmse)
    assert np.all(np.diff(y) >= -1e-12)
    iso = Calibration(method="isotonic", frame_scores=list(scores), frame_rmse=list(rmse))
    assert iso.score(0.2) > iso.score(0.1) > iso.score(0.05)
    assert spearman(scores, rmse) > 0.9
    with pytest.raises(ValueError, match="method"):
        Calibration(method="magic")


def test_refit_and_calibration_from_a_label_database(fitted, tmp_path):
    from almd.labels.database import LabelDatabase

    ens, frames, _ = fitted
    assert ens.fit(frames)["frames"] == 3  # the same labels again: nothing counted twice
    db = LabelDatabase(tmp_path / "labels.db", validation_fraction=1.0)  # all four held out
    for seed in range(4):
        labelled = sw_labelled(si8(0.1, seed=40 + seed))
        db.add(labelled, energy=labelled.get_potential_energy(), forces=labelled.get_forces())
    n_val = len(db.validation_set())
    ens.calibrate(db)
    ens.calibrate(db)  # idempotent
    assert ens.calibration.n_components == 3 * 8 * n_val
    assert len(ens.calibration.atom_u2) == 8 * n_val  # per-atom rows kept for the model-form fit
    ens.calibration.force_term = True  # switching it on refits (s, a) from the rows already seen
    pred = ens.predict(si8(0.1, seed=50))
    assert ens.calibration.relative >= 0 and np.all(pred["forces_std"] >= ens.calibration.scale * pred["forces_std_raw"] - 1e-12)
    ens.calibration.force_term = False


def test_save_load_round_trip(fitted, tmp_path):
    ens, frames, _ = fitted
    ens.calibrate([sw_labelled(si8(0.1, seed=31))])
    path = ens.save(tmp_path / "ens.pt")
    back = Ensemble.load(path)
    atoms = si8(0.07, seed=5)
    a, b = ens.predict(atoms), back.predict(atoms)
    for key in ("forces", "forces_std", "member_forces"):
        assert np.allclose(a[key], b[key], atol=1e-6)
    assert a["uncertainty"] == pytest.approx(b["uncertainty"], rel=1e-5)
    assert back.calibration.scale == pytest.approx(ens.calibration.scale)
    assert back.version == ens.version and len(back.designs) == len(ens.designs)
    with pytest.raises(ValueError, match="ensemble"):
        torch.save({"format": "other"}, tmp_path / "x.pt")
        Ensemble.load(tmp_path / "x.pt")


def test_calculator_in_md_loop(fitted, tmp_path):
    ens, _, _ = fitted
    atoms = si8(0.05, seed=2)
    atoms.calc = EnsembleCalculator(ens, uncertainty_every=2)
    scores, ages = [], []

    def record():
        scores.append(atoms.calc.results["uncertainty"])
        ages.append(atoms.calc.results["uncertainty_age"])

    md = VelocityVerlet(atoms, 1.0 * units.fs)
    md.attach(record)
    md.run(4)
    assert ages[:4] == [0, 1, 0, 1]
    res = atoms.calc.results
    assert res["forces_std"].shape == (len(atoms),) and res["member_forces"].shape == (3, len(atoms), 3)
    assert atoms.get_stress().shape == (6,) and np.all(np.isfinite(scores))
    assert np.allclose(res["forces_std"], ens.calibration.scale * res["forces_std_raw"])
    # a saved ensemble works by path, too
    atoms.calc = EnsembleCalculator(ens.save(tmp_path / "e.pt"))
    assert atoms.calc.get_uncertainty(atoms) > 0


# ---------------------------------------------------------------- MACE backbone
@pytest.fixture(scope="module")
def mace_backbone():
    pytest.importorskip("mace")
    from almd.potentials.mace import small_random_mace

    torch.set_num_threads(1)
    return small_random_mace([14], cutoff=4.0, seed=3)


def test_mace_pretrained_head_reproduces_backbone(mace_backbone):
    from almd.potentials.autodiff import energy_forces_stress

    ens = Ensemble(mace_backbone, k=3)
    atoms = si8(0.08, seed=4)
    ref = energy_forces_stress(mace_backbone, ens.graph(atoms), stress=False)
    out = ens.evaluate(ens.graph(atoms), members=True)
    assert np.allclose(out["energy"].detach().numpy(), float(ref["energy"].detach()), atol=1e-4)
    for k in range(3):  # every member is the backbone until fitted
        assert np.allclose(out["forces"][k].detach().numpy(), ref["forces"].detach().numpy(), atol=1e-5)
    # the probed readout weights carry the model: the rest feature ρ (pair terms) is zero here
    with torch.no_grad():
        h = ens.readout.features(ens.graph(atoms))
    assert h.shape[1] == ens.readout.n_features and float(h[:, -1].abs().max()) < 1e-4
    assert float(h[:, :-1].abs().max()) > 1e-2


def test_mace_members_differ_and_are_conservative(mace_backbone, tmp_path):
    ens = Ensemble(mace_backbone, k=3, rank=4, seed=2)
    frames = [sw_labelled(si8(0.1, seed=s)) for s in range(3)]
    ens.fit(frames, prior_scale=0.1)
    atoms = si8(0.06, seed=9)
    members = ens.evaluate(ens.graph(atoms), members=True)
    mean = ens.evaluate(ens.graph(atoms), members=False)
    f = members["forces"].detach().numpy()
    assert np.abs(f[0] - f[1]).max() > 1e-4 and np.abs(f[1] - f[2]).max() > 1e-4  # bootstrap members differ
    assert np.allclose(mean["forces"].detach().numpy(), f.mean(0), atol=1e-5)
    assert ens.predict(atoms)["uncertainty_raw"] > 0
    assert_member_forces_are_gradients(ens, atoms, [(1, 0), (4, 2)])
    back = Ensemble.load(ens.save(tmp_path / "mace-ens.pt"), allow_pickle=True)  # MACE pickles its module
    assert np.allclose(back.predict(atoms)["member_forces"], ens.predict(atoms)["member_forces"], atol=1e-6)


def test_unsupported_backbone_is_named():
    from almd.potentials import Potential

    class Toy(Potential):
        backbone_name = "toy"

    with pytest.raises(NotImplementedError, match="toy"):
        Ensemble(Toy(), k=2)


def test_calibration_model_form_term():
    # errors from σ² = (s·u)² + a²|F|²/3: the likelihood fit recovers (s, a), and the
    # calibrated σ then ranks frames by force magnitude where the spread cannot
    rng = np.random.default_rng(1)
    n = 3000
    u = rng.uniform(0.002, 0.01, n)
    forces = rng.standard_normal((n, 3)) * rng.uniform(0.2, 1.5, (n, 1))
    f2 = (forces**2).sum(1) / 3
    errors = np.sqrt((2.0 * u) ** 2 + 0.05**2 * f2)[:, None] * rng.standard_normal((n, 3))
    cal = Calibration(force_term=True)
    for chunk in np.array_split(np.arange(n), 5):  # refitted as labels arrive
        cal.update(errors[chunk], u[chunk, None], forces=forces[chunk])
    assert cal.scale == pytest.approx(2.0, rel=0.15) and cal.relative == pytest.approx(0.05, rel=0.1)
    sigma = cal.sigma(u, forces)
    assert sigma.shape == (n,) and coverage(errors, sigma[:, None]) == pytest.approx(0.683, abs=0.02)
    assert cal.score(0.0, sigma, "mean") == pytest.approx(sigma.mean())
    back = Calibration.from_state_dict(cal.state_dict())
    assert back.relative == pytest.approx(cal.relative)
    cal.fit = "quantile"
    assert coverage(errors, cal.sigma(u, forces)[:, None]) == pytest.approx(0.683, abs=0.005)
    assert Calibration().relative == 0.0 and Calibration().sigma(u, forces) is not None
