"""The campaign database: labelled frames with provenance, in ASE's SQLite format.

One row per reference calculation, successful or not. A row holds the structure,
its labels (energy, forces, stress through a SinglePointCalculator; a Hessian in
``data``) and its provenance as key-value pairs, so ``ase db FILE`` and
``ase db FILE status=failed`` work without almd.

Also here: content hashing (the cache key shared with the oracle), the
deterministic train/validation split, extxyz import/export and phonopy /
phono3py data sets (displaced supercells with DFT forces, force constants ->
Hessian labels). No torch.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
from ase import Atoms
from ase.calculators.singlepoint import SinglePointCalculator

# Provenance keys written as ase.db key-value pairs (None values are left out).
PROVENANCE_KEYS = (
    "status", "kind", "oracle", "settings_hash", "content_hash", "structure_hash",
    "wall_time", "attempts", "error_kind", "walker", "step", "model_version",
    "uncertainty", "split", "source",
)


# --------------------------------------------------------------------------- hashing

def _digest(payload: bytes) -> str:
    return hashlib.sha256(payload).hexdigest()[:24]


def _json_default(obj: Any) -> Any:
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, (set, frozenset)):
        return sorted(map(repr, obj))
    if hasattr(obj, "__dict__"):  # e.g. EspressoProfile: by content, not by memory address
        return {"__class__": f"{type(obj).__module__}.{type(obj).__qualname__}", **vars(obj)}
    return repr(obj)


def _settings_json(settings: Mapping[str, Any]) -> str:
    try:
        return json.dumps(dict(settings), sort_keys=True, default=_json_default)
    except (ValueError, TypeError):  # circular or odd objects: fall back to their repr
        return json.dumps(dict(settings), sort_keys=True, default=repr)


def structure_hash(atoms: Atoms, decimals: int = 8) -> str:
    """Hash of what a reference method sees: species, positions, cell, pbc, magmoms.

    Positions are rounded to 1e-8 Å so that float noise from a round trip through
    text formats does not defeat the cache.
    """
    h = hashlib.sha256()
    h.update(np.asarray(atoms.numbers, dtype=np.int64).tobytes())
    for arr in (atoms.positions, atoms.cell.array):
        # + 0.0 turns -0.0 into 0.0, which would otherwise hash differently
        h.update((np.round(np.asarray(arr, dtype=np.float64), decimals) + 0.0).tobytes())
    h.update(np.asarray(atoms.pbc, dtype=np.int8).tobytes())
    magmoms = atoms.get_initial_magnetic_moments()
    if np.any(magmoms):
        h.update((np.round(magmoms, 6) + 0.0).tobytes())
    # Letter prefixes keep the value from ever parsing as a number (ase.db rejects such strings).
    return "x" + h.hexdigest()[:24]


def settings_hash(settings: Mapping[str, Any]) -> str:
    """Hash of reference-method settings (any JSON-like mapping; key order irrelevant)."""
    text = _settings_json(settings)
    return "s" + _digest(text.encode())


def content_hash(atoms: Atoms, settings_hash: str) -> str:
    """Cache key of a label: the structure together with the settings that labelled it."""
    return "c" + _digest((structure_hash(atoms) + settings_hash).encode())


def assign_split(content_hash: str, validation_fraction: float = 0.1) -> str:
    """'train' or 'validation', a pure function of the content hash.

    Re-labelling the same structure with the same settings always lands in the
    same split, so validation data never leaks into training across restarts.
    """
    if not 0.0 <= validation_fraction <= 1.0:
        raise ValueError(f"validation_fraction must be in [0, 1], got {validation_fraction}")
    u = int(hashlib.sha256(content_hash.encode()).hexdigest()[:12], 16) / 16**12
    return "validation" if u < validation_fraction else "train"


def _clean_kvp(pairs: Mapping[str, Any]) -> dict[str, Any]:
    """Drop None and make values acceptable to ase.db (numbers, bools, non-numeric strings)."""
    out: dict[str, Any] = {}
    for key, value in pairs.items():
        if value is None:
            continue
        if isinstance(value, np.generic):
            value = value.item()
        if isinstance(value, str):
            try:  # ase.db refuses strings that read as numbers: store the number
                value = int(value)
            except ValueError:
                try:
                    value = float(value)
                except ValueError:
                    pass
        if isinstance(value, float) and not math.isfinite(value):
            value = str(value)  # NaN/inf would break queries; keep them visible as text
        out[key] = value
    return out


# --------------------------------------------------------------------------- database

class LabelDatabase:
    """Labelled frames of a campaign in one ASE SQLite file.

    Every ``add*`` call is one SQLite transaction: a crash loses at most the
    call in flight, never a stored row.
    """

    def __init__(self, path: str | Path, validation_fraction: float = 0.1) -> None:
        import ase.db

        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.validation_fraction = validation_fraction
        assign_split("c0", validation_fraction)  # validates the fraction early
        self._db = ase.db.connect(str(self.path), type="db", append=True)
        # One process owns the database (rank 0 under MPI): ASE would otherwise make every
        # rank join a broadcast on each read and write.
        self._db.serial = True

    # ---- writing
    def _row_args(
        self,
        atoms: Atoms,
        *,
        energy: float | None = None,
        forces: np.ndarray | None = None,
        stress: np.ndarray | None = None,
        status: str = "ok",
        error: str | None = None,
        settings: Mapping[str, Any] | None = None,
        hessian: np.ndarray | None = None,
        data: Mapping[str, Any] | None = None,
        **provenance: Any,
    ) -> tuple[Atoms, dict[str, Any], dict[str, Any]]:
        if status not in ("ok", "failed"):
            raise ValueError(f"status must be 'ok' or 'failed', got {status!r}")
        unknown = set(provenance) - set(PROVENANCE_KEYS)
        if unknown:
            raise ValueError(f"unknown provenance keys {sorted(unknown)}; allowed: {PROVENANCE_KEYS}")
        # only what the reference method saw (no constraints, momenta or info)
        frame = Atoms(atoms.numbers, positions=atoms.positions, cell=atoms.cell, pbc=atoms.pbc,
                      magmoms=atoms.get_initial_magnetic_moments())
        if status == "ok":
            results = {k: v for k, v in (("energy", energy), ("forces", forces), ("stress", stress))
                       if v is not None}
            if results:
                frame.calc = SinglePointCalculator(frame, **results)
        kvp = dict(provenance)
        kvp["status"] = status
        kvp.setdefault("kind", "hessian" if hessian is not None else "single_point")
        if kvp.get("settings_hash") is None:  # an explicit hash (the oracle's) wins
            kvp["settings_hash"] = settings_hash(settings if settings is not None else {})
        kvp["structure_hash"] = structure_hash(frame)
        if kvp.get("content_hash") is None:
            kvp["content_hash"] = content_hash(frame, kvp["settings_hash"])
        if kvp.get("split") is None:
            kvp["split"] = assign_split(kvp["content_hash"], self.validation_fraction)
        row_data = dict(data or {})
        if error is not None:
            row_data["error"] = str(error)
        if settings is not None:
            row_data["settings"] = json.loads(_settings_json(settings))
        if hessian is not None:
            row_data["hessian"] = np.asarray(hessian, dtype=np.float64)
        return frame, _clean_kvp(kvp), row_data

    def add(self, atoms: Atoms, **kwargs: Any) -> int:
        """Store one frame; returns the row id.

        Keyword arguments: ``energy``, ``forces``, ``stress`` (labels), ``status``
        ('ok'/'failed'), ``error`` (text, kept in row data), ``settings`` (dict,
        kept in data and hashed unless ``settings_hash`` is given), ``hessian`` (3n×3n, eV/Å²),
        ``data`` (extra row data) and provenance keys from ``PROVENANCE_KEYS``.
        """
        frame, kvp, data = self._row_args(atoms, **kwargs)
        return self._db.write(frame, key_value_pairs=kvp, data=data)

    def add_many(self, items: Iterable[tuple[Atoms, Mapping[str, Any]]],
                 skip_existing: bool = True) -> list[int]:
        """Store several frames in ONE transaction (all or nothing).

        With ``skip_existing`` a successful label whose content hash is already
        stored is not written again (its existing id is returned), so importing
        a data set twice does not double its weight in training.
        """
        prepared = [self._row_args(atoms, **dict(kw)) for atoms, kw in items]
        known = {}
        if skip_existing:
            wanted = {kvp["content_hash"] for _, kvp, _ in prepared if kvp["status"] == "ok"}
            rows = self._db.select(status="ok", columns=["id", "key_value_pairs"])  # skip arrays
            known = {r.content_hash: r.id for r in rows if r.content_hash in wanted}
        ids = []
        with self._db:
            for frame, kvp, data in prepared:
                key = kvp["content_hash"] if kvp["status"] == "ok" and skip_existing else None
                if key is not None and key in known:
                    ids.append(known[key])
                    continue
                ids.append(self._db.write(frame, key_value_pairs=kvp, data=data))
                if key is not None:
                    known[key] = ids[-1]
        return ids

    def add_frames(self, frames: Iterable[Atoms], **common: Any) -> list[int]:
        """Store Atoms whose labels sit in their calculator (e.g. read from extxyz)."""
        items = []
        for atoms in frames:
            res = atoms.calc.results if atoms.calc is not None else {}
            labels = {k: res.get(k) for k in ("energy", "forces", "stress")}
            if labels["stress"] is not None and np.shape(labels["stress"]) == (3, 3):
                from ase.stress import full_3x3_to_voigt_6_stress

                labels["stress"] = full_3x3_to_voigt_6_stress(labels["stress"])
            items.append((atoms, {**labels, **common}))
        return self.add_many(items)

    def add_result(self, atoms: Atoms, result: Any, **provenance: Any) -> int:
        """Store an oracle ``LabelResult`` (ok or failed) with its provenance."""
        return self.add(
            atoms,
            energy=result.energy, forces=result.forces, stress=result.stress,
            status=result.status, error=result.error,
            settings=getattr(result, "settings", None),
            settings_hash=result.settings_hash, content_hash=result.content_hash,
            oracle=result.oracle, wall_time=result.wall_time, attempts=result.attempts,
            error_kind=result.error_kind, **provenance,
        )

    # ---- reading
    def __len__(self) -> int:
        return self._db.count()

    def count(self, **selection: Any) -> int:
        return self._db.count(**selection)

    def rows(self, **selection: Any) -> list[Any]:
        """ase.db rows matching key=value selection (e.g. ``status='failed'``)."""
        return list(self._db.select(**selection))

    def lookup(self, content_hash: str) -> Any | None:
        """The newest successful row with this content hash, or None."""
        rows = list(self._db.select(content_hash=content_hash, status="ok"))
        return max(rows, key=lambda r: r.id) if rows else None

    @staticmethod
    def row_to_atoms(row: Any) -> Atoms:
        """Row -> Atoms with labels in a SinglePointCalculator and provenance in ``info``."""
        atoms = row.toatoms()
        atoms.info.update(row.key_value_pairs)
        atoms.info["row_id"] = row.id
        if "hessian" in row.data:
            atoms.info["hessian"] = np.asarray(row.data["hessian"])
        return atoms

    def frames(self, **selection: Any) -> list[Atoms]:
        return [self.row_to_atoms(r) for r in self._db.select(**selection)]

    def training_set(self) -> list[Atoms]:
        """Successful labels of the training split; failed calls never enter."""
        return self.frames(status="ok", split="train")

    def validation_set(self) -> list[Atoms]:
        return self.frames(status="ok", split="validation")

    def failures(self) -> list[tuple[Atoms, str]]:
        """Failed calls with their error text."""
        return [(r.toatoms(), r.data.get("error", "")) for r in self._db.select(status="failed")]

    # ---- import / export
    def export_extxyz(self, path: str | Path, **selection: Any) -> int:
        """Write successful rows (default) as extxyz with provenance in the info line."""
        import ase.io

        selection.setdefault("status", "ok")
        frames = []
        for row in self._db.select(**selection):
            atoms = row.toatoms()
            atoms.info.update(row.key_value_pairs)
            frames.append(atoms)
        ase.io.write(str(path), frames, format="extxyz")
        return len(frames)

    def import_extxyz(self, path: str | Path, *, oracle: str | None = None,
                      settings: Mapping[str, Any] | None = None, **provenance: Any) -> list[int]:
        """Read labelled frames from extxyz; provenance defaults to the file name."""
        import ase.io

        frames = ase.io.read(str(path), index=":", format="extxyz")
        provenance.setdefault("source", Path(path).name)
        settings = dict(settings) if settings is not None else {"source": Path(path).name}
        return self.add_frames(frames, oracle=oracle or f"extxyz:{Path(path).name}",
                               settings=settings, **provenance)

    def import_phonon_dataset(self, path: str | Path, *, oracle: str | None = None,
                              hessian: bool = False) -> list[int]:
        """Displaced supercells (DFT forces) of a phonopy/phono3py data set, plus
        optionally the perfect supercell with its DFT Hessian, in one transaction."""
        name = Path(path).name
        common = {"oracle": oracle or f"phonopy:{name}", "source": name,
                  "settings": {"source": name}}
        items = []
        for atoms in displaced_supercells(path):
            res = atoms.calc.results
            items.append((atoms, {"energy": res.get("energy"), "forces": res["forces"],
                                  "kind": "displacement", **common}))
        if hessian:
            supercell, h = phonon_hessian(path)
            # relaxed reference structure: zero forces are a label too (see docs/methods.md)
            items.append((supercell, {"forces": np.zeros((len(supercell), 3)), "hessian": h,
                                      "kind": "hessian", **common}))
        return self.add_many(items)


# --------------------------------------------------------------------------- phonon data sets

def _to_ase(cell: Any) -> Atoms:
    """PhonopyAtoms -> ase Atoms (periodic)."""
    return Atoms(cell.symbols, cell=cell.cell, scaled_positions=cell.scaled_positions, pbc=True)


def load_phonon_dataset(path: str | Path, *, is_compact_fc: bool = True) -> Any:
    """Phonopy or Phono3py object of a data set, force constants not yet produced.

    Files named ``phono3py*`` go through ``phono3py.load``; a ``FORCES_FC3`` /
    ``FORCES_FC2`` / ``FORCE_SETS`` next to the yaml is used whatever the cwd.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"phonon data set not found: {path}")
    folder = path.parent
    if "phono3py" in path.name:
        import phono3py

        extra = {}
        for key, fname in (("forces_fc3_filename", "FORCES_FC3"), ("forces_fc2_filename", "FORCES_FC2")):
            if (folder / fname).exists():
                extra[key] = str(folder / fname)
        return phono3py.load(str(path), produce_fc=False, is_compact_fc=is_compact_fc,
                             log_level=0, **extra)
    import phonopy

    extra = {}
    if (folder / "FORCE_SETS").exists():
        extra["force_sets_filename"] = str(folder / "FORCE_SETS")
    return phonopy.load(str(path), produce_fc=False, is_compact_fc=is_compact_fc, log_level=0, **extra)


