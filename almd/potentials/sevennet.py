"""SevenNet backbone: sevenn's pretrained E(3)-equivariant GNN driven by almd's graph.

sevenn's own calculator differentiates with respect to edge vectors built in
numpy, which gives forces but no Hessian. Here its ``force_output`` module is
removed and the edge vectors come from almd's graph (positions and strain in
autograd), so every derivative is available.
"""

from __future__ import annotations

import copy
import os

import torch

from almd.potentials.graph import Graph
from almd.potentials.potential import Potential

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

    def __init__(self, config: dict, state_dict: dict | None = None):
        super().__init__()
        from sevenn.model_build import build_E3_equivariant_model

        config = copy.deepcopy(config)
        config["_flash_lammps"] = False
        model = build_E3_equivariant_model(config)
        if state_dict is not None:
            model.load_state_dict(state_dict, strict=True)
        for name in ("force_output", "reduce_total_enegy"):
            if name in model._modules:
                model.delete_module_by_key(name)
        model.replace_module("onehot_idx_to_onehot", _TypedOneHot(model._modules["onehot_idx_to_onehot"]))
        model.key_grad = None  # almd differentiates w.r.t. positions, not edge vectors
        model.set_is_batch_data(True)
        self.model = model
        self.config = config
        self.cutoff = float(config["cutoff"])
        self.species = tuple(int(z) for z in model.type_map)

    @classmethod
    def from_checkpoint(cls, name_or_path: str | os.PathLike) -> "SevenNet":
        """A pretrained name (``sevennet-0``) or a sevenn checkpoint file."""
        from sevenn import util

        cp = util.load_checkpoint(str(name_or_path))
        base = cp.build_model()  # applies sevenn's state-dict compatibility patches
        return cls(cp.config, base.state_dict())

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
        out = self.model(data)
        return out[KEY.ATOMIC_ENERGY].squeeze(-1)

    def export(self) -> dict:
        # deep-copied sevenn models carry fx-codegen constants that a fresh build lacks
        sd = {k: v for k, v in self.model.state_dict().items() if "._tensor_constant" not in k}
        return {"backbone": self.backbone_name, "config": self.config, "state_dict": sd}

    @classmethod
    def from_export(cls, payload: dict) -> "SevenNet":
        return cls(payload["config"], payload["state_dict"])
