"""THE reader of phonopy / phono3py data sets: displaced supercells with their
DFT forces, force constants as supercell Hessians, third-order Hessians H(u) = Φ2 + Φ3·u.
No torch.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from ase import Atoms
from ase.calculators.singlepoint import SinglePointCalculator

from almd.structures import minimum_image

__all__ = ["displaced_supercells", "fold_force_constants", "folded_phonon_hessian", "force_constants_from_hessian",
           "hessian_from_force_constants", "load_phonon_dataset", "phonon_hessian", "third_order_hessians"]


def _to_ase(cell: Any) -> Atoms:
    """PhonopyAtoms -> ase Atoms (periodic)."""
    return Atoms(cell.symbols, cell=cell.cell, scaled_positions=cell.scaled_positions, pbc=True)


def load_phonon_dataset(path: str | Path, *, is_compact_fc: bool = True) -> Any:
    """Phonopy or Phono3py object of a data set, force constants not yet produced.

    Files named ``phono3py*`` go through ``phono3py.load``; a ``FORCES_FC3`` /
    ``FORCES_FC2`` / ``FORCE_SETS`` next to the yaml is used whatever the cwd.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"phonon data set not found: {path}")
    folder = path.parent
    if "phono3py" in path.name:
        import phono3py

        extra = {}
        for key, fname in (("forces_fc3_filename", "FORCES_FC3"), ("forces_fc2_filename", "FORCES_FC2")):
            if (folder / fname).exists():
                extra[key] = str(folder / fname)
        return phono3py.load(str(path), produce_fc=False, is_compact_fc=is_compact_fc,
                             log_level=0, **extra)
    import phonopy

    extra = {}
    if (folder / "FORCE_SETS").exists():
        extra["force_sets_filename"] = str(folder / "FORCE_SETS")
    return phonopy.load(str(path), produce_fc=False, is_compact_fc=is_compact_fc, log_level=0, **extra)


def _energies(dataset: Mapping[str, Any] | None, n: int) -> list[float | None]:
    values = (dataset or {}).get("supercell_energies")
    return [float(e) for e in values] if values is not None and len(values) == n else [None] * n


def _phonon_object(dataset: Any, is_compact_fc: bool = True) -> Any:
    """A path is loaded; an already loaded Phonopy/Phono3py object is used as is
    (loading NaCl's 512-atom yaml takes ~10 s, so callers may load once).
    """
    if isinstance(dataset, (str, Path)):
        return load_phonon_dataset(dataset, is_compact_fc=is_compact_fc)
    return dataset


def displaced_supercells(dataset_path: str | Path | Any) -> list[Atoms]:
    """Displaced supercells with their DFT forces (and energies when the set has them).

    ``dataset_path``: a phonopy/phono3py yaml, or the object loaded from one.
    For phono3py sets with a separate fc2 supercell (e.g. NaCl's 512-atom cells)
    those come after the fc3 supercells; ``info['set']`` says which is which.
    """
    ph = _phonon_object(dataset_path)
    source = Path(dataset_path).name if isinstance(dataset_path, (str, Path)) else type(ph).__name__
    groups = [("fc3" if hasattr(ph, "phonon_dataset") else "fc2",
               ph.supercells_with_displacements, ph.dataset)]
    if getattr(ph, "phonon_dataset", None) is not None:
        groups.append(("fc2", ph.phonon_supercells_with_displacements, ph.phonon_dataset))
    out: list[Atoms] = []
    for set_name, cells, dataset in groups:
        # phono3py leaves None for pairs it excluded; forces are stored only for the others
        present = [c for c in cells if c is not None]
        forces = np.asarray(ph.forces if set_name == groups[0][0] else ph.phonon_forces)
        if forces.shape[0] != len(present):
            raise ValueError(f"{dataset_path}: {len(present)} supercells but {forces.shape[0]} force sets")
        for i, (cell, f, e) in enumerate(zip(present, forces, _energies(dataset, len(present)))):
            atoms = _to_ase(cell)
            labels = {"forces": np.array(f), **({"energy": e} if e is not None else {})}
            atoms.calc = SinglePointCalculator(atoms, **labels)
            atoms.info.update(source=source, set=set_name, index=i)
            out.append(atoms)
    return out


