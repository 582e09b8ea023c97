"""The energy surface along a phonon mode (frozen phonons): double wells of imaginary modes.

For a mode (q, band) commensurate with a phonopy supercell, the atoms are displaced along

    u_j = Re(e^{iφ} e_κ(j) e^{2πi q·s_j}) / √m_j         (s_j: atom j in primitive-cell coordinates)

scaled so that the largest atomic displacement is the amplitude A (Å), and the energy
E(A) − E(0) of the supercell is computed with any calculator (φ makes u as large as
possible for a complex eigenvector). For a stable mode E ≈ ½ ω² Σ_j m_j |A u_j|² near
A = 0; an imaginary mode (ω² < 0) gives a double well, whose depth and minimum position
:class:`ModeScan` reports. Energies in eV per supercell, displacements in Å.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
from ase import Atoms

from almd.phonons.harmonic import to_ase_atoms

__all__ = ["ModeScan", "atoms_along", "commensurate_modes", "frozen_phonon_scan", "harmonic_energy",
           "in_smaller_cell", "mode_displacements", "plot_scans"]

#: amu · Å² · THz² in eV: E = ½ m (2πf)² x² in these units
AMU_A2_THZ2_EV = 1.0364269e-4


@dataclass
class ModeScan:
    """E(A) − E(0) along one mode, in eV per supercell; A in Å (the largest atomic displacement)."""

    qpoint: list[float]
    band: int
    frequency_thz: float  #: the harmonic frequency of the mode (negative: imaginary)
    amplitudes: np.ndarray
    energies: np.ndarray
    n_atoms: int
    label: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def depth(self) -> float:
        """Depth of the double well, eV per supercell (0 when no amplitude lies below A = 0)."""
        return float(max(0.0, -np.min(self.energies)))

    @property
    def minimum_at(self) -> float:
        """|A| of the lowest energy scanned, Å (0 for a single well)."""
        return 0.0 if self.depth == 0.0 else float(abs(self.amplitudes[int(np.argmin(self.energies))]))

    def to_dict(self) -> dict[str, Any]:
        return {"label": self.label, "qpoint": self.qpoint, "band": self.band, "frequency_thz": self.frequency_thz,
                "amplitudes_A": self.amplitudes.tolist(), "energies_eV": self.energies.tolist(),
                "n_atoms": self.n_atoms, "depth_eV": self.depth, "depth_meV_per_atom": 1e3 * self.depth / self.n_atoms,
                "minimum_at_A": self.minimum_at, **self.extra}


def _in_primitive_units(phonon: Any) -> np.ndarray:
    """The supercell's lattice vectors (rows) in primitive-cell coordinates: an integer matrix."""
    return np.asarray(phonon.supercell.cell) @ np.linalg.inv(np.asarray(phonon.primitive.cell))


def _commensurate(phonon: Any, qpoint: Sequence[float]) -> bool:
    scaled = _in_primitive_units(phonon) @ np.asarray(qpoint, float)  # q·T for every supercell vector T
    return bool(np.abs(scaled - np.round(scaled)).max() < 1e-6)


def in_smaller_cell(phonon: Any, supercell_matrix: Sequence[int] | Sequence[Sequence[int]]) -> Any:
    """The same force constants on a smaller commensurate supercell of the unit cell (folded,
    :func:`almd.phonons.datasets.fold_force_constants`): its modes are exactly the big cell's at the
    q-points both hold, so a mode can be scanned where a reference (DFT) energy is affordable.
    """
    from phonopy import Phonopy
    from phonopy.harmonic.force_constants import compact_fc_to_full_fc

    from almd.phonons.datasets import fold_force_constants
    from almd.phonons.harmonic import supercell_matrix as as_matrix

    small = Phonopy(phonon.unitcell, as_matrix(supercell_matrix), primitive_matrix=phonon.primitive_matrix)
    fc = phonon.force_constants
    if fc.shape[0] != fc.shape[1]:
        fc = compact_fc_to_full_fc(phonon.primitive, fc)
    n = len(small.supercell)
    hessian = fold_force_constants(fc, to_ase_atoms(phonon.supercell), to_ase_atoms(small.supercell))
    small.force_constants = hessian.reshape(n, 3, n, 3).swapaxes(1, 2)
    return small


