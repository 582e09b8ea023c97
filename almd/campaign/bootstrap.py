"""The campaign's model: which kind, its first labels and fit, its file, its calculators.

``[model] kind`` chooses the model (:data:`~almd.campaign.config.MODEL_KINDS`): an
ensemble of readout heads on a backbone (:class:`~almd.uncertainty.Ensemble`) or the
Bayesian lattice-dynamics expansion of the campaign's supercell
(:class:`~almd.uncertainty.lattice_dynamics.LatticeDynamicsModel`). Both answer the
loop the same way (``check_species``, ``fit``, ``calibrate``, ``predict``,
``head_state`` / ``load_head_state``, ``save`` / ``load``). The bootstrap labels the
start and rattled copies of it (training and held-out), fits, and makes the
campaign's phonon labels; the lattice-dynamics model learns from those too.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from ase import Atoms

from almd.campaign.config import CampaignConfig, ideal_supercell, starting_structure, unit_structure

if TYPE_CHECKING:
    from almd.campaign.loop import Campaign

__all__ = ["bootstrap", "load_model", "mean_calculator", "unfitted_model", "walker_calculator"]


def unfitted_model(config: CampaignConfig, backbone: str) -> Any:
    """The campaign's model, not yet fitted or loaded: the ensemble on ``backbone``, or the
    lattice-dynamics expansion of the campaign's supercell.
    """
    m = config.model
    if config.model.lattice_dynamics:
        from almd.uncertainty.lattice_dynamics import LatticeDynamicsModel

        return LatticeDynamicsModel(unit_structure(config), ideal_supercell(config), m.cutoffs, m.score)
    from almd.uncertainty import Ensemble

    return Ensemble(backbone, k=m.members, seed=config.md.seed, score=m.score)


def load_model(config: CampaignConfig, path: Path) -> Any:
    """The model of a checkpoint file."""
    if config.model.lattice_dynamics:
        from almd.uncertainty.lattice_dynamics import LatticeDynamicsModel

        return LatticeDynamicsModel.load(path)
    from almd.uncertainty import Ensemble

    return Ensemble.load(path)


def walker_calculator(config: CampaignConfig, model: Any) -> Any:
    """A walker's calculator: the model's mean forces and the frame's score."""
    if config.model.lattice_dynamics:
        return model.calculator()
    from almd.uncertainty import EnsembleCalculator

    m = config.model
    return EnsembleCalculator(model, uncertainty_every=m.uncertainty_every, dtype=m.dtype)


def mean_calculator(config: CampaignConfig, model: Any) -> Any:
    """The model's mean as a plain ASE calculator (phonons, parity)."""
    if config.model.lattice_dynamics:
        return model.calculator()
    from almd.potentials.calculator import Calculator

    return Calculator(model)


def bootstrap(campaign: Campaign, model: Any) -> None:
    """Check every walker's start, label the initial frames, fit ``model``, and make the phonon labels
    (rank 0; the other ranks lend a hand with the labels until it releases them).
    """
    cfg, le = campaign.config, campaign.config.learning
    try:  # an element the model does not know, a barostat without a periodic cell: before any call
        for k in range(cfg.run.walkers):
            start = starting_structure(cfg, k) if cfg.walker else campaign.start
            model.check_species(start.numbers)
            _check_barostat(cfg, k, start)
    except ValueError:
        campaign.helpers.release(None)
        raise
    rng = np.random.default_rng(cfg.md.seed)
    frames = [campaign.start]
    for _ in range(le.initial_labels + le.initial_calibration - 1):  # the start and rattled copies
        a = campaign.start.copy()
        a.positions += rng.normal(0.0, le.initial_rattle, a.positions.shape)
        frames.append(a)
    splits = ["train"] * le.initial_labels + ["validation"] * le.initial_calibration
    labelled = campaign._label(frames, walker=-1, step=0, reason="initial", splits=splits)
    if not any(a.info["split"] == "train" for a in labelled):
        campaign.helpers.release(None)
        raise RuntimeError(f"no initial reference calculation succeeded; the failures are recorded in "
                           f"{campaign.database.path} (LabelDatabase.failures())")
    campaign._refit(model, labelled)
    campaign.since_finetune = 0  # the initial labels do not count towards a fine-tune
    if le.phonons:
        from almd.campaign.phonon_labels import bootstrap_phonons

        campaign.phonons, cells = bootstrap_phonons(campaign)
        if cfg.model.lattice_dynamics and cells:  # the displaced cells are force-constant labels as they are
            model.fit(cells[1:], append=True)


def _check_barostat(config: CampaignConfig, k: int, start: Atoms) -> None:
    from almd.settings import ConfigError

    if config.walker_settings(k).dynamics == "npt" and not (start.pbc.all() and not start.constraints):
        raise ConfigError(f"walker {k}: dynamics = 'npt' needs a cell periodic in all three directions and "
                          f"no constraints; the start structure has pbc = {start.pbc.tolist()}")
