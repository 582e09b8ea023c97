"""The torch side of almd: graphs, backbones, and the one autodiff module.

``load(model)`` gives a :class:`Potential` from a pretrained name (``sevennet-0``),
a sevenn checkpoint, a MACE model file, or a file written by :func:`save`.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch

from almd.potentials.autodiff import (
    energy_forces_stress,
    energy_forces_stress_hvp,
    hessian,
    hessian_vector_product,
    hessian_vector_products,
)
from almd.potentials.graph import Graph, build_graph, neighbor_pairs
from almd.potentials.potential import Potential, UnknownElementError

__all__ = [
    "Graph", "Potential", "UnknownElementError", "build_graph", "neighbor_pairs",
    "atomic_torch_save", "energy_forces_stress", "energy_forces_stress_hvp", "hessian", "hessian_vector_product", "hessian_vector_products", "load", "save",
]

FORMAT = "almd-potential-1"


def _backbones() -> dict:
    from almd.potentials.mace import Mace
    from almd.potentials.sevennet import SevenNet

    return {"sevennet": SevenNet, "mace": Mace}


def load(model: str | os.PathLike | Potential = "sevennet-0") -> Potential:
    """A :class:`Potential` from a name or a file (see module docstring)."""
    if isinstance(model, Potential):
        return model
    from almd.potentials.sevennet import PRETRAINED, SevenNet

    name = str(model)
    if not Path(name).is_file():
        if name.lower() in PRETRAINED:
            return SevenNet.from_checkpoint(name)
        raise FileNotFoundError(
            f"model {name!r} is neither a file nor a known pretrained model; known: {', '.join(PRETRAINED)}"
        )
    payload = torch.load(name, map_location="cpu", weights_only=False)
    if isinstance(payload, dict) and payload.get("format") == FORMAT:
        backbone = payload["backbone"]
        classes = _backbones()
        if backbone not in classes:
            raise ValueError(f"{name}: unknown backbone {backbone!r}; known: {', '.join(classes)}")
        return classes[backbone].from_export(payload)
    if isinstance(payload, dict) and "model_state_dict" in payload and "config" in payload:
        return SevenNet.from_checkpoint(name)  # a sevenn training checkpoint
    if isinstance(payload, torch.nn.Module) and hasattr(payload, "atomic_energies_fn"):
        from almd.potentials.mace import Mace

        return Mace(payload)
    if isinstance(payload, dict) and payload.get("format") == "almd-ensemble-1":
        from almd.ensemble import Ensemble

        return Ensemble.load(name)
    raise ValueError(f"{name}: not an almd, sevenn or MACE model file")


def atomic_torch_save(obj, path: str | os.PathLike) -> Path:
    """``torch.save`` that never leaves a half-written file: temp file, fsync, rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            torch.save(obj, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def save(potential: Potential, path: str | os.PathLike, **metadata) -> Path:
    """Write ``potential`` so that ``load(path)`` (and ``almd.Calculator(model=path)``) rebuilds it (atomically)."""
    return atomic_torch_save({"format": FORMAT, **potential.export(), "metadata": metadata}, path)