def hessian_from_force_constants(fc: np.ndarray) -> np.ndarray:
    """Full phonopy force constants (n, n, 3, 3) -> supercell Hessian (3n, 3n) in eV/Å².

    Row 3i+a, column 3j+b is ∂²E/∂u_ia∂u_jb. No mass weighting.
    """
    fc = np.asarray(fc, dtype=np.float64)
    if fc.ndim != 4 or fc.shape[2:] != (3, 3):
        raise ValueError(f"force constants must have shape (n, n, 3, 3), got {fc.shape}")
    if fc.shape[0] != fc.shape[1]:
        raise ValueError(
            f"compact force constants {fc.shape}: produce them with is_compact_fc=False "
            "(or expand with phonopy's compact_fc_to_full_fc)")
    n = fc.shape[0]
    return np.ascontiguousarray(fc.swapaxes(1, 2).reshape(3 * n, 3 * n))


def force_constants_from_hessian(hessian: np.ndarray) -> np.ndarray:
    """(3N, 3N) Hessian → phonopy full force constants (N, N, 3, 3)."""
    n = hessian.shape[0] // 3
    return hessian.reshape(n, 3, n, 3).swapaxes(1, 2).copy()


def phonon_hessian(dataset_path: str | Path | Any) -> tuple[Atoms, np.ndarray]:
    """Perfect supercell and its DFT Hessian (eV/Å²) from a phonopy/phono3py data set
    (path, or loaded object: its force constants are then (re)produced in place).

    Random-displacement sets (no one-atom-at-a-time structure) go through symfc;
    the others through phonopy's finite-difference solver with symmetrisation.
    """
    ph = _phonon_object(dataset_path, is_compact_fc=False)
    if hasattr(ph, "phonon_dataset"):  # phono3py: fc2 lives on the phonon supercell
        dataset = ph.phonon_dataset if ph.phonon_dataset is not None else ph.dataset
        random = "displacements" in dataset
        ph.produce_fc2(is_compact_fc=False, fc_calculator="symfc" if random else None)
        if not random:
            ph.symmetrize_fc2()
        return _to_ase(ph.phonon_supercell), hessian_from_force_constants(ph.fc2)
    random = "displacements" in ph.dataset
    ph.produce_force_constants(fc_calculator="symfc" if random else None, show_drift=False)
    if not random:
        ph.symmetrize_force_constants()
    return _to_ase(ph.supercell), hessian_from_force_constants(ph.force_constants)


def _lattice_multiple(big: np.ndarray, small: np.ndarray, tol: float = 1e-6) -> np.ndarray:
    """Integer matrix N with big = N · small (lattice vectors as rows); ValueError if there is none."""
    n = np.asarray(big, dtype=float) @ np.linalg.inv(np.asarray(small, dtype=float))
    rounded = np.rint(n)
    if np.abs(n - rounded).max() > tol or round(abs(np.linalg.det(rounded))) < 1:
        raise ValueError("cells are not commensurate: the big cell's lattice is not an integer combination "
                         f"of the small cell's (big = N · small with N = {np.round(n, 4).tolist()})")
    return rounded.astype(int)


def _image_map(big: Atoms, small: Atoms, tol: float) -> np.ndarray:
    """For each big-cell atom, the small-cell atom it is a periodic image of (same species)."""
    frac = big.positions @ np.linalg.inv(small.cell.array)  # big atoms in the small cell's fractions
    diff = frac[:, None, :] - small.get_scaled_positions(wrap=True)[None, :, :]
    diff -= np.rint(diff)  # mod 1: any small-cell lattice translation is the same site
    dist = np.linalg.norm(diff @ small.cell.array, axis=-1)  # (N_big, n_small) in Å
    owner = dist.argmin(axis=1)
    big_symbols, small_symbols = big.get_chemical_symbols(), small.get_chemical_symbols()
    for k, i in enumerate(owner):
        if dist[k, i] > tol:
            raise ValueError(f"big-cell atom {k} ({big_symbols[k]}) at {np.round(big.positions[k], 4).tolist()} Å "
                             f"is on no small-cell site (nearest: atom {i}, {dist[k, i]:.3g} Å > tol {tol} Å)")
        if big_symbols[k] != small_symbols[i]:
            raise ValueError(f"big-cell atom {k} is {big_symbols[k]} but its small-cell site {i} is {small_symbols[i]}")
    return owner


