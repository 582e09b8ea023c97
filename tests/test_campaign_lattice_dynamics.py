"""The Bayesian lattice-dynamics model as a campaign's model: it learns, converges by the sub-block test,
resumes bit for bit, and its file, atom order and settings behave as a user expects.
"""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
from ase.calculators.singlepoint import SinglePointCalculator

from almd.campaign.config import CampaignConfig, ideal_supercell, unit_structure
from almd.campaign.loop import Campaign
from almd.references import build_calculator
from almd.settings import ConfigError
from almd.uncertainty.lattice_dynamics import LatticeDynamicsModel


def config(out, steps: int = 600, test_frames: int = 3, **trigger) -> CampaignConfig:
    return CampaignConfig.from_dict({
        "model": {"kind": "lattice-dynamics", "cutoffs": [5.0, 4.0], "subblock_steps": 40, "subblock_frames": 4},
        "md": {"temperature": 300.0},
        "learning": {"initial_labels": 2, "initial_calibration": 2, "initial_rattle": 0.01,
                     "test_frames": test_frames},
        "trigger": {"target": 0.01, "subblock_target": 0.01, "window": 50, **trigger},
        "run": {"steps": steps, "output": str(out), "progress": False, "checkpoint_every": 50},
        "finetune": {"every": 0}})


def labelled_frames(n: int, amplitude: float, seed: int) -> list:
    """SW-labelled rattled copies of the 64-atom Si cell."""
    cfg = CampaignConfig()
    sw, rng, frames = build_calculator("stillinger-weber-si"), np.random.default_rng(seed), []
    for _ in range(n):
        atoms = ideal_supercell(cfg)
        atoms.positions += rng.normal(0.0, amplitude, atoms.positions.shape)
        atoms.calc = SinglePointCalculator(atoms, forces=sw.get_forces(atoms))
        frames.append(atoms)
    return frames


def test_the_campaign_learns_converges_by_the_subblock_test_and_goes_quiet(tmp_path):
    result = Campaign(config(tmp_path / "run")).run()
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    state = json.loads((tmp_path / "run" / "campaign.json").read_text())
    assert summary["model"] == "lattice-dynamics" and result.converged and summary["converged"]
    # convergence needed a sub-block error under its target, recorded after the last call
    error, calls_then = state["triggers"]["0"]["subblock"]
    assert error < 0.01 and calls_then == result.calls
    assert summary["trigger_calls_after_convergence"] == 0
    # the campaign's own labels: the bootstrap phonopy displacement is learnt from, the test frames are not
    assert summary["oracle_calls"]["phonon"] >= 1 and summary["heldout_set"] == "test"
    assert summary["heldout_force_rmse_eV_A"] < summary["heldout_force_rmse_base_eV_A"] / 3
    after = summary["phonon_errors"]["final"]
    assert all(after[k] < 0.5 * v for k, v in summary["phonon_errors"]["base"].items())
    assert [p.name for p in (tmp_path / "run").glob("*-*.pt")] == []  # its checkpoints are lattice-dynamics-G.npz


def test_a_subblock_error_above_its_target_keeps_the_campaign_learning(tmp_path):
    """Quiet windows are not enough: while the sub-block error stays above its target, the trigger calls."""
    cfg = config(tmp_path / "run", steps=400, subblock_target=1e-5)  # far below any reachable parameter error
    result = Campaign(cfg).run()
    with open(tmp_path / "run" / "steps.csv") as fh:
        reasons = [r["reasons"] for r in csv.DictReader(fh) if r["action"] == "label"]
    assert not result.converged
    assert "subblock" in reasons


def test_an_interrupted_campaign_resumes_bit_for_bit(tmp_path):
    Campaign(config(tmp_path / "a", 300, test_frames=0)).run()
    Campaign(config(tmp_path / "b", 150, test_frames=0)).run()  # ends at the checkpoint of step 150 ...
    Campaign(config(tmp_path / "b", 300, test_frames=0)).run()  # ... and goes on from the model file it wrote
    a, b = (json.loads((tmp_path / d / "walker-0.json").read_text()) for d in "ab")
    np.testing.assert_array_equal(np.array(a["positions"]), np.array(b["positions"]))
    with open(tmp_path / "a" / "steps.csv") as fa, open(tmp_path / "b" / "steps.csv") as fb:
        assert list(csv.DictReader(fa)) == list(csv.DictReader(fb))


def test_the_model_file_and_phonopys_atom_order():
    cfg = CampaignConfig()
    train, held = labelled_frames(3, 0.03, 0), labelled_frames(2, 0.05, 1)
    model = LatticeDynamicsModel(unit_structure(cfg), ideal_supercell(cfg), [5.0, 4.0])
    model.fit(train)
    model.calibrate(held)
    probe = labelled_frames(1, 0.04, 2)[0]
    forces, sigma, energy = model.evaluate(probe)
    assert model.scale >= 1.0 and np.all(sigma > 0)

    # the file refits the same posterior and scale: the same numbers, bit for bit
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as tmp:
        path = model.save(Path(tmp) / "m.npz")
        again = LatticeDynamicsModel.load(path)
    f2, s2, e2 = again.evaluate(probe)
    np.testing.assert_array_equal(forces, f2)
    np.testing.assert_array_equal(sigma, s2)
    assert energy == e2 and again.scale == model.scale

    # atoms listed in another order (phonopy's supercells) get their own atoms' forces
    order = np.random.default_rng(3).permutation(len(probe))
    f3, s3, e3 = model.evaluate(probe[order])
    np.testing.assert_allclose(f3, forces[order], atol=1e-12)
    np.testing.assert_allclose(s3, sigma[order], atol=1e-12)
    assert e3 == pytest.approx(energy, abs=1e-10)

    # forces are the energy's negative gradient (central differences)
    atoms, h = probe.copy(), 1e-4
    for i, c in ((0, 0), (17, 2)):
        plus, minus = atoms.copy(), atoms.copy()
        plus.positions[i, c] += h
        minus.positions[i, c] -= h
        fd = -(model.evaluate(plus)[2] - model.evaluate(minus)[2]) / (2 * h)
        assert fd == pytest.approx(forces[i, c], abs=1e-6)


def test_lattice_dynamics_settings_are_checked_before_any_work(tmp_path):
    base = {"model": {"kind": "lattice-dynamics"}, "finetune": {"every": 0}, "run": {"output": str(tmp_path / "x")}}
    with pytest.raises(ConfigError, match="model.kind = 'gp'.*ensemble, lattice-dynamics"):
        CampaignConfig.from_dict({"model": {"kind": "gp"}})
    with pytest.raises(ConfigError, match="finetune.every = 10.*no backbone to fine-tune"):
        CampaignConfig.from_dict({"model": {"kind": "lattice-dynamics"}})
    with pytest.raises(ConfigError, match="md.dynamics = 'npt'.*fixed cell"):
        CampaignConfig.from_dict({**base, "md": {"dynamics": "npt"}})
    with pytest.raises(ConfigError, match="model.subblock_supercell"):
        CampaignConfig.from_dict({**base, "model": {"kind": "lattice-dynamics", "subblock_supercell": [2, 2, 2]}})
    with pytest.raises(ConfigError, match="trigger.subblock_target.*lattice-dynamics"):
        CampaignConfig.from_dict({"trigger": {"subblock_target": 0.01}})
    assert not (tmp_path / "x").exists()
