"""Walkers: thermostat and integrator physics, exact restarts, blow-up rollback, bad settings."""

from __future__ import annotations

import numpy as np
import pytest
from ase.build import bulk

from almd.campaign.walker import Walker, WalkerError, WalkerSettings, WalkerState
from almd.phonons import stillinger_weber_si


def si64():
    return bulk("Si", "diamond", a=5.431, cubic=True).repeat(2)


def test_langevin_holds_its_temperature():
    """64 SW Si atoms, Langevin at 900 K: the mean kinetic temperature after equilibration is 900 K
    within the statistical error (σ_T/T = sqrt(2/3N) ≈ 10 % per frame, frames correlated).
    """
    w = Walker(si64(), stillinger_weber_si(), WalkerSettings(temperature=900, friction=0.02, seed=3, keep=10))
    temps = [r.temperature for r in w.run(500)]
    mean = float(np.mean(temps[150:]))
    assert abs(mean - 900) < 0.08 * 900
    assert len(w.frames) == 10 and w.frames[-1].step == 500


def test_nve_conserves_total_energy():
    w = Walker(si64(), stillinger_weber_si(), WalkerSettings(dynamics="nve", temperature=600, seed=1))
    energies = [r.energy + w.atoms.get_kinetic_energy() for r in w.run(300)]
    assert (max(energies) - min(energies)) / len(w.atoms) < 5e-4  # eV/atom over 300 fs at 1 fs


def test_restart_from_json_is_bit_for_bit(tmp_path):
    calc = stillinger_weber_si()
    settings = WalkerSettings(temperature=1200, seed=7)
    straight = Walker(si64(), calc, settings)
    list(straight.run(40))

    first = Walker(si64(), calc, settings)
    list(first.run(25))
    first.save(tmp_path / "walker.json")
    resumed = Walker.load(tmp_path / "walker.json", si64(), stillinger_weber_si(), settings)
    assert resumed.step == 25
    list(resumed.run(15))
    np.testing.assert_array_equal(resumed.atoms.positions, straight.atoms.positions)
    np.testing.assert_array_equal(resumed.atoms.get_momenta(), straight.atoms.get_momenta())


def test_restart_with_sevennet_is_bit_for_bit(sevennet32):
    """The neural potential too: the neighbour cache's canonical graph makes forces independent of
    when the list was last built (and deterministic kernels, as the campaign sets them).
    """
    import torch

    torch.use_deterministic_algorithms(True, warn_only=True)
    atoms = bulk("Si", "diamond", a=5.43, cubic=True)
    settings = WalkerSettings(temperature=1500, timestep=2.0, seed=2)
    straight = Walker(atoms, sevennet32, settings)
    list(straight.run(16))
    first = Walker(atoms, sevennet32, settings)
    list(first.run(9))
    state = WalkerState.from_json(first.state().to_json())
    resumed = Walker(atoms, sevennet32, settings, state=state)
    list(resumed.run(7))
    np.testing.assert_array_equal(resumed.atoms.positions, straight.atoms.positions)


def test_blow_up_is_reported_and_rolled_back():
    w = Walker(si64(), stillinger_weber_si(), WalkerSettings(temperature=300, max_force=8.0))
    list(w.run(5))
    w.trust()
    trusted = w.atoms.positions.copy()
    w.atoms.positions[1] = w.atoms.positions[0] + [0.6, 0.0, 0.0]  # two atoms 0.6 Å apart
    record = w.advance()
    assert record.blown_up and record.max_force > 8.0
    state = w.rollback()
    assert state.step == 5 and w.step == 5
    np.testing.assert_array_equal(w.atoms.positions, trusted)
    assert not w.advance().blown_up


def test_bad_settings_name_the_key_and_the_choices():
    with pytest.raises(WalkerError, match="dynamics = 'nvt'.*allowed: langevin, nose-hoover, npt, nve"):
        WalkerSettings(dynamics="nvt")
    with pytest.raises(WalkerError, match="unknown walker setting 'temp'.*temperature"):
        WalkerSettings.from_dict({"temp": 300})
    with pytest.raises(WalkerError, match="friction"):
        WalkerSettings(friction=0.0)


