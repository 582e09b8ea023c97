"""Band-structure (+ DOS) figure for one or more PhononResults on the same path."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from almd.phonons.harmonic import PhononResult

__all__ = ["plot_bands"]

_STYLES = [("C0", "-"), ("k", "--"), ("C3", ":"), ("C2", "-.")]


def plot_bands(results: Sequence[PhononResult], path: str | Path, title: str | None = None) -> Path:
    """Write a PNG with the band structures of `results` (first one sets the axis) and their DOS."""
    import matplotlib

    matplotlib.use("Agg")  # headless: never needs a display
    import matplotlib.pyplot as plt

    fig, (ax, ax_dos) = plt.subplots(1, 2, figsize=(8, 4.5), sharey=True, gridspec_kw={"width_ratios": [4, 1]})
    first = results[0]
    # Distances of the first result place every curve: the x axis is the path, not |q|,
    # so a model relaxed to another cell still lines up with the reference.
    x_segments = [np.asarray(d) for d in first.band["distances"]]
    for (color, ls), res in zip(_STYLES, results):
        for x, f in zip(x_segments, res.band["frequencies_thz"]):
            lines = ax.plot(x, np.asarray(f), color=color, ls=ls, lw=1.0)
        lines[0].set_label(res.label)
        ax_dos.plot(res.dos["dos"], res.dos["frequency_thz"], color=color, ls=ls, lw=1.0)
    ticks, labels = [], []
    for x, (a, b) in zip(x_segments, first.band["segments"]):
        if ticks and np.isclose(ticks[-1], x[0]):
            if labels[-1] != a:
                labels[-1] = f"{labels[-1]}|{a}"
        else:
            ticks.append(x[0])
            labels.append(a)
        ticks.append(x[-1])
        labels.append(b)
    ax.set_xticks(ticks, labels)
    for t in ticks:
        ax.axvline(t, color="0.8", lw=0.6, zorder=0)
    ax.axhline(0.0, color="0.6", lw=0.6)
    ax.set_xlim(ticks[0], ticks[-1])
    # DOS frequency grids start below zero; show negative frequencies only if a band has them
    lowest = min(float(np.min(f)) for r in results for f in r.band["frequencies_thz"])
    top = max(float(np.max(f)) for r in results for f in r.band["frequencies_thz"])
    ax.set_ylim(min(lowest * 1.1, -0.02 * top), top * 1.08)
    ax.set_ylabel("Frequency (THz)")
    ax.legend(loc="lower right", fontsize=8)
    ax.set_title(title or first.formula)
    ax_dos.set_xlabel("DOS")
    ax_dos.set_xticks([])
    fig.tight_layout()
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out
