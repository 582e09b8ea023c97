"""Walkers: ASE molecular dynamics that report their uncertainty, can be rolled back, and restart exactly.

A :class:`Walker` owns one Atoms, one ASE calculator and one ASE integrator.
Each step yields a :class:`StepRecord` (energy, temperature, the calculator's
per-frame ``uncertainty`` when it has one, the largest force) and keeps the
recent frames, so the trigger can pick which of them to label.

Its whole dynamical state — positions, momenta, cell, step, the thermostat's
random-number generator, the Nosé–Hoover and barostat chains
(:mod:`almd.campaign.dynamics`) — is a :class:`WalkerState`, which round-trips through
JSON exactly (Python writes the shortest repr that reads back to the same
float) and is checked field by field when read back. A run restored from it
continues bit for bit, because ASE's Langevin draws its noise from that generator
and the forces at a restored geometry are recomputed by the same deterministic model.

A step whose forces are not finite or exceed ``max_force`` is a blow-up: the
record says so, and :meth:`Walker.rollback` returns to the last trusted state
(set with :meth:`Walker.trust`).
"""

from __future__ import annotations

import json
import math
import os
from collections import deque
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Iterator

import numpy as np
from ase import Atoms
from ase.calculators.calculator import Calculator as AseCalculator
from ase.md.velocitydistribution import Stationary

try:  # ASE >= 3.27 renamed MaxwellBoltzmannDistribution
    from ase.md.velocitydistribution import thermalize_momenta
except ImportError:  # pragma: no cover
    from ase.md.velocitydistribution import MaxwellBoltzmannDistribution as thermalize_momenta

from almd.campaign.dynamics import (
    DYNAMICS,
    THERMOSTATTED,
    build_integrator,
    integrator_state,
    restore_integrator,
    retarget,
    set_pressure,
)
from almd.io import atomic_write
from almd.settings import OneOrMore, read_state, settings

__all__ = ["DYNAMICS", "Frame", "StepRecord", "Walker", "WalkerError", "WalkerSettings", "WalkerState"]


class WalkerError(ValueError):
    """A walker setting or a saved walker state that cannot be used."""


@settings(frozen=True, error=WalkerError, noun="walker setting")
class WalkerSettings:
    """MD settings. Times in fs, temperature in K, forces in eV/Å."""

    dynamics: str = "langevin"  #: one of DYNAMICS
    temperature: float = 300.0  #: thermostat target and initial Maxwell–Boltzmann temperature
    timestep: float = 1.0  #: fs
    friction: float = 0.01  #: 1/fs, Langevin only (Callsen et al.: 0.01)
    tdamp: float = 100.0  #: fs, the Nosé–Hoover chain's time scale (nose-hoover, npt; ASE: ~100 steps)
    pdamp: float = 1000.0  #: fs, the barostat's time scale (npt; ASE: ~1000 steps)
    pressure: float = 0.0  #: GPa, the external pressure (npt)
    seed: int = 0
    max_force: float = 50.0  #: a larger force (or a non-finite one) is a blow-up
    keep: int = 1000  #: recent frames kept for frame selection (the trigger's window)
    #: temperature stages after which the last temperature is held, each [steps, T] (constant) or
    #: [steps, T_start, T_end] (linear ramp), K; empty: ``temperature`` throughout (thermostatted dynamics)
    schedule: list[OneOrMore[float]] = field(default_factory=list)
    #: pressure stages, as ``schedule`` but in GPa (npt); empty: ``pressure`` throughout
    pressure_schedule: list[OneOrMore[float]] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.dynamics not in DYNAMICS:
            raise WalkerError(f"dynamics = {self.dynamics!r} is not allowed; allowed: {', '.join(DYNAMICS)}")
        for name in ("timestep", "max_force", "tdamp", "pdamp"):
            if not getattr(self, name) > 0:
                raise WalkerError(f"{name} = {getattr(self, name)!r} must be > 0")
        if self.temperature < 0:
            raise WalkerError(f"temperature = {self.temperature!r} must be >= 0 K")
        if self.dynamics == "langevin" and not self.friction > 0:
            raise WalkerError(f"friction = {self.friction!r} must be > 0 (1/fs) for Langevin dynamics")
        if self.keep < 1:
            raise WalkerError(f"keep = {self.keep!r} must be >= 1")
        _check_stages("schedule", self.schedule, "T", "K", lowest=0.0)
        _check_stages("pressure_schedule", self.pressure_schedule, "P", "GPa", lowest=-math.inf)
        if self.schedule and self.dynamics not in THERMOSTATTED:
            raise WalkerError(f"schedule with dynamics = {self.dynamics!r}: a temperature schedule needs a thermostat "
                              f"(dynamics = one of {', '.join(THERMOSTATTED)})")
        if self.dynamics in ("nose-hoover", "npt"):  # a chain's masses are ∝ k_B T: none at 0 K
            lowest = min([self.temperature, *(v for stage in self.schedule for v in stage[1:])])
            if not lowest > 0:
                raise WalkerError(f"temperature {lowest!r} K with dynamics = {self.dynamics!r}: a Nosé–Hoover chain "
                                  "needs T > 0 K (use langevin to reach 0 K)")
        if self.pressure_schedule and self.dynamics != "npt":
            raise WalkerError(f"pressure_schedule with dynamics = {self.dynamics!r}: a pressure schedule needs "
                              "a barostat (dynamics = 'npt')")

    def temperature_at(self, step: int) -> float:
        """Thermostat temperature (K) of MD step ``step`` (1 is the first step; 0 the start)."""
        return _stage_value(self.schedule, step, self.temperature)

    def pressure_at(self, step: int) -> float:
        """Barostat pressure (GPa) of MD step ``step``."""
        return _stage_value(self.pressure_schedule, step, self.pressure)

    @property
    def schedule_steps(self) -> int:
        """MD steps until the last temperature and pressure are reached (0 without schedules)."""
        return int(max(sum(stage[0] for stage in stages) for stages in (self.schedule, self.pressure_schedule)))

    @property
    def top_temperature(self) -> float:
        """The highest thermostat temperature of the run (K)."""
        return max([self.temperature] if not self.schedule else [float(v) for st in self.schedule for v in st[1:]])

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> "WalkerSettings":
        """From a mapping; an unknown key or a value of the wrong kind is a :class:`WalkerError` naming it."""
        return cls(**raw)


