"""Calibration of ensemble spreads against reference labels (pure numpy).

Raw ensemble spreads are too small where the members share a bias (one frozen
backbone, heads fitted to the same labels), so they are mapped to errors on
labels the members were *not* trained on:

* a scale ``s``: force-component errors e ~ N(0, (s·σ)²), fitted by maximum
  likelihood, s² = mean(e²/σ²) — then e/(s·σ) has unit variance and a
  threshold in eV/Å is a stated error;
* optionally a monotone (isotonic) map from the raw per-frame score to the
  per-frame force RMSE, for when the error is not proportional to the spread.

Both refit cheaply: the scale keeps running sums, the isotonic map keeps the
(score, RMSE) pairs it has seen.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

__all__ = ["Calibration", "isotonic_fit", "coverage", "spearman"]

#: spreads below this (eV/Å) are treated as this, so e/σ stays finite
SIGMA_FLOOR = 1e-6


def isotonic_fit(x: np.ndarray, y: np.ndarray, w: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Non-decreasing least-squares fit of y on x (pool adjacent violators).

    Returns knots (x sorted, y fitted) for piecewise-linear interpolation.
    """
    x, y = np.asarray(x, float), np.asarray(y, float)
    w = np.ones_like(y) if w is None else np.asarray(w, float)
    order = np.argsort(x, kind="stable")
    x, y, w = x[order], y[order], w[order]
    # blocks of (weighted mean, weight, count); merge while the order is violated
    means, weights, counts = [], [], []
    for yi, wi in zip(y, w):
        means.append(yi), weights.append(wi), counts.append(1)
        while len(means) > 1 and means[-2] > means[-1]:
            wsum = weights[-2] + weights[-1]
            m = (means[-2] * weights[-2] + means[-1] * weights[-1]) / wsum
            c = counts[-2] + counts[-1]
            del means[-1], weights[-1], counts[-1]
            means[-1], weights[-1], counts[-1] = m, wsum, c
    fitted = np.repeat(means, counts)
    return x, fitted


def coverage(errors: np.ndarray, sigma: np.ndarray, k: float = 1.0) -> float:
    """Fraction of |errors| within k·sigma (0.683 for k=1 if calibrated and Gaussian)."""
    errors, sigma = np.broadcast_arrays(np.asarray(errors, float), np.asarray(sigma, float))
    return float(np.mean(np.abs(errors) <= k * sigma))


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman rank correlation (ties averaged)."""
    from scipy.stats import spearmanr

    return float(spearmanr(np.asarray(a, float), np.asarray(b, float)).statistic)


@dataclass
class Calibration:
    """Maps raw ensemble spreads (eV/Å) to calibrated ones.

    ``method`` = ``"scale"`` uses σ_cal = s·σ everywhere; ``"isotonic"`` also
    maps the per-frame score through the fitted monotone map (per-atom
    spreads still use ``s``). Unfitted, ``s`` = 1 (raw spreads).
    """

    method: str = "scale"
    fit: str = "variance"  # or "quantile": s puts exactly 68.3 % of |e| within s·σ
    sum_z2: float = 0.0  # Σ e²/σ² over force components seen so far
    n_components: int = 0
    frame_scores: list[float] = field(default_factory=list)  # raw per-frame scores seen
    frame_rmse: list[float] = field(default_factory=list)  # their true force RMSE
    abs_z: list[float] = field(default_factory=list)  # |e|/σ seen, for the quantile fit

    def __post_init__(self) -> None:
        if self.method not in ("scale", "isotonic"):
            raise ValueError(f"calibration method {self.method!r} is not one of: scale, isotonic")
        if self.fit not in ("variance", "quantile"):
            raise ValueError(f"calibration fit {self.fit!r} is not one of: variance, quantile")

    @property
    def scale(self) -> float:
        if not self.n_components:
            return 1.0
        if self.fit == "quantile":
            # heavy-tailed errors: the variance fit leaves too many inside 1σ;
            # this one states the coverage by construction
            return float(np.quantile(self.abs_z, 0.6827))
        return float(np.sqrt(self.sum_z2 / self.n_components))

    @property
    def fitted(self) -> bool:
        return self.n_components > 0

    def update(self, errors: np.ndarray, sigma: np.ndarray, frame_score: float | None = None) -> None:
        """Add one frame's (or any batch of) force-component errors and raw spreads.

        ``sigma`` broadcasts against ``errors`` (a per-atom σ of shape (N, 1)
        against errors (N, 3)). ``frame_score`` is the raw per-frame score of
        the same frame, for the isotonic map.
        """
        errors, sigma = np.broadcast_arrays(np.asarray(errors, float), np.asarray(sigma, float))
        sigma = np.maximum(sigma, SIGMA_FLOOR)
        self.sum_z2 += float(np.sum((errors / sigma) ** 2))
        self.n_components += errors.size
        self.abs_z.extend(np.abs(errors / sigma).ravel().tolist())
        if frame_score is not None:
            self.frame_scores.append(float(frame_score))
            self.frame_rmse.append(float(np.sqrt(np.mean(errors**2))))

    def reset(self) -> None:
        self.sum_z2, self.n_components = 0.0, 0
        self.frame_scores, self.frame_rmse, self.abs_z = [], [], []

    def sigma(self, raw: np.ndarray | float) -> np.ndarray | float:
        """Calibrated per-atom (or per-component) spread."""
        return self.scale * raw

    def score(self, raw: float) -> float:
        """Calibrated per-frame score in eV/Å."""
        if self.method == "scale" or len(self.frame_scores) < 2:
            return float(self.scale * raw)
        x, y = isotonic_fit(np.array(self.frame_scores), np.array(self.frame_rmse))
        if raw <= x[-1]:
            return float(np.interp(raw, x, y))
        # beyond the data: proportional to the raw score, never saturating —
        # a flat extrapolation would hide exactly the frames the trigger must see
        return float(y[-1] * raw / max(x[-1], SIGMA_FLOOR))

    def state_dict(self) -> dict:
        return {"method": self.method, "fit": self.fit, "abs_z": list(self.abs_z), "sum_z2": self.sum_z2, "n_components": self.n_components,
                "frame_scores": list(self.frame_scores), "frame_rmse": list(self.frame_rmse)}

    @classmethod
    def from_state_dict(cls, state: dict) -> "Calibration":
        return cls(**state)
