"""Plots of a run directory, drawn from its files alone (``almd report`` redraws them).

- ``uncertainty.png``: the per-walker uncertainty trace, thresholds, target, every call marked;
- ``md.png``: temperature and potential energy per walker;
- ``learning.png``: the model's true force error on each frame sent to the reference (before it
  learnt from it) and the score that sent it, against the number of labels;
- ``parity.png``: held-out forces of the base and the final model against the reference;
- ``phonons.png``: bands and DOS of the base and final model beside the reference's.
"""

from __future__ import annotations

import csv
import math
from pathlib import Path

from almd.campaign.state import read_checkpoint

__all__ = ["plot_learning", "plot_md", "plot_parity", "plot_phonons", "plot_run", "plot_uncertainty"]

#: how each kind of reference call is marked on the trace
MARKERS = {"label": ("o", "tab:red", "trigger call"), "brake": ("X", "black", "brake"),
           "audit": ("s", "tab:green", "audit")}


def _float(value: str) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # headless: never needs a display
    import matplotlib.pyplot as plt

    return plt


def _rows(run_dir: Path) -> list[dict[str, str]]:
    with open(run_dir / "steps.csv", newline="") as fh:
        return list(csv.DictReader(fh))


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    fig.clf()
    return path


def plot_run(run_dir: str | Path) -> list[Path]:
    """Every plot the run directory has the data for; the files written."""
    run_dir = Path(run_dir)
    plots = [plot_uncertainty(run_dir), plot_md(run_dir)]
    for plot in (plot_learning, plot_parity, plot_phonons):
        path = plot(run_dir)
        if path is not None:
            plots.append(path)
    _pyplot().close("all")
    return plots


def plot_md(run_dir: str | Path) -> Path:
    """Temperature (K) and potential energy per atom (eV) of each walker against the MD step."""
    plt = _pyplot()
    run_dir = Path(run_dir)
    rows = [r for r in _rows(run_dir) if r["action"] != "brake"]
    n_atoms = {int(k): max(1, len(w["numbers"])) for k, w in read_checkpoint(run_dir).get("walkers", {}).items()}
    fig, (ax_t, ax_e) = plt.subplots(2, 1, figsize=(9, 5.5), sharex=True)
    for k in sorted({int(r["walker"]) for r in rows}):
        mine = [r for r in rows if int(r["walker"]) == k]
        step = [int(r["step"]) for r in mine]
        ax_t.plot(step, [_float(r["temperature"]) for r in mine], lw=0.7, color=f"C{k % 10}", label=f"walker {k}")
        ax_e.plot(step, [_float(r["energy"]) / n_atoms.get(k, 1) for r in mine], lw=0.7, color=f"C{k % 10}")
    ax_t.set_ylabel("T (K)")
    ax_e.set_ylabel("potential energy (eV/atom)")
    ax_e.set_xlabel("MD step")
    ax_t.legend(fontsize=8)
    return _save(fig, run_dir / "md.png")


def plot_learning(run_dir: str | Path) -> Path | None:
    """The true force error of each frame sent to the reference (before learning from it), and its score."""
    run_dir = Path(run_dir)
    state = read_checkpoint(run_dir)
    curve = state.get("learning_curve", [])
    if not curve:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    labels = [c["labels"] for c in curve]
    ax.plot(labels, [c["error"] for c in curve], "o-", ms=4, lw=1, label="true force error (before learning it)")
    scored = [(c["labels"], c["score"]) for c in curve if c.get("score") is not None]
    if scored:
        ax.plot(*zip(*scored), "x", color="tab:grey", label="calibrated score that called it")
    target = state.get("config", {}).get("trigger", {}).get("target")
    if target is not None:
        ax.axhline(target, color="tab:purple", ls="--", lw=1.2, label=f"target {target} eV/Å")
    heldout = state.get("heldout", {})
    if heldout.get("final") is not None:
        ax.axhline(heldout["final"], color="tab:green", lw=1.0, label=f"held-out at the end {heldout['final']:.3f} eV/Å")
    ax.set_yscale("log")
    ax.set_xlabel("labels in the database (reference calculations)")
    ax.set_ylabel("force error (eV/Å)")
    ax.legend(fontsize=8)
    return _save(fig, run_dir / "learning.png")


def plot_parity(run_dir: str | Path) -> Path | None:
    """Held-out force components: base and final model against the reference (eV/Å)."""
    import numpy as np

    run_dir = Path(run_dir)
    path = run_dir / "heldout-forces.npz"
    if not path.is_file():
        return None
    data = np.load(path)
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 5.5))
    ref = data["reference"].ravel()
    for key, colour in (("base", "tab:grey"), ("final", "tab:blue")):
        pred = data[key].ravel()
        rmse = float(np.sqrt(np.mean((pred - ref) ** 2)))
        ax.scatter(ref, pred, s=4, alpha=0.5, color=colour, label=f"{key} model: RMSE {rmse:.3f} eV/Å")
    lim = float(np.abs(np.concatenate([ref, data["final"].ravel(), data["base"].ravel()])).max()) * 1.05
    ax.plot([-lim, lim], [-lim, lim], color="black", lw=0.8)
    ax.set(xlim=(-lim, lim), ylim=(-lim, lim), xlabel="reference force (eV/Å)", ylabel="model force (eV/Å)")
    ax.set_aspect("equal")
    ax.legend(fontsize=8, loc="upper left")
    return _save(fig, run_dir / "parity.png")


def plot_phonons(run_dir: str | Path) -> Path | None:
    """Bands and DOS of the base and the final model against the reference's (from ``phonons/*.json``)."""
    from almd.phonons.harmonic import PhononResult
    from almd.phonons.plot import plot_bands

    run_dir = Path(run_dir)
    files = [run_dir / "phonons" / f"{name}.json" for name in ("reference", "base", "final")]
    present = [f for f in files if f.is_file()]
    if files[0] not in present or len(present) < 2:
        return None
    return plot_bands([PhononResult.from_json(f) for f in present], run_dir / "phonons.png",
                      title="phonons: reference, base and final model")


def _schedule_ends(config: dict, walkers: list[int]) -> dict[int, list[int]]:
    """MD step at which each walker's temperature and pressure schedules end → the walkers ending there."""
    md, tables = config.get("md", {}), config.get("walker") or []
    ends: dict[int, list[int]] = {}
    for k in walkers:
        own = tables[k] if k < len(tables) else {}
        stages = [own.get(key, md.get(key)) or [] for key in ("schedule", "pressure_schedule")]
        end = max(sum(stage[0] for stage in st) for st in stages)
        if end > 0:
            ends.setdefault(int(end), []).append(k)
    return ends


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
    for end, who in _schedule_ends(state.get("config", {}), walkers).items():
        for a in (ax, ax_t):
            a.axvline(end, color="tab:orange", lw=1.0, ls="--")
        name = "" if len(walkers) == 1 else f" (walker {', '.join(map(str, who))})"
        ax_t.text(end, ax_t.get_ylim()[0], f" schedule ends{name}", va="bottom", fontsize=8, color="tab:orange")
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