@settings(error=WalkerError)
class WalkerState:
    """Everything that changes during MD; JSON-exact, and checked when read back."""

    step: int
    numbers: list[int]
    positions: list[list[float]]
    momenta: list[list[float]]
    cell: list[list[float]]
    pbc: list[bool]
    rng: dict[str, Any] = field(default_factory=dict)  # numpy bit-generator state
    integrator: dict[str, list] = field(default_factory=dict)  # thermostat / barostat chains (almd.campaign.dynamics)

    @classmethod
    def of(cls, atoms: Atoms, step: int, rng: np.random.Generator,
           integrator: dict[str, list] | None = None) -> "WalkerState":
        return cls(step, atoms.numbers.tolist(), atoms.positions.tolist(), atoms.get_momenta().tolist(),
                   atoms.cell.array.tolist(), atoms.pbc.tolist(), _jsonable(rng.bit_generator.state),
                   integrator or {})

    def atoms(self) -> Atoms:
        a = Atoms(self.numbers, positions=self.positions, cell=self.cell, pbc=self.pbc)
        a.set_momenta(np.array(self.momenta))
        return a

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> "WalkerState":
        """The state :meth:`to_json` wrote; a missing or corrupt field is a one-line :class:`WalkerError`."""
        return read_state(cls, json.loads(text), "walker state", WalkerError)


@dataclass(frozen=True)
class StepRecord:
    step: int
    energy: float  #: potential energy, eV
    temperature: float  #: K
    max_force: float  #: eV/Å
    score: float | None  #: the calculator's per-frame uncertainty (eV/Å), if it gives one
    blown_up: bool = False


@dataclass(frozen=True)
class Frame:
    """A recent MD frame: what the trigger scores and the oracle labels."""

    step: int
    atoms: Atoms
    score: float | None


