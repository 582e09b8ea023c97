"""ASE Atoms -> batched graph tensors with positions and strain in the autograd graph.

The neighbour list (vesin) gives integer data only: pairs (i, j) and cell
shifts S. Edge vectors are rebuilt in torch, r_ij = x_j - x_i + S·cell, from
*strained* positions and cell, so that one autodiff pass gives forces
(-∂E/∂x), stress ((1/V)·∂E/∂ε) and, by differentiating again, Hessians.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from ase import Atoms
from vesin import NeighborList

__all__ = ["build_graph", "Graph", "neighbor_pairs", "NeighborPairs"]


@dataclass
class NeighborPairs:
    """Pairs within ``cutoff`` of one structure: edges i -> j with integer cell shifts."""

    i: np.ndarray
    j: np.ndarray
    shifts: np.ndarray  # (n_edges, 3) integers


def neighbor_pairs(atoms: Atoms, cutoff: float) -> NeighborPairs:
    """Full neighbour list (both directions) of ``atoms`` within ``cutoff`` Å."""
    pbc = np.asarray(atoms.pbc, dtype=bool)
    positions = atoms.positions
    box = np.asarray(atoms.cell.array, dtype=float)
    if not pbc.any():
        box = np.zeros((3, 3))
    if pbc.any() and not pbc.all():
        periodic = pbc  # vesin >= 0.4 takes per-axis periodicity
    else:
        periodic = bool(pbc.all())
    nl = NeighborList(cutoff=cutoff, full_list=True)
    i, j, s = nl.compute(points=positions, box=box, periodic=periodic, quantities="ijS")
    return NeighborPairs(np.asarray(i, dtype=np.int64), np.asarray(j, dtype=np.int64),
                         np.asarray(s, dtype=np.int64).reshape(-1, 3))


@dataclass
class Graph:
    """A batch of structures as tensors.

    ``positions`` and ``strain`` are leaves that may require grad; everything the
    backbone sees (``edge_vectors`` and the strained ``cell``) is built from them.
    """

    numbers: torch.Tensor  # (n,) atomic numbers
    positions: torch.Tensor  # (n, 3) unstrained positions (leaf)
    cell: torch.Tensor  # (b, 3, 3) unstrained cells
    strain: torch.Tensor  # (b, 3, 3) symmetric-ised inside, zeros (leaf)
    batch: torch.Tensor  # (n,) structure index of each atom
    edge_index: torch.Tensor  # (2, e) src i, dst j
    shifts: torch.Tensor  # (e, 3) integer cell shifts (as float dtype)
    n_atoms: torch.Tensor  # (b,)
    pbc: torch.Tensor  # (b, 3) bool

    @property
    def n_structures(self) -> int:
        return int(self.cell.shape[0])

    @property
    def deformation(self) -> torch.Tensor:
        """(b, 3, 3) I + sym(ε); row-vector convention: x' = x·(I + ε)."""
        eps = 0.5 * (self.strain + self.strain.transpose(1, 2))
        return torch.eye(3, dtype=eps.dtype, device=eps.device) + eps

    def strained(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Strained positions (n, 3) and cells (b, 3, 3)."""
        f = self.deformation
        pos = torch.einsum("ni,nij->nj", self.positions, f[self.batch])
        cell = torch.bmm(self.cell, f)
        return pos, cell

    def edge_vectors(self) -> torch.Tensor:
        """(e, 3) r_ij = x_j - x_i + S·cell, differentiable in positions and strain."""
        pos, cell = self.strained()
        src, dst = self.edge_index
        edge_batch = self.batch[src]
        offsets = torch.einsum("ei,eij->ej", self.shifts, cell[edge_batch])
        return pos[dst] - pos[src] + offsets

    def volumes(self) -> torch.Tensor:
        return torch.linalg.det(self.cell).abs()

    def requires_grad_(self, positions: bool = True, strain: bool = True) -> "Graph":
        self.positions.requires_grad_(positions)
        self.strain.requires_grad_(strain)
        return self

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> "Graph":
        def f(t: torch.Tensor) -> torch.Tensor:
            return t.to(device=device, dtype=dtype) if t.is_floating_point() else t.to(device=device)

        return Graph(**{k: f(getattr(self, k)) for k in self.__dataclass_fields__})


def build_graph(
    structures: Atoms | list[Atoms],
    cutoff: float,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    pairs: list[NeighborPairs] | None = None,
) -> Graph:
    """Batch ``structures`` into one :class:`Graph`.

    ``pairs`` lets a caller reuse neighbour lists (e.g. built with a skin);
    edges are then filtered to ``cutoff`` by the backbone or the caller.
    """
    if isinstance(structures, Atoms):
        structures = [structures]
    if pairs is None:
        pairs = [neighbor_pairs(a, cutoff) for a in structures]
    numbers, positions, cells, batch, src, dst, shifts, pbcs = [], [], [], [], [], [], [], []
    offset = 0
    for k, (atoms, p) in enumerate(zip(structures, pairs)):
        n = len(atoms)
        numbers.append(atoms.numbers)
        positions.append(atoms.positions)
        cells.append(atoms.cell.array if atoms.pbc.any() else np.zeros((3, 3)))
        batch.append(np.full(n, k))
        src.append(p.i + offset)
        dst.append(p.j + offset)
        shifts.append(p.shifts)
        pbcs.append(atoms.pbc)
        offset += n

    def t(x, dt=dtype):
        return torch.as_tensor(np.concatenate(x) if isinstance(x, list) else x, dtype=dt, device=device)

    return Graph(
        numbers=t(numbers, torch.int64),
        positions=t(positions),
        cell=torch.as_tensor(np.stack(cells), dtype=dtype, device=device),
        strain=torch.zeros((len(structures), 3, 3), dtype=dtype, device=device),
        batch=t(batch, torch.int64),
        edge_index=torch.stack([t(src, torch.int64), t(dst, torch.int64)]),
        shifts=t(shifts),
        n_atoms=torch.as_tensor([len(a) for a in structures], device=device),
        pbc=torch.as_tensor(np.stack(pbcs), dtype=torch.bool, device=device),
    )
