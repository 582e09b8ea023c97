"""``EnsembleCalculator``: the ensemble as an ASE calculator with uncertainties.

``results`` hold the member mean (``energy``, ``forces``, ``stress``), the
per-atom force spread, raw and calibrated (``forces_std_raw``,
``forces_std``), the per-frame score (``uncertainty``, ``uncertainty_raw``,
eV/Å) and the members' forces. Hessians come from the parent class, on the
member mean.

Cost: the mean needs one trunk backward, the spread K. With
``uncertainty_every=n`` the spread is evaluated on every n-th call only and
the other calls pay for the mean alone; their results carry the last spread
with ``uncertainty_age`` > 0 (calls since it was evaluated), and none before the
first evaluation. A walker takes a score only from an evaluation of its own step.
"""

from __future__ import annotations

import os
from typing import Protocol, runtime_checkable

import numpy as np
from ase import Atoms
from ase.calculators.calculator import Calculator as AseCalculatorBase
from ase.calculators.calculator import all_changes
from ase.stress import full_3x3_to_voigt_6_stress

from almd.potentials import build_graph
from almd.potentials.calculator import Calculator
from almd.uncertainty.ensemble import Ensemble, frame_score, per_atom_spread

__all__ = ["EnsembleCalculator", "UncertaintyCalculator"]


@runtime_checkable
class UncertaintyCalculator(Protocol):
    """An ASE calculator whose ``results`` hold the frame's calibrated score ``uncertainty``
    (eV/Å) at the calls where it evaluates it, on a schedule a restart can realign.
    """

    results: dict

    def align_schedule(self, step: int) -> None:
        """Evaluate the spread at the calls an uninterrupted run would, counting from MD step ``step``."""

    def reset(self) -> None:
        """Forget cached results."""


class EnsembleCalculator(Calculator):
    """ASE calculator for an :class:`Ensemble` (an instance or a file from ``Ensemble.save``)."""

    implemented_properties = Calculator.implemented_properties + [
        "forces_std", "forces_std_raw", "uncertainty", "uncertainty_raw", "member_forces"]

    def __init__(self, ensemble: Ensemble | str | os.PathLike, uncertainty_every: int = 1,
                 device: str = "cpu", dtype: str = "float32", skin: float = 0.5, **kwargs):
        if not isinstance(ensemble, Ensemble):
            ensemble = Ensemble.load(ensemble)
        if uncertainty_every < 1:
            raise ValueError(f"uncertainty_every must be >= 1, got {uncertainty_every}")
        super().__init__(model=ensemble, device=device, dtype=dtype, skin=skin, **kwargs)
        self.ensemble: Ensemble = self.potential
        self.uncertainty_every = uncertainty_every
        self.calls = 0
        self._last: dict | None = None  # last evaluated spread

    def calculate(self, atoms: Atoms | None = None, properties=("energy",), system_changes=all_changes):
        # ASE's bookkeeping only; almd.Calculator.calculate would run the mean model again
        AseCalculatorBase.calculate(self, atoms, properties, system_changes)
        atoms = self.atoms
        ens = self.ensemble
        want_stress = bool(atoms.pbc.all())  # same backward as the forces (see almd.Calculator)
        graph = build_graph(atoms, ens.cutoff, self.dtype, self.device, pairs=[self.neighbors.get(atoms)])
        # on schedule only, counted from the MD step (align_schedule): a restart or a checkpoint
        # then evaluates the spread at exactly the steps an uninterrupted run does
        spread_now = self.calls % self.uncertainty_every == 0
        out = ens.evaluate(graph, members=spread_now, stress=want_stress)
        self.calls += 1
        res = {key: v.detach().cpu().double().numpy() for key, v in out.items()}
        if spread_now:
            members = res["forces"]
            spread = per_atom_spread(members)
            raw = frame_score(spread, ens.score)
            sigma = ens.calibration.sigma(spread, members.mean(0))
            self._last = {"forces_std_raw": spread, "forces_std": sigma,
                          "uncertainty_raw": raw, "uncertainty": ens.calibration.score(raw, sigma, ens.score),
                          "member_forces": members, "uncertainty_age": 0}
            for key in res:
                res[key] = res[key].mean(0)
        elif self._last is not None:
            self._last["uncertainty_age"] += 1
        energy = float(res["energy"].sum())
        self.results = {"energy": energy, "free_energy": energy, "forces": res["forces"], **(self._last or {})}
        if want_stress:
            self.results["stress"] = full_3x3_to_voigt_6_stress(res["stress"][0])

    def align_schedule(self, step: int) -> None:
        """Forget cached results and the last spread; call number ``step`` is next.

        A walker calls this after a restart, a rollback or a model change, so the
        spread is evaluated on the same MD steps as in an uninterrupted run.
        """
        self.reset()
        self.calls, self._last = step, None

    def get_uncertainty(self, atoms: Atoms | None = None) -> float:
        return float(self.get_property("uncertainty", atoms))

    def get_forces_std(self, atoms: Atoms | None = None) -> np.ndarray:
        return self.get_property("forces_std", atoms)

