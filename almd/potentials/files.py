"""Model files: load and save with a format registry.

``load(model)`` gives a :class:`Potential` from a pretrained name (``sevennet-0``),
a sevenn checkpoint, a MACE model file, or any almd file whose ``format`` is
registered. almd's own potential format is registered here; higher layers register
theirs (the ensemble: ``almd-ensemble-1``) with :func:`register_format`, so this
layer never imports them.

Files are read with ``torch.load(weights_only=True)`` (:func:`read_payload`): tensors,
numbers, strings, lists, dicts and numpy arrays only, so a model file someone sends
you cannot run code when it is read. A file that needs full unpickling (a MACE model
file pickles the whole module, by MACE's convention, and so does an almd file with a
MACE backbone) is refused unless the caller passes ``allow_pickle=True``.
"""

from __future__ import annotations

import os
import pickle
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from almd.io import atomic_write_with
from almd.potentials.potential import Potential

__all__ = ["FORMAT", "UnsafeModelFile", "atomic_torch_save", "backbone_from_export", "load", "read_payload",
           "register_format", "save"]

FORMAT = "almd-potential-1"

#: file format name -> loader(path, payload) of a Potential
_FORMATS: dict[str, Callable[[str, dict], Potential]] = {}


class UnsafeModelFile(ValueError):
    """A model file that only full unpickling could read (and that could run code when read)."""


def _numpy_globals() -> list[Any]:
    """Numpy's array and dtype constructors: they build arrays from bytes and run no other code."""
    core = getattr(np, "_core", None) or np.core
    dtypes = [getattr(np.dtypes, name) for name in dir(np.dtypes) if name.endswith("DType")]
    return [core.multiarray._reconstruct, core.multiarray.scalar, np.ndarray, np.dtype, *dtypes]


def read_payload(path: str | os.PathLike, allow_pickle: bool = False) -> Any:
    """The object stored in a torch file, read without running code from it.

    Parameters
    ----------
    path
        A file written by ``torch.save``.
    allow_pickle
        Fall back to full unpickling when the weights-only reader refuses the file.
        Only for files you trust: unpickling can run any code the file holds.
    """
    try:
        with torch.serialization.safe_globals(_numpy_globals()):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        if allow_pickle:
            return torch.load(path, map_location="cpu", weights_only=False)
        reason = next((line.strip() for line in str(exc).splitlines() if "GLOBAL" in line or "got <" in line),
                      "it holds Python objects")
        raise UnsafeModelFile(
            f"{path}: refused, reading it would need full unpickling, which can run code ({reason}); "
            "pass allow_pickle=True only for a file you trust (a MACE model file, an almd file with a "
            "MACE backbone)") from None


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


def load(model: str | os.PathLike | Potential = "sevennet-0", allow_pickle: bool = False) -> Potential:
    """A :class:`Potential` from a name or a file (see module docstring; ``allow_pickle``: :func:`read_payload`)."""
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
    payload = read_payload(name, allow_pickle)
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
