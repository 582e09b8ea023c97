"""A campaign under a scheduler: real signals, real SIGKILL, a lock on the run directory, a torn log."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import small_si_toml

from almd.campaign.state import RunLock, RunLocked, truncate_log

STEPS = 16
def campaign_file(folder: Path, steps: int = STEPS, **sections) -> Path:
    return small_si_toml(folder / "campaign.toml", folder / "run", steps, checkpoint_every=100, **sections)


def almd_run(toml: Path, **kwargs) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "almd.cli", "run", str(toml)], env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, **kwargs)


def logged_steps(run: Path) -> int:
    try:
        with open(run / "steps.csv") as fh:
            return sum(1 for _ in csv.DictReader(fh))
    except FileNotFoundError:
        return 0


def wait_for_steps(proc: subprocess.Popen, run: Path, n: int, timeout: float = 240) -> None:
    end = time.monotonic() + timeout
    while logged_steps(run) < n:
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < end, "the campaign made no progress"
        time.sleep(0.05)


def outcome(run: Path) -> tuple:
    """What an uninterrupted run and an interrupted-then-resumed one must share to the last bit."""
    import ase.db

    with open(run / "steps.csv") as fh:
        log = [(r["walker"], r["step"], r["energy"], r["score"], r["action"]) for r in csv.DictReader(fh)]
    rows = list(ase.db.connect(run / "labels.db").select())
    hashes = [r.content_hash for r in rows]
    return (json.loads((run / "walker-0.json").read_text()), log + trajectory(run), sorted(hashes),
            len(hashes) == len(set(hashes)))


def trajectory(run: Path) -> list[tuple]:
    """Every frame of walker 0's trajectory: step, energy, positions, uncertainty (each once, in order;
    the spread is evaluated on every 2nd step, so only even steps carry one).
    """
    from ase.io import read

    frames = read(run / "trajectory-0.extxyz", ":")
    steps = [a.info["step"] for a in frames]
    assert steps == list(range(3, STEPS + 1, 3)), steps
    return [(a.info["step"], a.get_potential_energy(), a.positions.tobytes(),
             a.arrays.get("force_uncertainty", a.positions[:0]).tobytes()) for a in frames]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    folder = tmp_path_factory.mktemp("straight")
    proc = almd_run(campaign_file(folder))
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err
    return (*outcome(folder / "run"), folder / "run")


@pytest.mark.parametrize("name", ["SIGTERM", "SIGUSR1"])
def test_a_signal_checkpoints_and_the_resumed_run_is_identical(uninterrupted, tmp_path, name):
    toml = campaign_file(tmp_path)
    proc = almd_run(toml)
    wait_for_steps(proc, tmp_path / "run", 5)
    os.kill(proc.pid, getattr(signal, name))
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 75, err
    (line,) = out.strip().splitlines()
    assert line.startswith(f"almd run: stopped by {name}") and "run the same command again" in line
    stopped_at = json.loads((tmp_path / "run" / "campaign.json").read_text())["steps"]["0"]
    assert 5 <= stopped_at < STEPS  # a checkpoint where the signal came, not at checkpoint_every

    run_to_end(toml)
    walker, log, hashes, unique = outcome(tmp_path / "run")
    assert unique and (walker, log, hashes) == uninterrupted[:3]


def test_sigkill_during_md_loses_no_label_and_computes_none_twice(uninterrupted, tmp_path):
    toml = campaign_file(tmp_path)
    proc = almd_run(toml)
    wait_for_steps(proc, tmp_path / "run", 9)  # past the first trigger calls, no checkpoint yet
    proc.kill()
    proc.wait()
    run_to_end(toml)
    walker, log, hashes, unique = outcome(tmp_path / "run")
    assert unique and (walker, log, hashes) == uninterrupted[:3]


def test_a_second_process_on_the_directory_is_refused(tmp_path):
    toml = campaign_file(tmp_path, steps=100_000)  # still running when the second one starts
    first = almd_run(toml)
    try:
        wait_for_steps(first, tmp_path / "run", 1)
        second = almd_run(toml)
        out, err = second.communicate(timeout=120)
        assert second.returncode == 2, err
        assert f"in use by pid {first.pid}" in out and "almd.lock" in out
    finally:
        first.kill()
        first.wait()


def test_a_dead_process_lock_is_taken_over(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    import socket

    (tmp_path / "almd.lock").write_text(json.dumps({"pid": int(dead.stdout), "host": socket.gethostname(),
                                                    "started": "earlier"}))
    with RunLock(tmp_path) as lock:
        assert json.loads(lock.path.read_text())["pid"] == os.getpid()
    assert not (tmp_path / "almd.lock").exists()
    (tmp_path / "almd.lock").write_text(json.dumps({"pid": 1, "host": "another-node", "started": "earlier"}))
    with pytest.raises(RunLocked, match="pid 1 on another-node"):
        RunLock(tmp_path).acquire()


def test_a_torn_last_line_of_the_log_is_dropped_on_resume(tmp_path):
    fields = ("walker", "step", "energy")
    path = tmp_path / "steps.csv"
    path.write_text("walker,step,energy\r\n0,1,-1.5\r\n0,2,-1.6\r\n0,3,-1.")  # killed mid-write
    truncate_log(path, fields, {"0": 5})
    assert path.read_bytes() == b"walker,step,energy\r\n0,1,-1.5\r\n0,2,-1.6\r\n"
    truncate_log(path, fields, {"0": 1})
    assert path.read_bytes() == b"walker,step,energy\r\n0,1,-1.5\r\n"


def test_a_torn_last_frame_of_the_trajectory_is_dropped_on_resume(tmp_path):
    """A kill inside a frame's write leaves part of it; trim keeps the whole frames up to the checkpoint."""
    from ase.build import bulk
    from ase.io import read

    from almd.campaign.trajectory import TrajectoryWriter, trim
    from almd.phonons import stillinger_weber_si

    atoms = bulk("Si", "diamond", a=5.431, cubic=True)
    atoms.calc = stillinger_weber_si()
    path = tmp_path / "trajectory-0.extxyz"
    writer = TrajectoryWriter(path, every=2)
    for step in range(1, 9):
        atoms.rattle(0.01, seed=step)
        atoms.get_forces(), atoms.get_stress()  # as a walker's step has them
        writer.write(atoms, step, 0.1 * step, 300.0, 1)
    text = path.read_text()
    path.write_text(text[: len(text) - 40])  # the frame of step 8 torn
    assert trim(path, last_step=8) == 3
    assert [a.info["step"] for a in read(path, ":")] == [2, 4, 6]
    assert trim(path, last_step=5) == 2  # a checkpoint at step 5: frames after it are re-run
    frames = read(path, ":")
    assert [a.info["step"] for a in frames] == [2, 4] and frames[1].info["score"] == pytest.approx(0.4)
    assert frames[1].get_forces().shape == (8, 3)


