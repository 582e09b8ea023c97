"""Model files: load and save with a format registry.

``load(model)`` gives a :class:`Potential` from a pretrained name (``sevennet-0``),
a sevenn checkpoint, a MACE model file, or any almd file whose ``format`` is
registered. almd's own potential format is registered here; higher layers register
theirs (the ensemble: ``almd-ensemble-1``) with :func:`register_format`, so this
layer never imports them.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from almd.io import atomic_write_with
from almd.potentials.potential import Potential

__all__ = ["FORMAT", "atomic_torch_save", "backbone_from_export", "load", "register_format", "save"]

FORMAT = "almd-potential-1"

#: file format name -> loader(path, payload) of a Potential
_FORMATS: dict[str, Callable[[str, dict], Potential]] = {}


def register_format(name: str, loader: Callable[[str, dict], Potential]) -> None:
    """Let :func:`load` read files whose payload says ``format = name``."""
    _FORMATS[name] = loader


def _backbone_classes() -> dict[str, type[Potential]]:
    from almd.potentials.mace import Mace
    from almd.potentials.sevennet import SevenNet

    return {"sevennet": SevenNet, "mace": Mace}


def backbone_from_export(payload: dict[str, Any], source: str = "payload") -> Potential:
    """The backbone that ``Potential.export()`` wrote into ``payload``."""
    classes = _backbone_classes()
    name = payload["backbone"]
    if name not in classes:
        raise ValueError(f"{source}: unknown backbone {name!r}; known: {', '.join(classes)}")
    return classes[name].from_export(payload)


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
    if isinstance(payload, dict) and payload.get("format") in _FORMATS:
        return _FORMATS[payload["format"]](name, payload)
    if isinstance(payload, dict) and str(payload.get("format", "")).startswith("almd-"):
        raise ValueError(f"{name}: format {payload['format']!r} is not registered here; "
                         "almd.load_model(path) reads every almd format")
    if isinstance(payload, dict) and "model_state_dict" in payload and "config" in payload:
        return SevenNet.from_checkpoint(name)  # a sevenn training checkpoint
    if isinstance(payload, torch.nn.Module) and hasattr(payload, "atomic_energies_fn"):
        from almd.potentials.mace import Mace

        return Mace(payload)
    raise ValueError(f"{name}: not an almd, sevenn or MACE model file")


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> Path:
    """``torch.save`` that never leaves a half-written file: temp file, fsync, rename."""
    return atomic_write_with(path, lambda fh: torch.save(obj, fh))


def save(potential: Potential, path: str | os.PathLike, **metadata: Any) -> Path:
    """Write ``potential`` so that ``load(path)`` (and ``almd.Calculator(model=path)``) rebuilds it (atomically)."""
    return atomic_torch_save({"format": FORMAT, **potential.export(), "metadata": metadata}, path)


register_format(FORMAT, lambda name, payload: backbone_from_export(payload, name))
