"""Convergence of the Bayesian lattice-dynamics model without new reference calls.

Callsen, Lee, Chou (2026; methods.md §3): "Bayesian errors evaluated on sub-blocks
of larger-supercell MD show when training has converged." The model is trained
in a small supercell; MD in a larger supercell (run with the cheap model itself)
samples many more local environments per frame. The force-constant expansion is
local (cluster cutoffs), so the model's design block Φ of the *large* ideal
supercell is exact there, and each force component's posterior std
``sqrt(diag(Φ S Φᵀ))`` depends only on the displacements within the cutoffs
around its atom. Splitting the large frame into sub-blocks (by default regions
about the size of the training supercell) and taking the largest std in each
block gives one Bayesian error per block: a distribution over many
training-cell-sized configurations, from every MD frame, at no DFT cost.
Training has converged when a high quantile (by default the largest) of that
distribution is below a target force.

Difference from BayLMD's own script (which re-folds each slab of the large cell
into the periodic training cell): the rows of the large cell's design block see
each block's true surroundings, with no artificial periodic image at the cut.

Units: forces and errors in eV/Å.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
from ase import Atoms

from almd.uncertainty.bayes import BayesianForceConstantModel

__all__ = ["SubblockConvergence", "block_labels", "subblock_convergence",
           "subblock_errors"]

BlockSpec = Atoms | Sequence[int] | np.ndarray | str | None


def block_labels(ideal: Atoms, block: BlockSpec = None,
                 model: BayesianForceConstantModel | None = None) -> np.ndarray:
    """Sub-block index (0 … n_blocks−1) of every atom of the large ideal supercell.

    ``block`` is one of
      * an ``(n1, n2, n3)`` grid: the cell is cut into n1·n2·n3 parallelepipeds
        along its cell vectors, atoms assigned by their ideal fractional
        coordinates (so a frame's thermal motion never moves an atom between blocks);
      * an ideal supercell (Atoms), e.g. the training supercell: the coarsest grid
        whose blocks are no larger than it, ``ceil(|a_large| / |a_block|)`` per cell
        vector (the cells must be parallel; a 3×3×3 cell with a 2×2×2 block gives a
        2×2×2 grid of 1.5×1.5×1.5 regions);
      * ``None``: the model's default (training) supercell, as above;
      * ``"atom"``: one block per atom (the error of each atom's neighbourhood);
      * an integer array of length N: explicit labels.
    """
    n = len(ideal)
    if isinstance(block, str):
        if block != "atom":
            raise ValueError(f"block = {block!r}: the only named block is 'atom'")
        return np.arange(n)
    if block is None:
        if model is None or model._default is None:
            raise ValueError("no block given and the model has no default supercell: "
                             "pass block=(n1, n2, n3) or the training supercell")
        block = model._default.ideal
    if isinstance(block, Atoms):
        block = _grid_for(ideal, block)
    arr = np.asarray(block)
    if arr.shape == (3,) and n != 3:
        grid = arr.astype(int)
        if not np.array_equal(grid, arr) or np.any(grid < 1):
            raise ValueError(f"block grid {tuple(arr)}: must be three integers >= 1")
        frac = ideal.get_scaled_positions(wrap=False)
        # A lattice site at fractional 0.9999999 belongs to block 0, not n-1: wrap
        # with a small tolerance before binning.
        frac = np.mod(frac + 1e-8, 1.0)
        idx = np.minimum((frac * grid).astype(int), grid - 1)
        return np.ravel_multi_index(idx.T, tuple(grid))
    labels = arr.astype(int)
    if labels.shape != (n,) or not np.array_equal(labels, arr) or labels.min() < 0:
        raise ValueError(f"block labels must be {n} non-negative integers, got shape {arr.shape}")
    return labels


def _grid_for(ideal: Atoms, block: Atoms) -> tuple[int, int, int]:
    big = np.asarray(ideal.get_cell(), dtype=float)
    small = np.asarray(block.get_cell(), dtype=float)
    ratio = big @ np.linalg.inv(small)  # rows: large cell vectors in block-cell units
    off = ratio - np.diag(np.diag(ratio))
    if np.abs(off).max() > 1e-6 * np.abs(ratio).max():
        raise ValueError("the large and block cells are not parallel: pass block=(n1, n2, n3)")
    # ceil with a tolerance: 16.293 Å / 10.862 Å is 1.4999999…, and an exact
    # multiple may come out as 2.0000001.
    return tuple(int(max(1, np.ceil(r - 1e-6))) for r in np.diag(ratio))  # type: ignore[return-value]


def subblock_errors(model: BayesianForceConstantModel, frames: Sequence[Atoms] | Atoms,
                    ideal: Atoms, block: BlockSpec = None) -> np.ndarray:
    """Bayesian error of every sub-block of every frame, shape (n_frames, n_blocks), eV/Å.

    The error of a block is the largest posterior std of a force component of its
    atoms (the model's trigger score restricted to the block; with
    ``model.include_noise`` the noise 1/β is included, which does not fall with
    more data, so convergence targets must then lie above it). ``frames`` are
    displaced copies of ``ideal``, a supercell of the model's primitive cell of
    any size (its basis is built once and cached by the model). ``block``: see
    :func:`block_labels`.
    """
    if isinstance(frames, Atoms):
        frames = [frames]
    labels = block_labels(ideal, block, model)
    n_blocks = int(labels.max()) + 1
    out = np.full((len(frames), n_blocks), -np.inf)
    for k, atoms in enumerate(frames):
        std = model.force_std(atoms, ideal=ideal)  # (N, 3), from the large design block
        np.maximum.at(out[k], labels, std.max(axis=1))
    if np.isneginf(out).any():
        raise ValueError("some block labels have no atoms (labels must be 0 … n_blocks−1)")
    return out


@dataclass(frozen=True)
class SubblockConvergence:
    """Decision of :func:`subblock_convergence`. Errors and target in eV/Å.

    ``converged`` is True when the ``quantile`` of all sub-block errors (over every
    block of every frame) is below ``target``: more reference data of this kind
    would barely change the predictions. It says nothing about the misfit of the
    expansion itself (cutoffs, highest order): that floor is estimated by
    ``noise``, √(1/β) of the evidence fit, which does not fall with more data
    (benchmarks/RESULTS.md shows it on Stillinger–Weber Si).
    """

    errors: np.ndarray  #: (n_frames, n_blocks) sub-block errors
    target: float
    quantile: float
    value: float  #: the ``quantile`` of ``errors``, compared with ``target``
    converged: bool
    noise: float  #: √(1/β) of the fit, eV/Å: the misfit the model cannot learn away

    @property
    def max(self) -> float:
        """Largest sub-block error."""
        return float(self.errors.max())

    @property
    def q95(self) -> float:
        """95 % quantile of the sub-block errors."""
        return float(np.quantile(self.errors, 0.95))

    def worst(self) -> tuple[int, int]:
        """(frame, block) of the largest error: the region to label next."""
        f, b = np.unravel_index(int(np.argmax(self.errors)), self.errors.shape)
        return int(f), int(b)


def subblock_convergence(model: BayesianForceConstantModel, frames: Sequence[Atoms] | Atoms,
                         ideal: Atoms, target: float, quantile: float = 1.0,
                         block: BlockSpec = None) -> SubblockConvergence:
    """Is the model converged on larger-supercell MD ``frames``? (No new DFT.)

    Args:
        target: force (eV/Å) the ``quantile`` of the sub-block errors must stay below.
        quantile: 1.0 (the default) takes the worst block of all frames; e.g. 0.95
            tolerates rare outliers in long runs.
        block: sub-block definition, see :func:`block_labels` (default: regions the
            size of the model's training supercell).
    """
    if not (np.isfinite(target) and target > 0):
        raise ValueError(f"target = {target!r}: must be a finite force > 0 in eV/Å")
    if not 0.0 < quantile <= 1.0:
        raise ValueError(f"quantile = {quantile!r}: must be in (0, 1]")
    errors = subblock_errors(model, frames, ideal, block)
    value = float(np.quantile(errors, quantile))
    return SubblockConvergence(errors, float(target), float(quantile), value,
                               bool(value < target), float(1.0 / np.sqrt(model.fit_result.beta)))