def _energies(dataset: Mapping[str, Any] | None, n: int) -> list[float | None]:
    values = (dataset or {}).get("supercell_energies")
    return [float(e) for e in values] if values is not None and len(values) == n else [None] * n


def _phonon_object(dataset: Any, is_compact_fc: bool = True) -> Any:
    """A path is loaded; an already loaded Phonopy/Phono3py object is used as is
    (loading NaCl's 512-atom yaml takes ~10 s, so callers may load once)."""
    if isinstance(dataset, (str, Path)):
        return load_phonon_dataset(dataset, is_compact_fc=is_compact_fc)
    return dataset


def displaced_supercells(dataset_path: str | Path | Any) -> list[Atoms]:
    """Displaced supercells with their DFT forces (and energies when the set has them).

    ``dataset_path``: a phonopy/phono3py yaml, or the object loaded from one.
    For phono3py sets with a separate fc2 supercell (e.g. NaCl's 512-atom cells)
    those come after the fc3 supercells; ``info['set']`` says which is which.
    """
    ph = _phonon_object(dataset_path)
    source = Path(dataset_path).name if isinstance(dataset_path, (str, Path)) else type(ph).__name__
    groups = [("fc3" if hasattr(ph, "phonon_dataset") else "fc2",
               ph.supercells_with_displacements, ph.dataset)]
    if getattr(ph, "phonon_dataset", None) is not None:
        groups.append(("fc2", ph.phonon_supercells_with_displacements, ph.phonon_dataset))
    out: list[Atoms] = []
    for set_name, cells, dataset in groups:
        # phono3py leaves None for pairs it excluded; forces are stored only for the others
        present = [c for c in cells if c is not None]
        forces = np.asarray(ph.forces if set_name == groups[0][0] else ph.phonon_forces)
        if forces.shape[0] != len(present):
            raise ValueError(f"{dataset_path}: {len(present)} supercells but {forces.shape[0]} force sets")
        for i, (cell, f, e) in enumerate(zip(present, forces, _energies(dataset, len(present)))):
            atoms = _to_ase(cell)
            labels = {"forces": np.array(f), **({"energy": e} if e is not None else {})}
            atoms.calc = SinglePointCalculator(atoms, **labels)
            atoms.info.update(source=source, set=set_name, index=i)
            out.append(atoms)
    return out


