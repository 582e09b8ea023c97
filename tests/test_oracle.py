"""Oracle: labels, caching, failure handling, configuration errors, real DFT."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from ase import Atoms
from ase.build import bulk
from ase.calculators.calculator import Calculator, all_changes
from ase.units import _amu, _e

from almd.labels.database import LabelDatabase
from almd.labels.labeller import Labeller
from almd.labels.oracle import (
    PRESETS,
    LabelResult,
    Oracle,
    OracleConfigError,
    available_pseudopotentials,
    build_calculator,
    resolve_spec,
)

A_SI_PBE = 5.46626289  # lattice constant of the VASP PBE data in almd/data/si-pbe


def si8(rattle: float = 0.05, seed: int = 0) -> Atoms:
    atoms = bulk("Si", "diamond", a=5.43, cubic=True)
    atoms.rattle(rattle, seed=seed)
    return atoms


# ---- calculators the worker imports by "module:Class" (this module's own name)

class CountingSW(Calculator):
    """Stillinger-Weber that appends a line to ``log`` per calculation (counts across processes)."""

    implemented_properties = ["energy", "forces", "stress"]

    def __init__(self, log: str, **kwargs):
        super().__init__(**kwargs)
        self.log = log

    def calculate(self, atoms=None, properties=("energy",), system_changes=all_changes):
        super().calculate(atoms, properties, system_changes)
        with open(self.log, "a") as f:
            f.write(f"{os.getpid()}\n")
        sw = build_calculator("stillinger-weber-si")
        a = self.atoms.copy()
        a.calc = sw
        self.results = {"energy": a.get_potential_energy(), "forces": a.get_forces(),
                        "stress": a.get_stress()}


class RaisingCalculator(Calculator):
    implemented_properties = ["energy", "forces"]

    def __init__(self, message: str = "deliberate failure", **kwargs):
        super().__init__(**kwargs)
        self.message = message

    def calculate(self, atoms=None, properties=("energy",), system_changes=all_changes):
        raise RuntimeError(self.message)


class NaNCalculator(Calculator):
    implemented_properties = ["energy", "forces"]

    def calculate(self, atoms=None, properties=("energy",), system_changes=all_changes):
        super().calculate(atoms, properties, system_changes)
        forces = np.zeros((len(self.atoms), 3))
        forces[1, 2] = np.nan
        self.results = {"energy": -1.0, "forces": forces}


class HangingCalculator(Calculator):
    """Starts a child process (like pw.x under mpirun) and hangs."""

    implemented_properties = ["energy", "forces"]

    def __init__(self, pidfile: str, **kwargs):
        super().__init__(**kwargs)
        self.pidfile = pidfile

    def calculate(self, atoms=None, properties=("energy",), system_changes=all_changes):
        child = subprocess.Popen(["sleep", "300"])
        Path(self.pidfile).write_text(str(child.pid))
        time.sleep(300)


class CrashingCalculator(Calculator):
    implemented_properties = ["energy", "forces"]

    def calculate(self, atoms=None, properties=("energy",), system_changes=all_changes):
        os._exit(3)  # like a segfault in compiled code: no exception, no result


class FlakyCalculator(CountingSW):
    """Fails the first time (marker file absent), then behaves like CountingSW."""

    def calculate(self, atoms=None, properties=("energy",), system_changes=all_changes):
        marker = Path(self.log + ".failed-once")
        if not marker.exists():
            marker.write_text("x")
            raise RuntimeError("transient failure: node lost")
        super().calculate(atoms, properties, system_changes)


def spec(cls: type) -> str:
    return f"{__name__}:{cls.__name__}"


@pytest.fixture
def sw_oracle(tmp_path):
    return Oracle("stillinger-weber-si", timeout=60, retries=0, workdir=tmp_path / "runs")


# ---------------------------------------------------------------- Stillinger-Weber physics

def test_sw_labels_match_matscipy(sw_oracle):
    atoms = si8()
    result = sw_oracle.label(atoms)
    assert result.ok and result.attempts == 1 and not result.cached
    ref = atoms.copy()
    ref.calc = build_calculator("stillinger-weber-si")
    assert result.energy == pytest.approx(ref.get_potential_energy(), abs=1e-10)
    np.testing.assert_allclose(result.forces, ref.get_forces(), atol=1e-10)
    np.testing.assert_allclose(result.stress, ref.get_stress(), atol=1e-12)
    assert np.abs(result.forces).max() > 0.05  # rattled: the check is not trivially 0 == 0
    labelled = result.attach(atoms)
    assert labelled.get_potential_energy() == result.energy


def test_sw_forces_are_minus_energy_gradient(sw_oracle):
    atoms = si8(seed=3)
    forces = sw_oracle.label(atoms).forces
    h = 1e-4
    for i, k in [(0, 0), (3, 1), (6, 2)]:
        plus, minus = atoms.copy(), atoms.copy()
        plus.positions[i, k] += h
        minus.positions[i, k] -= h
        de = sw_oracle.label(plus).energy - sw_oracle.label(minus).energy
        assert -de / (2 * h) == pytest.approx(forces[i, k], abs=1e-5)


def test_second_call_is_served_from_cache(tmp_path):
    log = tmp_path / "calls.log"
    db_path = tmp_path / "labels.db"
    oracle = Labeller(Oracle(spec(CountingSW), log=str(log), retries=0, workdir=tmp_path), db_path)
    atoms = si8()
    first = oracle.label(atoms)
    second = oracle.label(atoms.copy())
    assert first.ok and not first.cached
    assert second.cached and second.energy == first.energy
    assert len(log.read_text().split()) == 1 and oracle.calls == 1

    # a new oracle (new process, say after a restart) finds the label in the database
    again = Labeller(Oracle(spec(CountingSW), log=str(log), retries=0, workdir=tmp_path), db_path)
    third = again.label(atoms)
    assert third.cached and again.calls == 0
    np.testing.assert_allclose(third.forces, first.forces)
    assert len(log.read_text().split()) == 1
    assert len(LabelDatabase(db_path)) == 1  # the cache hit is not stored twice

    # other structure -> computed
    moved = atoms.copy()
    moved.positions[0, 0] += 0.01
    assert not oracle.label(moved).cached
    assert len(log.read_text().split()) == 2


def test_label_many_in_parallel_matches_serial(tmp_path):
    frames = [si8(seed=s) for s in range(4)]
    frames.append(frames[1].copy())  # duplicate: computed once
    db = LabelDatabase(tmp_path / "l.db")
    oracle = Labeller(Oracle("stillinger-weber-si", retries=0, workdir=tmp_path / "runs"), db)
    oracle.label(frames[0])  # already known -> cache hit inside the batch
    results = oracle.label_many(frames, max_workers=2,
                                provenance=[{"walker": i, "step": 7} for i in range(5)])
    assert [r.cached for r in results] == [True, False, False, False, True]
    assert oracle.calls == 4 and len(db) == 4
    serial = Oracle("stillinger-weber-si", retries=0, workdir=tmp_path / "runs")
    for atoms, r in zip(frames, results):
        assert r.energy == pytest.approx(serial.label(atoms).energy, abs=1e-12)
    assert sorted(row.get("walker", -1) for row in db.rows()) == [-1, 1, 2, 3]  # row 0 came earlier
    assert not any((tmp_path / "runs").iterdir())  # empty run directories are not left behind


def test_settings_enter_the_hash():
    name, kwargs = resolve_spec("gpaw-pw")
    assert name == "gpaw-pw" and kwargs["ecut"] > 0 and kwargs["xc"] == "PBE"
    default = Oracle("gpaw-pw")
    assert Oracle("gpaw-pw", ecut=kwargs["ecut"]).settings_hash == default.settings_hash
    assert Oracle({"calculator": "gpaw-pw", "ecut": 500}).settings_hash != default.settings_hash
    as_dict = Oracle({"calculator": "gpaw-pw", "ecut": 500})
    assert Oracle("gpaw-pw", ecut=500).settings_hash == as_dict.settings_hash


# ---------------------------------------------------------------- faults

FAULTS = {
    "raises": (RaisingCalculator, {}, "deliberate failure", "exception"),
    "scf": (RaisingCalculator, {"message": "SCF did not converge after 333 iterations"}, "converge", "scf"),
    "nan": (NaNCalculator, {}, "non-finite forces", "nonfinite"),
    "crash": (CrashingCalculator, {}, "exit code 3", "crashed"),
    "hangs": (HangingCalculator, {}, "timed out", "timeout"),
}


@pytest.mark.parametrize("fault", list(FAULTS))
def test_fault_is_recorded_and_next_call_works(tmp_path, fault):
    cls, kwargs, text, kind = FAULTS[fault]
    if cls is HangingCalculator:
        kwargs = {"pidfile": str(tmp_path / "child.pid")}
    db = LabelDatabase(tmp_path / "labels.db")
    good = Labeller(Oracle("stillinger-weber-si", retries=0, workdir=tmp_path), db)
    before = good.label(si8(seed=1))

    bad = Labeller(Oracle(spec(cls), timeout=2.0, retries=0, workdir=tmp_path, **kwargs), db)
    t0 = time.perf_counter()
    result = bad.label(si8(seed=2), walker=4, step=120)
    elapsed = time.perf_counter() - t0
    assert result.status == "failed" and result.error_kind == kind
    assert text in result.error and result.energy is None
    assert elapsed < 30

    rows = db.rows(status="failed")
    assert len(rows) == 1 and text in rows[0].data["error"]
    assert rows[0].walker == 4 and rows[0].step == 120 and rows[0].error_kind == kind
    assert db.training_set() + db.validation_set()  # the good row is still there ...
    ok_rows = db.rows(status="ok")
    assert len(ok_rows) == 1 and ok_rows[0].energy == pytest.approx(before.energy)
    np.testing.assert_allclose(ok_rows[0].forces, before.forces)

    after = good.label(si8(seed=3))  # ... and the next call is fine
    assert after.ok and len(db) == 3
    if fault == "hangs":  # the whole process group died, not only the worker
        pid = int((tmp_path / "child.pid").read_text())
        time.sleep(0.2)
        assert not Path(f"/proc/{pid}").exists() or "Z" in Path(f"/proc/{pid}/stat").read_text().split()[2]


def test_failed_result_is_not_cached(tmp_path):
    oracle = Labeller(Oracle(spec(RaisingCalculator), retries=0, workdir=tmp_path), tmp_path / "l.db")
    atoms = si8()
    assert not oracle.label(atoms).ok
    assert not oracle.label(atoms).ok and oracle.calls == 2  # a failure is retried later, not remembered
    assert len(LabelDatabase(tmp_path / "l.db").rows(status="failed")) == 2


def test_retry_recovers_from_transient_failure(tmp_path):
    log = tmp_path / "calls.log"
    oracle = Oracle(spec(FlakyCalculator), log=str(log), retries=1, workdir=tmp_path)
    result = oracle.label(si8())
    assert result.ok and result.attempts == 2 and oracle.calls == 2
    no_retry = Oracle(spec(FlakyCalculator), log=str(tmp_path / "other.log"), retries=0, workdir=tmp_path)
    failed = no_retry.label(si8())
    assert not failed.ok and failed.attempts == 1 and "transient failure" in failed.error


# ---------------------------------------------------------------- configuration errors

def test_unknown_preset_lists_presets():
    with pytest.raises(OracleConfigError) as err:
        build_calculator("stillinger-weber")
    for name in PRESETS:
        assert name in str(err.value)
    with pytest.raises(OracleConfigError, match="no option"):
        build_calculator("stillinger-weber-si", cutoff=3.0)
    with pytest.raises(OracleConfigError, match="pip install nosuchcode"):
        Oracle("nosuchcode.calculators:Thing")


def test_import_path_and_dict_specs():
    calc = build_calculator("ase.calculators.emt:EMT")
    assert type(calc).__name__ == "EMT"
    calc = build_calculator({"calculator": "ase.calculators.lj:LennardJones", "sigma": 2.0})
    assert calc.parameters.sigma == 2.0
    assert type(build_calculator(" EMT ")).__name__ == "EMT"  # preset names are forgiving


def test_missing_pw_x_gives_install_advice():
    with pytest.raises(OracleConfigError, match="apt-get install quantum-espresso"):
        build_calculator("espresso-pw", command="pw-not-installed.x")
    with pytest.raises(OracleConfigError, match="apt-get install quantum-espresso"):
        Oracle("espresso-pw", command="pw-not-installed.x")


@pytest.mark.skipif(shutil.which("pw.x") is None, reason="needs pw.x")
def test_missing_pseudopotential_names_element_and_dir(tmp_path):
    shutil.copy(Path("/usr/share/espresso/pseudo/Si.pbe-rrkj.UPF"), tmp_path)
    oracle = Oracle("espresso-pw", pseudo_dir=str(tmp_path), workdir=tmp_path)
    with pytest.raises(OracleConfigError) as err:
        oracle.label(bulk("NaCl", "rocksalt", a=5.64))
    assert "Na" in str(err.value) and "Cl" in str(err.value) and str(tmp_path) in str(err.value)
    assert oracle.calls == 0  # raised before any worker started


def test_pseudopotential_choice():
    pseudos = available_pseudopotentials()
    # PBE, non-relativistic, norm-conserving beats ultrasoft (Si.pbe-nl-rrkjus...) and LDA (Si.pz-vbc)
    assert pseudos["Si"] == "Si.pbe-rrkj.UPF"
    assert "rel" not in pseudos["Fe"] and ".pbe" in pseudos["Fe"]
    if shutil.which("pw.x"):  # charge-density cutoff follows the pseudopotential type
        si = build_calculator("espresso-pw", ecutwfc=30, atoms=bulk("Si"))
        assert si.parameters["pseudopotentials"] == {"Si": "Si.pbe-rrkj.UPF"}
        assert si.parameters["input_data"]["system"]["ecutrho"] == 4 * 30  # norm-conserving
        ge = build_calculator("espresso-pw", ecutwfc=30, atoms=bulk("Ge"))
        assert ge.parameters["input_data"]["system"]["ecutrho"] == 8 * 30  # PAW


# ---------------------------------------------------------------- real DFT (slow)

def _check_dft(result: LabelResult) -> None:
    assert result.ok, result.error
    assert np.isfinite(result.energy)
    assert np.abs(result.forces.sum(axis=0)).max() < 0.01  # momentum conservation
    assert np.abs(result.forces[0]).max() > 0.05  # the displaced atom feels a force
    assert result.stress is not None and result.stress.shape == (6,)
    assert np.all(np.isfinite(result.stress))


def _si2_displaced() -> Atoms:
    atoms = bulk("Si", "diamond", a=A_SI_PBE)
    atoms.positions[0] += [0.03, -0.02, 0.01]
    return atoms


@pytest.mark.slow
def test_gpaw_single_point(tmp_path):
    pytest.importorskip("gpaw")
    oracle = Labeller(Oracle("gpaw-pw", ecut=200, kpt_density=1.5, timeout=600, workdir=tmp_path), tmp_path / "dft.db")
    _check_dft(oracle.label(_si2_displaced()))
    row = LabelDatabase(tmp_path / "dft.db").rows()[0]
    assert row.oracle == "gpaw-pw" and row.status == "ok" and row.data["settings"]["ecut"] == 200


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("pw.x") is None, reason="needs pw.x (apt-get install quantum-espresso)")
def test_espresso_single_point(tmp_path):
    oracle = Oracle("espresso-pw", ecutwfc=20, kpt_density=2.0, timeout=600, workdir=tmp_path)
    result = oracle.label(_si2_displaced())
    _check_dft(result)
    # per-call working directory kept for inspection
    assert (tmp_path / result.content_hash / "espresso.pwo").exists()


@pytest.mark.slow
def test_gpaw_gamma_optical_phonon_of_si(tmp_path):
    """Frozen phonon in the 2-atom cell: displacing atom 0 by u along x is the
    Γ-point problem; by the acoustic sum rule the optical mode has ω² = k/μ with
    k = (F1x − F0x)/(2u) and μ = m/2. Reference: 15.09 THz from the VASP PBE data.
    """
    pytest.importorskip("gpaw")
    u = 0.015
    atoms = bulk("Si", "diamond", a=A_SI_PBE)
    atoms.positions[0, 0] += u
    # 8×8×8 k-points, 300 eV (the data's cutoff): 15.20 THz; 10×10×10 gives 15.14 (k-converged to <1 %)
    oracle = Oracle("gpaw-pw", ecut=300, kpts=(8, 8, 8), convergence={"forces": 1e-4},
                    timeout=900, retries=0, workdir=tmp_path)
    result = oracle.label(atoms)
    assert result.ok, result.error
    k = (result.forces[1, 0] - result.forces[0, 0]) / (2 * u)  # eV/Å²
    mu = atoms.get_masses()[0] / 2
    nu = np.sqrt(k * _e / 1e-20 / (mu * _amu)) / (2 * np.pi) / 1e12
    assert nu == pytest.approx(15.09, rel=0.05)
    print(f"GPAW PBE Γ optical: {nu:.2f} THz (VASP PBE 15.09) in {result.wall_time:.0f} s")


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("pw.x") is None, reason="needs pw.x (apt-get install quantum-espresso)")
def test_espresso_scf_failure_is_reported_as_such(tmp_path):
    oracle = Labeller(Oracle("espresso-pw", ecutwfc=15, kpt_density=1.0, retries=0, workdir=tmp_path,
                    input_data={"electrons": {"electron_maxstep": 2}}), tmp_path / "l.db")
    result = oracle.label(_si2_displaced())
    assert result.status == "failed" and result.error_kind == "scf"
    assert "convergence NOT achieved" in result.error  # pw.x's own words, not just "exit status 2"
    (row,) = LabelDatabase(tmp_path / "l.db").rows(status="failed")
    assert row.error_kind == "scf" and "convergence NOT achieved" in row.data["error"]


def test_missing_executable_of_a_generic_calculator_is_a_failed_result(tmp_path):
    """Only presets can check their program up front; for any other file-based
    calculator the missing program surfaces in the worker and is recorded.
    """
    from ase.calculators.espresso import EspressoProfile

    profile = EspressoProfile(command="no-such-pw.x", pseudo_dir="/usr/share/espresso/pseudo")
    oracle = Labeller(Oracle("ase.calculators.espresso:Espresso", profile=profile,
                    pseudopotentials={"Si": "Si.pbe-rrkj.UPF"}, retries=0, workdir=tmp_path), tmp_path / "l.db")
    result = oracle.label(bulk("Si"))
    assert result.status == "failed" and result.error_kind == "exception"
    assert "no-such-pw.x" in result.error
    assert len(LabelDatabase(tmp_path / "l.db").rows(status="failed")) == 1
    same = EspressoProfile(command="no-such-pw.x", pseudo_dir="/usr/share/espresso/pseudo")
    other = Oracle("ase.calculators.espresso:Espresso", profile=same,
                   pseudopotentials={"Si": "Si.pbe-rrkj.UPF"})
    assert other.settings_hash == oracle.settings_hash  # objects hash by content (restarts hit the cache)


def test_calculator_defined_in_a_user_script(tmp_path):
    """A class from the user's own script ("__main__:Toy") reaches the worker (spawned)."""
    script = tmp_path / "campaign.py"
    script.write_text(
        "import numpy as np\n"
        "from ase.build import bulk\n"
        "from ase.calculators.calculator import Calculator, all_changes\n"
        "from almd.labels.oracle import Oracle\n\n"
        "class Toy(Calculator):\n"
        "    implemented_properties = ['energy', 'forces']\n"
        "    def calculate(self, atoms=None, properties=('energy',), system_changes=all_changes):\n"
        "        super().calculate(atoms, properties, system_changes)\n"
        "        self.results = {'energy': 1.5, 'forces': np.zeros((len(self.atoms), 3))}\n\n"
        "if __name__ == '__main__':\n"
        "    r = Oracle(Toy, retries=0, workdir='runs').label(bulk('Si'))\n"
        "    print(r.status, r.energy)\n")
    out = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True,
                         text=True, timeout=120)
    assert out.stdout.split() == ["ok", "1.5"], out.stderr


def test_oracle_and_dataset_do_not_import_torch():
    """The oracle must run on DFT nodes without the ML stack (architecture contract)."""
    code = ("import sys, almd.labels.oracle, almd.labels.database, almd.phonons.datasets; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'sevenn', 'mace')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
