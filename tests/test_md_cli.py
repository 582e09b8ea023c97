"""``almd md``: production MD from a campaign's model, its warnings, its stop at a blow-up, its errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from ase.build import bulk
from ase.io import read, write
from conftest import small_si_campaign


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """A finished small campaign: its run directory holds an ensemble with fitted, calibrated heads."""
    from almd.campaign.loop import Campaign

    out = tmp_path_factory.mktemp("campaign") / "run"
    Campaign(small_si_campaign(out, 8)).run()
    return out


@pytest.fixture(scope="module")
def si8(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("structure") / "si8.xyz"
    write(path, bulk("Si", "diamond", a=5.431, cubic=True))
    return path


def almd_md(*args, cwd=None) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "almd.cli", "md", *map(str, args)], env=env, cwd=cwd,
                          capture_output=True, text=True, timeout=600)


def test_md_from_a_run_directory_writes_frames_with_uncertainty_and_warns_above_the_target(run_dir, si8, tmp_path):
    traj = tmp_path / "md.extxyz"
    # a target below any calibrated spread: the warning must come, once per excursion, with step and value
    done = almd_md(run_dir, si8, "--steps", 12, "--temperature", 900, "--trajectory", traj, "--every", 3,
                   "--target", 1e-6)
    assert done.returncode == 0, done.stdout + done.stderr
    warnings = [line for line in done.stdout.splitlines() if "warning" in line]
    assert len(warnings) == 1 and "step 1:" in warnings[0] and "above the model's target 0.0000 eV/Å" in warnings[0]
    frames = read(traj, ":")
    assert [a.info["step"] for a in frames] == [3, 6, 9, 12]
    assert all(a.arrays["force_uncertainty"].shape == (8,) and (a.arrays["force_uncertainty"] > 0).all()
               for a in frames)
    summary = json.loads(done.stdout[done.stdout.index("{"):])
    assert summary["md_steps"] == 12 and summary["stopped_at_step"] is None and summary["max_uncertainty_eV_A"] > 0


def test_the_campaign_target_is_the_default_and_a_blow_up_stops_the_run(run_dir, si8, tmp_path):
    traj = tmp_path / "md.extxyz"
    done = almd_md(run_dir, si8, "--steps", 50, "--max-force", 1e-3, "--trajectory", traj, "--every", 1)
    assert done.returncode == 3, done.stdout + done.stderr
    assert "stopped at step 1: the prediction blew up (largest force" in done.stdout
    assert not traj.exists() or read(traj, ":") == []  # no frame of the blown-up step
    summary = json.loads(done.stdout[done.stdout.index("{"):])
    target = json.loads((run_dir / "campaign.json").read_text())["config"]["trigger"]["target"]
    assert summary["target_eV_A"] == target and summary["stopped_at_step"] == 1


@pytest.fixture(scope="module")
def cluster(tmp_path_factory) -> Path:
    """Si atoms without a periodic cell: no pressure, so no NPT."""
    from ase import Atoms

    path = tmp_path_factory.mktemp("structure") / "si2.xyz"
    write(path, Atoms("Si2", positions=[[0, 0, 0], [0, 0, 2.35]]))
    return path


@pytest.mark.parametrize("args, message", [
    (["missing.xyz"], "STRUCTURE missing.xyz: no such file"),
    (["{si8}", "--dynamics", "nvt"], "dynamics = 'nvt' is not allowed; allowed: langevin, nose-hoover, npt, nve"),
    (["{si8}", "--dynamics", "nose-hoover", "--temperature", "0"], "a Nosé–Hoover chain needs T > 0 K"),
    (["{cluster}", "--dynamics", "npt"], "must be periodic in all three directions"),
    (["{si8}", "--steps", "0"], "--steps = 0: must be >= 1"),
])
def test_bad_input_is_one_line_and_creates_nothing(run_dir, si8, cluster, tmp_path, args, message):
    args = [a.format(si8=si8, cluster=cluster) for a in args]
    done = almd_md(run_dir, *args, "--trajectory", tmp_path / "md.extxyz", cwd=tmp_path)
    assert done.returncode == 2
    (line,) = done.stdout.strip().splitlines()
    assert line.startswith("almd md: error: ") and message in line
    assert list(tmp_path.iterdir()) == []
