"""Fine-tuning strategies as weight parametrisations: LoRA, delta, freezing, re-initialisation.

Every strategy rewrites *weights*, never activations: ``torch.nn.utils.parametrize``
replaces a parameter ``w`` by ``f(w₀)``, computed on every access. The backbones
(sevenn's and MACE's e3nn layers) read ``self.weight`` in their forward, so they
run unchanged, all derivatives (forces, stress, Hessian columns) still come from
:mod:`almd.potentials.autodiff`, and :func:`merge` folds ``f(w₀)`` back into
plain weights for :func:`almd.potentials.save`.

Equivariance. An e3nn ``o3.Linear`` stores one flat weight vector: for each irrep
path (l_in → l_out, same l and parity) a (mul_in × mul_out) block mixing
multiplicities only. LoRA here acts on those blocks one by one, ``ΔW_p = (α/r)·B_p·A_p``,
so the update has exactly the form of an e3nn weight and cannot break the
symmetry; a generic LoRA on 2-D ``nn.Linear`` weights would never touch these 1-D
tensors. The radial MLPs of the convolutions (e3nn ``FullyConnectedNet`` layers:
invariant in, invariant out) take an ordinary matrix LoRA.
"""

from __future__ import annotations

import math
import re

import torch
from torch import nn
from torch.nn.utils import parametrize

STRATEGIES = ("full", "lora", "delta", "freeze", "scratch")


# ---------------------------------------------------------------- parametrisations
class IrrepsLoRA(nn.Module):
    """w₀ + (α/r)·vec(B_p·A_p)ᵀ per irrep path of an e3nn ``o3.Linear`` (flat weight)."""

    def __init__(self, path_shapes: list[tuple[int, int]], rank: int, alpha: float,
                 dtype: torch.dtype, generator: torch.Generator | None = None):
        super().__init__()
        self.path_shapes = [tuple(int(s) for s in shape) for shape in path_shapes]
        self.ranks = [max(1, min(rank, m_in, m_out)) for m_in, m_out in self.path_shapes]
        self.scale = alpha / rank
        self.A = nn.ParameterList()
        self.B = nn.ParameterList()
        for (m_in, m_out), r in zip(self.path_shapes, self.ranks):
            # A random (Kaiming-like), B zero: the adapted model starts equal to the base
            a = torch.randn(r, m_in, generator=generator, dtype=torch.float64) / math.sqrt(m_in)
            self.A.append(nn.Parameter(a.to(dtype)))
            self.B.append(nn.Parameter(torch.zeros(m_out, r, dtype=dtype)))

    def delta(self) -> torch.Tensor:
        # e3nn's block is (mul_in, mul_out) = Wᵀ, so ΔWᵀ = (B·A)ᵀ = Aᵀ·Bᵀ
        return torch.cat([(a.T @ b.T).reshape(-1) for a, b in zip(self.A, self.B)]) * self.scale

    def forward(self, w0: torch.Tensor) -> torch.Tensor:
        return w0 + self.delta()


class MatrixLoRA(nn.Module):
    """w₀ + (α/r)·(B·A)ᵀ for a (h_in, h_out) matrix used as ``x @ w`` (e3nn FC layers)."""

    def __init__(self, shape: tuple[int, int], rank: int, alpha: float,
                 dtype: torch.dtype, generator: torch.Generator | None = None):
        super().__init__()
        h_in, h_out = shape
        r = max(1, min(rank, h_in, h_out))
        self.scale = alpha / rank
        a = torch.randn(r, h_in, generator=generator, dtype=torch.float64) / math.sqrt(h_in)
        self.A = nn.Parameter(a.to(dtype))
        self.B = nn.Parameter(torch.zeros(h_out, r, dtype=dtype))

    def delta(self) -> torch.Tensor:
        return (self.A.T @ self.B.T) * self.scale

    def forward(self, w0: torch.Tensor) -> torch.Tensor:
        return w0 + self.delta()


