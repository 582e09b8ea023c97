"""Label database: round trips, provenance, split, crash safety, phonon data sets."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from ase.build import bulk
from ase.units import _amu, _e

from almd.data import SI_PBE as DATA_SI_PBE
from almd.labels.database import LabelDatabase, assign_split
from almd.phonons.datasets import displaced_supercells, hessian_from_force_constants, load_phonon_dataset, phonon_hessian
from almd.structures import content_hash, settings_hash, structure_hash

SI_PBE = DATA_SI_PBE / "phono3py_disp.yaml"
SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "dft"


def labelled(seed: int):
    """A rattled Si cell with made-up but distinct labels."""
    rng = np.random.default_rng(seed)
    atoms = bulk("Si", "diamond", a=5.43, cubic=True)
    atoms.rattle(0.03, seed=seed)
    return atoms, dict(energy=-40.0 + rng.normal(), forces=rng.normal(size=(8, 3)),
                       stress=rng.normal(size=6) * 1e-2)


def test_round_trip_labels_and_provenance(tmp_path):
    db = LabelDatabase(tmp_path / "c.db")
    atoms, labels = labelled(0)
    row_id = db.add(atoms, **labels, oracle="gpaw-pw", settings={"ecut": 300}, wall_time=5.5,
                    walker=2, step=1500, model_version="r3", uncertainty=0.071)
    reopened = LabelDatabase(tmp_path / "c.db")
    frame = reopened.frames(id=row_id)[0]
    assert frame.get_potential_energy() == pytest.approx(labels["energy"], abs=1e-12)
    np.testing.assert_allclose(frame.get_forces(), labels["forces"], atol=1e-12)
    np.testing.assert_allclose(frame.get_stress(), labels["stress"], atol=1e-12)
    np.testing.assert_allclose(frame.positions, atoms.positions, atol=1e-12)
    info = frame.info
    assert (info["oracle"], info["walker"], info["step"], info["model_version"]) == ("gpaw-pw", 2, 1500, "r3")
    assert info["uncertainty"] == pytest.approx(0.071) and info["status"] == "ok"
    assert info["settings_hash"] == settings_hash({"ecut": 300})
    assert info["content_hash"] == content_hash(atoms, settings_hash({"ecut": 300}))
    assert reopened.lookup(info["content_hash"]).id == row_id
    assert reopened.lookup(content_hash(atoms, settings_hash({"ecut": 400}))) is None
    with pytest.raises(ValueError, match="unknown provenance"):
        db.add(atoms, **labels, temperature=300)


def test_hashes_see_what_matters():
    a, _ = labelled(0)
    b = a.copy()
    assert structure_hash(a) == structure_hash(b)
    b.positions[3, 1] += 1e-5
    assert structure_hash(a) != structure_hash(b)
    c = a.copy()
    c.positions += 1e-11  # float noise from text round trips does not defeat the cache
    assert structure_hash(a) == structure_hash(c)
    assert settings_hash({"a": 1, "b": 2}) == settings_hash({"b": 2, "a": 1})
    assert settings_hash({"a": 1}) != settings_hash({"a": 2})


def test_split_is_deterministic_and_has_the_requested_fraction(tmp_path):
    hashes = [content_hash(labelled(0)[0], settings_hash({"i": i})) for i in range(2000)]
    splits = [assign_split(h, 0.2) for h in hashes]
    assert splits == [assign_split(h, 0.2) for h in hashes]
    frac = splits.count("validation") / len(splits)
    assert abs(frac - 0.2) < 4 * np.sqrt(0.2 * 0.8 / len(splits))  # 4 sigma binomial
    assert {assign_split(h, 0.0) for h in hashes} == {"train"}
    assert {assign_split(h, 1.0) for h in hashes} == {"validation"}
    with pytest.raises(ValueError):
        LabelDatabase(tmp_path / "x.db", validation_fraction=1.5)

    # two databases agree row by row: the split does not depend on insertion order
    db1, db2 = LabelDatabase(tmp_path / "1.db", 0.3), LabelDatabase(tmp_path / "2.db", 0.3)
    frames = [labelled(s) for s in range(30)]
    for atoms, lab in frames:
        db1.add(atoms, **lab)
    for atoms, lab in reversed(frames):
        db2.add(atoms, **lab)
    split1 = {r.content_hash: r.split for r in db1.rows()}
    split2 = {r.content_hash: r.split for r in db2.rows()}
    assert split1 == split2 and set(split1.values()) == {"train", "validation"}
    assert len(db1.training_set()) + len(db1.validation_set()) == 30


def test_failed_calls_are_kept_but_never_trained_on(tmp_path):
    db = LabelDatabase(tmp_path / "c.db", validation_fraction=0.0)
    good, labels = labelled(1)
    db.add(good, **labels)
    bad, _ = labelled(2)
    db.add(bad, status="failed", error="SCF not converged in 100 iterations", oracle="espresso-pw")
    assert len(db) == 2
    assert len(db.training_set()) == 1
    assert structure_hash(db.training_set()[0]) == structure_hash(good)
    (atoms, error), = db.failures()
    assert "SCF not converged" in error and structure_hash(atoms) == structure_hash(bad)


def test_extxyz_round_trip(tmp_path):
    db = LabelDatabase(tmp_path / "a.db")
    frames = [labelled(s) for s in range(4)]
    for atoms, lab in frames:
        db.add(atoms, **lab, oracle="stillinger-weber-si", walker=1, step=10)
    db.add(labelled(9)[0], status="failed", error="x")
    assert db.export_extxyz(tmp_path / "labels.xyz") == 4  # the failed row is not exported

    other = LabelDatabase(tmp_path / "b.db")
    ids = other.import_extxyz(tmp_path / "labels.xyz", oracle="vasp-pbe")
    assert len(ids) == 4
    for (atoms, lab), frame in zip(frames, other.frames()):
        assert structure_hash(frame) == structure_hash(atoms)
        assert frame.get_potential_energy() == pytest.approx(lab["energy"], abs=1e-9)
        np.testing.assert_allclose(frame.get_forces(), lab["forces"], rtol=0, atol=1e-7)  # extxyz: 8 decimals
        np.testing.assert_allclose(frame.get_stress(), lab["stress"], rtol=0, atol=1e-7)
        assert frame.info["oracle"] == "vasp-pbe" and frame.info["source"] == "labels.xyz"


def test_ase_db_command_line_shows_rows(tmp_path):
    path = tmp_path / "c.db"
    db = LabelDatabase(path)
    for s in range(3):
        atoms, lab = labelled(s)
        db.add(atoms, **lab, oracle="emt", walker=s)
    db.add(labelled(5)[0], status="failed", error="timeout")
    out = subprocess.run([sys.executable, "-m", "ase", "db", str(path)], capture_output=True,
                         text=True, check=True).stdout
    assert "Rows: 4" in out and "Si8" in out and "walker" in out and "status" in out
    out = subprocess.run([sys.executable, "-m", "ase", "db", str(path), "status=failed", "-c", "id,status"],
                         capture_output=True, text=True, check=True).stdout
    assert "Rows: 1" in out and "failed" in out


def test_crash_during_a_write_loses_only_that_write(tmp_path):
    """SIGKILL in the middle of a multi-row transaction: earlier rows survive, no partial batch."""
    path = tmp_path / "c.db"
    script = textwrap.dedent(f"""
        import os, signal, sys
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        from test_database import labelled
        from almd.labels.database import LabelDatabase
        db = LabelDatabase({str(path)!r})
        for s in range(3):
            atoms, lab = labelled(s)
            db.add(atoms, **lab)
        write = db._db.write
        calls = []
        def dying_write(*args, **kwargs):
            calls.append(1)
            if len(calls) == 3:  # two rows of the batch are already written, uncommitted
                os.kill(os.getpid(), signal.SIGKILL)
            return write(*args, **kwargs)
        db._db.write = dying_write
        db.add_many([labelled(s) for s in range(10, 15)])
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert proc.returncode == -9, proc.stderr
    db = LabelDatabase(path)
    assert len(db) == 3
    for s, frame in enumerate(db.frames()):
        np.testing.assert_allclose(frame.get_forces(), labelled(s)[1]["forces"])
    atoms, lab = labelled(20)
    db.add(atoms, **lab)  # still writable
    assert len(db) == 4


