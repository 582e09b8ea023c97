"""Frozen phonons: the energy along a mode is the harmonic ½ω²Σm|u|² near the minimum, and the CLI scans modes."""

from __future__ import annotations

import numpy as np
import pytest
from ase.build import bulk

from almd.phonons.harmonic import phonopy_from_calculator
from almd.phonons.modes import commensurate_modes, frozen_phonon_scan, harmonic_energy, mode_displacements
from almd.references import build_calculator


@pytest.fixture(scope="module")
def sw_phonons():
    sw = build_calculator("stillinger-weber-si")
    return sw, phonopy_from_calculator(bulk("Si", "diamond", a=5.431, cubic=True), sw, [2, 2, 2])


@pytest.mark.parametrize("qpoint, band", [([0.5, 0.0, 0.5], 0), ([0.5, 0.0, 0.5], 5), ([0.5, 0.5, 0.5], 1),
                                          ([0.0, 0.0, 0.0], 4)])
def test_the_energy_along_a_mode_is_its_harmonic_energy_at_small_amplitude(sw_phonons, qpoint, band):
    sw, ph = sw_phonons
    scan = frozen_phonon_scan(ph, sw, qpoint, band, amplitudes=[-0.01, 0.01])
    harmonic = harmonic_energy(ph, scan)
    # the even part of E(A) is ½ω²Σm|Au|² (a cubic term, e.g. at Γ, is odd in A and cancels)
    assert np.mean(scan.energies) == pytest.approx(np.mean(harmonic), rel=2e-3)
    assert scan.depth == 0.0 and scan.minimum_at == 0.0 and scan.frequency_thz > 1.0
    # a calculator factory (a fresh calculator per structure, as DFT codes need) gives the same energies
    fresh = frozen_phonon_scan(ph, lambda: build_calculator("stillinger-weber-si"), qpoint, band, [-0.01, 0.01])
    np.testing.assert_allclose(fresh.energies, scan.energies, rtol=1e-12)


def test_patterns_are_real_periodic_and_scaled_and_a_non_commensurate_q_is_refused(sw_phonons):
    _, ph = sw_phonons
    u, f = mode_displacements(ph, [0.5, 0.0, 0.5], 0)
    assert u.shape == (64, 3) and np.isrealobj(u) and np.linalg.norm(u, axis=1).max() == pytest.approx(1.0)
    assert abs(u.sum(axis=0)).max() < 1e-8  # a zone-boundary mode does not move the centre of mass
    with pytest.raises(ValueError, match="not commensurate"):
        mode_displacements(ph, [0.25, 0.0, 0.0], 0)
    modes = commensurate_modes(ph, below=1e9)  # every mode at the supercell's q-points
    assert len(modes) == 32 * 6 and not commensurate_modes(ph)  # Si is stable: no imaginary mode


def test_the_cli_scans_a_chosen_mode_against_the_shipped_reference(tmp_path, capsys):
    import json

    from almd.phonons.cli import main

    si = str(__import__("pathlib").Path(__file__).resolve().parents[1] / "almd" / "data" / "si-pbe")
    out = tmp_path / "modes.json"
    assert main(["--reference", si, "--calculator", "stillinger-weber-si", "--mode", "0.5", "0", "0.5", "0",
                 "--mode-points", "5", "--mode-amplitude", "0.05", "--json", str(out)]) == 0
    (scan,) = json.loads(out.read_text())["modes"]
    assert scan["band"] == 0 and len(scan["energies_eV"]) == 5 and scan["depth_eV"] == 0.0
    assert min(scan["energies_eV"]) >= 0.0 and scan["energies_eV"][2] == pytest.approx(0.0, abs=1e-12)
    assert main(["--calculator", "stillinger-weber-si", "--modes", "x.xyz"]) == 2
    assert "--modes / --mode need --reference" in capsys.readouterr().err


def test_a_mode_scanned_in_a_smaller_cell_that_holds_it_gives_the_same_energy_per_atom(sw_phonons):
    from almd.phonons.modes import in_smaller_cell

    sw, ph = sw_phonons
    small = in_smaller_cell(ph, [1, 1, 1])  # the 8-atom cubic cell holds X
    big_scan = frozen_phonon_scan(ph, sw, [0.5, 0.0, 0.5], 0, amplitudes=[-0.01, 0.01])
    small_scan = frozen_phonon_scan(small, sw, [0.5, 0.0, 0.5], 0, amplitudes=[-0.01, 0.01])
    assert small_scan.n_atoms == 8 and small_scan.frequency_thz == pytest.approx(big_scan.frequency_thz, abs=1e-6)
    # (X is doubly degenerate: the two cells may pick other partners in its plane, alike to harmonic order)
    assert np.mean(small_scan.energies) / 8 == pytest.approx(np.mean(big_scan.energies) / 64, rel=1e-3)