def fold_force_constants(fc: np.ndarray, big: Atoms, small: Atoms, tol: float = 1e-3) -> np.ndarray:
    """Force constants of a periodic supercell folded onto a smaller commensurate one:
    the Hessian of the small periodic cell (its dynamical matrix at its commensurate q).

    Element (i, j) is the sum of Φ(i', j') over the big-cell images j' of small-cell atom j,
    averaged over the images i' of i (each gives the same when Φ has the small cell's
    translation symmetry; the mean keeps the result symmetric when it has not exactly).

    Parameters
    ----------
    fc : ndarray, shape (N_big, N_big, 3, 3)
        Full (not compact) force constants of ``big`` in eV/Å², phonopy's order.
    big : Atoms
        The supercell of ``fc``; its lattice must be an integer combination of ``small``'s.
    small : Atoms
        The small periodic cell, every big-cell atom a lattice image of one of its atoms.
    tol : float
        Å; how far a big-cell atom may be from its small-cell site.

    Returns
    -------
    ndarray, shape (3n, 3n)
        Hessian of ``small`` in eV/Å², row 3i+a, column 3j+b (as hessian_from_force_constants).

    Raises
    ------
    ValueError
        Compact or mis-shaped ``fc``, cells not commensurate, an atom on no site, species that differ.
    """
    fc = np.asarray(fc, dtype=np.float64)
    if fc.ndim != 4 or fc.shape[2:] != (3, 3) or fc.shape[0] != fc.shape[1]:
        raise ValueError(f"force constants must be full, shape (N, N, 3, 3), got {fc.shape} "
                         "(compact ones: produce them with is_compact_fc=False)")
    if fc.shape[0] != len(big):
        raise ValueError(f"force constants are for {fc.shape[0]} atoms, the big cell has {len(big)}")
    multiple = abs(round(np.linalg.det(_lattice_multiple(big.cell.array, small.cell.array))))
    if len(big) != multiple * len(small):
        raise ValueError(f"the big cell is {multiple} small cells but has {len(big)} atoms, not "
                         f"{multiple} × {len(small)}")
    owner = _image_map(big, small, tol)
    counts = np.bincount(owner, minlength=len(small))
    if np.any(counts != multiple):
        i = int(np.flatnonzero(counts != multiple)[0])
        raise ValueError(f"small-cell atom {i} has {counts[i]} images in the big cell, expected {multiple}")
    n = len(small)
    folded = np.zeros((n, n, 3, 3))
    np.add.at(folded, (owner[:, None], owner[None, :]), fc)  # Σ over all image pairs (i', j')
    folded /= multiple  # the mean over i' of the sums over j'
    return np.ascontiguousarray(folded.swapaxes(1, 2).reshape(3 * n, 3 * n))


_SupercellMatrix = int | Sequence[int] | Sequence[Sequence[int]] | np.ndarray


def _as_supercell_matrix(supercell_matrix: _SupercellMatrix) -> np.ndarray:
    m = np.asarray(supercell_matrix, dtype=int)
    if m.ndim == 0:
        return np.eye(3, dtype=int) * int(m)
    if m.shape == (3,):
        return np.diag(m)
    if m.shape != (3, 3):
        raise ValueError(f"supercell_matrix must be an int, 3 ints or a 3×3 matrix, got {supercell_matrix!r}")
    return m


