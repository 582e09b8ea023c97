"""Loss terms: energy per atom, forces, stress (MAE or Huber) and the stochastic Hessian column.

All derivatives come from almd.potentials.autodiff with ``create_graph=True``,
so the losses stay differentiable in the parameters; the Hessian-column term is
then third-order autograd.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from almd.finetune.data import Sample
from almd.potentials import (
    Potential,
    build_graph,
    energy_forces_stress,
    energy_forces_stress_hvp,
)

__all__ = ["counted_efs_terms", "counted_pft_terms", "efs_terms", "efs_validation", "hessian_term", "pft_terms",
           "wants_stress"]


def _graph(potential: Potential, samples: list[Sample], dtype: torch.dtype, mirrors: list[Sample] = ()):
    """One batch graph: the samples, then the mirror geometries of ``mirrors``."""
    return build_graph([s.atoms for s in samples] + [s.mirror for s in mirrors], potential.cutoff, dtype,
                       pairs=[s.pairs(potential.cutoff) for s in samples]
                       + [s.mirror_pairs(potential.cutoff) for s in mirrors])


def _penalty(diff: torch.Tensor, huber: float | None) -> torch.Tensor:
    if huber is None:
        return diff.abs().mean()
    return F.huber_loss(diff, torch.zeros_like(diff), delta=huber)


def efs_terms(potential: Potential, samples: list[Sample], dtype: torch.dtype,
              huber: float | None = None, create_graph: bool = True) -> dict[str, torch.Tensor]:
    """Per-term losses over the samples that carry each label.

    MAE form (PFT phonon batches): |ΔE|/N, mean over atoms of ‖ΔF‖₂, |Δσ|.
    Huber form (co-training): Huber(δ) of ΔE/N, of force and of stress components.
    """
    return counted_efs_terms(potential, samples, dtype, huber, create_graph)[0]


def counted_efs_terms(potential: Potential, samples: list[Sample], dtype: torch.dtype, huber: float | None = None,
                      create_graph: bool = True,
                      want_stress: bool | None = None) -> tuple[dict[str, torch.Tensor], dict[str, int]]:
    """:func:`efs_terms` and how many entries each term averages over (none for no samples).

    ``want_stress``: whether the batch has a stress term (default: :func:`wants_stress` of
    ``samples``; a slice of a larger batch takes the whole batch's answer).
    """
    if not samples:
        return {}, {}
    want_stress = wants_stress(samples) if want_stress is None else want_stress
    graph = _graph(potential, samples, dtype)
    out = energy_forces_stress(potential, graph, forces=True, stress=want_stress, create_graph=create_graph)
    return _efs_from(out, samples, dtype, huber, want_stress)


def efs_validation(potential: Potential, sample: Sample,
                   dtype: torch.dtype) -> tuple[dict[str, torch.Tensor], np.ndarray]:
    """:func:`efs_terms` of one sample (MAE form, no parameter graph) and the model's forces on it
    (n, 3), from the one forward and backward.
    """
    want_stress = wants_stress([sample])
    out = energy_forces_stress(potential, _graph(potential, [sample], dtype), forces=True, stress=want_stress)
    return _efs_from(out, [sample], dtype, None, want_stress)[0], out["forces"].detach().double().numpy()


def wants_stress(samples: list[Sample]) -> bool:
    """Whether a batch has a stress term: some sample carries a stress label and every cell is periodic."""
    return any(s.stress is not None for s in samples) and all(s.atoms.pbc.all() for s in samples)


def _efs_from(out: dict[str, torch.Tensor], samples: list[Sample], dtype: torch.dtype, huber: float | None,
              want_stress: bool) -> tuple[dict[str, torch.Tensor], dict[str, int]]:
    """The terms, and how many entries each averages over (to merge terms of two batches exactly)."""
    terms: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}
    idx = [k for k, s in enumerate(samples) if s.energy is not None]
    if idx:
        n = torch.as_tensor([len(samples[k].atoms) for k in idx], dtype=dtype)
        target = torch.as_tensor([samples[k].energy for k in idx], dtype=dtype)
        terms["energy"] = _penalty((out["energy"][idx] - target) / n, huber)
        counts["energy"] = len(idx)
    start, pred, ref = 0, [], []
    for s in samples:
        n = len(s.atoms)
        if s.forces is not None:
            pred.append(out["forces"][start:start + n])
            ref.append(torch.as_tensor(s.forces, dtype=dtype))
        start += n
    if pred:
        diff = torch.cat(pred) - torch.cat(ref)
        if huber is None:
            # ‖ΔF‖₂ per atom; the tiny floor keeps the gradient finite at ΔF = 0
            terms["forces"] = torch.sqrt((diff**2).sum(-1) + 1e-20).mean()
        else:
            terms["forces"] = _penalty(diff, huber)
        counts["forces"] = diff.shape[0] if huber is None else diff.numel()
    idx = [k for k, s in enumerate(samples) if s.stress is not None]
    if idx and want_stress:
        target = torch.as_tensor(np.stack([samples[k].stress for k in idx]), dtype=dtype)
        terms["stress"] = _penalty(out["stress"][idx] - target, huber)
        counts["stress"] = target.numel()
    return terms, counts


def pft_terms(potential: Potential, samples: list[Sample], columns: list[int | None], dtype: torch.dtype,
              create_graph: bool = True) -> dict[str, torch.Tensor]:
    """The EFS terms (MAE form) and the Hessian-column term of one batch.

    ``columns[k]`` is the Hessian column drawn for sample k (None: no Hessian
    term for it). Equal to :func:`efs_terms` plus :func:`hessian_term`, but
    the structures with a column get their EFS terms from the same forward as
    the column; the others go through a plain EFS pass, because carrying them
    through the Hessian-vector product would make the costly third-order
    backward cross them too.
    """
    return counted_pft_terms(potential, samples, columns, dtype, create_graph)[0]


def counted_pft_terms(potential: Potential, samples: list[Sample], columns: list[int | None], dtype: torch.dtype,
                      create_graph: bool = True,
                      want_stress: bool | None = None) -> tuple[dict[str, torch.Tensor], dict[str, int]]:
    """:func:`pft_terms` and how many entries (atoms, structures, columns) each term averages over
    (``want_stress`` as for :func:`counted_efs_terms`).
    """
    with_column = [k for k, j in enumerate(columns) if j is not None]
    phonon = [samples[k] for k in with_column]
    rest = [s for k, s in enumerate(samples) if columns[k] is None]
    want_stress = wants_stress(samples) if want_stress is None else want_stress
    terms, counts, errors, odd_errors = {}, {}, [], []
    if phonon:
        # third-order samples bring their mirror geometry x − u into the same HVP (after
        # the samples, so the EFS terms read the samples' rows as before)
        mirrored = [k for k, s in enumerate(phonon) if s.mirror is not None]
        graph = _graph(potential, phonon, dtype, [phonon[k] for k in mirrored])
        vectors = torch.zeros_like(graph.positions)
        flat, start, picked = vectors.view(-1), 0, []
        for s, k in zip(phonon, with_column):
            flat[3 * start + columns[k]] = 1.0
            picked.append([start, s, columns[k], None])
            start += len(s.atoms)
        for k in mirrored:
            flat[3 * start + picked[k][2]] = 1.0
            picked[k][3] = start
            start += len(phonon[k].atoms)
        out = energy_forces_stress_hvp(potential, graph, vectors, stress=want_stress, create_graph=create_graph)
        terms, counts = _efs_from(out, phonon, dtype, None, want_stress)
        hv = out["hessian_vector"].reshape(-1)
        for a, s, j, m in picked:
            column = hv[3 * a:3 * (a + len(s.atoms))]
            if m is not None:  # the odd part (H(x+u) − H(x−u))/2 = Φ3·u + O(u³)
                column = 0.5 * (column - hv[3 * m:3 * (m + len(s.atoms))])
            error = (column - torch.as_tensor(s.hessian[:, j], dtype=dtype)).abs().mean()
            (errors if m is None else odd_errors).append(error)
    if rest:
        graph = _graph(potential, rest, dtype)
        out = energy_forces_stress(potential, graph, forces=True, stress=want_stress, create_graph=create_graph)
        more, more_counts = _efs_from(out, rest, dtype, None, want_stress)
        for key, value in more.items():  # the mean over the whole batch, as one pass would give
            n0, n1 = counts.get(key, 0), more_counts[key]
            terms[key] = value if n0 == 0 else (terms[key] * n0 + value * n1) / (n0 + n1)
            counts[key] = n0 + n1
    if errors:
        terms["hessian"], counts["hessian"] = torch.stack(errors).mean(), len(errors)
    if odd_errors:  # its own term: it is ~u·Φ3, orders of magnitude below a harmonic column
        terms["third_order"], counts["third_order"] = torch.stack(odd_errors).mean(), len(odd_errors)
    return terms, counts


def hessian_term(potential: Potential, samples: list[Sample], columns: list[int], dtype: torch.dtype,
                 create_graph: bool = True) -> torch.Tensor:
    """MAE between model and reference Hessian column ``columns[k]`` of each structure k.

    One HVP with a one-hot vector per structure gives every structure's column at
    once (the batch Hessian is block-diagonal).
    """
    return pft_terms(potential, samples, list(columns), dtype, create_graph)["hessian"]
