"""Data-parallel fine-tuning: the ranks of a communicator share every batch.

Every rank holds the whole training set and draws the same global batch (the
trainer's random stream is seeded alike on every rank); each computes the loss
terms of its own slice of the batch. A term that averages over n entries of a
global N (atoms for forces, structures for energies, columns for the Hessian)
enters a rank's loss weighted n / N, so the gradients summed over the ranks are
the gradient of the global batch's loss. The sum is formed on rank 0 and
broadcast: every rank then steps with the same bits, whatever the reduction
tree of the MPI library would have done.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

__all__ = ["DataParallel"]


class DataParallel:
    """The ranks of ``comm`` (an mpi4py communicator) sharing each fine-tuning batch."""

    def __init__(self, comm: Any) -> None:
        self.comm = comm
        self.size, self.rank = comm.size, comm.rank

    def mine(self, items: Sequence[Any]) -> list[Any]:
        """The slice of a global batch this rank takes: every ``size``-th item, from its rank on."""
        return list(items[self.rank::self.size])

    def combine(self, terms: dict[str, torch.Tensor],
                counts: dict[str, int]) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
        """The terms of this rank, weighted by its share of each global count (to differentiate), and
        the global terms' values (to report; the same floats on every rank).
        """
        parts = self.comm.allgather((dict(counts), {k: float(v.detach()) for k, v in terms.items()}))
        total: dict[str, int] = {}
        for part_counts, _ in parts:
            for k, n in part_counts.items():
                total[k] = total.get(k, 0) + n
        weighted = {k: v * (counts[k] / total[k]) for k, v in terms.items()}
        values = {k: sum(v[k] * c[k] / total[k] for c, v in parts if k in v) for k in total}
        return weighted, values

    def gather(self, mine: dict[int, Any], n: int) -> list[Any]:
        """Items 0..n-1, each computed on one rank (``mine``: index → value), on every rank."""
        merged: dict[int, Any] = {}
        for part in self.comm.allgather(mine):
            merged.update(part)
        return [merged[i] for i in range(n)]

    def sum_gradients(self, params: Sequence[torch.nn.Parameter]) -> None:
        """Replace every parameter's gradient by its sum over the ranks (rank 0's sum, on every rank).

        A parameter no rank has a gradient for keeps none: AdamW then leaves it alone,
        as it would in one process (a zero gradient would still decay it).
        """
        used = [any(flags) for flags in zip(*self.comm.allgather([p.grad is not None for p in params]))]
        params = [p for p, u in zip(params, used) if u]
        if not params:
            return
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        local = torch.cat([g.detach().reshape(-1) for g in grads]).numpy()
        summed = np.empty_like(local)
        self.comm.Reduce(local, summed, root=0)
        self.comm.Bcast(summed, root=0)
        start = 0
        for p in params:
            n = p.numel()
            p.grad = torch.from_numpy(summed[start:start + n].copy()).view_as(p)
            start += n

    def total(self, value: float) -> float:
        """The sum of a float over the ranks, added in rank order (the same on every rank)."""
        return float(sum(self.comm.allgather(float(value))))
