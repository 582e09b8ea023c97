"""The command line as a user meets it."""

from __future__ import annotations

import json
import subprocess
import sys

import almd


def run(*args: str, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "almd.cli", *args], capture_output=True, text=True, cwd=cwd)


def test_version():
    out = run("--version")
    assert out.returncode == 0
    assert out.stdout.strip() == f"almd {almd.__version__}"


def test_unknown_subcommand_is_an_error_listing_commands():
    out = run("frobnicate")
    assert out.returncode != 0
    assert "demo" in out.stderr and "phonons" in out.stderr


def test_demo_runs_offline_and_two_routes_agree(tmp_path):
    """The README's main job: embedded VASP Si data, SevenNet-0 by displacements and by exact HVPs."""
    out = run("demo", "--out", str(tmp_path / "demo"))
    assert out.returncode == 0, out.stderr[-2000:]
    assert (tmp_path / "demo" / "si_bands.png").stat().st_size > 10_000
    dft = json.loads((tmp_path / "demo" / "vasp_pbe_si.json").read_text())
    model = json.loads((tmp_path / "demo" / "sevennet0_si.json").read_text())
    assert abs(max(dft["frequencies_thz"]["Γ"]) - 15.09) < 0.02
    # SevenNet-0 softens silicon's optical mode (its own calculator: 12.47 THz at this lattice constant)
    assert 11.5 < max(model["frequencies_thz"]["Γ"]) < 13.5
    line = next(l for l in out.stdout.splitlines() if l.startswith("ω(Γ)"))
    _, by_displacement, by_hvp = line.split()[-3:]
    assert abs(float(by_displacement) - float(by_hvp)) < 0.05


def test_a_bad_campaign_is_one_line_rc_2_and_creates_nothing(tmp_path):
    cases = {
        "reference.calculator = 'stillinger-weber-sii'": '[reference]\ncalculator = "stillinger-weber-sii"\n',
        "model.backbone = 'sevennet-99'": '[model]\nbackbone = "sevennet-99"\n',
        "unknown key 'md.temprature'": "[md]\ntemprature = 300\n",
    }
    for expected, text in cases.items():
        toml = tmp_path / "campaign.toml"
        toml.write_text(text + f'[run]\noutput = "{tmp_path / "run"}"\n')
        out = run("run", str(toml), cwd=tmp_path)
        assert out.returncode == 2, out.stderr
        (line,) = out.stdout.strip().splitlines()
        assert line.startswith("almd run: error: ") and expected in line
        assert not (tmp_path / "run").exists()


def test_phonon_inputs_that_cannot_work_are_one_line_errors(tmp_path, capsys):
    """A displacement set without forces, a missing file, a misspelt calculator: status 2, one line, no file."""
    import phonopy
    from phonopy.structure.atoms import PhonopyAtoms

    from almd.phonons.cli import main

    unit = PhonopyAtoms(symbols=["Si", "Si"], cell=[[0, 2.715, 2.715], [2.715, 0, 2.715], [2.715, 2.715, 0]],
                        scaled_positions=[[0, 0, 0], [0.25, 0.25, 0.25]])
    displaced = phonopy.Phonopy(unit, supercell_matrix=[[2, 0, 0], [0, 2, 0], [0, 0, 2]])
    displaced.generate_displacements()
    displaced.save(str(tmp_path / "phonopy_disp.yaml"))
    cases = [(["-c", "stillinger-weber-si", "--reference", str(tmp_path / "phonopy_disp.yaml")],
              "a displacement data set without forces"),
             (["-c", "stillinger-weber-si", "--reference", str(tmp_path / "missing.yaml")],
              "missing.yaml: no such phonon data set"),
             (["-c", "stilinger-weber-si", "--reference", str(tmp_path / "phonopy_disp.yaml")],
              "calculator 'stilinger-weber-si' is not allowed: a reference preset (stillinger-weber-si")]
    for args, message in cases:
        assert main([*args, "--json", str(tmp_path / "out.json")]) == 2
        (line,) = capsys.readouterr().err.strip().splitlines()
        assert line.startswith("almd phonons: error: ") and message in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["phonopy_disp.yaml"]
