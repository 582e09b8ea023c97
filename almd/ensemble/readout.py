"""Split a backbone into a shared trunk (run once) and a linear readout (per member).

SevenNet-0's readout after the last interaction block is
``reduce_input_to_hidden`` (128→64, no bias) → ``reduce_hidden_to_energy``
(64→1, no bias) → ``rescale_atomic_energy`` (per-species scale and shift):
no nonlinearity, so per atom E_i = W[z_i]·h_i + b[z_i] exactly, with h_i the
128 scalar features of the trunk. Members are then (W, b) pairs; the
trunk and its backward are the only costly parts.
"""

from __future__ import annotations

import torch

from almd.potentials import Graph, Potential

#: SevenNet's readout modules, in order
SEVENNET_HEAD = ("reduce_input_to_hidden", "reduce_hidden_to_energy", "rescale_atomic_energy")


class SevenNetReadout:
    """Trunk features and the pretrained linear readout of a SevenNet backbone."""

    def __init__(self, potential: Potential):
        modules = getattr(getattr(potential, "model", None), "_modules", {})
        if potential.backbone_name != "sevennet" or not all(m in modules for m in SEVENNET_HEAD):
            raise NotImplementedError(
                f"ensemble heads need a SevenNet backbone with readout {SEVENNET_HEAD}; "
                f"got {type(potential).__name__}")
        self.potential = potential
        type_map = potential.model.type_map  # atomic number -> species index
        table = torch.full((max(type_map) + 1,), -1, dtype=torch.int64)
        for z, idx in type_map.items():
            table[z] = idx
        self.type_table = table
        self.n_species = len(type_map)
        self.n_features = int(modules[SEVENNET_HEAD[0]].linear.irreps_in.dim)

    def species_index(self, numbers: torch.Tensor) -> torch.Tensor:
        return self.type_table.to(numbers.device)[numbers]

    def features(self, graph: Graph) -> torch.Tensor:
        """(n, F) scalar features entering the readout, differentiable in positions/strain."""
        import sevenn._keys as KEY

        pot = self.potential
        pot.check_species(graph.numbers)
        edge_index, vectors = pot.edges(graph)
        data = {KEY.NODE_FEATURE: graph.numbers, KEY.ATOMIC_NUMBERS: graph.numbers, KEY.EDGE_IDX: edge_index,
                KEY.EDGE_VEC: vectors, KEY.BATCH: graph.batch, KEY.NUM_ATOMS: graph.n_atoms}
        data = pot.model._preprocess(data)
        for name, module in pot.model._modules.items():
            if name == SEVENNET_HEAD[0]:
                break
            data = module(data)
        return data[KEY.NODE_FEATURE]

    @torch.no_grad()
    def pretrained_head(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(S, F) weights and (S,) shifts equal to the backbone's own readout.

        Read off by running the real modules on h = 0 and h = unit vectors for
        every species, so sevenn's weight layout and normalisation never matter.
        """
        import sevenn._keys as KEY

        modules = self.potential.model._modules
        dtype = self.potential.dtype
        F, S = self.n_features, self.n_species
        basis = torch.cat([torch.zeros(1, F, dtype=dtype), torch.eye(F, dtype=dtype)])  # (F+1, F)
        data = {KEY.NODE_FEATURE: basis.repeat(S, 1),
                KEY.ATOM_TYPE: torch.arange(S).repeat_interleave(F + 1)}
        for name in SEVENNET_HEAD:
            data = modules[name](data)
        out = data[KEY.ATOMIC_ENERGY].reshape(S, F + 1)
        shifts = out[:, 0]
        weights = out[:, 1:] - shifts[:, None]
        return weights.clone(), shifts.clone()
