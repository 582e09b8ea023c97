"""The trunk / readout split the ensemble's heads stand on.

Every backbone is written as per-atom E_i = W[z_i]·h_i + b[z_i] with h_i the
trunk's invariant features; members are (W, b) pairs. The split is backbone
knowledge, so each backbone gives its own (:meth:`Potential.readout`); this
module states the contract the ensemble relies on.
"""

from __future__ import annotations

from typing import Protocol

import torch

from almd.potentials import Graph, Potential

__all__ = ["Readout", "readout_for"]


class Readout(Protocol):
    """A backbone's shared trunk (run once per structure) and its linear readout."""

    n_species: int
    n_features: int

    def species_index(self, numbers: torch.Tensor) -> torch.Tensor:
        """(n,) species index of each atom, from its atomic number."""

    def features(self, graph: Graph) -> torch.Tensor:
        """(n, F) invariant features entering the readout, differentiable in positions and strain."""

    def pretrained_head(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(S, F) weights and (S,) shifts equal to the backbone's own readout."""


def readout_for(potential: Potential) -> Readout:
    """The trunk / readout split of ``potential`` (SevenNet, MACE)."""
    return potential.readout()
