"""Cheap, calibrated ensembles: K readout heads on one frozen backbone.

* :class:`Ensemble` — members, mean prediction, per-atom force spread, fit
  (bootstrap least squares on labelled frames), calibration, save/load;
* :class:`EnsembleCalculator` — the ASE plug-in (``forces_std``, ``uncertainty``);
* :class:`Calibration` — scale / isotonic map from raw spreads to errors.
"""

from almd.uncertainty.calibration import Calibration, coverage, spearman
from almd.uncertainty.ensemble import Ensemble, frame_score, per_atom_spread

__all__ = ["Calibration", "Ensemble", "EnsembleCalculator", "coverage", "frame_score", "per_atom_spread", "spearman"]


def __getattr__(name: str):
    if name == "EnsembleCalculator":
        from almd.uncertainty.calculator import EnsembleCalculator

        return EnsembleCalculator
    raise AttributeError(f"module 'almd.uncertainty' has no attribute {name!r}")
