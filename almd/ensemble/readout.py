"""Split a backbone into a shared trunk (run once) and a linear readout (per member).

Every backbone is written as per-atom E_i = W[z_i]·h_i + b[z_i] with h_i the
trunk's invariant features; members are (W, b) pairs. :func:`readout_for`
picks the split by backbone type.

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

__all__ = ["MaceReadout", "SevenNetReadout", "readout_for"]

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


class MaceReadout:
    """Trunk features and the pretrained linear readout of a MACE backbone.

    MACE sums one readout per interaction layer: a linear map of the layer's
    features (``LinearReadoutBlock``) and, last, a small MLP
    (``NonLinearReadoutBlock``: linear → gate → linear). Each readout's *final*
    linear map is linear in its input, so

        E_i = E0[z_i] + shift + scale·(Σ_l w_l·x_li + pair_i)

    with x_li the input of readout l's final linear map: layer l's features
    for a linear readout, the gated MLP activations for the last one. Only the
    scalar (0e) part of x_li enters (an equivariant map to an energy cannot
    use vectors), so h_i = [scalars of x_1i, …, x_Li, ρ_i] is invariant, and
    ρ_i — the rest of the backbone's atomic energy (ZBL pair repulsion, an
    embedding readout), computed as the exact difference — is one more
    feature with pretrained weight 1, so the pretrained head reproduces the
    backbone exactly whatever the model holds. Multi-head models use head 0,
    as :class:`~almd.potentials.mace.Mace` does.
    """

    def __init__(self, potential: Potential):
        model = getattr(potential, "model", None)
        readouts = getattr(model, "readouts", None)
        if potential.backbone_name != "mace" or readouts is None or not hasattr(model, "scale_shift"):
            raise NotImplementedError(f"MaceReadout needs a MACE (ScaleShiftMACE) backbone; got {type(potential).__name__}")
        self.potential = potential
        # the last linear map of each readout: its input is the feature vector we want
        self.final_linears = [r.linear_2 if hasattr(r, "linear_2") else r.linear for r in readouts]
        self.scalar_slices = []
        for lin in self.final_linears:
            irreps = lin.irreps_in
            self.scalar_slices.append([sl for (mul, ir), sl in zip(irreps, irreps.slices()) if ir.l == 0 and ir.p == 1])
        self.n_species = len(potential.species)
        w, b = self._probe()
        self.w_readout, self.b_readout = w, b  # (S, F-1), (S,): the readouts' own map, without ρ
        self.n_features = w.shape[1] + 1

    def species_index(self, numbers: torch.Tensor) -> torch.Tensor:
        return self.potential.z_to_index.to(numbers.device)[numbers]

    @torch.no_grad()
    def _probe(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Weights and shifts of Σ_l (final linear map of readout l), read off the real modules.

        Each final map is applied to 0 and to unit vectors on its scalar slots,
        so e3nn's weight layout and path normalisation never matter.
        """
        model, dtype = self.potential.model, self.potential.dtype
        scale = torch.atleast_1d(model.scale_shift.scale)[0].to(dtype)
        shift = torch.atleast_1d(model.scale_shift.shift)[0].to(dtype)
        columns = []
        for lin, slices in zip(self.final_linears, self.scalar_slices):
            dim = lin.irreps_in.dim
            zero = lin(torch.zeros(1, dim, dtype=dtype))[0, 0]
            for sl in slices:
                for j in range(sl.start, sl.stop):
                    unit = torch.zeros(1, dim, dtype=dtype)
                    unit[0, j] = 1.0
                    columns.append(lin(unit)[0, 0] - zero)
        weights = scale * torch.stack(columns)
        e0 = model.atomic_energies_fn(torch.eye(self.n_species, dtype=dtype))
        e0 = e0[:, 0] if e0.dim() == 2 else e0  # (S, heads) in multi-head MACE
        shifts = e0.to(dtype) + shift
        return weights.expand(self.n_species, -1).clone(), shifts.clone()

    def features(self, graph: Graph) -> torch.Tensor:
        """(n, F) invariant features [readout inputs' scalars, ρ], differentiable in positions/strain."""
        pot = self.potential
        pot.check_species(graph.numbers)
        captured: list[torch.Tensor] = []
        # temporary hooks: permanent ones would end up in deep copies and saved files
        hooks = [lin.register_forward_pre_hook(lambda module, args: captured.append(args[0]))
                 for lin in self.final_linears]
        try:
            edge_index, vectors = pot.edges(graph)
            atomic = pot.atomic_energies(graph, edge_index, vectors)
        finally:
            for hook in hooks:
                hook.remove()
        if len(captured) != len(self.final_linears):
            raise RuntimeError(f"expected {len(self.final_linears)} readout calls, saw {len(captured)}")
        h = torch.cat([x[:, sl] for x, slices in zip(captured, self.scalar_slices) for sl in slices], 1)
        types = self.species_index(graph.numbers)
        w, b = self.w_readout.to(h.dtype), self.b_readout.to(h.dtype)
        rest = atomic.to(h.dtype) - (h * w[types]).sum(-1) - b[types]
        return torch.cat([h, rest[:, None]], 1)

    @torch.no_grad()
    def pretrained_head(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(S, F) weights and (S,) shifts equal to the backbone's own readout (weight 1 on ρ)."""
        ones = torch.ones(self.n_species, 1, dtype=self.w_readout.dtype)
        return torch.cat([self.w_readout, ones], 1), self.b_readout.clone()


def readout_for(potential: Potential) -> SevenNetReadout | MaceReadout:
    """The trunk/readout split for this backbone type."""
    kinds = {"sevennet": SevenNetReadout, "mace": MaceReadout}
    if potential.backbone_name not in kinds:
        raise NotImplementedError(
            f"ensemble heads exist for backbones {', '.join(kinds)}; got {potential.backbone_name!r} "
            f"({type(potential).__name__})")
    return kinds[potential.backbone_name](potential)