# ---------------------------------------------------------------- phonon data sets

@pytest.fixture(scope="module")
def si_frames():
    return displaced_supercells(SI_PBE)


@pytest.fixture(scope="module")
def si_hessian():
    return phonon_hessian(SI_PBE)


def test_si_pbe_displaced_supercells(si_frames):
    assert len(si_frames) == 111
    ph = load_phonon_dataset(SI_PBE)
    perfect = ph.supercell.positions
    expected_sets = []  # phono3py's order: each first displacement, then its pairs
    for first in ph.dataset["first_atoms"]:
        single = np.zeros((64, 3))
        single[first["number"]] += first["displacement"]
        expected_sets.append(single)
        for second in first["second_atoms"]:
            pair = single.copy()
            pair[second["number"]] += second["displacement"]
            expected_sets.append(pair)
    for atoms, expected in zip(si_frames, expected_sets, strict=True):
        assert len(atoms) == 64 and atoms.get_chemical_formula() == "Si64"
        forces = atoms.get_forces()
        assert np.abs(forces.sum(axis=0)).max() < 5e-3  # DFT forces conserve momentum
        frac = (atoms.positions - perfect) @ np.linalg.inv(atoms.cell.array)
        disp = (frac - np.round(frac)) @ atoms.cell.array  # undo wrapping into the cell
        moved = np.flatnonzero(np.linalg.norm(disp, axis=1) > 1e-6)
        assert len(moved) in (1, 2)  # phono3py: one displacement, or a pair (possibly on one atom)
        np.testing.assert_allclose(disp, expected, atol=1e-8)
        assert np.linalg.norm(disp, axis=1).max() <= 0.06 + 1e-9
    # single displacement (the first set): the displaced atom is pulled back (positive curvature)
    i = int(np.argmax(np.linalg.norm(expected_sets[0], axis=1)))
    assert np.linalg.norm(expected_sets[0], axis=1)[i] == pytest.approx(0.03)
    assert si_frames[0].get_forces()[i] @ expected_sets[0][i] < 0


