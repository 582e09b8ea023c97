"""`mpiexec -n 2 almd run`: walkers spread over ranks give the same campaign as one process."""

from __future__ import annotations

import contextlib
import csv
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
                          "test_spacing": 2, "frames_per_call": 2}}  # several frames a round: labelled on both ranks
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
    assert elapsed < 30  # the target, start-up of both ranks included (6 s measured); a hang runs into the timeout


def test_data_parallel_finetuning_gives_every_rank_the_same_weights(tmp_path):
    """Two ranks share each batch: their weights agree to the last bit, and with one process's
    fit of the same global batches to float64 rounding (the summed gradient is the batch's).
    """
    import torch
    from data_parallel_fit import fit

    from almd import potentials

    mpiexec = shutil.which("mpiexec", path=os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"])
    if mpiexec is None:
        pytest.skip("no mpiexec (pip install mpich)")
    script = os.path.join(os.path.dirname(__file__), "data_parallel_fit.py")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run([mpiexec, "-n", "2", sys.executable, script, str(tmp_path)],
                         capture_output=True, text=True, env=env, timeout=600)
    assert out.returncode == 0, out.stdout + out.stderr
    ranks = [torch.load(tmp_path / f"weights-{r}.pt", weights_only=True) for r in (0, 1)]
    assert ranks[0]["weights"].keys() == ranks[1]["weights"].keys()
    for name, w in ranks[0]["weights"].items():
        assert torch.equal(w, ranks[1]["weights"][name]), name
    assert (tmp_path / "fit" / "log.json").is_file()  # written once, by rank 0

    serial = fit(tmp_path / "serial")
    for name, p in serial.named_trainable.items():
        torch.testing.assert_close(ranks[0]["weights"][name], p.detach(), rtol=1e-9, atol=1e-12)
    base = dict(potentials.load("sevennet-0").double().named_parameters())
    moved = max(float((p.detach() - base[name].detach()).abs().max()) for name, p in serial.named_trainable.items())
    assert moved > 1e-6  # three steps of AdamW moved the weights: two untouched models would agree trivially
    for a, b in zip(ranks[0]["history"], serial.history, strict=True):
        for key in ("loss", "hessian", "forces", "val_loss"):
            assert a[key] == pytest.approx(b[key], rel=1e-9), key


def test_killed_on_two_ranks_resumed_on_one_loses_and_repeats_no_label(tmp_path):
    """Two ranks label a round's frames side by side and fine-tune data-parallel; killed (SIGKILL to the
    whole job) as its first fine-tune round writes its logs, the campaign resumes on one rank and completes:
    every step logged once, every label stored once, at most the calculations under way at the kill repeated.
    """
    import signal
    import time

    import ase.db

    mpiexec = shutil.which("mpiexec", path=os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"])
    if mpiexec is None:
        pytest.skip("no mpiexec (pip install mpich)")
    markers = tmp_path / "markers"
    markers.mkdir()
    steps = 16
    toml = small_si_toml(tmp_path / "campaign.toml", tmp_path / "run", steps, checkpoint_every=4, walkers=2,
                         reference={"calculator": "slow_reference:SlowSW",
                                    "options": {"marker_dir": str(markers), "seconds": 0.3}},
                         learning={"initial_labels": 2, "initial_calibration": 1, "phonons": False,
                                   "test_frames": 0, "frames_per_call": 2},
                         finetune={"every": 2, "steps": 2, "strategy": "lora", "lr": 1e-3})
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.path.dirname(__file__)}
    run = tmp_path / "run"
    proc = subprocess.Popen([mpiexec, "-n", "2", sys.executable, "-m", "almd.cli", "run", str(toml)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    end = time.monotonic() + 600
    while not (run / "finetune").exists():
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < end, "no fine-tune round started"
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    # hydra starts the ranks in a process group of their own: rank 0, the lock's holder, goes too
    holder = json.loads((run / "almd.lock").read_text())["pid"]
    with contextlib.suppress(ProcessLookupError):
        os.kill(holder, signal.SIGKILL)
    while _alive(holder):
        time.sleep(0.05)
    before = {r.content_hash for r in ase.db.connect(run / "labels.db").select()}
    askers = {m.name.split("-")[1] for m in markers.iterdir()}
    assert len(askers) == 2  # both ranks ran reference calculations

    again = subprocess.run([sys.executable, "-m", "almd.cli", "run", str(toml)], env=env, capture_output=True,
                           text=True, timeout=900)
    assert again.returncode == 0, again.stderr
    rows = list(ase.db.connect(run / "labels.db").select())
    hashes = [r.content_hash for r in rows]
    assert len(hashes) == len(set(hashes)) and before <= set(hashes)
    assert all(r.status == "ok" for r in rows)
    assert len(list(markers.iterdir())) - len(rows) <= 2  # at most one wave (one call per rank) repeated
    with open(run / "steps.csv") as fh:
        logged = [(r["walker"], int(r["step"])) for r in csv.DictReader(fh) if r["action"] != "brake"]
    assert sorted(logged) == sorted((str(k), s) for k in range(2) for s in range(1, steps + 1))
    summary = json.loads((run / "summary.json").read_text())
    assert summary["oracle_calls"]["total"] == len(rows) and summary["finetunes"] >= 1


def test_ranks_with_different_campaigns_are_refused_before_anything_is_written(tmp_path):
    mpiexec = shutil.which("mpiexec", path=os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"])
    if mpiexec is None:
        pytest.skip("no mpiexec (pip install mpich)")
    first = small_si_toml(tmp_path / "a.toml", tmp_path / "run", 4)
    second = small_si_toml(tmp_path / "b.toml", tmp_path / "run", 5)  # one setting differs
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [mpiexec, "-n", "1", sys.executable, "-m", "almd.cli", "run", str(first), ":",
           "-n", "1", sys.executable, "-m", "almd.cli", "run", str(second)]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode != 0
    assert "ranks [1] run other campaign settings than rank 0" in out.stderr
    assert not (tmp_path / "run").exists()


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/status") as fh:
            return "zombie" not in fh.read()
    except FileNotFoundError:
        return False