class Walker:
    """One MD trajectory driven by an ASE calculator (``almd.Calculator``, an ensemble, or a reference)."""

    def __init__(self, atoms: Atoms, calculator: AseCalculator, settings: WalkerSettings | None = None,
                 name: str = "walker-0", state: WalkerState | None = None):
        self.settings = s = settings or WalkerSettings()
        self.name = name
        self.rng = np.random.default_rng(s.seed)
        if state is None:
            self.atoms = atoms.copy()
            self.step = 0
            if not self.atoms.get_momenta().any() and s.temperature_at(0) > 0:
                from ase.parallel import DummyMPI

                # comm: this walker's own draw (ASE's default broadcasts rank 0's under MPI)
                thermalize_momenta(self.atoms, temperature_K=s.temperature_at(0), rng=self.rng, comm=DummyMPI())
                Stationary(self.atoms)
        else:
            self.atoms, self.step = state.atoms(), state.step
            self.rng.bit_generator.state = state.rng
            if self.atoms.numbers.tolist() != atoms.numbers.tolist():
                raise WalkerError(f"{name}: the saved state has other atoms than the structure given")
        self.calculator = calculator
        self.dynamics = build_integrator(self.atoms, s, s.temperature_at(self.step + 1), self.rng)
        if state is not None:
            restore_integrator(self.dynamics, state.integrator)
        self.frames: deque[Frame] = deque(maxlen=s.keep)
        self._trusted = self.state()

    @property
    def calculator(self) -> AseCalculator:
        """The calculator the walker's atoms carry (one place: ``atoms.calc``)."""
        return self.atoms.calc

    @calculator.setter
    def calculator(self, calculator: AseCalculator) -> None:
        self.atoms.calc = calculator

    # ---------------------------------------------------------------- state
    def state(self) -> WalkerState:
        return WalkerState.of(self.atoms, self.step, self.rng, integrator_state(self.dynamics))

    def restore(self, state: WalkerState) -> None:
        """Put the walker back into ``state`` (same atoms), keeping its calculator."""
        if state.numbers != self.atoms.numbers.tolist():
            raise WalkerError(f"{self.name}: the state belongs to other atoms")
        self.atoms.set_cell(state.cell)
        self.atoms.set_positions(np.array(state.positions))
        self.atoms.set_momenta(np.array(state.momenta))
        self.atoms.pbc = state.pbc
        self.rng.bit_generator.state = state.rng
        self.step = state.step
        restore_integrator(self.dynamics, state.integrator)
        self.frames = deque((f for f in self.frames if f.step <= state.step), maxlen=self.settings.keep)

    def trust(self) -> None:
        """Mark the current state as one to roll back to."""
        self._trusted = self.state()

    def rollback(self) -> WalkerState:
        """Return to the last trusted state (after a blow-up or an emergency brake)."""
        self.restore(self._trusted)
        return self._trusted

    def save(self, path: str | os.PathLike) -> None:
        atomic_write(path, self.state().to_json())

    @classmethod
    def load(cls, path: str | os.PathLike, atoms: Atoms, calculator: AseCalculator,
             settings: WalkerSettings | None = None, name: str = "walker-0") -> "Walker":
        with open(path) as fh:
            state = WalkerState.from_json(fh.read())
        return cls(atoms, calculator, settings, name, state=state)

    # ---------------------------------------------------------------- dynamics
    def advance(self) -> StepRecord:
        """One MD step. A blow-up is reported, not raised; the caller decides (usually rollback)."""
        if self.settings.schedule:  # the schedule's position is the step: a resumed ramp neither repeats nor skips
            self.dynamics = retarget(self.dynamics, self.settings, self.settings.temperature_at(self.step + 1),
                                     self.rng)
        if self.settings.pressure_schedule:
            set_pressure(self.dynamics, self.settings.pressure_at(self.step + 1))
        with np.errstate(all="ignore"):
            self.dynamics.step()
        self.step += 1
        return self._record()

    def _record(self) -> StepRecord:
        forces = self.atoms.get_forces()
        energy = float(self.atoms.get_potential_energy())
        fmax = float(np.sqrt((forces**2).sum(1)).max()) if len(forces) else 0.0
        blown = not (np.isfinite(fmax) and np.isfinite(energy) and np.isfinite(self.atoms.positions).all()) \
            or fmax > self.settings.max_force
        results = self.calculator.results
        score = results.get("uncertainty")
        # a spread carried over from an earlier step is not this step's score
        score = None if score is None or results.get("uncertainty_age", 0) > 0 else float(score)
        self.frames.append(Frame(self.step, self.atoms.copy(), score))
        return StepRecord(self.step, energy, float(self.atoms.get_temperature()), fmax, score, bool(blown))

    def run(self, steps: int, on_step: Callable[[StepRecord], bool | None] | None = None) -> Iterator[StepRecord]:
        """Advance ``steps`` steps, yielding each record; ``on_step`` returning False stops early."""
        for _ in range(steps):
            record = self.advance()
            yield record
            if on_step is not None and on_step(record) is False:
                return


def _check_stages(name: str, stages: list[list[float]], symbol: str, unit: str, lowest: float) -> None:
    """Each stage's length and values (their kind is checked already: lists of numbers)."""
    low = "" if lowest == -math.inf else f", {symbol} >= {lowest:g} {unit}"
    allowed = f"a list of stages [steps, {symbol}] or [steps, {symbol}_start, {symbol}_end], steps >= 1{low}"
    for stage in stages:
        if len(stage) not in (2, 3) or stage[0] < 1 or int(stage[0]) != stage[0] or min(stage[1:]) < lowest:
            raise WalkerError(f"{name} stage {stage!r}: must be {allowed}")


def _stage_value(stages: list[list[float]], step: int, default: float) -> float:
    """The value at MD step ``step`` of stages [steps, v] / [steps, v_start, v_end]; the last one held."""
    done = 0
    for stage in stages:
        n, start, end = int(stage[0]), float(stage[1]), float(stage[-1])
        if step <= done + n:
            return start + (end - start) * max(step - done, 0) / n
        done += n
    return float(stages[-1][-1]) if stages else default


def _jsonable(obj: Any) -> Any:
    """Numpy bit-generator states hold numpy ints and arrays; JSON wants plain types."""
    if isinstance(obj, dict):
        return {k: _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, np.integer):
        return int(obj)
    return obj