@pytest.mark.parametrize("walker_tables", [False, True])
def test_a_moved_run_directory_resumes_from_itself(uninterrupted, tmp_path, walker_tables):
    """`almd run --resume RUN_DIR` takes its settings from the folder, wherever it now is
    (a [[walker]] table, an array of tables, included: the same settings as [md] alone).
    """
    import shutil

    toml = campaign_file(tmp_path, walker=[{"temperature": 1200.0}]) if walker_tables else campaign_file(tmp_path)
    first = subprocess.run([sys.executable, "-m", "almd.cli", "run", str(toml), "--steps", "6"],
                           capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert first.returncode == 0, first.stderr
    assert (tmp_path / "run" / "campaign.toml").read_text() == toml.read_text()  # the user's file, kept
    moved = tmp_path / "elsewhere" / "run"
    shutil.move(tmp_path / "run", moved)
    toml.unlink()  # the folder alone must do
    again = subprocess.run([sys.executable, "-m", "almd.cli", "run", "--resume", str(moved), "--steps", str(STEPS)],
                           capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert again.returncode == 0, again.stderr
    walker, log, hashes, unique = outcome(moved)
    assert unique and (walker, log, hashes) == uninterrupted[:3]


def test_the_run_summary_adds_up_and_is_rebuilt_from_the_folder_alone(uninterrupted):
    import ase.db

    from almd.campaign.report import summarise

    run = uninterrupted[-1]
    written = json.loads((run / "summary.json").read_text())
    assert summarise(run) == written  # steps.csv, labels.db and campaign.json are enough
    plots = ("uncertainty.png", "md.png", "learning.png", "parity.png")  # no phonon labels in this campaign
    assert all((run / name).stat().st_size > 10_000 for name in plots)
    for name in ("summary.json", *plots):
        (run / name).unlink()
    out = subprocess.run([sys.executable, "-m", "almd.cli", "report", str(run)], capture_output=True, text=True)
    assert out.returncode == 0 and json.loads(out.stdout) == written == json.loads((run / "summary.json").read_text())
    assert all((run / name).stat().st_size > 10_000 for name in plots)
    curve = json.loads((run / "campaign.json").read_text())["learning_curve"]
    assert len(curve) == written["oracle_calls"]["trigger"] + written["oracle_calls"]["brake"]
    assert all(point["error"] > 0 for point in curve)
    rows = list(ase.db.connect(run / "labels.db").select())
    calls = written["oracle_calls"]
    assert calls["total"] == len(rows) == calls["bootstrap"] + calls["trigger"] + calls["brake"]
    assert calls["bootstrap"] == 3 and written["oracle_failures"] == 0  # 2 initial labels + 1 calibration
    assert written["md_steps"] == STEPS and 0 < written["fraction_steps_without_oracle"] < 1
    assert written["heldout_frames"] >= 1
    assert written["heldout_force_rmse_eV_A"] > 0 and written["heldout_force_rmse_base_eV_A"] > 0
    assert all(written["wall_time_s"][stage] > 0 for stage in ("md_and_uncertainty", "reference", "refit"))


# ---------------------------------------------------------------- kill -9 in the middle of the work

FINETUNE = {"every": 2, "steps": 2, "strategy": "lora", "lr": 1e-3, "recent_labels": 4}  # bounded rebuilds too


def run_to_end(toml: Path) -> None:
    proc = almd_run(toml, cwd=Path(__file__).parent)
    out, err = proc.communicate(timeout=900)
    assert proc.returncode == 0, err


def killed_when(toml: Path, ready) -> None:
    proc = almd_run(toml, cwd=Path(__file__).parent)
    end = time.monotonic() + 600
    while not ready():
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < end, "the moment to kill never came"
        time.sleep(0.02)
    proc.kill()
    proc.wait()


def test_sigkill_during_a_reference_call(tmp_path):
    """Killed while the reference computes: that calculation is lost work, nothing else is."""
    markers = tmp_path / "markers"
    markers.mkdir()
    files = {}
    for name in ("straight", "killed"):
        (tmp_path / name).mkdir()
        files[name] = campaign_file(tmp_path / name, reference={
            "calculator": "slow_reference:SlowSW", "options": {"marker_dir": str(markers), "seconds": 0.5}})
    run_to_end(files["straight"])
    expected = outcome(tmp_path / "straight" / "run")
    before = len(list(markers.iterdir()))
    # the 5th call: past the 3 bootstrap labels, inside the MD
    killed_when(files["killed"], lambda: len(list(markers.iterdir())) >= before + 5)
    run_to_end(files["killed"])
    walker, log, hashes, unique = outcome(tmp_path / "killed" / "run")
    assert unique and (walker, log, hashes) == expected[:3]


def test_sigkill_during_a_finetune_round(tmp_path):
    files = {}
    for name in ("straight", "killed"):
        (tmp_path / name).mkdir()
        files[name] = campaign_file(tmp_path / name, finetune=FINETUNE)
    run_to_end(files["straight"])
    expected = outcome(tmp_path / "straight" / "run")
    assert json.loads((tmp_path / "straight" / "run" / "campaign.json").read_text())["finetunes"]
    killed_when(files["killed"], lambda: (tmp_path / "killed" / "run" / "finetune").exists())
    run_to_end(files["killed"])
    walker, log, hashes, unique = outcome(tmp_path / "killed" / "run")
    assert unique and (walker, log, hashes) == expected[:3]


KILL_IN_CHECKPOINT = """
import os, signal, sys
import almd.potentials.files as files

write = files.atomic_write_with

def dying(path, payload):
    if os.path.basename(str(path)) == "ensemble-2.pt":  # the second checkpoint: half written, then SIGKILL
        def half(fh):
            import io
            buffer = io.BytesIO()
            payload(buffer)
            fh.write(buffer.getvalue()[: len(buffer.getvalue()) // 2])
            fh.flush()
            os.kill(os.getpid(), signal.SIGKILL)
        return write(path, half)
    return write(path, payload)

files.atomic_write_with = dying
from almd.cli import main
sys.exit(main(["run", sys.argv[1]]))
"""


def test_sigkill_in_the_middle_of_a_checkpoint_leaves_the_previous_one_whole(uninterrupted, tmp_path):
    toml = small_si_toml(tmp_path / "campaign.toml", tmp_path / "run", STEPS, checkpoint_every=5)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", KILL_IN_CHECKPOINT, str(toml)], env=env, capture_output=True, text=True)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    state = json.loads((tmp_path / "run" / "campaign.json").read_text())
    assert state["generation"] == 1 and state["steps"]["0"] == 5  # the first checkpoint, still current
    assert (tmp_path / "run" / state["ensemble"]).is_file()
    run_to_end(toml)
    walker, log, hashes, unique = outcome(tmp_path / "run")
    assert unique and (walker, log, hashes) == uninterrupted[:3]


KILL_IN_DATABASE_WRITE = """
import os, signal, sys
import ase.db.sqlite
from almd.labels.database import LabelDatabase

rows = []
add_result = LabelDatabase.add_result

def counted(self, *args, **kwargs):
    rows.append(1)
    return add_result(self, *args, **kwargs)

class DyingConnection:
    '''sqlite3's connection, except that the 5th label's commit never happens: SIGKILL first.'''
    def __init__(self, con):
        self._con = con
    def __getattr__(self, name):
        return getattr(self._con, name)
    def __enter__(self):
        return self
    def __exit__(self, *exc):
        self.commit()
        return self._con.__exit__(*exc)
    def commit(self):
        if len(rows) == 5:  # the row's INSERTs are made, the transaction is open
            os.kill(os.getpid(), signal.SIGKILL)
        return self._con.commit()

connect = ase.db.sqlite.SQLite3Database._connect
ase.db.sqlite.SQLite3Database._connect = lambda self: DyingConnection(connect(self))
LabelDatabase.add_result = counted
from almd.cli import main
sys.exit(main(["run", sys.argv[1]]))
"""


def test_sigkill_during_a_database_write(uninterrupted, tmp_path):
    """Killed inside the transaction that stores a label: SQLite rolls it back, the resumed run
    computes that label again (once), and the database opens and reads as ever.
    """
    import ase.db

    toml = campaign_file(tmp_path)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", KILL_IN_DATABASE_WRITE, str(toml)], env=env,
                          capture_output=True, text=True)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert len(list(ase.db.connect(tmp_path / "run" / "labels.db").select())) == 4  # the 5th rolled back
    run_to_end(toml)
    walker, log, hashes, unique = outcome(tmp_path / "run")
    assert unique and (walker, log, hashes) == uninterrupted[:3]


def test_a_failing_reference_is_reported_and_never_learnt_from(tmp_path):
    """One calculation in five raises, one in ten returns NaN forces (no retries): the campaign
    completes, stores and reports every failure, and fits its model on none of them.
    """
    import ase.db

    from almd.uncertainty import Ensemble

    markers = tmp_path / "markers"
    markers.mkdir()
    toml = campaign_file(tmp_path, steps=24, reference={
        "calculator": "slow_reference:FlakySW", "retries": 0, "options": {"marker_dir": str(markers)}},
        learning={"initial_labels": 2, "initial_calibration": 1, "phonons": False, "test_frames": 0,
                  "frames_per_call": 2})  # a round's frames labelled together, then learnt from in turn
    run_to_end(toml)
    n = len(list(markers.iterdir()))
    failed = [k for k in range(1, n + 1) if k % 5 == 4 or k % 10 == 7]
    assert n >= 7  # the run met both kinds of failure (calculations 4 and 7)
    run = tmp_path / "run"
    rows = list(ase.db.connect(run / "labels.db").select())
    assert len(rows) == n  # every calculation has its row, failed or not
    assert len({r.content_hash for r in rows}) == n  # and no frame was computed twice
    bad = {r.content_hash for r in rows if r.status == "failed"}
    assert len(bad) == len(failed)
    assert all(r.get("error") or r.data.get("error") for r in rows if r.status == "failed")
    summary = json.loads((run / "summary.json").read_text())
    assert summary["oracle_failures"] == len(failed)
    state = json.loads((run / "campaign.json").read_text())
    learnt = {d.key for d in Ensemble.load(run / state["ensemble"]).designs}
    assert learnt and not learnt & bad
