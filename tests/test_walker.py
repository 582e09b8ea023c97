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
    with pytest.raises(WalkerError, match="dynamics = 'nvt'.*allowed: langevin, nve"):
        WalkerSettings(dynamics="nvt")
    with pytest.raises(WalkerError, match="unknown walker setting 'temp'.*temperature"):
        WalkerSettings.from_dict({"temp": 300})
    with pytest.raises(WalkerError, match="friction"):
        WalkerSettings(friction=0.0)
