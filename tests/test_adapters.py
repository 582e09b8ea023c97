"""Adapters keep the physics: identity at start, equivariance, translation invariance, exact merge."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from ase.build import bulk

from almd import potentials
from almd.potentials import adapters, build_graph, energy_forces_stress


@pytest.fixture(scope="module")
def base():
    return potentials.load("sevennet-0").double().eval()


def fresh(base):
    # rebuilt from its export, not deepcopied: deepcopy of sevenn's fx-compiled modules
    # adds '_tensor_constant' buffers that the saved file would then carry
    return type(base).from_export(base.export()).double().eval()


@pytest.fixture
def sic8():
    atoms = bulk("SiC", "zincblende", a=4.36, cubic=True)
    atoms.rattle(0.05, seed=7)
    return atoms


def efs(pot, atoms):
    out = energy_forces_stress(pot, build_graph(atoms, pot.cutoff, torch.float64))
    return out["energy"].item(), out["forces"].detach().numpy(), out["stress"].detach().numpy()[0]


def randomize_b(pot, scale=0.05, seed=1):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in pot.named_parameters():
            if name.split(".")[-1] in ("B", "delta") or ".B." in name:
                p.copy_(scale * torch.randn(p.shape, generator=gen, dtype=p.dtype))


def test_lora_identity_at_start_and_parameter_count(base, sic8):
    pot = fresh(base)
    names = adapters.add_lora(pot, rank=4, radial=True)
    assert any("self_interaction" in n for n in names) and any("weight_nn" in n for n in names)
    e0, f0, s0 = efs(base, sic8)
    e1, f1, s1 = efs(pot, sic8)
    assert e1 == e0  # B = 0: bit-identical
    np.testing.assert_array_equal(f1, f0)
    np.testing.assert_array_equal(s1, s0)
    # count: per irrep path r·(mul_in + mul_out), per radial matrix r·(h_in + h_out)
    expected = 0
    for name in names:
        module = pot.get_submodule(name)
        p = module.parametrizations["weight"][0]
        if isinstance(p, adapters.IrrepsLoRA):
            expected += sum(r * (a + b) for r, (a, b) in zip(p.ranks, p.path_shapes))
        else:
            expected += p.A.numel() + p.B.numel()
    assert adapters.count_trainable(pot) == expected
    assert 0 < expected < 0.1 * sum(p.numel() for p in base.parameters())


def test_lora_with_random_b_is_equivariant_and_merges_exactly(base, sic8, tmp_path):
    pot = fresh(base)
    adapters.add_lora(pot, rank=2)
    randomize_b(pot)
    energy, forces, _ = efs(pot, sic8)
    assert abs(energy - efs(base, sic8)[0]) > 1e-4  # the adapter does something
    rotated = sic8.copy()
    rotated.rotate(33.0, (1, 2, 0.5), rotate_cell=True)
    rot = rotated.cell.array.T @ np.linalg.inv(sic8.cell.array.T)
    e_r, f_r, _ = efs(pot, rotated)
    assert e_r == pytest.approx(energy, abs=1e-8)
    np.testing.assert_allclose(f_r, forces @ rot.T, atol=1e-8)
    moved = sic8.copy()
    moved.translate([0.37, -1.1, 2.3])
    e_t, f_t, _ = efs(pot, moved)
    assert e_t == pytest.approx(energy, abs=1e-9)
    np.testing.assert_allclose(f_t, forces, atol=1e-9)
    # merged == unmerged, and the saved file loads through almd.Calculator
    _, _, stress = efs(pot, sic8)
    adapters.merge(pot)
    assert not adapters.is_adapted(pot)
    e_m, f_m, s_m = efs(pot, sic8)
    assert e_m == pytest.approx(energy, abs=1e-9)
    np.testing.assert_allclose(f_m, forces, atol=1e-10)
    np.testing.assert_allclose(s_m, stress, atol=1e-12)
    import almd

    path = potentials.save(pot, tmp_path / "lora.pt")
    calc = almd.Calculator(model=path, dtype="float64")
    atoms = sic8.copy()
    atoms.calc = calc
    # the file is rebuilt in the backbone's float32, so weights are rounded once
    assert atoms.get_potential_energy() == pytest.approx(energy, abs=2e-5)


def test_delta_zero_equals_base_and_trains_only_delta(base, sic8):
    pot = fresh(base)
    names = adapters.add_delta(pot)
    n_base = sum(p.numel() for p in base.parameters() if p.requires_grad)
    assert adapters.count_trainable(pot) == n_base
    assert all(n.endswith("delta") for n, p in pot.named_parameters() if p.requires_grad)
    assert len(names) > 10
    e0, f0, _ = efs(base, sic8)
    e1, f1, _ = efs(pot, sic8)
    assert e1 == e0
    np.testing.assert_array_equal(f1, f0)
    # ‖Δω‖²: zero at the start, the sum of squares of every Δω after a change, differentiable
    assert float(adapters.delta_sq_norm(pot)) == 0.0
    randomize_b(pot, scale=0.01)
    deltas = adapters.delta_parameters(pot)
    assert len(deltas) == len(names)
    expected = sum(float((p.detach() ** 2).sum()) for p in deltas)
    norm = adapters.delta_sq_norm(pot)
    assert expected > 0 and float(norm) == pytest.approx(expected, rel=1e-12)
    (g,) = torch.autograd.grad(norm, [deltas[0]])
    torch.testing.assert_close(g, 2 * deltas[0].detach())
    lora = fresh(base)
    adapters.add_lora(lora)
    assert adapters.delta_parameters(lora) == [] and float(adapters.delta_sq_norm(lora)) == 0.0


def test_freeze_groups_and_scratch(base):
    pot = fresh(base)
    groups = adapters.layer_groups(pot)
    assert {"embedding", "block0", "block4", "readout"} <= set(groups)
    total = adapters.count_trainable(pot)
    adapters.apply_strategy(pot, "freeze", frozen_groups=["embedding", "block0", "block1"])
    assert 0 < adapters.count_trainable(pot) < total
    with pytest.raises(ValueError, match="unknown layer group.*block0"):
        adapters.freeze(pot, ["block9"])
    with pytest.raises(ValueError, match="unknown strategy 'qlora'.*lora"):
        adapters.apply_strategy(fresh(base), "qlora")
    scratch = adapters.apply_strategy(fresh(base), "scratch", seed=3)
    w0 = base.model._modules["0_self_interaction_1"].linear.weight
    w1 = scratch.model._modules["0_self_interaction_1"].linear.weight
    assert not torch.allclose(w0, w1)


def test_lora_on_mace_keeps_equivariance():
    pytest.importorskip("mace")
    from almd.potentials.mace import small_random_mace

    pot = small_random_mace([14, 6], cutoff=4.5, seed=1).double()
    atoms = bulk("SiC", "zincblende", a=4.36)
    atoms.rattle(0.04, seed=8)
    e0, _, _ = efs(pot, atoms)
    adapters.add_lora(pot, rank=2)
    assert efs(pot, atoms)[0] == e0
    randomize_b(pot, scale=0.1)
    energy, forces, _ = efs(pot, atoms)
    assert abs(energy - e0) > 1e-3
    rotated = atoms.copy()
    rotated.rotate(40.0, (1, 0.3, 2), rotate_cell=True)
    rot = rotated.cell.array.T @ np.linalg.inv(atoms.cell.array.T)
    e_r, f_r, _ = efs(pot, rotated)
    assert e_r == pytest.approx(energy, abs=1e-9)
    np.testing.assert_allclose(f_r, forces @ rot.T, atol=1e-9)
