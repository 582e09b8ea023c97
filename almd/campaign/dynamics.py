"""The MD integrators a walker runs, and the state each carries beyond the Atoms.

All four are ASE's own:

- ``langevin``: :class:`ase.md.langevin.Langevin` (NVT; its noise comes from the walker's generator);
- ``nose-hoover``: :class:`ase.md.nose_hoover_chain.NoseHooverChainNVT` (NVT, deterministic);
- ``npt``: :class:`ase.md.nose_hoover_chain.MTKNPT`, Martyna–Tobias–Klein with a Nosé–Hoover
  chain on the particles and one on the cell (all nine cell degrees of freedom);
- ``nve``: :class:`ase.md.verlet.VelocityVerlet`.

Positions, momenta and cell live in the Atoms. The Nosé–Hoover chains add their
coordinates and momenta (η, p_η; ξ, p_ξ) and the barostat its cell momenta p_g:
:func:`integrator_state` reads them as JSON-exact lists and :func:`restore_integrator`
writes them back, so a restarted run continues bit for bit. ASE's chain
integrators also keep private copies of positions, momenta and cell between
steps; :func:`restore_integrator` re-reads them from the Atoms after any rollback.

A thermostat's masses scale with k_B T, so a new temperature (a schedule's
ramp) builds the integrator anew and hands the chain state over
(:func:`retarget`).
"""

from __future__ import annotations

from typing import Any

import numpy as np
from ase import Atoms, units
from ase.md.md import MolecularDynamics
from ase.parallel import DummyMPI

__all__ = ["DYNAMICS", "THERMOSTATTED", "build_integrator", "integrator_state", "restore_integrator", "retarget",
           "set_pressure"]

DYNAMICS = ("langevin", "nose-hoover", "npt", "nve")
THERMOSTATTED = ("langevin", "nose-hoover", "npt")

# the integrator's own attributes holding chain state: (owner path, attribute)
_CHAIN_STATE = {
    "nose-hoover": (("_thermostat", "_eta"), ("_thermostat", "_p_eta")),
    "npt": (("_thermostat", "_eta"), ("_thermostat", "_p_eta"), ("_barostat", "_xi"), ("_barostat", "_p_xi"),
            ("", "_p_g")),
}


def build_integrator(atoms: Atoms, settings: Any, temperature_K: float, rng: np.random.Generator) -> MolecularDynamics:
    """The ASE integrator of ``settings.dynamics`` for ``atoms`` at ``temperature_K``.

    ``settings`` is a :class:`~almd.campaign.walker.WalkerSettings` (timestep, friction,
    tdamp and pdamp in fs, pressure in GPa). ``comm=DummyMPI()``: a walker is one
    process's trajectory, whereas ASE's default (the MPI world) would make every
    rank take rank 0's random numbers under mpiexec.
    """
    dt = settings.timestep * units.fs
    if settings.dynamics == "langevin":
        from ase.md.langevin import Langevin

        # fixcm=False: the deprecated centre-of-mass fix does not sample NVT correctly
        return Langevin(atoms, dt, temperature_K=temperature_K, friction=settings.friction / units.fs,
                        fixcm=False, rng=rng, comm=DummyMPI())
    if settings.dynamics == "nose-hoover":
        from ase.md.nose_hoover_chain import NoseHooverChainNVT

        return NoseHooverChainNVT(atoms, dt, temperature_K=temperature_K, tdamp=settings.tdamp * units.fs,
                                  comm=DummyMPI())
    if settings.dynamics == "npt":
        from ase.md.nose_hoover_chain import MTKNPT

        return MTKNPT(atoms, dt, temperature_K=temperature_K, pressure_au=settings.pressure * units.GPa,
                      tdamp=settings.tdamp * units.fs, pdamp=settings.pdamp * units.fs, comm=DummyMPI())
    from ase.md.verlet import VelocityVerlet

    return VelocityVerlet(atoms, dt, comm=DummyMPI())


def integrator_state(dynamics: MolecularDynamics) -> dict[str, list]:
    """The chain and barostat variables of ``dynamics`` (empty for Langevin and NVE)."""
    return {_key(owner, name): np.asarray(getattr(_owner(dynamics, owner), name)).tolist()
            for owner, name in _CHAIN_STATE.get(_kind(dynamics), ())}


def restore_integrator(dynamics: MolecularDynamics, state: dict[str, list]) -> None:
    """Write ``state`` (from :func:`integrator_state`) back and re-read the Atoms into ``dynamics``."""
    kind = _kind(dynamics)
    for owner, name in _CHAIN_STATE.get(kind, ()):
        key = _key(owner, name)
        if key in state:
            setattr(_owner(dynamics, owner), name, np.array(state[key], dtype=float))
    if kind in _CHAIN_STATE:  # ASE's chain integrators step from their own copies of these
        dynamics._q = dynamics.atoms.get_positions()
        dynamics._p = dynamics.atoms.get_momenta()
    if kind == "npt":
        dynamics._h = np.array(dynamics.atoms.get_cell())


def retarget(dynamics: MolecularDynamics, settings: Any, temperature_K: float,
             rng: np.random.Generator) -> MolecularDynamics:
    """``dynamics`` thermostatted at ``temperature_K``: Langevin in place, a chain rebuilt with its state."""
    kind = _kind(dynamics)
    if kind == "langevin":
        dynamics.set_temperature(temperature_K=temperature_K)
        return dynamics
    if kind not in _CHAIN_STATE or dynamics._thermostat._kT == units.kB * temperature_K:
        return dynamics
    state = integrator_state(dynamics)
    fresh = build_integrator(dynamics.atoms, settings, temperature_K, rng)
    fresh.nsteps = dynamics.nsteps
    restore_integrator(fresh, state)
    return fresh


def set_pressure(dynamics: MolecularDynamics, pressure_GPa: float) -> None:
    """The MTK barostat's external pressure (no mass depends on it: set in place)."""
    dynamics._pressure_au = pressure_GPa * units.GPa


def _kind(dynamics: MolecularDynamics) -> str:
    from ase.md.langevin import Langevin
    from ase.md.nose_hoover_chain import MTKNPT, NoseHooverChainNVT

    if isinstance(dynamics, Langevin):
        return "langevin"
    if isinstance(dynamics, NoseHooverChainNVT):
        return "nose-hoover"
    if isinstance(dynamics, MTKNPT):
        return "npt"
    return "nve"


def _owner(dynamics: MolecularDynamics, path: str) -> Any:
    return getattr(dynamics, path) if path else dynamics


def _key(owner: str, name: str) -> str:
    return f"{owner.strip('_')}.{name.strip('_')}" if owner else name.strip("_")