class Delta(nn.Module):
    """w₀ + Δw with Δw zero-initialised (Equitrain's ω = ω₀ + Δω)."""

    def __init__(self, like: torch.Tensor):
        super().__init__()
        self.delta = nn.Parameter(torch.zeros_like(like))

    def forward(self, w0: torch.Tensor) -> torch.Tensor:
        return w0 + self.delta


# ---------------------------------------------------------------- helpers
def _is_e3nn_linear(module: nn.Module) -> bool:
    return (type(module).__name__ == "Linear" and hasattr(module, "instructions")
            and getattr(module, "internal_weights", False) and getattr(module, "weight_numel", 0) > 0)


def _is_fc_layer(module: nn.Module) -> bool:
    # e3nn.nn._fc._Layer: the radial weight MLPs of sevenn's and MACE's convolutions
    w = getattr(module, "weight", None)
    return type(module).__name__ == "_Layer" and isinstance(w, torch.Tensor) and w.ndim == 2


def trainable_parameters(module: nn.Module) -> list[nn.Parameter]:
    return [p for p in module.parameters() if p.requires_grad]


def count_trainable(module: nn.Module) -> int:
    """Number of trainable scalars (after an adapter strategy was applied)."""
    return sum(p.numel() for p in trainable_parameters(module))


def delta_parameters(module: nn.Module) -> list[nn.Parameter]:
    """The trainable Δω tensors of the :class:`Delta` adapters (empty for other strategies)."""
    return [m.delta for m in module.modules() if isinstance(m, Delta) and m.delta.requires_grad]


def delta_sq_norm(module: nn.Module) -> torch.Tensor:
    """‖Δω‖²: the sum of squares over every trainable Δω (differentiable; 0 without Delta adapters)."""
    params = delta_parameters(module)
    if not params:
        return torch.zeros(())
    return sum((p * p).sum() for p in params)


def is_adapted(module: nn.Module) -> bool:
    return any(parametrize.is_parametrized(m) for m in module.modules())


# ---------------------------------------------------------------- strategies
def add_lora(potential: nn.Module, rank: int = 4, alpha: float | None = None,
             radial: bool = True, seed: int = 0) -> list[str]:
    """Freeze every weight and add LoRA adapters; returns the adapted module names.

    ``alpha`` defaults to ``rank`` (scale 1). ``radial`` also adapts the
    convolutions' radial MLPs. Only the adapters' A and B are trainable.
    """
    alpha = float(rank if alpha is None else alpha)
    if rank < 1:
        raise ValueError(f"LoRA rank must be >= 1, got {rank}")
    gen = torch.Generator().manual_seed(seed)
    for p in potential.parameters():
        p.requires_grad_(False)
    adapted = []
    for name, module in list(potential.named_modules()):
        if _is_e3nn_linear(module):
            shapes = [tuple(ins.path_shape) for ins in module.instructions]
            lora = IrrepsLoRA(shapes, rank, alpha, module.weight.dtype, gen)
        elif radial and _is_fc_layer(module):
            lora = MatrixLoRA(tuple(module.weight.shape), rank, alpha, module.weight.dtype, gen)
        else:
            continue
        parametrize.register_parametrization(module, "weight", lora)
        module.parametrizations["weight"].original.requires_grad_(False)
        adapted.append(name)
    if not adapted:
        raise ValueError(f"{type(potential).__name__}: no e3nn Linear or radial MLP layer to adapt")
    return adapted


def add_delta(potential: nn.Module) -> list[str]:
    """ω = ω₀ + Δω for every trainable parameter; ω₀ frozen, Δω trainable (zero).

    Weight decay on the optimiser then acts on Δω only: it pulls the model back
    towards the pretrained one instead of towards zero. AdamW's decoupled decay
    moves Δω by only lr·wd per step, though, so over a fine-tuning budget delta
    trains like full; the fine-tuner adds an explicit λ_Δ·‖Δω‖² to the loss
    (``optim.delta_l2``, :func:`delta_sq_norm`) to make the pull count.
    """
    targets = [(mname, module, pname)
               for mname, module in potential.named_modules()
               for pname, p in list(module.named_parameters(recurse=False)) if p.requires_grad]
    for p in potential.parameters():
        p.requires_grad_(False)
    names = []
    for mname, module, pname in targets:
        if parametrize.is_parametrized(module, pname):
            continue
        parametrize.register_parametrization(module, pname, Delta(getattr(module, pname)))
        module.parametrizations[pname].original.requires_grad_(False)
        names.append(f"{mname}.{pname}" if mname else pname)
    return names


