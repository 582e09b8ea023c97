"""SevenNet backbone: sevenn's pretrained E(3)-equivariant GNN driven by almd's graph.

sevenn's own calculator differentiates with respect to edge vectors built in
numpy, which gives forces but no Hessian. Here its ``force_output`` module is
removed and the edge vectors come from almd's graph (positions and strain in
autograd), so every derivative is available.
"""

from __future__ import annotations

import copy
import os
import re

import torch

from almd.potentials.e3nn_graphs import streamline
from almd.potentials.graph import Graph
from almd.potentials.potential import Potential, _top_module

__all__ = ["PRETRAINED", "SevenNet", "SEVENNET_HEAD", "SevenNetReadout"]

#: SevenNet's readout modules, in order
SEVENNET_HEAD = ("reduce_input_to_hidden", "reduce_hidden_to_energy", "rescale_atomic_energy")

PRETRAINED = ("sevennet-0", "7net-0", "sevennet-0_11jul2024", "sevennet-0_22may2024", "sevennet-l3i5",
              "sevennet-mf-0", "sevennet-omat")


class _TypedOneHot(torch.nn.Module):
    """sevenn's one-hot embedding always emits float32; follow the model's dtype instead."""

    def __init__(self, inner: torch.nn.Module):
        super().__init__()
        self.inner = inner
        self.register_buffer("dtype_probe", torch.zeros(()), persistent=False)

    def forward(self, data: dict) -> dict:
        data = self.inner(data)
        for key in {self.inner.key_output, self.inner.key_additional_output} - {None}:
            data[key] = data[key].to(self.dtype_probe.dtype)
        return data


def _keys():
    import sevenn._keys as KEY

    return KEY


class SevenNet(Potential):
    backbone_name = "sevennet"

    def __init__(self, config: dict, state_dict: dict | None = None, streamlined: bool = True):
        super().__init__()
        from sevenn.model_build import build_E3_equivariant_model

        config = copy.deepcopy(config)
        modality = config.pop("_almd_modality", None)  # almd's own key: sevenn's builder never sees it
        config["_flash_lammps"] = False
        model = build_E3_equivariant_model(config)
        if state_dict is not None:
            model.load_state_dict(state_dict, strict=True)
        for name in ("force_output", "reduce_total_enegy"):
            if name in model._modules:
                model.delete_module_by_key(name)
        model.replace_module("onehot_idx_to_onehot", _TypedOneHot(model._modules["onehot_idx_to_onehot"]))
        model.key_grad = None  # almd differentiates w.r.t. positions, not edge vectors
        self.modality = None
        if getattr(model, "modal_map", None):  # multi-fidelity (SevenNet-MF-0): one fixed modality
            self.modality = modality or "PBE"  # SevenNet-MF-0: the PBE (Materials Project) fidelity
            if self.modality not in model.modal_map:
                raise ValueError(f"modality {self.modality!r} not in this model's {sorted(model.modal_map)}")
            model.eval_modal_map = False  # almd gives the modality index itself (sevenn's reads .x off a data object)
            self.modal_index = int(model.modal_map[self.modality])
        model.set_is_batch_data(True)
        if streamlined:  # e3nn's graphs without per-block slice gradients (almd.potentials.e3nn_graphs)
            streamline(model)
        self.model = model
        self.config = config
        self.cutoff = float(config["cutoff"])
        self.species = tuple(int(z) for z in model.type_map)

    @classmethod
    def from_checkpoint(cls, name_or_path: str | os.PathLike, streamlined: bool = True) -> "SevenNet":
        """A pretrained name (``sevennet-0``) or a sevenn checkpoint file (``streamlined``: see ``__init__``)."""
        from sevenn import util

        cp = util.load_checkpoint(str(name_or_path))
        base = cp.build_model()  # applies sevenn's state-dict compatibility patches
        return cls(cp.config, base.state_dict(), streamlined)

    def atomic_energies(self, graph: Graph, edge_index: torch.Tensor, edge_vectors: torch.Tensor) -> torch.Tensor:
        KEY = _keys()
        data = {
            KEY.NODE_FEATURE: graph.numbers,
            KEY.ATOMIC_NUMBERS: graph.numbers,
            KEY.EDGE_IDX: edge_index,
            KEY.EDGE_VEC: edge_vectors,
            KEY.BATCH: graph.batch,
            KEY.NUM_ATOMS: graph.n_atoms,
        }
        if self.modality is not None:  # one modality index per structure of the batch
            data[KEY.MODAL_TYPE] = self.modal_types(graph.n_structures, graph.numbers.device)
        out = self.model(data)
        return out[KEY.ATOMIC_ENERGY].squeeze(-1)

    def compiled(self) -> "SevenNet":
        """See :meth:`Potential.compiled`: sevenn's network through inductor, shapes dynamic
        (atom and edge counts change from call to call without a recompile).
        """
        twin = copy.copy(self)
        twin._modules = {**self._modules, "model": torch.compile(self.model, dynamic=True)}
        return twin

    def export(self) -> dict:
        # deep-copied sevenn models carry fx-codegen constants that a fresh build lacks
        sd = {k: v for k, v in self.model.state_dict().items() if "._tensor_constant" not in k}
        config = {**self.config, **({"_almd_modality": self.modality} if self.modality else {})}
        return {"backbone": self.backbone_name, "config": config, "state_dict": sd}

    @classmethod
    def from_export(cls, payload: dict) -> "SevenNet":
        return cls(payload["config"], payload["state_dict"])

    # ---- backbone knowledge
    def readout(self) -> "SevenNetReadout":
        return SevenNetReadout(self)

    def modal_types(self, n_structures: int, device: torch.device) -> torch.Tensor | None:
        """The modality index of each structure (multi-fidelity models), else None."""
        if self.modality is None:
            return None
        return torch.full((int(n_structures),), self.modal_index, dtype=torch.int64, device=device)

    def add_energy_shifts(self, shifts: dict[int, float]) -> None:
        if not shifts:
            return
        shift = self.model._modules["rescale_atomic_energy"].shift  # E_i = scale·x + shift[type]
        if shift.numel() == 1:
            raise ValueError("this SevenNet model has one shared energy shift; per-element shifts need one per type")
        with torch.no_grad():
            for z, s in shifts.items():
                if shift.dim() == 2:  # multi-fidelity: one row of shifts per modality
                    shift[self.modal_index, self.model.type_map[z]] += s
                else:
                    shift[self.model.type_map[z]] += s

    def layer_group(self, name: str) -> str:
        # sevenn names its modules <k>_<layer> for interaction block k
        top, _ = _top_module(name)
        m = re.match(r"^(\d+)_", top)
        if m:
            return f"block{m.group(1)}"
        if top.startswith(("reduce_", "readout", "rescale")) or top == "readouts":
            return "readout"
        return "embedding"