def hessian_from_force_constants(fc: np.ndarray) -> np.ndarray:
    """Full phonopy force constants (n, n, 3, 3) -> supercell Hessian (3n, 3n) in eV/Å².

    Row 3i+a, column 3j+b is ∂²E/∂u_ia∂u_jb. No mass weighting.
    """
    fc = np.asarray(fc, dtype=np.float64)
    if fc.ndim != 4 or fc.shape[2:] != (3, 3):
        raise ValueError(f"force constants must have shape (n, n, 3, 3), got {fc.shape}")
    if fc.shape[0] != fc.shape[1]:
        raise ValueError(
            f"compact force constants {fc.shape}: produce them with is_compact_fc=False "
            "(or expand with phonopy's compact_fc_to_full_fc)")
    n = fc.shape[0]
    return np.ascontiguousarray(fc.swapaxes(1, 2).reshape(3 * n, 3 * n))


def phonon_hessian(dataset_path: str | Path | Any) -> tuple[Atoms, np.ndarray]:
    """Perfect supercell and its DFT Hessian (eV/Å²) from a phonopy/phono3py data set
    (path, or loaded object: its force constants are then (re)produced in place).

    Random-displacement sets (no one-atom-at-a-time structure) go through symfc;
    the others through phonopy's finite-difference solver with symmetrisation.
    """
    ph = _phonon_object(dataset_path, is_compact_fc=False)
    if hasattr(ph, "phonon_dataset"):  # phono3py: fc2 lives on the phonon supercell
        dataset = ph.phonon_dataset if ph.phonon_dataset is not None else ph.dataset
        random = "displacements" in dataset
        ph.produce_fc2(is_compact_fc=False, fc_calculator="symfc" if random else None)
        if not random:
            ph.symmetrize_fc2()
        return _to_ase(ph.phonon_supercell), hessian_from_force_constants(ph.fc2)
    random = "displacements" in ph.dataset
    ph.produce_force_constants(fc_calculator="symfc" if random else None, show_drift=False)
    if not random:
        ph.symmetrize_force_constants()
    return _to_ase(ph.supercell), hessian_from_force_constants(ph.force_constants)


