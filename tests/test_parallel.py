"""`mpiexec -n 2 almd run`: walkers spread over ranks give the same campaign as one process."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
from conftest import small_si_toml

from almd.campaign.config import CampaignConfig
from almd.campaign.loop import Campaign

pytestmark = pytest.mark.mpi

def test_two_ranks_reproduce_the_serial_campaign(tmp_path):
    mpiexec = shutil.which("mpiexec", path=os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"])
    if mpiexec is None:
        pytest.skip("no mpiexec (pip install mpich)")
    import torch

    serial = tmp_path / "serial"
    # with audits (served on rank 0, their outcome sent back to the walker's rank) and test frames
    extra = {"trigger": {"window": 20, "min_history": 3, "abs_cap": 0.04, "min_spacing": 4, "target": 0.001,
                         "adaptive": False, "audit_every": 4},
             "learning": {"initial_labels": 2, "initial_calibration": 1, "phonons": False, "test_frames": 1,
                          "test_spacing": 2}}
    small_si_toml(tmp_path / "serial.toml", serial, 10, walkers=2, **extra)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each rank below: the bits of a sum depend on how it is split
    try:
        result = Campaign(CampaignConfig.from_toml(tmp_path / "serial.toml")).run()
    finally:
        torch.set_num_threads(threads)
    assert result.calls >= 1

    toml = small_si_toml(tmp_path / "campaign.toml", tmp_path / "mpi", 10, walkers=2, **extra)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run([mpiexec, "-n", "2", sys.executable, "-m", "almd.cli", "run", str(toml)],
                         capture_output=True, text=True, env=env, timeout=1200)
    assert out.returncode == 0, out.stdout + out.stderr
    for name in ("walker-0.json", "walker-1.json", "steps.csv"):
        assert (tmp_path / "mpi" / name).read_text() == (serial / name).read_text(), name
    summaries = [json.loads((d / "summary.json").read_text()) for d in (serial, tmp_path / "mpi")]
    assert summaries[0]["oracle_calls"] == summaries[1]["oracle_calls"]
    assert summaries[0]["oracle_calls"]["test"] == 2 and summaries[0]["audits"] == summaries[1]["audits"]


def test_an_error_on_one_rank_ends_the_whole_job_with_its_traceback(tmp_path):
    """Rank 1 cannot read its walker's state while rank 0 goes on to a collective call:
    without an abort the job would hang until the scheduler kills it.
    """
    import json
    import time

    mpiexec = shutil.which("mpiexec", path=os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"])
    if mpiexec is None:
        pytest.skip("no mpiexec (pip install mpich)")
    toml = small_si_toml(tmp_path / "campaign.toml", tmp_path / "run", 2, walkers=2)
    Campaign(CampaignConfig.from_toml(toml)).run()
    checkpoint = tmp_path / "run" / "campaign.json"
    state = json.loads(checkpoint.read_text())
    del state["walkers"]["1"]["momenta"]  # walker 1 (rank 1's) is corrupt
    checkpoint.write_text(json.dumps(state))

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    start = time.monotonic()
    out = subprocess.run([mpiexec, "-n", "2", sys.executable, "-m", "almd.cli", "run", str(toml), "--steps", "6"],
                         capture_output=True, text=True, env=env, timeout=300)
    elapsed = time.monotonic() - start
    assert out.returncode != 0
    assert "rank 1 of 2" in out.stderr and "WalkerError" in out.stderr and "momenta" in out.stderr
    assert elapsed < 90  # start-up of two ranks included; a hang would run into the timeout