def folded_phonon_hessian(dataset_path: str | Path | Any,
                          supercell_matrix: _SupercellMatrix) -> tuple[Atoms, np.ndarray]:
    """A small supercell of a data set's unit cell with the data's force constants folded
    onto it: a cheap label for the model's Hessian of the small periodic cell.

    Parameters
    ----------
    dataset_path : str, Path or Phonopy / Phono3py object
        As for :func:`phonon_hessian` (same loading; symfc for random-displacement sets).
    supercell_matrix : int, 3 ints or (3, 3) ints
        The small supercell in phonopy's convention, relative to the data set's ``unitcell``
        (e.g. [1, 1, 1] for the unit cell itself). Its lattice must divide the data set's supercell.

    Returns
    -------
    small : Atoms
        The small supercell (phonopy's atom order), periodic.
    hessian : ndarray, shape (3n, 3n)
        Its Hessian in eV/Å², row 3i+a, column 3j+b.

    Raises
    ------
    ValueError
        When the small supercell is not commensurate with the data set's supercell.
    """
    from phonopy.structure.cells import get_supercell

    ph = _phonon_object(dataset_path, is_compact_fc=False)
    matrix = _as_supercell_matrix(supercell_matrix)
    if round(abs(np.linalg.det(matrix))) < 1:
        raise ValueError(f"supercell_matrix {matrix.tolist()} is singular")
    small = _to_ase(get_supercell(ph.unitcell, matrix))
    phono3py = hasattr(ph, "phonon_dataset")  # its fc2 live on the phonon supercell, as in phonon_hessian
    big_cell = ph.phonon_supercell if phono3py else ph.supercell
    try:  # before the force constants: symfc on a 512-atom set takes a while
        _lattice_multiple(big_cell.cell, small.cell.array)
    except ValueError:
        own = ph.phonon_supercell_matrix if phono3py and ph.phonon_supercell_matrix is not None \
            else ph.supercell_matrix
        raise ValueError(f"supercell_matrix {matrix.tolist()} is not commensurate with the data set's "
                         f"supercell {np.asarray(own).tolist()}: the latter's lattice is not an integer "
                         "combination of the former's") from None
    big, h = phonon_hessian(ph)
    return small, fold_force_constants(force_constants_from_hessian(h), big, small)


def third_order_hessians(dataset_path: str | Path | Any, min_signal: float = 0.1,
                         symmetrize: bool = True) -> list[Atoms]:
    """The displaced supercells of a phono3py data set, each with the Hessian that the
    data's own force constants give at its geometry: H(u) = Φ2 + Φ3·u (eV/Å²).

    These are third-order labels: a model that matches H(u) for the measured u has the
    data's fc3 along them, which forces at 0.03 Å alone pin down poorly (a 0.5 meV/Å
    force error is already ~1 eV/Å³ in fc3). ``info['hessian']`` holds H(u) and
    ``info['hessian_columns']`` the columns whose third-order part Φ3·u has at least
    ``min_signal`` of the largest one's norm (elsewhere H(u) is just Φ2),
    ``info['hessian_third_order']`` the part Φ3·u alone and ``info['perfect_positions']``
    the undisplaced positions (same periodic images); the DFT forces and energy stay as
    labels. ``symmetrize``: phono3py's fc3 symmetrisation (as its command line and
    almd.phonons.kappa do; ~1 min for a 64-atom cell).
    """
    ph = _phonon_object(dataset_path, is_compact_fc=False)
    if not hasattr(ph, "produce_fc3"):
        raise ValueError(f"{dataset_path}: third-order labels need a phono3py data set")
    random = "displacements" in ph.dataset
    ph.produce_fc3(is_compact_fc=False, fc_calculator="symfc" if random else None)
    if symmetrize and not random:
        ph.symmetrize_fc3()
    _, h2 = phonon_hessian(ph)
    fc3 = ph.fc3
    perfect = _to_ase(ph.supercell)
    n = len(perfect)
    out = []
    for atoms in displaced_supercells(ph):
        if atoms.info.get("set") != "fc3":
            continue
        u = atoms.positions - perfect.positions
        u = minimum_image(u, perfect.cell.array)
        dh = np.einsum("ijkabc,kc->iajb", fc3, u).reshape(3 * n, 3 * n)
        strength = np.linalg.norm(dh, axis=0)
        atoms.info["hessian"] = h2 + dh
        atoms.info["hessian_third_order"] = dh
        atoms.info["perfect_positions"] = atoms.positions - u
        atoms.info["hessian_columns"] = np.flatnonzero(strength >= min_signal * strength.max()).tolist()
        out.append(atoms)
    return out
