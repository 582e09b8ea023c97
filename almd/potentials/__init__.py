"""The torch side of almd: graphs, backbones, and the one autodiff module.

``load(model)`` gives a :class:`Potential` from a pretrained name (``sevennet-0``),
a sevenn checkpoint, a MACE model file, or a file written by :func:`save` (see :mod:`.files`).
"""

from __future__ import annotations

from almd.potentials.autodiff import (
    energy_forces_stress,
    energy_forces_stress_hvp,
    hessian,
    hessian_vector_product,
    hessian_vector_products,
)
from almd.potentials.files import atomic_torch_save, load, register_format, save
from almd.potentials.graph import Graph, build_graph, neighbor_pairs
from almd.potentials.potential import Potential, UnknownElementError

__all__ = [
    "Graph", "Potential", "UnknownElementError", "atomic_torch_save", "build_graph", "energy_forces_stress",
    "energy_forces_stress_hvp", "hessian", "hessian_vector_product", "hessian_vector_products", "load",
    "neighbor_pairs", "register_format", "save",
]
