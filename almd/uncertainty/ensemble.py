"""K members on one frozen backbone: shared trunk, K linear readout heads.

Member k gives per-atom energies E_ki = W_k[z_i]·h_i + b_k[z_i] on the shared
trunk features h (see :mod:`almd.uncertainty.readout`; SevenNet and MACE
backbones). One trunk forward serves all members; each member's forces need
one backward through the trunk (the cotangent on h is W_k[z_i]), so K members
cost 1 forward + K backwards, and the member *mean* alone costs 1 forward + 1
backward (forces are linear in W).

**Members are readout adapters.** The issue asks for members that "share one
frozen backbone and differ in their adapters (different seeds, bootstrap
resamples)". Here each member's adapter is a *delta adapter on the readout*:
W_k = W_0 + Δ_k with W_0 the pretrained readout, trained with weight decay on
Δ_k (as :mod:`almd.potentials.adapters`' delta adapters are). Because the
trunk is frozen, the loss is exactly quadratic in Δ_k, so instead of SGD each
member is solved exactly: ridge regression (= weight decay) on

* a bootstrap resample of the labelled frames (seeded by ``seed``), and
* a random prior centre: the decay pulls Δ_k toward a seeded random c_k, not
  toward 0 (``prior_scale``), the "randomised prior" that makes an ensemble of
  linear models sample their posterior rather than agree on one fit.

Why the adapters sit on the readout and nowhere deeper: an adapter inside the
interaction blocks (LoRA) changes the features, so every member would need its
own trunk forward *and* backward — K full models per MD step. With readout
adapters the trunk runs once, the member mean costs one model, and the spread
K backwards (every ``uncertainty_every``-th step, see ``EnsembleCalculator``),
which is what keeps K = 4 within 2× of one model. The exact solve also makes
refits (as labels arrive) a small linear solve instead of a training run, and
deterministic for a given seed.

Δ_k is restricted to an r-dimensional feature subspace D (the pretrained
readout direction and the top principal components of the training
features): design rows need one trunk backward per subspace direction per
frame (r ≈ 16: a couple of seconds for an 8-atom cell), then every member and
every refit is a small linear solve.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import numpy as np
import torch
from ase import Atoms

from almd import potentials
from almd.potentials import Graph, Potential, atomic_torch_save, build_graph, register_format
from almd.potentials.files import backbone_from_export, read_payload
from almd.uncertainty.calibration import Calibration, reduce_atoms
from almd.uncertainty.readout import readout_for

__all__ = ["Ensemble", "FORMAT", "frame_score", "per_atom_spread", "SCORES"]

FORMAT = "almd-ensemble-1"
SCORES = ("max", "mean", "rms")


@dataclass
class _Design:
    """Least-squares rows of one labelled frame, relative to the pretrained readout."""

    force_x: np.ndarray  # (3n, P) d(force)/d(parameters)
    force_y: np.ndarray  # (3n,) reference force minus pretrained-readout force
    energy_x: np.ndarray  # (P,)
    energy_y: float
    n_atoms: int
    key: str = ""  # which labelled frame (so a refit never counts a frame twice)


def _frame_key(atoms: Atoms) -> str:
    from almd.structures import structure_hash

    if "content_hash" in atoms.info:  # from a LabelDatabase: structure + reference settings
        return str(atoms.info["content_hash"])
    return f"{structure_hash(atoms)}:{float(atoms.get_potential_energy()):.10g}"


def _labelled(frames, which: str) -> list[Atoms]:
    """A LabelDatabase (its ``training_set``/``validation_set``) or any iterable of labelled Atoms."""
    if hasattr(frames, which):
        return getattr(frames, which)()
    return list(frames)


def per_atom_spread(member_forces: np.ndarray) -> np.ndarray:
    """(N,) force spread per atom: RMS over x, y, z of the std over members (eV/Å).

    Per component, so that a calibrated value is the expected size of one
    force-component error.
    """
    return np.sqrt(member_forces.var(axis=0).mean(axis=-1))


def frame_score(spread: np.ndarray, reduce: str = "max") -> float:
    """Per-frame score: max, mean or rms over atoms of a per-atom spread."""
    return reduce_atoms(spread, reduce)


class Ensemble(Potential):
    """K readout heads on one frozen backbone (SevenNet-0 by default, or any MACE potential).

    As a :class:`~almd.potentials.Potential` it is the member mean, so
    ``almd.Calculator(model=ensemble)`` and the autodiff module (Hessians,
    HVPs) work on it unchanged; :meth:`evaluate` gives every member.

    ``score``: the per-frame reduction over atoms. ``"max"`` (default) keeps a
    local failure visible in a large cell; ``"mean"``/``"rms"`` average the
    K-member sampling noise over atoms and rank 64-atom frames of one
    temperature better (examples/calibration_si.py, 900 K: Spearman 0.88 vs
    0.66), at the price of diluting one bad atom by 1/N.
    ``calibration``: ``Calibration(force_term=True)`` adds the model-form
    term that the members, sharing one trunk, cannot show.
    """

    backbone_name = "ensemble"
    FILE_NAME = ("ensemble", ".pt")  #: stem and suffix of a campaign's checkpoint files of it

    def __init__(self, backbone: str | os.PathLike | Potential = "sevennet-0", k: int = 4, seed: int = 0,
                 rank: int = 16, score: str = "max", calibration: Calibration | None = None):
        super().__init__()
        if k < 2:
            raise ValueError(f"an ensemble needs k >= 2 members, got {k}")
        if score not in SCORES:
            raise ValueError(f"score {score!r} is not one of: {', '.join(SCORES)}")
        self.backbone = potentials.load(backbone)
        for p in self.backbone.parameters():
            p.requires_grad_(False)  # frozen: members differ only in their heads
        self.readout = readout_for(self.backbone)  # SevenNet or MACE
        self.cutoff, self.species = self.backbone.cutoff, self.backbone.species
        self.k, self.seed, self.rank, self.score = k, seed, rank, score
        w0, b0 = self.readout.pretrained_head()
        self.register_buffer("w0", w0)
        self.register_buffer("b0", b0)
        # all members start as the pretrained readout (identical until fitted)
        self.register_buffer("weights", w0.expand(k, -1, -1).clone())  # (K, S, F)
        self.register_buffer("shifts", b0.expand(k, -1).clone())  # (K, S)
        self.register_buffer("directions", torch.zeros(w0.shape[1], 0, dtype=w0.dtype))  # (F, r)
        self.fit_species: list[int] = []  # species indices with fitted heads
        self.designs: list[_Design] = []
        self.calibration = calibration or Calibration()
        self.version = 0  # bumped by every fit, for provenance
        self.calibrated_keys: set[str] = set()
        # the held-out labels in the order they were learnt (calibrated on), here and before a rebuild
        self.calibrated_order: list[str] = []
        # every training label the model was made from, in order: the heads' designs and, in an
        # ensemble rebuilt on a fine-tuned backbone, the labels of its fine-tune rounds
        self.trained_keys: list[str] = []

    # ---------------------------------------------------------------- prediction
    def atomic_energies(self, graph: Graph, edge_index: torch.Tensor, edge_vectors: torch.Tensor) -> torch.Tensor:
        h = self.readout.features(graph)
        types = self.readout.species_index(graph.numbers)
        return (h * self.weights.mean(0)[types]).sum(-1) + self.shifts.mean(0)[types]

    def forward_with_atomic(self, graph: Graph) -> tuple[torch.Tensor, torch.Tensor]:
        atomic = self.atomic_energies(graph, graph.edge_index, None)  # edges cut in the trunk
        energy = torch.zeros(graph.n_structures, dtype=atomic.dtype, device=atomic.device)
        return energy.index_add(0, graph.batch, atomic), atomic

    def evaluate(self, graph: Graph, members: bool = True, stress: bool = False) -> dict[str, torch.Tensor]:
        """Energies, forces (and stress) of every member, or of the mean only.

        ``members=True``: ``energy`` (K, b), ``forces`` (K, n, 3), ``stress``
        (K, b, 3, 3) — one trunk forward and K backwards. ``members=False``:
        the mean only, (b,), (n, 3), (b, 3, 3) — one forward, one backward.
        """
        stress = stress and bool(graph.pbc.all())
        graph.requires_grad_(positions=True, strain=stress)
        h = self.readout.features(graph)
        types = self.readout.species_index(graph.numbers)
        weights = self.weights[:, types]  # (K, n, F): dE_k/dh
        atomic = torch.einsum("nf,knf->kn", h.detach(), weights) + self.shifts[:, types]
        energy = torch.zeros(self.k, graph.n_structures, dtype=h.dtype, device=h.device)
        energy = energy.index_add(1, graph.batch, atomic)
        inputs = [graph.positions] + ([graph.strain] if stress else [])
        cotangents = weights if members else weights.mean(0, keepdim=True)
        # a loop of backwards: measured no slower than one is_grads_batched call (see benchmark)
        grads = [torch.autograd.grad(h, inputs, c, retain_graph=i < len(cotangents) - 1)
                 for i, c in enumerate(cotangents)]
        out = {"energy": energy if members else energy.mean(0),
               "forces": -torch.stack([g[0] for g in grads])}
        if stress:
            out["stress"] = torch.stack([g[1] for g in grads]) / graph.volumes()[:, None, None]
        if not members:
            out = {key: (v[0] if key != "energy" else v) for key, v in out.items()}
        return out

    def graph(self, atoms: Atoms) -> Graph:
        return build_graph(atoms, self.cutoff, self.dtype, self.w0.device)

    def predict(self, atoms: Atoms) -> dict[str, np.ndarray | float]:
        """Atoms in, numbers out: member and mean forces, raw and calibrated spreads, scores."""
        out = self.evaluate(self.graph(atoms), members=True)
        member_forces = out["forces"].detach().double().cpu().numpy()
        spread = per_atom_spread(member_forces)
        raw = frame_score(spread, self.score)
        forces = member_forces.mean(0)
        sigma = self.calibration.sigma(spread, forces)
        return {"energy": float(out["energy"].detach().mean()), "member_energies": out["energy"][:, 0].detach().double().cpu().numpy(),
                "forces": forces, "member_forces": member_forces,
                "forces_std_raw": spread, "forces_std": sigma,
                "uncertainty_raw": raw, "uncertainty": self.calibration.score(raw, sigma, self.score)}

    # ---------------------------------------------------------------- training
    def _species_of(self, frames: list[Atoms]) -> list[int]:
        zs = sorted({int(z) for a in frames for z in a.numbers})
        return [int(self.readout.species_index(torch.tensor([z]))) for z in zs]

    def _init_directions(self, frames: list[Atoms]) -> None:
        """Subspace of head corrections: the pretrained readout direction + top PCs of the features."""
        with torch.no_grad():
            h = torch.cat([self.readout.features(self.graph(a)) for a in frames]).double()
        w = self.w0[self.fit_species].double().mean(0)
        basis = [w / w.norm()]
        centred = h - h.mean(0)
        _, _, vt = torch.linalg.svd(centred, full_matrices=False)
        basis += list(vt[: self.rank])
        q, _ = torch.linalg.qr(torch.stack(basis, 1))
        self.directions = q[:, : self.rank].to(self.w0.dtype)

    def _design(self, atoms: Atoms) -> _Design:
        """Rows for one labelled frame: r·S trunk backwards (one per direction and species)."""
        f_ref = np.asarray(atoms.get_forces(), float).reshape(-1)
        e_ref = float(atoms.get_potential_energy())
        graph = self.graph(atoms)
        graph.requires_grad_(positions=True, strain=False)
        h = self.readout.features(graph)
        types = self.readout.species_index(graph.numbers)
        base = (h.detach() * self.w0[types]).sum(-1) + self.b0[types]
        (g0,) = torch.autograd.grad(h, graph.positions, self.w0[types], retain_graph=True)
        columns, e_cols = [], []
        for s in self.fit_species:
            mask = (types == s).to(h.dtype)[:, None]
            for d in self.directions.T:
                (g,) = torch.autograd.grad(h, graph.positions, mask * d, retain_graph=True)
                columns.append(-g.reshape(-1))
                e_cols.append(float((h.detach() * mask * d).sum()))
        n_s = [float((types == s).sum()) for s in self.fit_species]
        force_x = torch.stack(columns, 1).double().numpy()
        force_x = np.hstack([force_x, np.zeros((force_x.shape[0], len(n_s)))])  # shifts give no force
        return _Design(force_x=force_x, force_y=f_ref + g0.reshape(-1).double().numpy(),
                       energy_x=np.array(e_cols + n_s), energy_y=e_ref - float(base.sum()), n_atoms=len(atoms),
                       key=_frame_key(atoms))

    def fit(self, frames: Iterable[Atoms], append: bool = True, ridge: float = 1e-3, energy_weight: float = 1.0,
            prior_scale: float = 0.0, bootstrap: bool = True) -> dict[str, float]:
        """Fit every member's head on labelled frames (energies and forces).

        ``frames``: Atoms with reference results (e.g. ``LabelDatabase.training_set()``
        or SinglePointCalculator results). ``append`` keeps earlier frames' rows
        (refit as labels arrive). ``ridge``: penalty on head corrections,
        relative to the mean diagonal of the force normal matrix. Member k sees
        a bootstrap resample of the frames (seeded by ``seed``) and, if ``prior_scale`` > 0,
        a random prior centre of that relative size. Returns training RMSEs.
        """
        frames = _labelled(frames, "training_set")
        if not append:
            self.designs, self.trained_keys = [], []
        seen = {d.key for d in self.designs}
        frames = [a for a in frames if _frame_key(a) not in seen]
        if not self.designs:
            if not frames:
                raise ValueError("fit() needs at least one labelled frame")
            self.fit_species = self._species_of(frames)
            self._init_directions(frames)
        elif set(self._species_of(frames)) - set(self.fit_species):
            raise ValueError("new species in appended frames; refit with append=False")
        self.designs += [self._design(a) for a in frames]
        known = set(self.trained_keys)
        self.trained_keys += [d.key for d in self.designs if d.key not in known]
        r, S = self.directions.shape[1], len(self.fit_species)
        n_par = r * S + S
        # rows: forces, and energies per atom (weighted) so both are in eV/Å-ish units
        blocks = []
        for d in self.designs:
            x = np.vstack([d.force_x, energy_weight * d.energy_x[None] / d.n_atoms])
            y = np.concatenate([d.force_y, [energy_weight * d.energy_y / d.n_atoms]])
            blocks.append((x.T @ x, x.T @ y))
        gram_all = sum(b[0] for b in blocks)
        lam = ridge * float(np.trace(gram_all[: r * S, : r * S])) / (r * S) / len(self.designs)
        penalty = np.diag([lam] * (r * S) + [1e-10 * lam] * S)  # shifts almost free
        weights = self.w0.expand(self.k, -1, -1).clone().double()
        shifts = self.b0.expand(self.k, -1).clone().double()
        rng = np.random.default_rng(self.seed)
        D = self.directions.double()
        for k in range(self.k):
            counts = rng.multinomial(len(blocks), [1 / len(blocks)] * len(blocks)) if bootstrap else np.ones(len(blocks))
            gram = sum(c * b[0] for c, b in zip(counts, blocks)) + penalty * counts.sum()
            rhs = sum(c * b[1] for c, b in zip(counts, blocks))
            centre = np.zeros(n_par)
            if prior_scale > 0:
                centre[: r * S] = prior_scale * rng.standard_normal(r * S) / np.sqrt(lam)
            theta = np.linalg.solve(gram, rhs + penalty @ centre * counts.sum())
            coef = torch.as_tensor(theta[: r * S].reshape(S, r))
            for j, s in enumerate(self.fit_species):
                weights[k, s] += D @ coef[j]
                shifts[k, s] += theta[r * S + j]
        self.weights = weights.to(self.w0.dtype)
        self.shifts = shifts.to(self.w0.dtype)
        self.version += 1
        return self._training_rmse()

    def coefficients(self) -> np.ndarray:
        """(K, P) each member's head correction in design coordinates (subspace weights, then shifts).

        With ``d = design(atoms)``, member k's forces are the pretrained
        readout's forces plus ``d.force_x @ coefficients()[k]`` exactly, so
        studies of the spread (more members, other scores) on held-out frames
        need each frame's trunk backwards once, not once per variant.
        """
        D = self.directions.double()
        thetas = []
        for k in range(self.k):
            w = torch.stack([(self.weights[k, s].double() - self.w0[s].double()) @ D for s in self.fit_species])
            b = [float(self.shifts[k, s] - self.b0[s]) for s in self.fit_species]
            thetas.append(np.concatenate([w.reshape(-1).numpy(), b]))
        return np.array(thetas)

    def design(self, atoms: Atoms) -> _Design:
        """Least-squares rows of one labelled frame (see :meth:`coefficients`): r·S + 1 trunk backwards."""
        return self._design(atoms)

    def _training_rmse(self) -> dict[str, float]:
        r, S = self.directions.shape[1], len(self.fit_species)
        theta = self.coefficients().mean(0)
        res = np.concatenate([d.force_x @ theta - d.force_y for d in self.designs])
        return {"force_rmse": float(np.sqrt(np.mean(res**2))), "frames": len(self.designs), "rank": r * S}

    # ---------------------------------------------------------------- calibration
    def calibrate(self, frames: Iterable[Atoms], reset: bool = False) -> dict[str, float]:
        """Update the calibration with labelled frames the heads were not fitted on.

        ``frames``: Atoms with reference forces, or a LabelDatabase (its
        validation split). Frames already used, for fitting or calibration, are skipped.
        """
        if reset:
            self.calibration.reset()
            self.calibrated_keys, self.calibrated_order = set(), []
        used = self.calibrated_keys | {d.key for d in self.designs} | set(self.trained_keys)
        for atoms in _labelled(frames, "validation_set"):
            key = _frame_key(atoms)
            if key in used:
                continue
            used.add(key)
            self.calibrated_keys.add(key)
            self.calibrated_order.append(key)
            pred = self.predict(atoms)
            errors = np.asarray(atoms.get_forces(), float) - pred["forces"]
            self.calibration.update(errors, pred["forces_std_raw"][:, None], pred["uncertainty_raw"], forces=pred["forces"])
        return {"scale": self.calibration.scale, "components": self.calibration.n_components}

    # ---------------------------------------------------------------- files
    def export(self) -> dict:
        return {"format": FORMAT, "backbone": self.backbone.export(),
                "settings": {"k": self.k, "seed": self.seed, "rank": self.rank, "score": self.score},
                "weights": self.weights.cpu(), "shifts": self.shifts.cpu(), "directions": self.directions.cpu(),
                "fit_species": self.fit_species, "designs": [vars(d) for d in self.designs],
                "calibration": self.calibration.state_dict(), "version": self.version,
                "calibrated_keys": sorted(self.calibrated_keys), "trained_keys": list(self.trained_keys),
                "calibrated_order": list(self.calibrated_order)}

    def head_state(self) -> dict:
        """What a refit changes (heads, subspace, calibration): another process with the same
        backbone predicts identically after :meth:`load_head_state` (design rows stay behind).
        """
        return {"weights": self.weights.cpu(), "shifts": self.shifts.cpu(), "directions": self.directions.cpu(),
                "fit_species": list(self.fit_species), "calibration": self.calibration.state_dict(),
                "version": self.version}

    def load_head_state(self, state: dict) -> None:
        self.weights, self.shifts, self.directions = state["weights"], state["shifts"], state["directions"]
        self.fit_species = list(state["fit_species"])
        self.calibration = Calibration.from_state_dict(state["calibration"])
        self.version = state["version"]

    def save(self, path: str | os.PathLike) -> Path:
        """Atomic write (temp file, fsync, rename) of everything needed to rebuild and refit."""
        return atomic_torch_save(self.export(), path)

    @classmethod
    def load(cls, path: str | os.PathLike, allow_pickle: bool = False) -> "Ensemble":
        """The ensemble :meth:`save` wrote (read weights-only; see :func:`almd.potentials.files.read_payload`)."""
        return cls.from_payload(read_payload(path, allow_pickle), str(path))

    @classmethod
    def from_payload(cls, payload: dict, path: str = "payload") -> "Ensemble":
        if not (isinstance(payload, dict) and payload.get("format") == FORMAT):
            raise ValueError(f"{path}: not an almd ensemble file ({FORMAT})")
        ens = cls(backbone_from_export(payload["backbone"], str(path)), **payload["settings"],
                  calibration=Calibration.from_state_dict(payload["calibration"]))
        ens.weights, ens.shifts = payload["weights"], payload["shifts"]
        ens.directions = payload["directions"]
        ens.fit_species = list(payload["fit_species"])
        ens.designs = [_Design(**d) for d in payload["designs"]]
        ens.version = payload["version"]
        ens.calibrated_keys = set(payload["calibrated_keys"])
        ens.trained_keys = list(payload.get("trained_keys", [d.key for d in ens.designs]))  # older files: the designs
        ens.calibrated_order = list(payload.get("calibrated_order", sorted(ens.calibrated_keys)))
        return ens


register_format(FORMAT, lambda name, payload: Ensemble.from_payload(payload, name))
