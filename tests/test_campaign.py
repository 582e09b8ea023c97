"""The active-learning loop: it labels and learns, and a killed campaign resumes exactly, losing no label."""

from __future__ import annotations

import csv

import numpy as np
import pytest
from conftest import small_si_campaign

from almd.campaign.config import CampaignConfig
from almd.campaign.loop import Campaign
from almd.settings import ConfigError


def config(out, steps: int) -> CampaignConfig:
    return small_si_campaign(out, steps, checkpoint_every=6)


def rows(out) -> list[tuple]:
    with open(out / "steps.csv") as fh:
        return [(r["walker"], r["step"], r["energy"], r["score"], r["action"]) for r in csv.DictReader(fh)]


def test_campaign_learns_and_a_killed_run_resumes_bit_for_bit(tmp_path):
    straight = Campaign(config(tmp_path / "a", 18)).run()
    assert straight.calls >= 1 and straight.labels > 3 and straight.model_version > 1

    Campaign(config(tmp_path / "b", 6)).run()  # stops at the checkpoint of step 6
    lost = Campaign(config(tmp_path / "b", 18))
    for _ in range(5):  # work after the checkpoint, then killed: steps lost, labels kept
        lost._round()
    labels_before = lost.database.count(status="ok")
    del lost
    resumed = Campaign(config(tmp_path / "b", 18))
    result = resumed.run()

    a, b = (np.array(__import__("json").load(open(tmp_path / d / "walker-0.json"))["positions"]) for d in "ab")
    np.testing.assert_array_equal(a, b)
    assert rows(tmp_path / "a") == rows(tmp_path / "b")
    assert result.labels == straight.labels  # nothing labelled twice
    assert resumed.labeller.calls == straight.labels - labels_before  # nothing recomputed


def test_bad_campaign_settings_name_the_key(tmp_path):
    with pytest.raises(ConfigError, match="unknown key 'md.temp'.*temperature"):
        CampaignConfig.from_dict({"md": {"temp": 300}})
    with pytest.raises(ConfigError, match=r"\[md\]: dynamics = 'nvt'.*langevin, nose-hoover, npt, nve"):
        CampaignConfig.from_dict({"md": {"dynamics": "nvt"}})
    with pytest.raises(ConfigError, match="unknown section \\[walkers\\]"):
        CampaignConfig.from_dict({"walkers": {}})
    with pytest.raises(ConfigError, match="run.checkpoint_every"):
        CampaignConfig.from_dict({"run": {"checkpoint_every": 0}})
    with pytest.raises(ConfigError, match="system.structure"):
        CampaignConfig.from_dict({"system": {"structure": str(tmp_path / "missing.xyz")}})


def test_example_campaign_files_parse_and_document_the_defaults():
    from pathlib import Path

    folder = Path(__file__).resolve().parents[1] / "examples" / "campaigns"
    files = sorted(folder.glob("*.toml"))
    assert files
    for path in files:
        CampaignConfig.from_toml(path)
    from almd.campaign.config import builtin_campaign

    written_out = CampaignConfig.from_toml(folder / "si_stillinger_weber.toml")
    assert written_out.to_dict() == builtin_campaign().to_dict()  # `almd run` without a file


def test_unknown_element_is_named_before_any_reference_call(tmp_path):
    from ase import Atoms
    from ase.io import write

    from almd.potentials import UnknownElementError

    write(tmp_path / "odd.xyz", Atoms("SiDb", positions=[[0, 0, 0], [1.2, 1.2, 1.2]], cell=[5, 5, 5], pbc=True))
    cfg = CampaignConfig.from_dict({"system": {"structure": str(tmp_path / "odd.xyz"), "supercell": [1]},
                                    "run": {"output": str(tmp_path / "out"), "progress": False}})
    with pytest.raises(UnknownElementError, match="Db"):
        Campaign(cfg)
    from almd.labels.database import LabelDatabase

    assert len(LabelDatabase(tmp_path / "out" / "labels.db")) == 0