def test_si_pbe_hessian_symmetry_sum_rule_and_optical_phonon(si_hessian):
    supercell, h = si_hessian
    n = len(supercell)
    assert h.shape == (3 * n, 3 * n) == (192, 192)
    assert np.abs(h - h.T).max() < 1e-6 * np.abs(h).max()
    # acoustic sum rule: a rigid translation costs no force
    assert np.abs(h.reshape(n, 3, n, 3).sum(axis=2)).max() < 1e-6 * np.abs(h).max()
    assert np.abs(h @ np.tile([1.0, 0.0, 0.0], n)).max() < 1e-6
    # Γ optical mode: the two fcc sublattices move against each other along x.
    # The supercell contains Γ, so the Rayleigh quotient is exactly ω² of that mode.
    # In conventional-cell fractions, fcc translations shift x by multiples of 1/2 and
    # the second sublattice sits 1/4 further: 4·Δx is even within a sublattice, odd across.
    x = supercell.get_scaled_positions()[:, 0] * 2
    sublattice = np.round(4 * (x - x[0])).astype(int) % 2
    assert sublattice.sum() == n // 2
    v = np.zeros((n, 3))
    v[:, 0] = np.where(sublattice == 0, 1.0, -1.0)
    v = v.ravel() / np.linalg.norm(v)
    m = supercell.get_masses()[0]
    omega2 = v @ h @ v / m  # eV/Å²/amu
    nu = np.sqrt(omega2 * _e / 1e-20 / _amu) / (2 * np.pi) / 1e12
    assert nu == pytest.approx(15.09, rel=0.01)  # README of the data: Γ optical 15.09 THz
    assert np.linalg.norm(h @ v - (v @ h @ v) * v) < 1e-6 * np.abs(h).max()  # it is an eigenvector


def test_hessian_layout_from_force_constants():
    rng = np.random.default_rng(0)
    fc = rng.normal(size=(3, 3, 3, 3))
    h = hessian_from_force_constants(fc)
    for i, j, a, b in [(0, 1, 2, 0), (2, 0, 1, 2), (1, 1, 0, 1)]:
        assert h[3 * i + a, 3 * j + b] == fc[i, j, a, b]
    with pytest.raises(ValueError, match="compact"):
        hessian_from_force_constants(fc[:1])


def test_import_phonon_dataset_into_database(tmp_path, monkeypatch, si_frames, si_hessian):
    import almd.labels.database as ds

    # reuse the module-scoped loads: this test is about storage, not parsing
    monkeypatch.setattr(ds, "displaced_supercells", lambda path: si_frames)
    monkeypatch.setattr(ds, "phonon_hessian", lambda path: si_hessian)
    db = LabelDatabase(tmp_path / "c.db")
    ids = db.import_phonon_dataset(SI_PBE, hessian=True)
    assert len(ids) == 112 and db.count(kind="displacement") == 111
    (row,) = db.rows(kind="hessian")
    np.testing.assert_array_equal(row.data["hessian"], si_hessian[1])
    frames = db.frames(kind="displacement")
    np.testing.assert_allclose(frames[5].get_forces(), si_frames[5].get_forces())
    assert frames[5].info["source"] == "phono3py_disp.yaml"
    assert db.import_phonon_dataset(SI_PBE, hessian=True) == ids  # importing twice adds nothing
    assert len(db) == 112


@pytest.mark.slow
@pytest.mark.skipif(not SHARED.exists(), reason="needs ../shared/data/dft (not distributed)")
def test_shared_phonopy_and_nacl_sets():
    """Chalcogenide (phonopy, one-atom displacements) and NaCl (phono3py, random
    displacements through symfc) give symmetric Hessians obeying the sum rule.
    """
    nacl = load_phonon_dataset(SHARED / "nacl-rd" / "phono3py_params_NaCl.yaml.xz")  # ~10 s: load once
    for dataset in (SHARED / "chalcogenides-pbe" / "mp-1000.phonopy.yaml.xz", nacl):
        supercell, h = phonon_hessian(dataset)
        n = len(supercell)
        scale = np.abs(h).max()
        assert np.abs(h - h.T).max() < 1e-6 * scale
        assert np.abs(h.reshape(n, 3, n, 3).sum(axis=2)).max() < 1e-4 * scale
        assert np.linalg.eigvalsh(h)[3] > -1e-3 * scale  # stable crystals: no negative curvature
    frames = displaced_supercells(nacl)
    assert [len(f) for f in frames].count(64) == 100 and [len(f) for f in frames].count(512) == 2
    assert all("energy" in f.calc.results for f in frames)