def layer_groups(potential: nn.Module) -> dict[str, list[str]]:
    """Parameter names by layer group: ``embedding``, ``block0``…``blockK``, ``readout``
    (the backbone's own :meth:`~almd.potentials.Potential.layer_groups`).
    """
    return potential.layer_groups()


def freeze(potential: nn.Module, groups: list[str] | tuple[str, ...]) -> list[str]:
    """Stop training the named layer groups (see :func:`layer_groups`); returns frozen names."""
    known = layer_groups(potential)
    unknown = [g for g in groups if g not in known]
    if unknown:
        raise ValueError(f"unknown layer group(s) {unknown}; this model has: {', '.join(known)}")
    params = dict(potential.named_parameters())
    frozen = []
    for g in groups:
        for name in known[g]:
            params[name].requires_grad_(False)
            frozen.append(name)
    return frozen


def reinitialize(potential: nn.Module, seed: int = 0) -> int:
    """From-scratch baseline: redraw every trainable weight as e3nn does (N(0, 1)).

    e3nn layers normalise by fan-in inside the forward, so unit normals are their
    own initialisation. Non-weight parameters (radial basis frequencies, sevenn's
    scale/shift) keep their values: they set units, not learned features.
    Returns the number of re-drawn scalars.
    """
    gen = torch.Generator().manual_seed(seed)
    n = 0
    with torch.no_grad():
        for name, p in potential.named_parameters():
            if p.requires_grad and re.search(r"(weight|weights|weights_max|weights\.\d+)$", name):
                p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float64).to(p.dtype))
                n += p.numel()
    return n


def apply_strategy(potential: nn.Module, strategy: str = "full", *, rank: int = 4,
                   alpha: float | None = None, radial: bool = True,
                   frozen_groups: tuple[str, ...] | list[str] = (), seed: int = 0) -> nn.Module:
    """Prepare ``potential`` in place for fine-tuning with one of :data:`STRATEGIES`.

    full: every parameter (minus ``frozen_groups``); lora / delta: adapters on a
    frozen base; freeze: ``frozen_groups`` frozen, the rest trained; scratch:
    full training from re-initialised weights.
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown strategy {strategy!r}; allowed: {', '.join(STRATEGIES)}")
    if strategy == "freeze" and not frozen_groups:
        raise ValueError(f"strategy 'freeze' needs frozen groups; this model has: {', '.join(layer_groups(potential))}")
    if strategy == "scratch":
        reinitialize(potential, seed)
    if frozen_groups:
        freeze(potential, list(frozen_groups))
    if strategy == "lora":
        add_lora(potential, rank=rank, alpha=alpha, radial=radial, seed=seed)
    elif strategy == "delta":
        add_delta(potential)
    if count_trainable(potential) == 0:
        raise ValueError("no trainable parameters left after freezing")
    return potential


def merge(potential: nn.Module) -> nn.Module:
    """Fold every adapter into plain weights (in place) and return the model.

    Afterwards the state dict has the backbone's own keys again, so
    :func:`almd.potentials.save` writes a file ``almd.Calculator(model=PATH)`` loads.
    """
    for module in potential.modules():
        if parametrize.is_parametrized(module):
            for name in list(module.parametrizations.keys()):
                parametrize.remove_parametrizations(module, name, leave_parametrized=True)
    return potential


__all__ = [
    "STRATEGIES", "IrrepsLoRA", "MatrixLoRA", "Delta", "add_lora", "add_delta", "apply_strategy",
    "count_trainable", "delta_parameters", "delta_sq_norm", "freeze", "is_adapted", "layer_groups", "merge",
    "reinitialize", "trainable_parameters",
]
