"""The lattice-dynamics campaign's convergence test: sub-block errors of a larger supercell's MD.

Callsen, Lee, Chou (2026; methods.md §3): when a walker's windows are quiet, the model
itself runs MD in ``model.subblock_supercell`` at the walker's temperature, and the
Bayesian (parameter) force error of every training-cell-sized block of its frames is
computed (:func:`~almd.uncertainty.bayes_convergence.subblock_convergence`). No reference
call is made. The largest block error goes to the walker's trigger
(:meth:`~almd.campaign.trigger.Trigger.record_subblock_error`): below
``trigger.subblock_target`` the campaign has converged; above it the trigger calls again.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

from almd.campaign.config import CampaignConfig, unit_structure
from almd.campaign.walker import Walker, WalkerSettings

if TYPE_CHECKING:
    from almd.uncertainty.bayes_convergence import SubblockConvergence
    from almd.uncertainty.lattice_dynamics import LatticeDynamicsModel

__all__ = ["subblock_test"]


def subblock_test(model: LatticeDynamicsModel, config: CampaignConfig, walker: WalkerSettings,
                  step: int) -> SubblockConvergence:
    """The sub-block errors (eV/Å) of the model on its own MD in the larger supercell.

    The MD starts at the ideal cell at the walker's temperature of ``step``, seeded by
    the walker's seed and ``step``: the same test gives the same answer in a resumed run.
    """
    from almd.uncertainty.bayes import BayesianCalculator
    from almd.uncertainty.bayes_convergence import subblock_convergence

    m = config.model
    large = unit_structure(config).repeat(m.subblock_supercell * 3 if len(m.subblock_supercell) == 1
                                          else m.subblock_supercell)
    settings = dataclasses.replace(walker, temperature=walker.temperature_at(step), schedule=[],
                                   seed=walker.seed + 7919 * (step + 1), keep=1)
    md = Walker(large.copy(), BayesianCalculator(model.bayes, ideal=large), settings, name="subblock")
    every = m.subblock_steps // m.subblock_frames
    frames = []
    for i in range(m.subblock_frames * every):
        md.advance()
        if (i + 1) % every == 0:
            frames.append(md.atoms.copy())
    return subblock_convergence(model.bayes, frames, large, config.trigger.subblock_target, block=model.ideal)
