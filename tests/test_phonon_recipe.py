"""``almd finetune --phonon DATASET``: the default phonon recipe on the shipped VASP Si set."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from almd.finetune.cli import main
from almd.finetune.recipe import auto_fold, phonon_recipe, run_phonon_recipe
from almd.settings import ConfigError

SI = Path(__file__).resolve().parents[1] / "almd" / "data" / "si-pbe"


def test_the_fold_halves_even_directions_of_the_data_supercell():
    assert auto_fold(SI) == [1, 1, 1]  # the 2x2x2 conventional supercell onto the 8-atom cell
    cfg = phonon_recipe(SI, 60.0, "out", fold="none")
    assert cfg.data.phonon_fold == [] and cfg.run.budget == 60.0 and cfg.data.phonon == [str(SI)]
    assert cfg.run.seed == 0 and phonon_recipe(SI, 60.0, "out", seed=3).run.seed == 3


def test_the_recipe_moves_silicon_phonons_towards_the_dft(tmp_path):
    report = run_phonon_recipe(SI, 600.0, tmp_path / "run", steps=40)
    assert report["steps"] == 40 and json.loads((tmp_path / "run" / "phonon_report.json").read_text()) == report
    assert report["validation"]["best"]["val_loss"] < report["validation"]["before"]["val_loss"]
    # the kept model is chosen on held-out Hessian columns; the phonons it gives are judged on the DFT's own set
    assert report["final"]["band_mae_thz"] < 0.5 * report["base"]["band_mae_thz"]
    assert report["final"]["omega_max_K_abs_error"] < 0.5 * report["base"]["omega_max_K_abs_error"]


@pytest.mark.parametrize("argv, message", [
    (["--phonon", "missing.yaml"], "phonon data not found: missing.yaml"),
    (["--phonon", str(SI), "--fold", "2,x,2"], "--fold = '2,x,2' is not allowed"),
    (["--phonon", str(SI), "--budget", "0"], "--budget = 0.0 is not allowed"),
    (["--phonon", str(SI), "--kappa", "0", "11", "11"], "--kappa = [0, 11, 11] is not allowed"),
])
def test_bad_recipe_arguments_are_one_line_and_train_nothing(tmp_path, capsys, argv, message):
    assert main([*argv, "--output", str(tmp_path / "out")]) == 2
    out = capsys.readouterr().out.strip()
    assert message in out and "\n" not in out
    assert not (tmp_path / "out").exists()


def test_a_file_and_the_recipe_are_one_or_the_other(tmp_path):
    with pytest.raises(SystemExit):
        main([str(tmp_path / "x.toml"), "--phonon", str(SI)])
    with pytest.raises(ConfigError, match="--fold"):
        phonon_recipe(SI, 60.0, tmp_path, fold="half")
