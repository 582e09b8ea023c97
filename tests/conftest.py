"""Shared fixtures: small silicon cells and models loaded once per session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# Two cores are shared by everything in CI; keep torch and BLAS from oversubscribing:
# one thread per xdist worker (two workers, setup.cfg), two for a plain serial run.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = "1"
else:
    os.environ.setdefault("OMP_NUM_THREADS", "2")

ROOT = Path(__file__).resolve().parents[1]
SHARED_DFT = ROOT.parent / "shared" / "data" / "dft"


@pytest.fixture(autouse=True)
def numpy_as_it_was():
    """GPAW, imported under pytest, swaps np.empty for a NaN-filling debug version and makes
    floating-point warnings raise (gpaw/__init__.py); undo that after every test so that a
    test which builds a GPAW calculator cannot break the tests after it.
    """
    import numpy as np

    saved = np.empty, np.empty_like, np.geterr()
    yield
    np.empty, np.empty_like = saved[:2]
    np.seterr(**saved[2])


@pytest.fixture(scope="session")
def sevennet64():
    """SevenNet-0 in float64, for finite-difference checks."""
    import almd

    return almd.Calculator("sevennet-0", dtype="float64")


@pytest.fixture(scope="session")
def sevennet32():
    import almd

    return almd.Calculator("sevennet-0", dtype="float32")


@pytest.fixture
def si8():
    """Rattled 8-atom conventional silicon cell."""
    from ase.build import bulk

    atoms = bulk("Si", "diamond", a=5.43, cubic=True)
    atoms.rattle(0.05, seed=3)
    return atoms


@pytest.fixture
def si2():
    """Rattled 2-atom primitive silicon cell."""
    from ase.build import bulk

    atoms = bulk("Si", "diamond", a=5.43)
    atoms.rattle(0.03, seed=4)
    return atoms


@pytest.fixture(scope="session")
def same_losses_and_gradients():
    """Check that two dicts of loss terms agree in value and in their parameter gradients."""
    import torch

    def check(terms: dict, reference: dict, params: list) -> None:
        assert set(terms) == set(reference)
        for key in terms:
            assert float(terms[key].detach()) == pytest.approx(float(reference[key].detach()), rel=1e-10)
        grads = torch.autograd.grad(sum(terms.values()), params, allow_unused=True)
        expected = torch.autograd.grad(sum(reference.values()), params, allow_unused=True)
        for a, b in zip(grads, expected):
            if a is None or b is None:
                assert a is None and b is None
                continue
            torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-12)

    return check


def small_si_sections(out, steps: int, checkpoint_every: int = 6, walkers: int = 1, **sections) -> dict:
    """The test suite's campaign: the 8-atom Si cell at 1200 K, 2 members, Stillinger–Weber labels,
    a trigger that calls every few steps (a target no model reaches, no audits), no phonon or test
    labels; ``sections`` add or replace whole sections.
    """
    return {
        "system": {"supercell": [1, 1, 1]},
        "model": {"members": 2},
        "md": {"temperature": 1200, "timestep": 2.0, "seed": 4},
        "trigger": {"window": 20, "min_history": 3, "abs_cap": 0.04, "min_spacing": 4, "target": 0.001,
                    "adaptive": False, "audit_every": 0},
        "learning": {"initial_labels": 2, "initial_calibration": 1, "phonons": False, "test_frames": 0},
        "run": {"steps": steps, "walkers": walkers, "checkpoint_every": checkpoint_every, "output": str(out),
                "progress": False, "trajectory_every": 3},
        **sections,
    }


def small_si_campaign(out, steps: int, checkpoint_every: int = 6, **sections):
    """:func:`small_si_sections` as a CampaignConfig."""
    from almd.campaign.config import CampaignConfig

    return CampaignConfig.from_dict(small_si_sections(out, steps, checkpoint_every, **sections))


def small_si_toml(path, out, steps: int, checkpoint_every: int = 6, walkers: int = 1, **sections):
    """:func:`small_si_sections` written as a campaign file (for `almd run` in a subprocess)."""
    def value(v) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, str):
            return '"' + v + '"'
        if isinstance(v, dict):
            return "{ " + ", ".join(f"{k} = {value(x)}" for k, x in v.items()) + " }"
        if isinstance(v, list):
            return "[" + ", ".join(value(x) for x in v) + "]"
        return repr(v)

    def table(header: str, values: dict) -> str:
        return f"{header}\n" + "".join(f"{k} = {value(v)}\n" for k, v in values.items())

    tables = small_si_sections(out, steps, checkpoint_every, walkers, **sections)
    path.write_text("".join("".join(table(f"[[{name}]]", t) for t in values) if isinstance(values, list)
                            else table(f"[{name}]", values) for name, values in tables.items()))
    return path
