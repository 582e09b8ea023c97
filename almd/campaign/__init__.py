"""The active-learning loop, files in the order it runs.

``config`` (the campaign file) → ``walker`` (MD) → ``trigger`` (when to call the
reference) → ``selection`` (which frames) → ``loop`` (the campaign itself) →
``finetune_round`` (the backbone learns); ``parallel`` spreads walkers over MPI
ranks; ``cli`` is ``almd run``.
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = ["Campaign", "CampaignConfig", "CampaignResult", "main", "run"]

# Lazy, so that importing one stage (the trigger, say) does not pull in the others' dependencies.
_LAZY = {"Campaign": "almd.campaign.loop", "CampaignResult": "almd.campaign.loop", "run": "almd.campaign.loop",
         "CampaignConfig": "almd.campaign.config", "main": "almd.campaign.cli"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'almd.campaign' has no attribute {name!r}")
