"""Plots of a run directory: ``OUTPUT/uncertainty.png``, drawn from ``steps.csv`` and ``campaign.json`` alone."""

from __future__ import annotations

import csv
import math
from pathlib import Path

from almd.campaign.state import read_checkpoint

__all__ = ["plot_uncertainty"]

#: how each kind of reference call is marked on the trace
MARKERS = {"label": ("o", "tab:red", "trigger call"), "brake": ("X", "black", "brake"),
           "audit": ("s", "tab:green", "audit")}


def _float(value: str) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


def plot_uncertainty(run_dir: str | Path) -> Path:
    """The per-walker calibrated uncertainty trace with its rolling mean, the history threshold,
    the target, every reference call marked and the thermostat's temperature; returns the file.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run_dir = Path(run_dir)
    state = read_checkpoint(run_dir)
    with open(run_dir / "steps.csv", newline="") as fh:
        rows = [r for r in csv.DictReader(fh)]
    target = state.get("config", {}).get("trigger", {}).get("target")
    walkers = sorted({int(r["walker"]) for r in rows})
    fig, (ax, ax_t) = plt.subplots(2, 1, figsize=(9, 6.5), sharex=True, height_ratios=[3, 1])
    for k in walkers:
        mine = [r for r in rows if int(r["walker"]) == k]
        step = [int(r["step"]) for r in mine]
        colour = f"C{k % 10}"
        for key, style, name in (("score", {"lw": 0.6, "alpha": 0.6}, "calibrated score"),
                                 ("rolling_mean", {"lw": 1.6}, "trajectory average"),
                                 ("threshold", {"lw": 1.0, "ls": ":"}, "history threshold")):
            points = [(s, _float(r.get(key))) for s, r in zip(step, mine) if math.isfinite(_float(r.get(key)))]
            if points:  # unscored steps have no value: joined over, not broken
                ax.plot(*zip(*points), color=colour, label=f"walker {k}: {name}", **style)
        ax_t.plot(step, [_float(r["temperature"]) for r in mine], lw=0.6, color=colour)
        for action, (marker, c, name) in MARKERS.items():
            hits = [r for r in mine if r["action"] == action]
            if hits:
                ax.scatter([int(r["step"]) for r in hits], [_float(r["score"]) for r in hits], marker=marker,
                           color=c, s=28, zorder=3, label=f"{name} ({len(hits)})" if k == walkers[0] else None)
    if target is not None:
        ax.axhline(target, color="tab:purple", ls="--", lw=1.2, label=f"target {target} eV/Å")
    schedule = state.get("config", {}).get("md", {}).get("schedule") or []
    if schedule:
        end = sum(stage[0] for stage in schedule)
        for a in (ax, ax_t):
            a.axvline(end, color="tab:orange", lw=1.0, ls="--")
        ax_t.text(end, ax_t.get_ylim()[0], " schedule ends", va="bottom", fontsize=8, color="tab:orange")
    at = state.get("converged_at_step")
    if at is not None:
        for a in (ax, ax_t):
            a.axvline(at, color="grey", lw=1.0)
        ax_t.text(at, ax_t.get_ylim()[1], " converged: production", va="top", fontsize=8, color="grey")
    ax.set_yscale("log")
    ax.set_ylabel("force uncertainty (eV/Å)")
    ax.legend(fontsize=7, ncol=2, loc="upper right")
    ax_t.set_xlabel("MD step")
    ax_t.set_ylabel("T (K)")
    fig.tight_layout()
    path = run_dir / "uncertainty.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
