"""The ASE plug-in: ``almd.Calculator``.

Works unchanged in ASE dynamics, optimisers and phonopy. Beyond ASE's
``energy``, ``free_energy``, ``energies``, ``forces`` and ``stress`` it gives the
Hessian, ``calc.get_hessian(atoms)``, by automatic differentiation.

Whatever property is asked for, one forward and one backward give them all
(the stress of a periodic cell included) and ``results`` caches them, so ASE's
``get_forces()`` followed by ``get_stress()`` runs the model once.

MD calls move atoms a little each step, so the neighbour list is built with a
skin and reused until some atom has moved more than half the skin, less what a
change of the cell (NPT) uses up (:meth:`NeighborCache._valid`), or the numbers or pbc
change; pairs beyond the cutoff are dropped in torch.
"""

from __future__ import annotations

import os

import numpy as np
import torch
from ase import Atoms
from ase.calculators.calculator import Calculator as AseCalculator
from ase.calculators.calculator import all_changes
from ase.stress import full_3x3_to_voigt_6_stress

from almd import potentials
from almd.potentials import Potential, build_graph, neighbor_pairs
from almd.potentials.graph import NeighborPairs

__all__ = ["Calculator", "DTYPES", "NeighborCache"]

DTYPES = {"float32": torch.float32, "float64": torch.float64}


class NeighborCache:
    """A neighbour list with a skin, rebuilt only when it can have become wrong.

    Each call hands out the pairs within the cutoff *now*, in a canonical order
    (by i, j, shift). The model then sees the same graph whatever the list's
    build history, so an MD run restarted from a checkpoint repeats the
    uninterrupted one bit for bit, and pairs inside the skin cost nothing.
    """

    def __init__(self, cutoff: float, skin: float):
        self.cutoff, self.skin = cutoff, skin
        self.pairs: NeighborPairs | None = None
        self._reference: Atoms | None = None
        self.builds = 0

    def get(self, atoms: Atoms) -> NeighborPairs:
        if not self._valid(atoms):
            self.pairs = neighbor_pairs(atoms, self.cutoff + self.skin)
            self._reference = atoms.copy()
            self.builds += 1
        p = self.pairs
        vectors = atoms.positions[p.j] - atoms.positions[p.i] + p.shifts @ atoms.cell.array
        inside = np.flatnonzero((vectors**2).sum(1) < self.cutoff**2)
        order = inside[np.lexsort((p.shifts[inside, 2], p.shifts[inside, 1], p.shifts[inside, 0],
                                   p.j[inside], p.i[inside]))]
        return NeighborPairs(p.i[order], p.j[order], p.shifts[order])

    def _valid(self, atoms: Atoms) -> bool:
        """Whether every pair now within the cutoff is in the list (built with cutoff + skin).

        A pair vector moves from d to d·M + (Δs_j − Δs_i)·C, with C the cell now, M = C_ref⁻¹·C
        and Δs an atom's change in fractional coordinates; so no pair can have come in from
        beyond cutoff + skin while 2·max|Δs·C| + (cutoff + skin)·‖M − 1‖₂ < skin. Without a
        cell change that is the usual half-skin rule; with one (NPT) the list survives small strains.
        """
        ref = self._reference
        if ref is None or len(ref) != len(atoms):
            return False
        if not (np.array_equal(ref.numbers, atoms.numbers) and np.array_equal(ref.pbc, atoms.pbc)):
            return False
        if not len(atoms):
            return True
        old, new = ref.cell.array, atoms.cell.array
        if np.allclose(old, new, rtol=0, atol=1e-12):
            moved, strain = np.sqrt(((atoms.positions - ref.positions) ** 2).sum(1).max()), 0.0
        elif abs(np.linalg.det(old)) > 1e-9 and abs(np.linalg.det(new)) > 1e-9:
            ds = atoms.positions @ np.linalg.inv(new) - ref.positions @ np.linalg.inv(old)
            moved = np.sqrt(((ds @ new) ** 2).sum(1).max())
            strain = np.linalg.norm(np.linalg.solve(old, new) - np.eye(3), 2)
        else:  # a cell with empty vectors changed: no bound, rebuild
            return False
        return 2 * moved + (self.cutoff + self.skin) * strain < self.skin