def test_walkers_with_their_own_temperature_dynamics_and_structure(tmp_path):
    """[[walker]] tables: walker 1 starts from its own file (a 2 % larger cell, which NVT keeps), runs
    Nosé–Hoover at 1500 K; walker 0 Langevin at 300 K. Each walker's checkpointed state shows its own.
    """
    import json

    from ase.build import bulk
    from ase.io import write

    expanded = tmp_path / "expanded.xyz"
    write(expanded, bulk("Si", "diamond", a=1.02 * 5.431, cubic=True))
    out = tmp_path / "run"
    walkers = [{"temperature": 300.0}, {"temperature": 1500.0, "dynamics": "nose-hoover", "tdamp": 40.0,
                                        "structure": str(expanded)}]
    result = Campaign(small_si_campaign(out, 20, walker=walkers, run={
        "steps": 20, "walkers": 2, "checkpoint_every": 100, "output": str(out), "progress": False})).run()
    assert result.steps == {0: 20, 1: 20}
    with open(out / "steps.csv") as fh:
        rows = list(csv.DictReader(fh))
    temperature = {k: np.mean([float(r["temperature"]) for r in rows if r["walker"] == str(k)]) for k in (0, 1)}
    assert temperature[1] > 2 * temperature[0]
    state = json.loads((out / "campaign.json").read_text())["walkers"]
    np.testing.assert_allclose(np.diag(state["1"]["cell"]), 1.02 * 5.431)
    np.testing.assert_allclose(np.diag(state["0"]["cell"]), 5.431)
    assert set(state["1"]["integrator"]) == {"thermostat.eta", "thermostat.p_eta"} and not state["0"]["integrator"]


def test_progress_lines_one_per_walker_every_n_steps():
    from almd.campaign.progress import ProgressLines

    lines: list[str] = []
    progress = ProgressLines(every=10, steps=30)
    for step in range(1, 31):
        progress.show([{"walker": k, "step": step, "temperature": 300.0 + 600 * k, "score": None if step % 2 else 0.05,
                        "calls": step // 7} for k in (0, 1)], lines.append)
    assert [line.split("  ")[:2] for line in lines] == [[f"walker {k}", f"step {s}/30"] for s in (10, 20, 30) for k in (0, 1)]
    assert "T 900 K  score 0.05 eV/Å  calls 1" in lines[1] and lines[-1].endswith(" s/step")
    quiet: list[str] = []
    ProgressLines(every=0, steps=30).show([{"walker": 0, "step": 10}], quiet.append)
    assert quiet == []


@pytest.mark.parametrize("backbone", ["sevennet-l3i5", "sevennet-mf-0"])
def test_the_other_shipped_backbones_drive_a_campaign(tmp_path, backbone):
    """SevenNet-l3i5 and the multi-fidelity SevenNet-MF-0 (its PBE modality): heads, refits and a
    fine-tune round on their trunk; the campaign's held-out error ends below the base model's.
    """
    import json

    out = tmp_path / "run"
    result = Campaign(small_si_campaign(out, 12, model={"members": 2, "backbone": backbone},
                                        learning={"initial_labels": 2, "initial_calibration": 1, "phonons": False,
                                                  "test_frames": 2, "test_spacing": 2},
                                        finetune={"every": 2, "steps": 1})).run()
    assert result.calls >= 1 and result.finetunes >= 1
    summary = json.loads((out / "summary.json").read_text())
    assert summary["heldout_force_rmse_eV_A"] < 0.5 * summary["heldout_force_rmse_base_eV_A"]


def test_the_uncertainty_plot_marks_each_walkers_own_schedule_end():
    from almd.campaign.plots import _schedule_ends

    config = {"md": {"schedule": [[100, 300], [400, 300, 900]]},
              "walker": [{}, {"schedule": [[50, 300, 600]]}, {"pressure_schedule": [[700, 0.0, 2.0]]}, {"schedule": []}]}
    assert _schedule_ends(config, [0, 1, 2, 3]) == {500: [0], 50: [1], 700: [2]}
    assert _schedule_ends({"md": {}}, [0]) == {}
