"""The house rules a user can rely on: what `import almd` gives, and what each layer may pull in."""

from __future__ import annotations

import subprocess
import sys


def _modules_after(statement: str, roots: tuple[str, ...]) -> list[str]:
    code = f"import sys; {statement}; print(sorted({{m.split('.')[0] if m.split('.')[0] != 'ase' else m for m in sys.modules}}))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    loaded = eval(out.stdout)  # a printed list of module names
    return [m for m in loaded if m in roots or m.startswith(tuple(r + "." for r in roots))]


def test_import_almd_is_cheap_and_exports_the_public_names():
    assert _modules_after("import almd", ("torch", "sevenn", "mace")) == []
    import almd

    assert {"Calculator", "EnsembleCalculator", "Campaign", "CampaignConfig", "load_model"} <= set(almd.__all__)
    from almd.campaign.loop import Campaign
    from almd.potentials.calculator import Calculator

    assert almd.Calculator is Calculator and almd.Campaign is Campaign


def test_the_trigger_imports_neither_torch_nor_ase_dynamics():
    assert _modules_after("import almd.campaign.trigger", ("torch", "ase.md")) == []


def test_an_unregistered_almd_format_is_refused_by_name(tmp_path):
    """Higher layers register their file formats with the potentials layer, which never imports them."""
    import torch

    import almd
    from almd import potentials

    path = tmp_path / "fake.pt"
    torch.save({"format": "almd-unknown-1"}, path)
    try:
        potentials.load(path)
    except ValueError as exc:
        assert "almd-unknown-1" in str(exc) and "load_model" in str(exc)
    else:
        raise AssertionError("an unregistered almd format must be refused by name")
    assert callable(almd.load_model)
