"""Bayesian lattice-dynamics model (BayLMD; Callsen, Lee, Chou 2026; methods.md §3).

The energy is a Taylor expansion in displacements, linear in the force-constant
parameters p of a hiphive ClusterSpace: forces ``F = Φ(u) p`` with the design
block Φ(u) (3N × P). Evidence-maximised ridge regression gives p a Gaussian
posterior (m, S); ``diag(Φ S Φᵀ)`` is each force component's predictive
variance, whose largest square root is the score that drives the trigger.

Units: forces eV/Å, displacements Å, force constants eV/Å^n, β in (eV/Å)^-2.

Speed: ``_SupercellBasis`` expands the per-eigentensor force constants of one
ideal supercell once into sparse matrices, so a design block is one or two
sparse products instead of hiphive's ``get_fit_matrix`` per frame (equal to it
to round-off, tested; the timings are in benchmarks/RESULTS.md). Convergence from sub-blocks of
larger-supercell MD (no new DFT): :mod:`almd.uncertainty.bayes_convergence`.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import math
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

import numpy as np
import scipy.sparse as sp
from ase import Atoms
from ase.calculators.calculator import Calculator, all_changes

from almd.structures import minimum_image

__all__ = ["BayesianForceConstantModel", "BayesianCalculator", "EvidenceFit", "RefittedModelCalculator",
           "evidence_ridge", "displacements"]


@contextlib.contextmanager
def _quiet_hiphive() -> Iterator[None]:
    # hiphive prints cluster-space tables at INFO; silence them only for our calls.
    log = logging.getLogger("hiphive")
    old = log.level
    log.setLevel(logging.WARNING)
    try:
        yield
    finally:
        log.setLevel(old)


# ---------------------------------------------------------------- the fit
@dataclass(frozen=True)
class EvidenceFit:
    """Posterior of the evidence-maximised ridge: ``alpha`` is the prior (weight)
    precision, ``beta`` the noise precision in (eV/Å)^-2 (scikit-learn's
    ``lambda_`` and ``alpha_`` respectively).
    """

    mean: np.ndarray  #: posterior mean m (P,)
    cov: np.ndarray  #: posterior covariance S (P, P)
    alpha: float
    beta: float
    gamma: float  #: effective number of well-determined parameters
    n_iter: int
    converged: bool


def evidence_ridge(phi: np.ndarray, y: np.ndarray, tol: float = 0.01, max_iter: int = 500,
                   alpha0: float = 1.0, beta0: float | None = None) -> EvidenceFit:
    """Bayesian ridge with evidence maximisation (MacKay), as in methods.md §3.

    Iterates ``S = (αI + βΦᵀΦ)⁻¹``, ``m = βSΦᵀy``, ``γ = Σλ/(α/β+λ)``,
    ``α = γ/|m|²``, ``β = (N−γ)/Σres²`` until α and β change by less than the
    relative tolerance ``tol``; S and m are then recomputed with the final α, β.
    Starts from α = ``alpha0``, β = 1/var(y) (scikit-learn's defaults).
    """
    phi = np.asarray(phi, dtype=float)
    y = np.asarray(y, dtype=float).ravel()
    n, p = phi.shape
    if y.size != n:
        raise ValueError(f"design has {n} rows but y has {y.size} entries")
    if n < 2:
        raise ValueError("need at least two force components to fit")
    # One eigendecomposition of ΦᵀΦ makes every iteration O(P²).
    lam, vec = np.linalg.eigh(phi.T @ phi)
    lam = np.clip(lam, 0.0, None)
    proj = vec.T @ (phi.T @ y)
    alpha = float(alpha0)
    beta = float(beta0) if beta0 is not None else 1.0 / max(float(np.var(y)), 1e-300)

    def posterior(a: float, b: float) -> tuple[np.ndarray, np.ndarray]:
        d = 1.0 / (a + b * lam)
        return vec @ (b * d * proj), d

    converged, it = False, 0
    for it in range(1, max_iter + 1):
        m, _ = posterior(alpha, beta)
        gamma = float(np.sum(beta * lam / (alpha + beta * lam)))
        res = y - phi @ m
        new_alpha = gamma / max(float(m @ m), 1e-300)
        new_beta = (n - gamma) / max(float(res @ res), 1e-300)
        done = abs(new_alpha - alpha) <= tol * alpha and abs(new_beta - beta) <= tol * beta
        alpha, beta, converged = new_alpha, new_beta, done
        if done:
            break
    m, d = posterior(alpha, beta)
    cov = (vec * d) @ vec.T
    gamma = float(np.sum(beta * lam / (alpha + beta * lam)))
    return EvidenceFit(m, cov, alpha, beta, gamma, it, converged)


# ---------------------------------------------------------------- geometry
def displacements(atoms: Atoms, ideal: Atoms) -> np.ndarray:
    """Displacements (Å) of ``atoms`` from ``ideal`` under the minimum image,
    so MD frames whose atoms were wrapped across the cell are handled.
    """
    if len(atoms) != len(ideal):
        raise ValueError(f"{len(atoms)} atoms vs {len(ideal)} in the ideal supercell")
    return minimum_image(atoms.get_positions() - ideal.get_positions(), ideal.get_cell())


class _SupercellBasis:
    """Force constants of one ideal supercell per eigentensor, as sparse matrices.

    For order n the full (all index permutations) force-constant tensor is
    linear in the eigentensor coefficients c: ``Φ = Σ_e c_e T_e``. Forces are
    ``F = -Σ_n 1/(n-1)! Φ_n : u^(n-1)``; the design column of eigentensor e is the
    force with ``c = e_e``. Orders 2 and 3 are CSR matrices acting on u and
    on vec(u⊗u); higher orders use a generic scatter-add.
    """

    def __init__(self, cs: Any, ideal: Atoms) -> None:
        from hiphive.force_constant_model import ForceConstantModel

        with _quiet_hiphive():
            fcm = ForceConstantModel(ideal, cs)
        self.ideal = ideal.copy()
        self.n3 = 3 * len(ideal)
        self.cvs = np.asarray(cs._cvs.toarray())  # eigentensor coefficients = cvs @ p
        self.n_et = self.cvs.shape[0]
        # per order: row = (atom·3+xyz of the force)·n_et + eigentensor, the other
        # (atom·3+xyz) indices, and the value (with the -1/(n-1)! of the force)
        rows: dict[int, list] = {}
        cols: dict[int, list] = {}
        vals: dict[int, list] = {}
        et_index = 0
        for orbit in fcm.orbits:
            n, n_e = orbit.order, len(orbit.eigentensors)
            if n_e == 0:
                continue
            carts = np.array(list(itertools.product(range(3), repeat=n)))  # (3^n, n)
            for of in orbit.orientation_families:
                clusters = np.array([fcm.cluster_list[i] for i in of.cluster_indices])
                ets = np.asarray(of.eigentensors)
                seen: list[np.ndarray] = []
                for perm in itertools.permutations(range(n)):
                    tup = clusters[:, perm]
                    # Clusters with repeated atoms give the same tuple for several
                    # permutations; count each distinct tuple once.
                    new = np.ones(len(tup), dtype=bool)
                    for s in seen:
                        new &= ~np.all(tup == s, axis=1)
                    seen.append(tup)
                    if not new.any():
                        continue
                    tup = tup[new]
                    t = ets.transpose(0, *[1 + q for q in perm]).reshape(n_e, -1)
                    flat = 3 * tup[:, None, :] + carts[None, :, :]  # (C, 3^n, n)
                    val = np.broadcast_to(t[None], (len(tup), n_e, 3**n))
                    nz = np.abs(val) > 1e-12
                    c_i, e_i, k_i = np.nonzero(nz)
                    idx = flat[c_i, k_i]  # (nnz, n)
                    rows.setdefault(n, []).append((idx[:, 0] * self.n_et + et_index + e_i).astype(np.intp))
                    cols.setdefault(n, []).append(idx[:, 1:])
                    vals.setdefault(n, []).append(val[nz] * (-1.0 / math.factorial(n - 1)))
            et_index += n_e
        self._entries = {n: (np.concatenate(rows[n]), np.concatenate(cols[n]).T.astype(np.intp),
                             np.concatenate(vals[n])) for n in rows}
        self._csr: dict[int, sp.csr_matrix] = {}
        for n, (r, c, v) in self._entries.items():
            if n <= 3:
                col = c[0] if n == 2 else c[0] * self.n3 + c[1]
                shape = (self.n3 * self.n_et, self.n3 ** (n - 1))
                self._csr[n] = sp.csr_matrix((v, (r, col)), shape=shape)

    def design_by_order(self, u: np.ndarray) -> dict[int, np.ndarray]:
        """Per-order design blocks (3N × P) for displacements ``u`` (N, 3)."""
        uf = np.asarray(u, dtype=float).ravel()
        out = {}
        for n, mat in self._csr.items():
            vec = uf if n == 2 else np.outer(uf, uf).ravel()
            out[n] = (mat @ vec).reshape(self.n3, self.n_et) @ self.cvs
        for n, (r, c, v) in ((n, e) for n, e in self._entries.items() if n not in self._csr):
            prod = v * np.prod(uf[c], axis=0)  # orders >= 4: scatter-add
            acc = np.bincount(r, prod, minlength=self.n3 * self.n_et)
            out[n] = acc.reshape(self.n3, self.n_et) @ self.cvs
        return out

    def design(self, u: np.ndarray) -> np.ndarray:
        """Design block Φ(u), 3N × P: forces = Φ(u) @ parameters."""
        return sum(self.design_by_order(u).values())

    def fc_array(self, order: int, params: np.ndarray) -> np.ndarray:
        """Force constants of ``order`` for ``params`` in phonopy's layout
        (N,)*order + (3,)*order and this supercell's atom order. (hiphive's
        ``get_fc_array`` loops over all N^order tuples in Python: seconds for fc3.)
        """
        if order not in self._entries or self.n3**order > 4e8:  # dense array: keep < 3 GB
            raise ValueError(f"no dense fc{order} on {self.n3 // 3} atoms (orders {sorted(self._entries)})")
        coef = self.cvs @ np.asarray(params, dtype=float)  # eigentensor coefficients
        row, cols, val = self._entries[order]
        flat_rest = np.zeros(len(row), dtype=np.intp)
        for c in cols:
            flat_rest = flat_rest * self.n3 + c
        ia, e = np.divmod(row, self.n_et)
        # undo the -1/(n-1)! folded into the force expansion
        w = val * coef[e] * (-math.factorial(order - 1))
        fc = np.bincount(ia * self.n3 ** (order - 1) + flat_rest, w, minlength=self.n3**order)
        fc = fc.reshape((self.n3 // 3, 3) * order)
        return fc.transpose(*range(0, 2 * order, 2), *range(1, 2 * order, 2)).copy()

    def energy_row(self, u: np.ndarray, blocks: dict[int, np.ndarray]) -> np.ndarray:
        # E_n = -(1/n) u · F_n, since F_n is homogeneous of degree n-1 in u.
        uf = np.asarray(u, dtype=float).ravel()
        return sum(-(uf @ b) / n for n, b in blocks.items())


def _same_supercell(a: Atoms, b: Atoms) -> bool:
    return (len(a) == len(b) and np.array_equal(a.numbers, b.numbers)
            and np.allclose(a.cell, b.cell, atol=1e-8)
            and np.allclose(a.positions, b.positions, atol=1e-8))


def _as_ase(supercell: Any) -> Atoms:
    """ASE Atoms from ASE Atoms, PhonopyAtoms or a Phonopy/Phono3py object (its
    supercell), keeping phonopy's atom order.
    """
    if hasattr(supercell, "supercell") and not isinstance(supercell, Atoms):
        supercell = supercell.supercell
    if isinstance(supercell, Atoms):
        return supercell
    return Atoms(symbols=list(supercell.symbols), cell=np.asarray(supercell.cell),
                 scaled_positions=np.asarray(supercell.scaled_positions), pbc=True)


def _forces_of(atoms: Atoms) -> np.ndarray:
    if "forces" in atoms.arrays:
        return np.asarray(atoms.arrays["forces"], dtype=float)
    if atoms.calc is not None:
        return np.asarray(atoms.get_forces(), dtype=float)
    raise ValueError("structure has no forces (no 'forces' array and no calculator)")


# ---------------------------------------------------------------- the model
class BayesianForceConstantModel:
    """Force-constant expansion with a Bayesian (evidence-maximised ridge) posterior.

    Args:
        primitive: the ideal primitive (or unit) cell of the ClusterSpace.
        cutoffs: cluster cutoffs in Å for orders 2, 3, … (hiphive convention).
        supercell: default ideal supercell for structures given without one.
        tol: relative tolerance on α and β of the evidence iteration (Callsen: 0.01).
        include_noise: add the noise variance 1/β to each force component's
            predictive variance (:meth:`force_std`, :meth:`score`).

    Restarts: the posterior is a deterministic function of (primitive, cutoffs,
    settings, training structures): refitting the dataset's labels restores it
    bit for bit, so the model keeps no state of its own worth a file.
    """

    def __init__(self, primitive: Atoms, cutoffs: Sequence[float], supercell: Atoms | None = None,
                 tol: float = 0.01, max_iter: int = 500, include_noise: bool = False) -> None:
        from hiphive import ClusterSpace

        if not tol > 0:
            raise ValueError(f"tol = {tol!r}: must be > 0")
        with _quiet_hiphive():
            self.cs = ClusterSpace(primitive, list(cutoffs))  # acoustic sum rules on
        self.primitive = primitive.copy()
        self.cutoffs = [float(c) for c in cutoffs]
        self.tol, self.max_iter, self.include_noise = float(tol), int(max_iter), bool(include_noise)
        self._bases: list[_SupercellBasis] = []
        self._default: _SupercellBasis | None = None
        if supercell is not None:
            self._default = self._basis(supercell)
        self._phi: list[np.ndarray] = []  # design blocks of the training structures
        self._y: list[np.ndarray] = []  # their forces, flattened
        self._structures: list[tuple[Atoms, Atoms]] = []  # (displaced with forces, ideal)
        self.fit_result: EvidenceFit | None = None
        self.version = 0  #: incremented by every refit (provenance; calculator caches)

    # ------------------------------------------------------------ bookkeeping
    @property
    def n_parameters(self) -> int:
        return int(self.cs.n_dofs)

    @property
    def n_structures(self) -> int:
        return len(self._phi)

    @property
    def parameters(self) -> np.ndarray:  # posterior mean
        return self._require_fit().mean

    @property
    def covariance(self) -> np.ndarray:  # posterior covariance S
        return self._require_fit().cov

    def _require_fit(self) -> EvidenceFit:
        if self.fit_result is None:
            raise RuntimeError("model not fitted: call fit() first")
        return self.fit_result

    def _basis(self, ideal: Atoms | None, atoms: Atoms | None = None) -> _SupercellBasis:
        """The basis of ``ideal`` (built once); without it, the registered supercell
        of the same size and cell closest to ``atoms`` (ours and phonopy's ordering
        of one supercell share size and cell; the wrong one gives Å displacements).
        """
        if ideal is None:
            if atoms is None:
                if self._default is None:
                    raise ValueError("no default supercell: pass ideal=...")
                return self._default
            best, best_d = None, math.inf
            for b in self._bases:
                if len(b.ideal) == len(atoms) and np.allclose(b.ideal.cell, atoms.cell, atol=1e-6):
                    d = float(np.abs(displacements(atoms, b.ideal)).max())
                    if d < best_d:
                        best, best_d = b, d
            if best is None:
                raise ValueError(f"no ideal supercell with {len(atoms)} atoms and this cell: "
                                 "pass ideal=...")
            return best
        for b in self._bases:
            if _same_supercell(b.ideal, ideal):
                return b
        basis = _SupercellBasis(self.cs, ideal)
        self._bases.append(basis)
        return basis

    def design_matrix(self, atoms: Atoms, ideal: Atoms | None = None) -> np.ndarray:
        """Design block Φ (3N × P) of a configuration: forces = Φ @ parameters."""
        b = self._basis(ideal, atoms)
        return b.design(displacements(atoms, b.ideal))

    # ------------------------------------------------------------ training
    def fit(self, structures: Sequence[Atoms], ideal: Atoms | None = None) -> "BayesianForceConstantModel":
        """Replace the training set by ``structures`` (displaced supercells with
        forces, from a calculator or a ``forces`` array) and fit.
        """
        self._phi, self._y, self._structures = [], [], []
        return self.add(structures, ideal, refit=True)

    def add(self, structures: Sequence[Atoms] | Atoms, ideal: Atoms | None = None,
            refit: bool = True) -> "BayesianForceConstantModel":
        """Add labelled structures (e.g. the frames the trigger selected), then refit."""
        for atoms in [structures] if isinstance(structures, Atoms) else structures:
            f = _forces_of(atoms)
            b = self._basis(ideal, atoms)
            self._phi.append(b.design(displacements(atoms, b.ideal)))
            self._y.append(f.ravel())
            stored = atoms.copy()  # (copy() drops the calculator)
            stored.arrays["forces"] = f.copy()
            self._structures.append((stored, b.ideal))
        if refit:
            self.refit()
        return self

    def refit(self) -> EvidenceFit:
        """Evidence-maximised fit on all stored structures."""
        if not self._phi:
            raise RuntimeError("no training structures")
        phi, y = self.fit_data()
        self.fit_result = evidence_ridge(phi, y, tol=self.tol, max_iter=self.max_iter)
        self.version += 1
        return self.fit_result

    def fit_data(self) -> tuple[np.ndarray, np.ndarray]:
        """Stacked design matrix and force vector of the training set."""
        return np.vstack(self._phi), np.concatenate(self._y)

    def structure_container(self) -> Any:
        """Hiphive StructureContainer of the training set (slow: hiphive builds its
        own fit matrices; for interoperability and cross-checks).
        """
        from hiphive import StructureContainer

        with _quiet_hiphive():
            sc = StructureContainer(self.cs)
            for atoms, ideal in self._structures:
                s = ideal.copy()
                s.new_array("displacements", displacements(atoms, ideal))
                s.new_array("forces", atoms.arrays["forces"])
                sc.add_structure(s)
        return sc

    # ------------------------------------------------------------ prediction
    def evaluate(self, atoms: Atoms, ideal: Atoms | None = None) -> tuple[np.ndarray, np.ndarray, float]:
        """Posterior mean forces (N, 3), std of each force component (N, 3), both eV/Å,
        and energy (eV, relative to the ideal supercell), from one design block.
        """
        fit = self._require_fit()
        b = self._basis(ideal, atoms)
        u = displacements(atoms, b.ideal)
        blocks = b.design_by_order(u)
        phi = sum(blocks.values())
        # diag(Φ S Φᵀ) without forming the 3N × 3N matrix
        var = np.einsum("ij,ij->i", phi @ fit.cov, phi)
        if self.include_noise:
            var = var + 1.0 / fit.beta
        std = np.sqrt(np.clip(var, 0.0, None))
        energy = float(b.energy_row(u, blocks) @ fit.mean)
        return (phi @ fit.mean).reshape(-1, 3), std.reshape(-1, 3), energy

    def predict(self, atoms: Atoms, ideal: Atoms | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Posterior mean forces and std of each force component, (N, 3) each, eV/Å."""
        return self.evaluate(atoms, ideal)[:2]

    def predict_forces(self, atoms: Atoms, ideal: Atoms | None = None) -> np.ndarray:
        """Posterior mean forces (N, 3) in eV/Å."""
        return self.evaluate(atoms, ideal)[0]

    def predict_energy(self, atoms: Atoms, ideal: Atoms | None = None) -> float:
        """Energy (eV) relative to the ideal supercell."""
        return self.evaluate(atoms, ideal)[2]

    def force_std(self, atoms: Atoms, ideal: Atoms | None = None) -> np.ndarray:
        """Posterior std (eV/Å) of each force component, shape (N, 3)."""
        return self.evaluate(atoms, ideal)[1]

    def score(self, atoms: Atoms, ideal: Atoms | None = None) -> float:
        """Uncertainty score for the trigger: the largest posterior std of a force
        component, eV/Å (plus noise if ``include_noise``).
        """
        return float(self.evaluate(atoms, ideal)[1].max())

    def anharmonicity(self, frames: Sequence[Atoms], ideal: Atoms | None = None) -> float:
        """σᴬ = √(Σ|F − F_harm|² / Σ|F|²) over labelled ``frames`` (Callsen et al.),
        with F_harm from the fitted second-order force constants alone.
        """
        num = den = 0.0
        for atoms in frames:
            b = self._basis(ideal, atoms)
            f_harm = b.design_by_order(displacements(atoms, b.ideal))[2] @ self.parameters
            f = _forces_of(atoms).ravel()
            num, den = num + float(np.sum((f - f_harm) ** 2)), den + float(f @ f)
        return math.sqrt(num / den)

    # ------------------------------------------------------------ export
    def potential(self) -> Any:
        """Hiphive ForceConstantPotential with the posterior-mean parameters."""
        from hiphive import ForceConstantPotential

        with _quiet_hiphive():
            return ForceConstantPotential(self.cs, self.parameters)

    def force_constants(self, supercell: Any) -> Any:
        """Hiphive SortedForceConstants on ``supercell`` (Atoms, PhonopyAtoms, Phonopy)."""
        with _quiet_hiphive():
            return self.potential().get_force_constants(_as_ase(supercell))

    def calculator(self, supercell: Atoms) -> Calculator:
        """Hiphive's ForceConstantCalculator (ASE) for fast MD around ``supercell``."""
        from hiphive.calculators import ForceConstantCalculator

        return ForceConstantCalculator(self.force_constants(supercell))

    def fc2(self, supercell: Any) -> np.ndarray:
        """fc2 (n, n, 3, 3) in eV/Å² for ``phonon.force_constants``. Pass phonopy's
        own supercell (or the Phonopy object): another atom order gives silently
        wrong frequencies.
        """
        return self.fc_array(2, supercell)

    def fc3(self, supercell: Any) -> np.ndarray:
        """fc3 (n, n, n, 3, 3, 3) in eV/Å³ for ``ph3.fc3`` (full format), on
        phono3py's own supercell.
        """
        return self.fc_array(3, supercell)

    def fc_array(self, order: int, supercell: Any) -> np.ndarray:
        """Force constants of any order in phonopy's full layout on ``supercell``
        (ASE Atoms, PhonopyAtoms, or a Phonopy/Phono3py object's supercell).
        """
        fit = self._require_fit()
        return self._basis(_as_ase(supercell)).fc_array(order, fit.mean)


