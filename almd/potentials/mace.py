"""MACE backbone (extra ``mace``): a MACE model driven by almd's graph.

MACE builds edge vectors itself as x_recv - x_send + shift. Passing zero
positions and almd's differentiable edge vectors as the shifts makes MACE see
exactly almd's geometry, so the one autodiff module gives its forces, stress
and Hessians like any other backbone's.

mace-torch 0.3.x pins e3nn==0.4.4 while sevenn needs e3nn>=0.5; install it with
``pip install --no-deps mace-torch`` (the README explains).
"""

from __future__ import annotations

import torch

from almd.potentials.graph import Graph
from almd.potentials.potential import Potential


class Mace(Potential):
    backbone_name = "mace"

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model
        self.cutoff = float(model.r_max)
        self.species = tuple(int(z) for z in model.atomic_numbers)
        table = torch.full((119,), -1, dtype=torch.long)
        table[torch.as_tensor(self.species)] = torch.arange(len(self.species))
        self.register_buffer("z_to_index", table, persistent=False)

    @classmethod
    def from_file(cls, path: str) -> "Mace":
        return cls(torch.load(path, map_location="cpu", weights_only=False))

    def atomic_energies(self, graph: Graph, edge_index: torch.Tensor, edge_vectors: torch.Tensor) -> torch.Tensor:
        dtype = edge_vectors.dtype
        index = self.z_to_index[graph.numbers]
        node_attrs = torch.nn.functional.one_hot(index, len(self.species)).to(dtype)
        ptr = torch.cat([graph.n_atoms.new_zeros(1), graph.n_atoms.cumsum(0)])
        data = {
            "positions": torch.zeros_like(graph.positions, dtype=dtype),
            "shifts": edge_vectors,
            "unit_shifts": graph.shifts,
            "cell": graph.cell.reshape(-1, 3),
            "edge_index": edge_index,
            "batch": graph.batch,
            "ptr": ptr,
            "node_attrs": node_attrs,
            "head": torch.zeros(graph.n_structures, dtype=torch.long, device=index.device),
        }
        out = self.model(data, training=self.training, compute_force=False)
        return out["node_energy"].to(dtype)

    def export(self) -> dict:
        return {"backbone": self.backbone_name, "module": self.model}

    @classmethod
    def from_export(cls, payload: dict) -> "Mace":
        return cls(payload["module"])


def small_random_mace(species: list[int], cutoff: float = 4.0, seed: int = 0, channels: int = 8) -> Mace:
    """A small randomly initialised MACE (for tests and examples; not a physical model)."""
    import numpy as np
    from e3nn import o3
    from mace import modules

    torch.manual_seed(seed)
    block = modules.interaction_classes["RealAgnosticResidualInteractionBlock"]
    model = modules.ScaleShiftMACE(
        r_max=cutoff,
        num_bessel=6,
        num_polynomial_cutoff=5,
        max_ell=2,
        interaction_cls=block,
        interaction_cls_first=block,
        num_interactions=2,
        num_elements=len(species),
        hidden_irreps=o3.Irreps(f"{channels}x0e + {channels}x1o"),
        MLP_irreps=o3.Irreps("8x0e"),
        gate=torch.nn.functional.silu,
        atomic_energies=np.full(len(species), -1.0),
        avg_num_neighbors=8.0,
        atomic_numbers=list(species),
        correlation=2,
        atomic_inter_scale=1.0,
        atomic_inter_shift=0.0,
    )
    return Mace(model)
