"""The labeller: the one place where reference calculations meet their store.

The :class:`~almd.labels.oracle.Oracle` computes and never stores; the
:class:`~almd.labels.database.LabelDatabase` stores and never computes. A
:class:`Labeller` looks a frame up, has the oracle compute what is missing,
stores every outcome (successes and failures, with their provenance) as soon
as it finishes, and hands back the labelled frames as stored, split included.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ase import Atoms

from almd.labels.database import LabelDatabase
from almd.labels.oracle import LabelResult, Oracle, Spread

__all__ = ["Labeller"]


class Labeller:
    """An oracle joined to a label database.

    Parameters
    ----------
    oracle
        Computes the labels.
    database
        A :class:`LabelDatabase` or the path of one: already-labelled structures
        are read from it, every outcome is written to it.
    """

    def __init__(self, oracle: Oracle, database: LabelDatabase | str | Path) -> None:
        self.oracle = oracle
        self.database = database if isinstance(database, LabelDatabase) else LabelDatabase(database)

    @property
    def settings_hash(self) -> str:
        """Hash of the reference settings: part of every label's content hash."""
        return self.oracle.settings_hash

    @property
    def calls(self) -> int:
        """Reference calculations actually started (cache and database hits excluded)."""
        return self.oracle.calls

    def _known(self, key: str) -> LabelResult | None:
        row = self.database.lookup(key)
        if row is None:
            return None
        oracle = self.oracle
        return LabelResult(
            status="ok", energy=row.get("energy"), forces=row.get("forces"),
            stress=row.get("stress"), wall_time=float(row.get("wall_time", 0.0)),
            attempts=int(row.get("attempts", 1)), settings_hash=oracle.settings_hash,
            content_hash=key, oracle=row.get("oracle", oracle.name), settings=oracle.settings)

    def label(self, atoms: Atoms, **provenance: Any) -> LabelResult:
        """Label one structure; ``provenance`` (walker, step, model_version, uncertainty) goes into its row.

        Never raises for a failed calculation: the result says 'failed' and a failed row is stored.
        """
        return self.label_many([atoms], provenance=[provenance])[0]

    def label_many(self, frames: list[Atoms], *, max_workers: int = 1,
                   provenance: list[Mapping[str, Any]] | None = None,
                   spread: Spread | None = None) -> list[LabelResult]:
        """Label several structures (see :meth:`Oracle.label_many`, also for ``spread``), each outcome
        stored as it finishes.
        """
        provenance = provenance or [{} for _ in frames]
        if len(provenance) != len(frames):
            raise ValueError("provenance needs one mapping per frame")

        def store(i: int, result: LabelResult) -> None:
            self.database.add_result(frames[i], result, **provenance[i])

        return self.oracle.label_many(frames, max_workers=max_workers, known=self._known, on_result=store,
                                      spread=spread)

    def labelled(self, frames: list[Atoms], provenance: list[Mapping[str, Any]],
                 spread: Spread | None = None) -> list[Atoms]:
        """The successfully labelled ``frames`` as stored (labels, ``info['split']``), in input order."""
        return self.stored(self.label_many(frames, provenance=provenance, spread=spread))

    def stored(self, results: list[LabelResult]) -> list[Atoms]:
        """The frames of the successful ``results`` as stored (labels, ``info['split']``), in order."""
        rows = [self.database.lookup(r.content_hash) for r in results if r.ok]
        return [self.database.row_to_atoms(row) for row in rows if row is not None]