class RefittedModelCalculator(Calculator):
    """An ASE calculator of a model refitted in place: a new ``model.version`` makes cached
    results stale (subclasses set ``self._version`` when they calculate).
    """

    def __init__(self, model: Any) -> None:
        super().__init__()
        self.model, self._version = model, -1

    def check_state(self, atoms: Atoms, tol: float = 1e-15) -> list[str]:
        changes = super().check_state(atoms, tol)
        return changes + ["model"] if self._version != self.model.version else changes


class BayesianCalculator(RefittedModelCalculator):
    """ASE calculator of the posterior mean; ``results['force_std']`` (N, 3) and
    ``results['uncertainty']`` (the trigger score, eV/Å) come with every force
    evaluation at no extra cost. A refit of the model invalidates cached results.
    """

    implemented_properties = ["energy", "forces", "force_std", "uncertainty"]

    def __init__(self, model: BayesianForceConstantModel, ideal: Atoms | None = None) -> None:
        super().__init__(model)
        self.ideal = ideal

    def calculate(self, atoms: Atoms | None = None, properties: Sequence[str] = ("energy",),
                  system_changes: Sequence[str] = all_changes) -> None:
        super().calculate(atoms, properties, system_changes)
        self._version = self.model.version
        forces, std, energy = self.model.evaluate(self.atoms, self.ideal)
        self.results.update(forces=forces, energy=energy, force_std=std,
                            uncertainty=float(std.max()))
