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

from almd.potentials.e3nn_graphs import streamline
from almd.potentials.graph import Graph
from almd.potentials.potential import Potential, _top_module

__all__ = ["Mace", "MaceReadout", "small_random_mace"]


class Mace(Potential):
    backbone_name = "mace"

    def __init__(self, model: torch.nn.Module, streamlined: bool = True):
        super().__init__()
        if streamlined:  # e3nn's graphs without per-block slice gradients (almd.potentials.e3nn_graphs)
            streamline(model)
        self.model = model
        self.cutoff = float(model.r_max)
        self.species = tuple(int(z) for z in model.atomic_numbers)
        table = torch.full((119,), -1, dtype=torch.long)
        table[torch.as_tensor(self.species)] = torch.arange(len(self.species))
        self.register_buffer("z_to_index", table, persistent=False)

    @classmethod
    def from_file(cls, path: str, allow_pickle: bool = False, streamlined: bool = True) -> "Mace":
        """A MACE model file. MACE pickles the whole module, so reading it can run code:
        ``allow_pickle=True`` only for a file you trust (:func:`almd.potentials.files.read_payload`).
        """
        from almd.potentials.files import read_payload

        return cls(read_payload(path, allow_pickle), streamlined)

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


    # ---- backbone knowledge
    def readout(self) -> "MaceReadout":
        return MaceReadout(self)

    def add_energy_shifts(self, shifts: dict[int, float]) -> None:
        if not shifts:
            return
        e0 = self.model.atomic_energies_fn.atomic_energies  # E0 per element
        with torch.no_grad():
            for z, s in shifts.items():
                e0.view(-1, e0.shape[-1])[..., list(self.species).index(z)] += s

    def layer_group(self, name: str) -> str:
        # MACE: interactions.k / products.k are block k, readouts.* the readout
        top, parts = _top_module(name)
        if top in ("interactions", "products") and len(parts) > 2 and parts[2].isdigit():
            return f"block{parts[2]}"
        if top.startswith(("reduce_", "readout", "rescale")) or top == "readouts":
            return "readout"
        return "embedding"


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


def small_random_mace(species: list[int], cutoff: float = 4.0, seed: int = 0, channels: int = 8,
                      streamlined: bool = True) -> Mace:
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
    return Mace(model, streamlined)