class Calculator(AseCalculator):
    """ASE calculator for any almd potential (SevenNet-0 by default).

    Parameters
    ----------
    model: a pretrained name (``"sevennet-0"``), a model file (almd, sevenn or MACE)
        or a :class:`~almd.potentials.Potential` instance.
    device: torch device, e.g. ``"cpu"``.
    dtype: ``"float32"`` (fast) or ``"float64"`` (for Hessians and finite-difference checks).
    skin: neighbour-list skin in Å; 0 rebuilds the list on every call.
    allow_pickle: read a model file that needs full unpickling (a MACE model file); only
        for files you trust, as unpickling can run code (see almd.potentials.files).
    compile: run energy, forces and stress through ``torch.compile`` (SevenNet backbones).
        The first call compiles (2.7 min on 2 cores, seconds from inductor's cache); it pays off in long MD of
        large cells (benchmarks/RESULTS.md). Hessians stay on the eager model.
    """

    implemented_properties = ["energy", "free_energy", "energies", "forces", "stress"]

    def __init__(
        self,
        model: str | os.PathLike | Potential = "sevennet-0",
        device: str = "cpu",
        dtype: str | torch.dtype = "float32",
        skin: float = 0.5,
        allow_pickle: bool = False,
        compile: bool = False,
        **kwargs,
    ):
        super().__init__(**kwargs)
        if isinstance(dtype, str):
            if dtype not in DTYPES:
                raise ValueError(f"dtype {dtype!r} is not one of {', '.join(DTYPES)}")
            dtype = DTYPES[dtype]
        self.device = torch.device(device)
        self.dtype = dtype
        self.potential = potentials.load(model, allow_pickle).to(device=self.device, dtype=dtype).eval()
        for p in self.potential.parameters():
            p.requires_grad_(False)  # inference: no parameter gradients in MD
        self.neighbors = NeighborCache(self.potential.cutoff, skin)
        self._inference = self.potential.compiled() if compile else self.potential

    def calculate(self, atoms: Atoms | None = None, properties=("energy",), system_changes=all_changes):
        super().calculate(atoms, properties, system_changes)
        atoms = self.atoms
        self.potential.check_species(atoms.numbers)
        want_stress = bool(atoms.pbc.all())  # same backward as the forces: ASE asks for it next
        graph = build_graph(atoms, self.potential.cutoff, self.dtype, self.device,
                            pairs=[self.neighbors.get(atoms)])
        out = potentials.energy_forces_stress(self._inference, graph, forces=True, stress=want_stress)
        energy = float(out["energy"].detach().sum())
        self.results = {
            "energy": energy,
            "free_energy": energy,
            "energies": out["energies"].detach().cpu().double().numpy(),
            "forces": out["forces"].detach().cpu().double().numpy(),
        }
        if want_stress:
            sigma = out["stress"].detach().cpu().double().numpy()[0]
            self.results["stress"] = full_3x3_to_voigt_6_stress(sigma)

    def _graph(self, atoms: Atoms | None):
        atoms = self.atoms if atoms is None else atoms
        if atoms is None:
            raise ValueError("no atoms given")
        self.potential.check_species(atoms.numbers)
        return build_graph(atoms, self.potential.cutoff, self.dtype, self.device)

    def get_hessian(self, atoms: Atoms | None = None, chunk: int = 1) -> np.ndarray:
        """(3N, 3N) Hessian ∂²E/∂x∂x in eV/Å², atom-major (x, y, z), no mass weighting."""
        return potentials.hessian(self.potential, self._graph(atoms), chunk=chunk).cpu().double().numpy()

    def get_hessian_vector_products(self, atoms: Atoms | None, vectors: np.ndarray, chunk: int = 1) -> np.ndarray:
        """H·u for displacement fields ``vectors`` (k, N, 3) in Å → (k, N, 3) in eV/Å.

        The exact harmonic force change of a displacement u is -H·u: phonopy's
        symmetry-reduced displacements then cost one product each, with no
        finite-difference error.
        """
        vectors = torch.as_tensor(np.asarray(vectors, dtype=float).reshape(-1, len(atoms if atoms is not None else self.atoms), 3))
        graph = self._graph(atoms)
        return potentials.hessian_vector_products(self.potential, graph, vectors, chunk).cpu().double().numpy()
