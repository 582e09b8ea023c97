"""The model interface: a backbone maps a :class:`Graph` to per-atom energies.

Backbones give energies only; forces, stress and Hessians come from
:mod:`almd.potentials.autodiff`, the one place that differentiates.
"""

from __future__ import annotations

import torch
from ase.data import chemical_symbols
from torch import nn

from almd.potentials.graph import Graph

__all__ = ["Potential", "UnknownElementError"]


class UnknownElementError(ValueError):
    """A structure holds an element the model was not trained on."""


class Potential(nn.Module):
    """Base class of every backbone.

    Subclasses set ``cutoff`` (Å) and ``species`` (supported atomic numbers) and
    implement :meth:`atomic_energies`. ``forward`` returns per-structure energies (eV).
    """

    cutoff: float
    species: tuple[int, ...]
    #: how to rebuild this potential from a saved file (see almd.potentials.load)
    backbone_name: str = ""

    def atomic_energies(self, graph: Graph, edge_index: torch.Tensor, edge_vectors: torch.Tensor) -> torch.Tensor:
        """(n,) per-atom energies in eV from edges already cut to ``cutoff``."""
        raise NotImplementedError

    def edges(self, graph: Graph) -> tuple[torch.Tensor, torch.Tensor]:
        """Edge index and differentiable edge vectors, restricted to the cutoff.

        Neighbour lists may be built with a skin (see almd.potentials.calculator); pairs that
        moved out of range are dropped here, pairs that moved in are the skin's job.
        """
        vectors = graph.edge_vectors()
        keep = (vectors.detach() ** 2).sum(-1) < self.cutoff**2
        if bool(keep.all()):
            return graph.edge_index, vectors
        return graph.edge_index[:, keep], vectors[keep]

    def forward_with_atomic(self, graph: Graph) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-structure energies (b,) and per-atom energies (n,)."""
        self.check_species(graph.numbers)
        edge_index, vectors = self.edges(graph)
        atomic = self.atomic_energies(graph, edge_index, vectors)
        energy = torch.zeros(graph.n_structures, dtype=atomic.dtype, device=atomic.device)
        energy = energy.index_add(0, graph.batch, atomic)
        return energy, atomic

    def forward(self, graph: Graph) -> torch.Tensor:
        return self.forward_with_atomic(graph)[0]

    def check_species(self, numbers: torch.Tensor | list[int]) -> None:
        present = {int(z) for z in torch.as_tensor(numbers).unique().tolist()}
        unknown = sorted(present - set(self.species))
        if unknown:
            names = ", ".join(chemical_symbols[z] for z in unknown)
            known = " ".join(chemical_symbols[z] for z in sorted(self.species))
            raise UnknownElementError(
                f"{type(self).__name__} does not know element(s) {names}; it supports: {known}"
            )

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    def export(self) -> dict:
        """What :func:`almd.potentials.save` needs to rebuild this model."""
        raise NotImplementedError

    # ---- backbone knowledge: what higher layers need to know of a backbone, answered here
    def readout(self):
        """The trunk / linear-readout split that ensemble heads stand on
        (:class:`almd.uncertainty.readout.Readout`).
        """
        raise NotImplementedError(f"ensemble heads exist for backbones sevennet, mace; got {self.backbone_name!r} "
                                  f"({type(self).__name__})")

    def compiled(self) -> "Potential":
        """A twin of the potential with its network compiled by ``torch.compile`` (parameters shared).

        For energy, force and stress calls only: the compiled graph has no double
        backward, so Hessians and training use the eager potential.
        """
        raise NotImplementedError(f"{type(self).__name__}: no compiled form for this backbone")

    def add_energy_shifts(self, shifts: dict[int, float]) -> None:
        """Add s_Z (eV) to the per-element energy of each atomic number Z (in place; saved with the model)."""
        raise NotImplementedError(f"{type(self).__name__}: no per-element energy to shift")

    def layer_group(self, name: str) -> str:
        """The layer group (``embedding``, ``block0``…``blockK``, ``readout``) of parameter ``name``."""
        return "embedding"

    def layer_groups(self) -> dict[str, list[str]]:
        """Parameter names by layer group (see :meth:`layer_group`)."""
        groups: dict[str, list[str]] = {}
        for name, _ in self.named_parameters():
            groups.setdefault(self.layer_group(name), []).append(name)
        return groups


def _top_module(name: str) -> tuple[str, list[str]]:
    """The backbone's own top-level module of parameter ``name`` and all name parts."""
    parts = name.split(".")
    return (parts[1] if parts[0] == "model" and len(parts) > 1 else parts[0]), parts
