"""The end of a campaign: test frames labelled last, the final and base models' errors, the summary.

After the last MD step every walker goes on ``learning.test_frames`` ×
``learning.test_spacing`` steps with the final model and keeps every
``test_spacing``-th frame: frames from the top of the temperature schedule,
labelled (``split = "test"``) and never learnt from. The final ensemble and the
base model are scored on them, the phonons of the final model are compared
with the reference's, and ``summary.json`` and the plots (:mod:`almd.campaign.plots`) are written.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import numpy as np
from ase import Atoms

from almd.campaign.state import update_checkpoint
from almd.structures import bare

if TYPE_CHECKING:
    from almd.campaign.loop import Campaign

__all__ = ["PARITY_FILE", "force_rmse", "label_test_frames", "record_outcome", "save_parity"]

#: the held-out forces of the reference, the final and the base model (``almd report``'s parity plot)
PARITY_FILE = "heldout-forces.npz"


def force_rmse(predict: Callable[[Atoms], dict], frames: list[Atoms]) -> float:
    """Force RMSE (eV/Å) of ``predict(atoms)["forces"]`` against the frames' reference forces; nan if none."""
    errors = [np.asarray(a.get_forces()) - predict(bare(a))["forces"] for a in frames]
    return float(np.sqrt(np.mean(np.concatenate(errors) ** 2))) if errors else float("nan")


def label_test_frames(campaign: Campaign) -> list[Atoms]:
    """The test frames, labelled (rank 0 gets them all; the other ranks an empty list).

    The same steps follow the last checkpoint in a resumed run, so a run killed while
    they were made finds the same frames, and the labels already made, again.
    """
    le = campaign.config.learning
    frames = []
    for k, w in campaign.walkers.items():
        for i in range(le.test_frames * le.test_spacing):
            w.advance()
            if (i + 1) % le.test_spacing == 0:
                frames.append((k, w.step, bare(w.atoms)))
    gathered = campaign.comm.gather(frames)
    if not campaign.root:
        campaign.helpers.wait()  # while rank 0 labels them, one per rank at a time
        return []
    frames = sorted((f for part in gathered for f in part), key=lambda f: (f[0], f[1]))
    provenance = [p for k, step, _ in frames for p in campaign._provenance(1, k, step, "test", splits=["test"])]
    labelled = campaign._label_rows([atoms for _, _, atoms in frames], provenance)
    campaign.helpers.release()
    return labelled


def record_outcome(campaign: Campaign, rmse: float, test: list[Atoms], converged: bool,
                   converged_at: int | None) -> None:
    """Held-out errors (final and base model), phonon errors, convergence, then ``summary.json`` and
    the uncertainty plot (rank 0). Without test frames the held-out labels stand in.
    """
    from almd.campaign.plots import plot_run
    from almd.campaign.report import write_summary
    from almd.potentials.calculator import Calculator

    cfg = campaign.config
    held = test or campaign.database.validation_set()
    base = Calculator(cfg.model.backbone, dtype=cfg.model.dtype)
    forces = save_parity(campaign.output / PARITY_FILE, held, campaign.model.predict, base)
    base_rmse = float(np.sqrt(np.mean((forces["base"] - forces["reference"]) ** 2))) if forces else float("nan")
    phonons = dict(campaign.phonons)
    if phonons.get("file"):
        from almd.campaign.phonon_labels import phonon_errors

        with campaign._timed("phonons"):
            phonons["final"] = phonon_errors(campaign.output / phonons["file"], campaign.mean_calculator(),
                                             name="final")
    update_checkpoint(campaign.output, heldout={"frames": len(held), "set": "test" if test else "validation",
                                                "final": _finite(rmse), "base": _finite(base_rmse)},
                      phonons=phonons, converged=converged, converged_at_step=converged_at,
                      timings=campaign.timings)
    write_summary(campaign.output)
    plot_run(campaign.output)


def save_parity(path: Path, frames: list[Atoms], predict: Callable[[Atoms], dict],
                base: Any) -> dict[str, np.ndarray] | None:
    """Reference, final-model and base-model forces (eV/Å) on the held-out frames, kept for the
    parity plot and returned (None without frames).
    """
    if not frames:
        return None
    forces = {"reference": np.concatenate([np.asarray(a.get_forces()) for a in frames]),
              "final": np.concatenate([predict(bare(a))["forces"] for a in frames]),
              "base": np.concatenate([base.get_forces(bare(a)) for a in frames])}
    tmp = path.with_suffix(".tmp.npz")
    np.savez(tmp, **forces)
    tmp.replace(path)
    return forces

def _finite(value: float) -> float | None:
    return value if np.isfinite(value) else None  # JSON has no nan
