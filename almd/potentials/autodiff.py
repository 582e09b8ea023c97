"""Every derivative of the energy, for every backbone, in one place.

Forces F = -∂E/∂x, stress σ = (1/V)·∂E/∂ε (ASE's sign: positive is tensile),
Hessian-vector products H·v = ∂(∇E·v)/∂x, and full Hessians by batched HVPs.
With ``create_graph=True`` the results stay differentiable in the parameters,
which is what training on forces, stresses and Hessian columns needs.
"""

from __future__ import annotations

import torch

from almd.potentials.graph import Graph
from almd.potentials.potential import Potential

__all__ = [
    "energy_forces_stress", "energy_forces_stress_hvp", "hessian", "hessian_vector_product",
    "hessian_vector_products",
]


def energy_forces_stress(
    potential: Potential,
    graph: Graph,
    forces: bool = True,
    stress: bool = True,
    create_graph: bool = False,
) -> dict[str, torch.Tensor]:
    """Energies (b,), per-atom energies (n,), forces (n, 3) and stress (b, 3, 3) in eV/Å³."""
    stress = stress and bool(graph.pbc.all())
    graph.requires_grad_(positions=forces, strain=stress)
    energy, atomic = potential.forward_with_atomic(graph)
    out = {"energy": energy, "energies": atomic}
    inputs = [t for t, wanted in ((graph.positions, forces), (graph.strain, stress)) if wanted]
    if inputs:
        grads = torch.autograd.grad(energy.sum(), inputs, create_graph=create_graph)
        if forces:
            out["forces"] = -grads[0]
        if stress:
            out["stress"] = grads[-1] / graph.volumes()[:, None, None]
    return out


def hessian_vector_product(
    potential: Potential,
    graph: Graph,
    vectors: torch.Tensor,
    create_graph: bool = False,
) -> torch.Tensor:
    """H·v for an (n, 3) displacement field ``vectors`` (one per structure in the batch).

    The batch Hessian is block-diagonal, so one product gives each structure's own
    H·v; with one-hot ``vectors`` that is one Hessian column per structure.
    Returns (n, 3) in eV/Å² (times the units of ``vectors``).
    """
    graph.requires_grad_(positions=True, strain=False)
    energy = potential(graph)
    (gradient,) = torch.autograd.grad(energy.sum(), graph.positions, create_graph=True)
    (hv,) = torch.autograd.grad((gradient * vectors).sum(), graph.positions, create_graph=create_graph)
    return hv


def energy_forces_stress_hvp(
    potential: Potential,
    graph: Graph,
    vectors: torch.Tensor,
    stress: bool = True,
    create_graph: bool = False,
) -> dict[str, torch.Tensor]:
    """:func:`energy_forces_stress` and H·v from one forward pass.

    A PFT step needs both; the separate calls run the network and its first
    backward twice. Here the force graph is built once (``create_graph`` is
    always on for it, since H·v differentiates it again) and reused.
    """
    stress = stress and bool(graph.pbc.all())
    graph.requires_grad_(positions=True, strain=stress)
    energy, atomic = potential.forward_with_atomic(graph)
    inputs = [graph.positions] + ([graph.strain] if stress else [])
    grads = torch.autograd.grad(energy.sum(), inputs, create_graph=True)
    out = {"energy": energy, "energies": atomic, "forces": -grads[0]}
    if stress:
        out["stress"] = grads[1] / graph.volumes()[:, None, None]
    (out["hessian_vector"],) = torch.autograd.grad((grads[0] * vectors.to(grads[0].dtype)).sum(), graph.positions,
                                                   create_graph=create_graph)
    return out


def hessian_vector_products(potential: Potential, graph: Graph, vectors: torch.Tensor, chunk: int = 1) -> torch.Tensor:
    """H·v for a stack of ``k`` displacement fields ``vectors`` (k, n, 3) at one geometry.

    One forward and one gradient with ``create_graph``, then one second backward per
    vector. ``chunk > 1`` vmaps that many at once; on CPU that is slower than the loop
    (benchmarks/RESULTS.md), so the loop is the default.
    Returns (k, n, 3).
    """
    graph.requires_grad_(positions=True, strain=False)
    energy = potential(graph)
    (gradient,) = torch.autograd.grad(energy.sum(), graph.positions, create_graph=True)
    vectors = vectors.to(gradient.dtype)
    out = []
    for start in range(0, len(vectors), chunk):
        block = vectors[start:start + chunk]
        if chunk == 1:
            out.append(torch.autograd.grad(gradient, graph.positions, block[0], retain_graph=True)[0][None].detach())
            continue
        try:
            (hv,) = torch.autograd.grad(gradient, graph.positions, block, retain_graph=True, is_grads_batched=True)
        except RuntimeError:
            hv = torch.stack([torch.autograd.grad(gradient, graph.positions, v, retain_graph=True)[0] for v in block])
        out.append(hv.detach())
    return torch.cat(out)


def hessian(potential: Potential, graph: Graph, chunk: int = 1, symmetrize: bool = True) -> torch.Tensor:
    """Full (3n, 3n) Hessian of a single-structure graph, in eV/Å², no mass weighting."""
    if graph.n_structures != 1:
        raise ValueError("hessian() takes a graph of one structure; batch the columns instead")
    dim = graph.positions.numel()
    eye = torch.eye(dim, dtype=graph.positions.dtype, device=graph.positions.device).reshape(dim, -1, 3)
    h = hessian_vector_products(potential, graph, eye, chunk).reshape(dim, dim)
    # exact mixed partials commute; the computed ones only to round-off
    return 0.5 * (h + h.T) if symmetrize else h
