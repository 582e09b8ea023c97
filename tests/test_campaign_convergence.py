"""The campaign converges and goes on in production; it makes its own phonon, audit and test labels."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
from conftest import small_si_campaign

from almd.campaign.config import CampaignConfig, builtin_campaign
from almd.campaign.loop import Campaign
from almd.campaign.walker import Walker, WalkerSettings
from almd.settings import ConfigError


def steps_csv(out) -> list[dict]:
    with open(out / "steps.csv", newline="") as fh:
        return list(csv.DictReader(fh))


def test_temperature_ramp_is_followed_and_a_resumed_ramp_continues_bit_for_bit():
    from ase.build import bulk

    from almd.references import build_calculator

    settings = WalkerSettings(temperature=300, seed=2, schedule=[[10, 300], [20, 300, 900]])
    assert [settings.temperature_at(s) for s in (0, 10, 11, 20, 30, 31, 500)] == [300, 300, 330, 600, 900, 900, 900]
    assert settings.schedule_steps == 30 and settings.top_temperature == 900
    atoms = bulk("Si", "diamond", a=5.431, cubic=True)

    def walker(state=None):
        return Walker(atoms, build_calculator("stillinger-weber-si"), settings, state=state)

    straight = walker()
    for _ in range(40):
        straight.advance()
    first = walker()
    for _ in range(17):  # stop inside the ramp
        first.advance()
    resumed = walker(type(first.state()).from_json(first.state().to_json()))
    for _ in range(23):
        resumed.advance()
    np.testing.assert_array_equal(resumed.atoms.positions, straight.atoms.positions)
    np.testing.assert_array_equal(resumed.atoms.get_momenta(), straight.atoms.get_momenta())
    assert straight.dynamics.temp == pytest.approx(900 * 8.617333262e-5)  # the thermostat is at the top


def test_bad_schedule_and_subblock_target_name_the_key():
    with pytest.raises(ConfigError, match=r"schedule stage \[0.0, 300.0\]"):
        CampaignConfig.from_dict({"md": {"schedule": [[0, 300]]}})
    with pytest.raises(ConfigError, match="needs a thermostat"):
        CampaignConfig.from_dict({"md": {"dynamics": "nve", "schedule": [[10, 300]]}})
    with pytest.raises(ConfigError, match="trigger.subblock_target = 0.01"):
        CampaignConfig.from_dict({"trigger": {"subblock_target": 0.01}})


def test_builtin_campaign_heats_to_900_K_with_a_target():
    cfg = builtin_campaign()
    assert cfg.md.top_temperature == 900 and cfg.md.schedule_steps < cfg.run.steps
    assert cfg.trigger.target is not None and cfg.learning.phonons


def test_campaign_makes_phonon_audit_and_test_labels(tmp_path):
    from almd.campaign.phonon_labels import displacement_set
    from almd.labels.database import LabelDatabase

    out = tmp_path / "run"
    cfg = small_si_campaign(out, 24, trigger={"window": 10, "min_history": 3, "target": 0.001, "audit_every": 8,
                                              "min_spacing": 4},
                            learning={"initial_labels": 2, "initial_calibration": 1, "phonons": True,
                                      "test_frames": 2, "test_spacing": 3})
    Campaign(cfg).run()
    summary = json.loads((out / "summary.json").read_text())
    db = LabelDatabase(out / "labels.db")

    # phonons: phonopy's displacements labelled, and its perfect supercell unless it is the start structure
    displaced = len(displacement_set(cfg).supercells_with_displacements)
    assert summary["oracle_calls"]["phonon"] == db.count(source="phonon") in (displaced, displaced + 1)
    assert (out / "phonons" / "phonopy_params.yaml").is_file()
    base, final = summary["phonon_errors"]["base"], summary["phonon_errors"]["final"]
    assert set(base) == set(final) and "bz_mae_thz" in base
    assert final["bz_mae_thz"] < base["bz_mae_thz"]  # learnt from SW forces: closer to SW's phonons
    assert (out / "phonons.png").stat().st_size > 10_000  # bands of base, final and reference, kept as JSON
    assert {p.name for p in (out / "phonons").glob("*.json")} == {"base.json", "final.json", "reference.json"}

    # audits: held out, and they measured the true error against the score
    audits = json.loads((out / "campaign.json").read_text())["triggers"]["0"]["audits"]
    assert audits and summary["audits"]["made"] == len(audits) == db.count(source="audit")
    assert all(r.get("split") == "validation" for r in db.rows(source="audit"))
    for a in audits:  # passed: the true error within 1.5 × the calibrated score, or under the target
        assert a["true_error"] > 0 and a["score"] > 0
        assert a["passed"] == (a["true_error"] <= max(1.5 * a["score"], 0.001))

    # test frames: after the last step, never learnt from
    test = db.test_set()
    assert len(test) == summary["heldout_frames"] == 2 and summary["heldout_set"] == "test"
    hashes = {a.info["content_hash"] for a in db.training_set() + db.validation_set()}
    assert not hashes & {a.info["content_hash"] for a in test}
    assert sorted(r.get("step") for r in db.rows(source="test")) == [27, 30]
    assert summary["heldout_force_rmse_eV_A"] < summary["heldout_force_rmse_base_eV_A"]
    assert (out / "uncertainty.png").stat().st_size > 10_000


def test_converged_campaign_goes_on_in_production_with_audits_only(tmp_path):
    out = tmp_path / "run"
    # a target every model meets: convergence after 2 quiet windows, then production to run.steps
    cfg = small_si_campaign(out, 40, trigger={"window": 8, "min_history": 3, "target": 0.5, "converge_windows": 2,
                                              "audit_every": 12})
    result = Campaign(cfg).run()
    assert result.converged and result.steps == {0: 40}
    summary = json.loads((out / "summary.json").read_text())
    at = summary["converged_at_step"]
    assert at is not None and at < 40
    after = [r for r in steps_csv(out) if int(r["step"]) > at]
    assert after and {r["action"] for r in after} <= {"none", "audit"}
    assert summary["trigger_calls_after_convergence"] == 0
    assert summary["fraction_steps_without_oracle_after_convergence"] < 1.0  # the audits
    assert summary["audits"]["made"] >= 2 and summary["audits"]["failed"] == 0