@pytest.mark.parametrize("dynamics", ["langevin", "nose-hoover", "npt", "nve"])
def test_every_integrator_restarts_bit_for_bit(dynamics):
    """2n steps straight equal n steps, a JSON round trip of the state (a kill and a resume), n more;
    the thermostatted ones on a temperature ramp (NPT also on a pressure ramp), so the schedules'
    position is part of what must resume.
    """
    ramp = [] if dynamics == "nve" else [[30, 600, 1100]]
    pressures = [[10, 1.0], [20, 1.0, 4.0]] if dynamics == "npt" else []  # GPa: held, then ramped
    settings = WalkerSettings(dynamics=dynamics, temperature=600, seed=5, tdamp=50, pdamp=200, pressure=1.0,
                              schedule=ramp, pressure_schedule=pressures)
    straight = Walker(si64(), stillinger_weber_si(), settings)
    list(straight.run(40))
    first = Walker(si64(), stillinger_weber_si(), settings)
    list(first.run(20))
    state = WalkerState.from_json(first.state().to_json())
    resumed = Walker(si64(), stillinger_weber_si(), settings, state=state)
    list(resumed.run(20))
    for quantity in ("positions", "cell"):
        np.testing.assert_array_equal(getattr(resumed.atoms, quantity)[:], getattr(straight.atoms, quantity)[:])
    np.testing.assert_array_equal(resumed.atoms.get_momenta(), straight.atoms.get_momenta())
    assert resumed.state().integrator == straight.state().integrator


def test_a_rollback_resets_the_chain_integrators_own_copies():
    """ASE's Nosé–Hoover integrators step from private copies of positions and momenta: after a
    rollback the walker must continue from the trusted state, exactly as a fresh walker from it would.
    """
    settings = WalkerSettings(dynamics="npt", temperature=900, seed=2, tdamp=50, pdamp=200)
    w = Walker(si64(), stillinger_weber_si(), settings)
    list(w.run(10))
    w.trust()
    trusted = w.state()
    list(w.run(10))
    w.rollback()
    list(w.run(10))
    fresh = Walker(si64(), stillinger_weber_si(), settings, state=trusted)
    list(fresh.run(10))
    np.testing.assert_array_equal(w.atoms.positions, fresh.atoms.positions)
    np.testing.assert_array_equal(w.atoms.cell[:], fresh.atoms.cell[:])


def test_nose_hoover_holds_its_temperature_and_npt_its_pressure():
    """64 SW Si atoms at 900 K: the chain thermostat's mean temperature is 900 K within the statistical
    error; MTK NPT at 2 GPa drives the mean pressure (virial + kinetic) to 2 GPa within its fluctuation.
    """
    from ase import units

    nh = Walker(si64(), stillinger_weber_si(), WalkerSettings(dynamics="nose-hoover", temperature=900, seed=3,
                                                              tdamp=50))
    temps = [r.temperature for r in nh.run(600)]
    assert abs(np.mean(temps[200:]) - 900) < 0.1 * 900
    npt = Walker(si64(), stillinger_weber_si(), WalkerSettings(dynamics="npt", temperature=300, seed=3, tdamp=50,
                                                               pdamp=250, pressure=2.0))
    pressures = []
    for r in npt.run(1200):
        if r.step > 400:
            stress = npt.atoms.get_stress(include_ideal_gas=True)
            pressures.append(-stress[:3].mean() / units.GPa)
    assert abs(np.mean(pressures) - 2.0) < 0.5
    assert npt.atoms.get_volume() < si64().get_volume()  # compressed by 2 GPa


def test_a_pressure_ramp_compresses_the_cell():
    """MTK NPT of SW Si at 300 K, 0 GPa held, then ramped to 8 GPa: the volume shrinks with the pressure."""
    settings = WalkerSettings(dynamics="npt", temperature=300, seed=1, tdamp=50, pdamp=250,
                              pressure_schedule=[[300, 0.0], [300, 0.0, 8.0], [400, 8.0]])
    assert settings.pressure_at(450) == 4.0 and settings.pressure_at(5000) == 8.0 and settings.schedule_steps == 1000
    w = Walker(si64(), stillinger_weber_si(), settings)
    volumes = [w.atoms.get_volume() for _ in w.run(1000)]
    at_zero, at_eight = np.mean(volumes[100:300]), np.mean(volumes[700:])
    assert at_eight < 0.97 * at_zero  # SW Si's bulk modulus ~100 GPa: about -7 % at 8 GPa
    with pytest.raises(WalkerError, match="pressure_schedule with dynamics = 'langevin'"):
        WalkerSettings(pressure_schedule=[[10, 1.0]])


def test_a_nose_hoover_chain_at_zero_kelvin_is_refused():
    """The chain's masses are ∝ k_B T: at 0 K they vanish and every step would be NaN."""
    for settings in ({"dynamics": "nose-hoover", "temperature": 0.0},
                     {"dynamics": "npt", "temperature": 300.0, "schedule": [[100, 300, 0]]}):
        with pytest.raises(WalkerError, match="needs T > 0 K"):
            WalkerSettings(**settings)
    WalkerSettings(dynamics="langevin", temperature=0.0)  # a Langevin quench to 0 K is fine