def _phases(phonon: Any, qpoint: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    """exp(2πi q·s_j) of every supercell atom and the index of its primitive-cell atom."""
    supercell, primitive = phonon.supercell, phonon.primitive
    s = supercell.positions @ np.linalg.inv(primitive.cell)  # primitive-cell (fractional) coordinates
    index = np.array([primitive.p2p_map[i] for i in primitive.s2p_map])  # supercell atom -> primitive atom
    return np.exp(2j * np.pi * s @ np.asarray(qpoint, float)), index


def mode_displacements(phonon: Any, qpoint: Sequence[float], band: int) -> tuple[np.ndarray, float]:
    """The real displacement pattern (N, 3) of mode ``band`` at ``qpoint`` in phonopy's supercell,
    largest atomic displacement 1 Å, and the mode's frequency (THz; negative if imaginary).

    Raises ValueError when ``qpoint`` is not commensurate with the supercell (the pattern
    would not be periodic in it).
    """
    if not _commensurate(phonon, qpoint):
        raise ValueError(f"q = {list(qpoint)} is not commensurate with the supercell "
                         f"{np.asarray(phonon.supercell_matrix).tolist()}")
    phase, index = _phases(phonon, qpoint)
    frequencies, vectors = phonon.get_frequencies_with_eigenvectors(list(qpoint))
    e = vectors[:, band].reshape(-1, 3)  # (n_primitive, 3), mass-weighted
    masses = np.asarray(phonon.supercell.masses)
    w = e[index] * phase[:, None] / np.sqrt(masses)[:, None]
    # the phase that makes Re(e^{iφ} w) largest: |Re(e^{iφ}w)|² = ½(|w|² + Re(e^{2iφ} w·w))
    u = np.real(np.exp(-0.5j * np.angle(np.sum(w * w))) * w)
    return u / np.linalg.norm(u, axis=1).max(), float(frequencies[band])


def commensurate_modes(phonon: Any, below: float = -0.05) -> list[tuple[list[float], int, float]]:
    """(q, band, frequency THz) of the modes with frequency under ``below`` (imaginary: negative)
    at the q-points commensurate with phonopy's supercell.
    """
    from phonopy.harmonic.dynmat_to_fc import get_commensurate_points

    out = []
    for q in get_commensurate_points(np.rint(_in_primitive_units(phonon)).astype(int)):
        if not _commensurate(phonon, q):  # (the other matrix convention)
            continue
        for band, f in enumerate(phonon.get_frequencies(list(q))):
            if f < below:
                out.append(([float(x) for x in q], band, float(f)))
    return out


def frozen_phonon_scan(phonon: Any, calculator: Any, qpoint: Sequence[float], band: int,
                       amplitudes: Sequence[float] = tuple(np.linspace(-0.3, 0.3, 13)), label: str = "") -> ModeScan:
    """E(A) − E(0) (eV per supercell) of phonopy's supercell displaced by A (Å) along the mode.

    ``phonon`` gives the pattern (its force constants: the model's or the reference's);
    ``calculator`` the energies: an ASE calculator, or a function that returns a fresh one for
    each structure (DFT codes such as GPAW keep the symmetry of the first structure they see).
    """
    pattern, frequency = mode_displacements(phonon, qpoint, band)
    ideal = to_ase_atoms(phonon.supercell)
    energies = []
    for a in [0.0, *amplitudes]:
        atoms = ideal.copy()
        atoms.positions += a * pattern
        atoms.calc = calculator() if callable(calculator) and not hasattr(calculator, "get_potential_energy") \
            else calculator
        energies.append(float(atoms.get_potential_energy()))
    return ModeScan([float(x) for x in qpoint], int(band), frequency, np.asarray(amplitudes, float),
                    np.asarray(energies[1:]) - energies[0], len(ideal), label)


def harmonic_energy(phonon: Any, scan: ModeScan) -> np.ndarray:
    """½ ω² Σ_j m_j |A u_j|² (eV) at the scan's amplitudes: its harmonic limit (ω² < 0 for imaginary modes)."""
    pattern, frequency = mode_displacements(phonon, scan.qpoint, scan.band)
    stiffness = np.sign(frequency) * (2 * np.pi * frequency) ** 2 * float(
        np.sum(np.asarray(phonon.supercell.masses)[:, None] * pattern**2))
    return 0.5 * stiffness * AMU_A2_THZ2_EV * scan.amplitudes**2


def plot_scans(scans: Sequence[ModeScan], path: str) -> None:
    """E(A) per atom (meV) of each scan, one line per scan (e.g. base, fine-tuned, reference)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.6))
    for s in scans:
        ax.plot(s.amplitudes, 1e3 * s.energies / s.n_atoms, marker="o", ms=3,
                label=f"{s.label} (q {s.qpoint}, band {s.band}, {s.frequency_thz:.2f} THz)")
    ax.axhline(0.0, color="0.7", lw=0.8)
    ax.set_xlabel("largest atomic displacement along the mode (Å)")
    ax.set_ylabel("E − E(0) (meV/atom)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=150)
    plt.close(fig)


def atoms_along(phonon: Any, qpoint: Sequence[float], band: int, amplitude: float) -> Atoms:
    """Phonopy's supercell displaced by ``amplitude`` Å along the mode (e.g. for a DFT single point)."""
    pattern, _ = mode_displacements(phonon, qpoint, band)
    atoms = to_ase_atoms(phonon.supercell)
    atoms.positions += amplitude * pattern
    return atoms
