"""Calibration of ensemble spreads against reference labels (pure numpy).

Raw ensemble spreads are too small where the members share a bias (one frozen
backbone, heads fitted to the same labels), so they are mapped to errors on
labels the members were *not* trained on:

* a scale ``s``: force-component errors e ~ N(0, (s·σ)²), fitted by maximum
  likelihood, s² = mean(e²/σ²) — then e/(s·σ) has unit variance and a
  threshold in eV/Å is a stated error;
* optionally a monotone (isotonic) map from the raw per-frame score to the
  per-frame force RMSE, for when the error is not proportional to the spread;
* optionally (``force_term=True``) a model-form term: σ_i² = (s·u_i)² +
  a²·|F̄_i|²/3 per force component of atom i, with u_i the raw spread and F̄_i
  the mean predicted force, (s, a) by maximum likelihood. Members that share
  one frozen trunk share its model-form error, which no spread between them
  can show; on Si against Stillinger–Weber that error is roughly a fixed
  fraction a of the force (frames with larger distortions have larger
  errors at the same temperature), and the term lets the calibrated σ rank
  frames within one temperature (examples/calibration_si.py). a is refitted
  as labels arrive and shrinks as the heads learn.

Both refit cheaply: the scale keeps running sums, the isotonic map keeps the
(score, RMSE) pairs it has seen.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

__all__ = ["Calibration", "isotonic_fit", "coverage", "reduce_atoms", "spearman"]

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


def reduce_atoms(values: np.ndarray, reduce: str = "max") -> float:
    """Per-frame score from per-atom values: max, mean or rms over atoms."""
    values = np.asarray(values, float)
    if reduce == "max":
        return float(values.max())
    if reduce == "mean":
        return float(values.mean())
    if reduce == "rms":
        return float(np.sqrt((values**2).mean()))
    raise ValueError(f"score reduction {reduce!r} is not one of: max, mean, rms")


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
    force_term: bool = False  # add the model-form term a·|F̄|/√3 (module docstring)
    atom_abs_e: list[float] = field(default_factory=list)  # |e| of each component (3 per atom) …
    atom_u2: list[float] = field(default_factory=list)  # … raw spread² and |F̄|² per atom, for force_term
    atom_f2: list[float] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.method not in ("scale", "isotonic"):
            raise ValueError(f"calibration method {self.method!r} is not one of: scale, isotonic")
        if self.fit not in ("variance", "quantile"):
            raise ValueError(f"calibration fit {self.fit!r} is not one of: variance, quantile")

    @property
    def scale(self) -> float:
        """s: calibrated spread = s × raw spread (with ``force_term``, the spread's share)."""
        return self._fitted_pair()[0]

    @property
    def relative(self) -> float:
        """a: the model-form error per force component as a fraction of |F̄|/√3 (0 without ``force_term``)."""
        return self._fitted_pair()[1]

    def _fitted_pair(self) -> tuple[float, float]:
        if not self.n_components:
            return 1.0, 0.0
        if not (self.force_term and self.atom_u2):
            if self.fit == "quantile":
                # heavy-tailed errors: the variance fit leaves too many inside 1σ;
                # this one states the coverage by construction
                return float(np.quantile(self.abs_z, 0.6827)), 0.0
            return float(np.sqrt(self.sum_z2 / self.n_components)), 0.0
        # refitted only when labels arrive (update/reset clear the cache) or the fit kind changes
        cached = getattr(self, "_pair", None)
        if cached is None or cached[0] != self.fit:
            self._pair = cached = (self.fit, self._fit_pair())
        return cached[1]

    def _fit_pair(self) -> tuple[float, float]:
        """Maximum likelihood of (s, a) on per-atom errors, 3 components sharing σ_i."""
        from scipy.optimize import minimize

        abs_e = np.asarray(self.atom_abs_e, float).reshape(-1, 3)
        e2 = (abs_e**2).sum(1)
        u2, f2 = np.asarray(self.atom_u2, float), np.asarray(self.atom_f2, float) / 3.0

        def nll(p: np.ndarray) -> float:
            var = np.exp(2 * p[0]) * u2 + np.exp(2 * p[1]) * f2 + SIGMA_FLOOR**2
            return float(np.sum(1.5 * np.log(var) + 0.5 * e2 / var))

        # start with the two terms sharing the mean squared error
        ms = np.mean(e2) / 3
        start = 0.5 * np.log([ms / max(np.mean(u2), SIGMA_FLOOR**2), ms / max(np.mean(f2), SIGMA_FLOOR**2)]) - 0.35
        best = minimize(nll, start, method="Nelder-Mead", options={"xatol": 1e-4, "fatol": 1e-6, "maxiter": 2000})
        s, a = np.exp(best.x)
        if self.fit == "quantile":
            # same shape, one overall factor putting 68.3 % of the |e| components within σ
            sigma = np.sqrt(s**2 * u2 + a**2 * f2 + SIGMA_FLOOR**2)
            c = float(np.quantile(abs_e / sigma[:, None], 0.6827))
            s, a = s * c, a * c
        return float(s), float(a)

    @property
    def fitted(self) -> bool:
        return self.n_components > 0

    def update(self, errors: np.ndarray, sigma: np.ndarray, frame_score: float | None = None,
               forces: np.ndarray | None = None) -> None:
        """Add one frame's (or any batch of) force-component errors and raw spreads.

        ``sigma`` broadcasts against ``errors`` (a per-atom σ of shape (N, 1)
        against errors (N, 3)). ``frame_score`` is the raw per-frame score of
        the same frame, for the isotonic map. ``forces`` (N, 3): the mean
        predicted forces, for the model-form term (errors must then be (N, 3)).
        """
        self._pair = None
        if forces is not None:
            e = np.asarray(errors, float).reshape(-1, 3)
            u = np.broadcast_to(np.asarray(sigma, float).reshape(-1, 1), e.shape)[:, 0]
            self.atom_abs_e.extend(np.abs(e).ravel().tolist())
            self.atom_u2.extend((u**2).tolist())
            self.atom_f2.extend((np.asarray(forces, float).reshape(-1, 3) ** 2).sum(1).tolist())
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
        self.atom_abs_e, self.atom_u2, self.atom_f2 = [], [], []
        self._pair = None

    def sigma(self, raw: np.ndarray | float, forces: np.ndarray | None = None) -> np.ndarray | float:
        """Calibrated per-atom spread (per force component); ``forces`` (N, 3) for the model-form term."""
        s, a = self._fitted_pair()
        if forces is None or a == 0.0:
            return s * raw
        f2 = (np.asarray(forces, float).reshape(-1, 3) ** 2).sum(1) / 3
        raw = np.asarray(raw, float)
        return np.sqrt((s * raw) ** 2 + a**2 * f2.reshape(raw.shape))

    def score(self, raw: float, sigma: np.ndarray | None = None, reduce: str = "max") -> float:
        """Calibrated per-frame score in eV/Å.

        With the model-form term fitted, the score is ``reduce`` over the
        calibrated per-atom ``sigma`` (from :meth:`sigma` with forces); else
        it maps the raw score (scale, or the isotonic map).
        """
        if sigma is not None and self.relative > 0.0:
            return reduce_atoms(sigma, reduce)
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
                "frame_scores": list(self.frame_scores), "frame_rmse": list(self.frame_rmse),
                "force_term": self.force_term, "atom_abs_e": list(self.atom_abs_e), "atom_u2": list(self.atom_u2),
                "atom_f2": list(self.atom_f2)}

    @classmethod
    def from_state_dict(cls, state: dict) -> "Calibration":
        return cls(**state)
