"""The campaign database: labelled frames with provenance, in ASE's SQLite format.

One row per reference calculation, successful or not. A row holds the structure,
its labels (energy, forces, stress through a SinglePointCalculator; a Hessian in
``data``) and its provenance as key-value pairs, so ``ase db FILE`` and
``ase db FILE status=failed`` work without almd.

Also here: the deterministic train/validation split and extxyz / phonopy
import and export. The only writer of labels. No torch.
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

from almd.phonons.datasets import displaced_supercells, phonon_hessian
from almd.structures import bare, content_hash, settings_hash, settings_json, structure_hash

__all__ = ["PROVENANCE_KEYS", "LabelDatabase", "assign_split"]

# Provenance keys written as ase.db key-value pairs (None values are left out).
PROVENANCE_KEYS = (
    "status", "kind", "oracle", "settings_hash", "content_hash", "structure_hash",
    "wall_time", "attempts", "error_kind", "walker", "step", "model_version",
    "uncertainty", "split", "source",
)


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
        # SQLite locks and journals its own writes; ASE's extra lock file, left behind by a
        # process killed in a write, would make the next one wait for it for ever
        self._db = ase.db.connect(str(self.path), type="db", append=True, use_lock_file=False)
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
        frame = bare(atoms, magmoms=True)
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
            row_data["settings"] = json.loads(settings_json(settings))
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

    def test_set(self) -> list[Atoms]:
        """Labels kept for the final test (split "test"): never trained or calibrated on."""
        return self.frames(status="ok", split="test")

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
        optionally the perfect supercell with its DFT Hessian, in one transaction.
        """
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
