"""The campaign's [finetune] rounds: the walkers move on the fine-tuned backbone, and resume stays exact."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch
from conftest import small_si_campaign

from almd.campaign.config import CampaignConfig
from almd.campaign.loop import Campaign
from almd.settings import ConfigError


def config(out, steps: int, every: int = 1, **finetune) -> CampaignConfig:
    return small_si_campaign(out, steps, checkpoint_every=4, finetune={
        "every": every, "steps": 2, "strategy": "lora", "lr": 1e-3, **finetune})


def rows(out) -> list[tuple]:
    with open(out / "steps.csv") as fh:
        return [(r["walker"], r["step"], r["energy"], r["score"], r["action"], r["model_version"])
                for r in csv.DictReader(fh)]


STEPS, EVERY = 16, 2  # a fine-tune round every 2 training labels; where it falls is read from the run


def round_step(out, model_version: int) -> int:
    """The MD step at which the fine-tune round that started ``model_version`` ran (from steps.csv)."""
    with open(out / "steps.csv") as fh:
        return min(int(r["step"]) for r in csv.DictReader(fh) if int(r["model_version"]) >= model_version)


class Killed(Exception):
    pass


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """An uninterrupted campaign with a fine-tune round (shared: a campaign costs ~25 s here)."""
    out = tmp_path_factory.mktemp("straight")
    campaign = Campaign(config(out, STEPS, every=EVERY))
    return campaign, campaign.run()


def test_walkers_run_on_the_finetuned_backbone(straight):
    from ase.build import bulk

    import almd
    from almd import potentials

    campaign, result = straight
    assert result.finetunes >= 1
    path = campaign.output / "models" / f"backbone-v{campaign.finetunes[-1]['model_version']}.pt"
    assert result.backbone == str(path) and path.is_file()

    # the walkers' ensemble sits on exactly the exported weights, which differ from SevenNet-0's
    tuned, base = potentials.load(path), potentials.load("sevennet-0")
    used = campaign.walkers[0].calculator.ensemble.backbone.state_dict()
    assert all(torch.equal(used[k], v.to(used[k].dtype)) for k, v in tuned.state_dict().items())
    assert any(not torch.equal(a, b) for a, b in zip(tuned.state_dict().values(), base.state_dict().values()))

    # the file is an ordinary model, and it has learnt: lower force error on the held-out SW labels
    atoms = bulk("Si", "diamond", a=5.431, cubic=True)
    atoms.calc = almd.Calculator(model=path)
    assert np.isfinite(atoms.get_potential_energy())
    held = campaign.database.validation_set()

    def force_error(model) -> float:
        calc = almd.Calculator(model=model)
        return float(np.mean([np.abs(calc.get_forces(a.copy()) - a.get_forces()).mean() for a in held]))

    assert force_error(tuned) < force_error(base)
    info = json.loads((campaign.output / "campaign.json").read_text())
    assert info["backbone"] == str(path) and len(info["finetunes"]) == result.finetunes
    # labels made after the first round say so in their provenance, labels before it do not
    version = campaign.finetunes[0]["model_version"]
    step = round_step(campaign.output, version)
    assert step < STEPS
    labels = [(a.info["step"], a.info["model_version"]) for a in campaign.database.frames(status="ok")]
    assert all(v >= version for s, v in labels if s > step)
    assert all(v < version for s, v in labels if s < step)
    # and every MD step after the round was run on the fine-tuned model
    with open(campaign.output / "steps.csv") as fh:
        assert all(int(r["model_version"]) >= version for r in csv.DictReader(fh) if int(r["step"]) > step)


def killed(campaign: Campaign, before=None, after=None) -> None:
    """Run ``campaign`` until ``before(campaign)`` (checked before a round) or ``after(campaign)``
    (after one, so its work is done but never checkpointed) says so, then die.
    """
    round_ = campaign._round

    def dying():
        if before is not None and before(campaign):
            raise Killed
        out = round_()
        if after is not None and after(campaign):
            raise Killed
        return out

    campaign._round = dying
    with pytest.raises(Killed):
        campaign.run()


def test_a_killed_campaign_resumes_with_its_finetuned_backbone_bit_for_bit(straight, tmp_path):
    campaign, reference = straight
    state = lambda: json.loads((tmp_path / "campaign.json").read_text())  # noqa: E731
    first = campaign.finetunes[0]
    step = round_step(reference.output, first["model_version"])
    assert step + 4 <= STEPS, "the scenario needs a checkpoint after the first round"

    # killed right after the first fine-tune, before it was checkpointed: the round is redone
    killed(Campaign(config(tmp_path, STEPS, every=EVERY)), after=lambda c: bool(c.finetunes))
    assert state()["steps"]["0"] < step and state()["backbone"] == "sevennet-0"
    # killed after the first checkpoint that holds the fine-tuned backbone: resumed on it
    killed(Campaign(config(tmp_path, STEPS, every=EVERY)), before=lambda c: state()["backbone"] != "sevennet-0")
    assert state()["backbone"] == first["backbone"].replace(str(reference.output), str(tmp_path))
    result = Campaign(config(tmp_path, STEPS, every=EVERY)).run()

    a, b = (json.loads((d / "walker-0.json").read_text()) for d in (reference.output, tmp_path))
    assert a == b
    assert rows(reference.output) == rows(tmp_path)
    assert result.finetunes == reference.finetunes >= 1 and result.labels == reference.labels


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
    with pytest.raises(ConfigError, match="finetune.replay = 'others'.*'self'"):
        CampaignConfig.from_dict({"finetune": {"replay": "others"}})
    for n in (-2, 2):
        with pytest.raises(ConfigError, match=f"finetune.recent_labels = {n} .*0 \\(all\\) or >= 4"):
            CampaignConfig.from_dict({"finetune": {"recent_labels": n}})
    (tmp_path / "ft.toml").write_text("[optim]\nlearning_rate = 0.1\n")
    with pytest.raises(ConfigError, match="finetune.config.*unknown key 'optim.learning_rate'"):
        CampaignConfig.from_dict({"finetune": {"config": str(tmp_path / "ft.toml")}})


def test_a_finetune_file_gives_the_settings_and_the_campaign_the_rest(tmp_path):
    from almd.campaign.finetune_round import finetune_config

    (tmp_path / "ft.toml").write_text('[model]\nlora_rank = 2\nstrategy = "full"\n[loss]\nforces = 7.0\n'
                                      '[data]\nefs = ["elsewhere.xyz"]\n[run]\nsteps = 500\nefs_batch = 3\n')
    cfg = CampaignConfig.from_dict({"finetune": {"config": str(tmp_path / "ft.toml"), "steps": 3, "lr": 2e-3}})
    ft = finetune_config(cfg, "models/backbone-v5.pt", tmp_path / "work", seed=9)
    assert (ft.model.name, ft.model.strategy, ft.model.lora_rank) == ("models/backbone-v5.pt", "lora", 2)
    assert (ft.loss.forces, ft.optim.lr, ft.run.steps, ft.run.efs_batch, ft.run.seed) == (7.0, 2e-3, 3, 3, 9)
    assert ft.data.efs == [] and ft.run.output == str(tmp_path / "work")


def test_a_round_fits_the_heads_on_the_newest_labels_and_keeps_every_label_learnt(tmp_path):
    """recent_labels bounds the rebuild; the backbone still trains on every label, and the next
    round still sees them all (trained_keys), in learning order, resumed from the ensemble file too.
    """
    from ase.build import bulk
    from ase.calculators.singlepoint import SinglePointCalculator

    from almd.campaign.finetune_round import finetune_round, learnt_labels
    from almd.labels.database import LabelDatabase
    from almd.references import build_calculator
    from almd.uncertainty import Ensemble

    frames = []
    for seed in range(11):
        a = bulk("Si", "diamond", a=5.431, cubic=True)
        a.rattle(0.05, seed=seed)
        a.calc = build_calculator("stillinger-weber-si")
        a.calc = SinglePointCalculator(a, energy=a.get_potential_energy(), forces=a.get_forces())
        frames.append(a)
    db = LabelDatabase(tmp_path / "labels.db")
    db.add_frames(frames[:6], split="train")
    db.add_frames(frames[6:], split="validation")
    ens = Ensemble("sevennet-0", k=2, rank=4, score="rms")
    ens.fit(db.training_set())
    held = db.validation_set()
    ens.calibrate(held[::-1])  # learnt in another order than stored: the order that counts
    cfg = CampaignConfig.from_dict({"finetune": {"steps": 1, "recent_labels": 4}, "learning": {"phonons": False}})
    path, new, record = finetune_round(cfg, db, ens, "sevennet-0", 1, tmp_path)
    assert (record["train"], record["heads_on"], record["held_out"], record["stopped"]) == (6, 4, 4, "steps")
    newest = [a.info["content_hash"] for a in db.training_set()][-4:]
    assert [d.key for d in new.designs] == newest and new.trained_keys == ens.trained_keys
    assert new.calibrated_keys == ens.calibrated_keys  # the oldest held-out label is still known
    again = Ensemble.load(new.save(tmp_path / "ensemble.pt"))
    train, held_out = learnt_labels(db, again, recent=4)
    assert len(train) == 6 and [a.info["row_id"] for a in held_out] == [10, 9, 8, 7]


def test_the_bounded_heads_keep_every_element():
    """The newest labels may all lack an element the ensemble knows: the newest label with it joins them."""
    from ase import Atoms

    from almd.campaign.finetune_round import heads_subset

    labels = [Atoms("SiC", positions=[[0, 0, 0], [1, 1, 1]])] + [Atoms("Si2", positions=[[0, 0, 0], [1, 1, 1]])
                                                                for _ in range(5)]
    chosen = heads_subset(labels, 4)
    assert chosen[0] is labels[0] and chosen[1:] == labels[-4:]
    assert heads_subset(labels, 0) == labels and heads_subset(labels[1:], 4) == labels[-4:]
