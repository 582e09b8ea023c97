"""The campaign's [finetune] rounds: the walkers move on the fine-tuned backbone, and resume stays exact."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch

from almd.campaign import Campaign
from almd.config import CampaignConfig, ConfigError


def config(out, steps: int, every: int = 1, **finetune) -> CampaignConfig:
    return CampaignConfig.from_dict({
        "system": {"supercell": [1, 1, 1]},
        "model": {"members": 2},
        "md": {"temperature": 1200, "timestep": 2.0, "seed": 4},
        "trigger": {"window": 20, "min_history": 3, "abs_cap": 0.04, "min_spacing": 4},
        "learning": {"initial_labels": 2, "initial_calibration": 1},
        "run": {"steps": steps, "checkpoint_every": 6, "output": str(out), "progress": False},
        "finetune": {"every": every, "steps": 2, "strategy": "lora", "lr": 1e-3, **finetune},
    })


def rows(out) -> list[tuple]:
    with open(out / "steps.csv") as fh:
        return [(r["walker"], r["step"], r["energy"], r["score"], r["action"], r["model_version"])
                for r in csv.DictReader(fh)]


STEPS, EVERY = 14, 2


class Killed(Exception):
    pass


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """An uninterrupted campaign with fine-tune rounds (shared: a campaign costs ~30 s here)."""
    out = tmp_path_factory.mktemp("straight")
    campaign = Campaign(config(out, STEPS, every=EVERY))
    return campaign, campaign.run()


def test_walkers_run_on_the_finetuned_backbone(straight):
    import almd
    from almd import potentials
    from ase.build import bulk

    campaign, result = straight
    assert result.finetunes >= 1
    path = campaign.output / "models" / f"backbone-v{campaign.finetunes[-1]['model_version']}.pt"
    assert result.backbone == str(path) and path.is_file()

    # the walkers' ensemble sits on exactly the exported weights, which differ from SevenNet-0's
    exported = potentials.load(path).state_dict()
    used = campaign.walkers[0].calculator.ensemble.backbone.state_dict()
    base = potentials.load("sevennet-0").state_dict()
    assert all(torch.equal(used[k], v.to(used[k].dtype)) for k, v in exported.items())
    assert any(not torch.equal(base[k], v) for k, v in exported.items())

    # the file is an ordinary model, and it has learnt: lower force error on the held-out SW labels
    held = campaign.database.validation_set()
    atoms = bulk("Si", "diamond", a=5.431, cubic=True)
    atoms.calc = almd.Calculator(model=path)
    assert np.isfinite(atoms.get_potential_energy())

    def force_error(model) -> float:
        calc = almd.Calculator(model=model)
        return float(np.mean([np.abs(calc.get_forces(a.copy()) - a.get_forces()).mean() for a in held]))

    assert force_error(path) < force_error("sevennet-0")
    info = json.loads((campaign.output / "campaign.json").read_text())
    assert info["backbone"] == str(path) and len(info["finetunes"]) == result.finetunes
    labels = campaign.database.frames(status="ok")
    assert max(a.info["model_version"] for a in labels) > campaign.finetunes[0]["model_version"]


def test_a_killed_campaign_resumes_with_its_finetuned_backbone_bit_for_bit(straight, tmp_path):
    _, reference = straight
    killed = Campaign(config(tmp_path, STEPS, every=EVERY))
    round_ = killed._round
    calls = []

    def dies_in_round_11():  # checkpoint at step 6, a fine-tune after it, killed before step 12's
        calls.append(1)
        if len(calls) == 11:
            raise Killed
        return round_()

    killed._round = dies_in_round_11
    with pytest.raises(Killed):
        killed.run()
    assert killed.finetunes and json.loads((tmp_path / "campaign.json").read_text())["steps"]["0"] == 6
    del killed
    resumed = Campaign(config(tmp_path, STEPS, every=EVERY))
    result = resumed.run()

    a, b = (json.loads((d / "walker-0.json").read_text()) for d in (reference.output, tmp_path))
    assert a == b
    assert rows(reference.output) == rows(tmp_path)
    assert result.finetunes == reference.finetunes
    assert result.backbone.replace(str(tmp_path), str(reference.output)) == reference.backbone


def test_bad_finetune_settings_name_the_key(tmp_path):
    with pytest.raises(ConfigError, match="unknown key 'finetune.step'.*every, steps, strategy"):
        CampaignConfig.from_dict({"finetune": {"step": 3}})
    with pytest.raises(ConfigError, match="finetune.strategy = 'scratch'.*lora, delta, full, freeze"):
        CampaignConfig.from_dict({"finetune": {"strategy": "scratch"}})
    with pytest.raises(ConfigError, match="finetune.every = -1"):
        CampaignConfig.from_dict({"finetune": {"every": -1}})
    with pytest.raises(ConfigError, match="finetune.freeze"):
        CampaignConfig.from_dict({"finetune": {"strategy": "freeze"}})
    with pytest.raises(ConfigError, match="finetune.config"):
        CampaignConfig.from_dict({"finetune": {"config": str(tmp_path / "missing.toml")}})
    (tmp_path / "ft.toml").write_text("[optim]\nlearning_rate = 0.1\n")
    with pytest.raises(ConfigError, match="finetune.config.*unknown key 'optim.learning_rate'"):
        CampaignConfig.from_dict({"finetune": {"config": str(tmp_path / "ft.toml")}})
