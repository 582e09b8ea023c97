"""almd: active-learning molecular dynamics with fine-tuned ML interatomic potentials.

The data flow, as the folders show it: ``campaign/`` (walkers, trigger, loop) →
``uncertainty/`` (ensemble score) and ``labels/`` (oracle, database) → ``finetune/``
(PFT) → back to the walkers; ``phonons/`` turns force constants into Hessian
labels; ``potentials/`` is the torch layer under all of them.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

__all__ = ["Calculator", "Campaign", "CampaignConfig", "EnsembleCalculator", "OnTheFlyCalculator", "__version__",
           "load_model"]

if TYPE_CHECKING:
    from almd.campaign import Campaign, CampaignConfig
    from almd.campaign.on_the_fly import OnTheFlyCalculator
    from almd.potentials import Potential
    from almd.potentials.calculator import Calculator
    from almd.uncertainty.calculator import EnsembleCalculator

# Lazy: `import almd` stays cheap (no torch) for the oracle, trigger and CLI help.
_LAZY = {
    "Calculator": ("almd.potentials.calculator", "Calculator"),
    "EnsembleCalculator": ("almd.uncertainty.calculator", "EnsembleCalculator"),
    "Campaign": ("almd.campaign.loop", "Campaign"),
    "CampaignConfig": ("almd.campaign.config", "CampaignConfig"),
    "OnTheFlyCalculator": ("almd.campaign.on_the_fly", "OnTheFlyCalculator"),
}


def load_model(model: str | os.PathLike = "sevennet-0") -> Potential:
    """Any model almd reads: a pretrained name, a model file, or an ensemble file."""
    import almd.uncertainty  # noqa: F401  (registers the ensemble's file format)
    from almd.potentials import load

    return load(model)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        module, attr = _LAZY[name]
        return getattr(importlib.import_module(module), attr)
    raise AttributeError(f"module 'almd' has no attribute {name!r}")