class SevenNetReadout:
    """Trunk features and the pretrained linear readout of a SevenNet backbone.

    SevenNet-0's readout after the last interaction block is
    ``reduce_input_to_hidden`` (128→64, no bias) → ``reduce_hidden_to_energy``
    (64→1, no bias) → ``rescale_atomic_energy`` (per-species scale and shift):
    no nonlinearity, so per atom E_i = W[z_i]·h_i + b[z_i] exactly, with h_i the
    128 scalar features of the trunk. Members are then (W, b) pairs; the
    trunk and its backward are the only costly parts.
    """

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
        head = modules[SEVENNET_HEAD[0]]
        # a multi-fidelity head also reads the modality's one-hot, appended by the head itself
        self.n_features = int(getattr(head, "_irreps_in_wo_modal", head.linear.irreps_in).dim)

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
        modal = pot.modal_types(graph.n_structures, graph.numbers.device)
        if modal is not None:
            data[KEY.MODAL_TYPE] = modal
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
        modal = self.potential.modal_types(1, basis.device)
        if modal is not None:  # the head of this model's modality: every probe row is structure 0
            onehot = torch.nn.functional.one_hot(modal, len(self.potential.model.modal_map)).to(dtype)
            data.update({KEY.MODAL_TYPE: modal, KEY.MODAL_ATTR: onehot,
                         KEY.BATCH: torch.zeros(S * (F + 1), dtype=torch.int64)})
        for name in SEVENNET_HEAD:
            data = modules[name](data)
        out = data[KEY.ATOMIC_ENERGY].reshape(S, F + 1)
        shifts = out[:, 0]
        weights = out[:, 1:] - shifts[:, None]
        return weights.clone(), shifts.clone()