def third_order_hessians(dataset_path: str | Path | Any, min_signal: float = 0.1,
                         symmetrize: bool = True) -> list[Atoms]:
    """The displaced supercells of a phono3py data set, each with the Hessian that the
    data's own force constants give at its geometry: H(u) = Φ2 + Φ3·u (eV/Å²).

    These are third-order labels: a model that matches H(u) for the measured u has the
    data's fc3 along them, which forces at 0.03 Å alone pin down poorly (a 0.5 meV/Å
    force error is already ~1 eV/Å³ in fc3). ``info['hessian']`` holds H(u) and
    ``info['hessian_columns']`` the columns whose third-order part Φ3·u has at least
    ``min_signal`` of the largest one's norm (elsewhere H(u) is just Φ2),
    ``info['hessian_third_order']`` the part Φ3·u alone and ``info['perfect_positions']``
    the undisplaced positions (same periodic images); the DFT forces and energy stay as
    labels. ``symmetrize``: phono3py's fc3 symmetrisation (as its command line and
    almd.phonons.kappa do; ~1 min for a 64-atom cell).
    """
    ph = _phonon_object(dataset_path, is_compact_fc=False)
    if not hasattr(ph, "produce_fc3"):
        raise ValueError(f"{dataset_path}: third-order labels need a phono3py data set")
    random = "displacements" in ph.dataset
    ph.produce_fc3(is_compact_fc=False, fc_calculator="symfc" if random else None)
    if symmetrize and not random:
        ph.symmetrize_fc3()
    _, h2 = phonon_hessian(ph)
    fc3 = ph.fc3
    perfect = _to_ase(ph.supercell)
    n = len(perfect)
    out = []
    for atoms in displaced_supercells(ph):
        if atoms.info.get("set") != "fc3":
            continue
        u = atoms.positions - perfect.positions
        u -= (np.round(u @ np.linalg.inv(perfect.cell.array)) @ perfect.cell.array)  # minimum image
        dh = np.einsum("ijkabc,kc->iajb", fc3, u).reshape(3 * n, 3 * n)
        strength = np.linalg.norm(dh, axis=0)
        atoms.info["hessian"] = h2 + dh
        atoms.info["hessian_third_order"] = dh
        atoms.info["perfect_positions"] = atoms.positions - u
        atoms.info["hessian_columns"] = np.flatnonzero(strength >= min_signal * strength.max()).tolist()
        out.append(atoms)
    return out
