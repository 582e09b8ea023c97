"""The potential layer against numerical truths, for every backbone.

Forces = -∇E, stress = (1/V)∂E/∂ε and Hessian (-vector products) against
central finite differences; symmetry, the acoustic sum rule, momentum
conservation and invariance under rigid motions. float64 throughout so the
finite differences are the limiting error.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from ase import Atoms
from ase.build import bulk

from almd import potentials
from almd.potentials import build_graph, energy_forces_stress, hessian, hessian_vector_product


@pytest.fixture(scope="module", params=["sevennet-0", "mace"])
def potential(request):
    if request.param == "mace":
        pytest.importorskip("mace")
        from almd.potentials.mace import small_random_mace

        pot = small_random_mace([14, 6], cutoff=4.5, seed=1)
    else:
        pot = potentials.load(request.param)
    return pot.double().eval()


def efs(pot, atoms: Atoms):
    out = energy_forces_stress(pot, build_graph(atoms, pot.cutoff, torch.float64))
    return (out["energy"].item(), out["forces"].detach().numpy(),
            out["stress"].detach().numpy()[0] if "stress" in out else None)


@pytest.fixture
def sic2():
    """Rattled 2-atom SiC primitive cell: small enough for full finite-difference Hessians."""
    atoms = bulk("SiC", "zincblende", a=4.36)
    atoms.rattle(0.04, seed=8)
    return atoms


@pytest.fixture
def sic8():
    """Rattled 8-atom zincblende SiC (two species, so per-species terms are exercised)."""
    atoms = bulk("SiC", "zincblende", a=4.36, cubic=True)
    atoms.rattle(0.05, seed=7)
    return atoms


def test_forces_are_minus_energy_gradient(potential, sic8):
    _, forces, _ = efs(potential, sic8)
    h = 1e-4
    for atom, axis in [(0, 0), (3, 1), (6, 2)]:
        plus, minus = sic8.copy(), sic8.copy()
        plus.positions[atom, axis] += h
        minus.positions[atom, axis] -= h
        fd = -(efs(potential, plus)[0] - efs(potential, minus)[0]) / (2 * h)
        assert forces[atom, axis] == pytest.approx(fd, abs=2e-6, rel=1e-5)


def test_stress_is_strain_derivative(potential, sic8):
    _, _, stress = efs(potential, sic8)
    volume = sic8.get_volume()
    h = 1e-5
    for i, j in [(0, 0), (1, 2), (0, 1)]:
        eps = np.zeros((3, 3))
        eps[i, j] = eps[j, i] = h
        energies = []
        for sign in (1, -1):
            strained = sic8.copy()
            strained.set_cell(sic8.cell.array @ (np.eye(3) + sign * eps), scale_atoms=True)
            energies.append(efs(potential, strained)[0])
        # a symmetric off-diagonal strain moves both ε_ij and ε_ji
        fd = (energies[0] - energies[1]) / (2 * h) / volume / (1 if i == j else 2)
        assert stress[i, j] == pytest.approx(fd, abs=1e-7, rel=1e-4)


def test_momentum_conservation_and_rigid_motion_invariance(potential, sic8):
    energy, forces, _ = efs(potential, sic8)
    assert np.abs(forces.sum(0)).max() < 1e-9
    moved = sic8.copy()
    moved.translate([0.37, -1.1, 2.3])
    e_t, f_t, _ = efs(potential, moved)
    assert e_t == pytest.approx(energy, abs=1e-9)
    np.testing.assert_allclose(f_t, forces, atol=1e-9)
    rotated = sic8.copy()
    rotated.rotate(33.0, (1, 2, 0.5), rotate_cell=True)
    rot = rotated.cell.array.T @ np.linalg.inv(sic8.cell.array.T)  # the rotation applied
    e_r, f_r, _ = efs(potential, rotated)
    assert e_r == pytest.approx(energy, abs=1e-8)
    np.testing.assert_allclose(f_r, forces @ rot.T, atol=1e-8)


def test_hessian_matches_finite_differences_of_forces(potential, sic2):
    graph = build_graph(sic2, potential.cutoff, torch.float64)
    h_auto = hessian(potential, graph, symmetrize=False).numpy()
    n = 3 * len(sic2)
    assert h_auto.shape == (n, n)
    step = 1e-4
    for col in range(n):
        atom, axis = divmod(col, 3)
        plus, minus = sic2.copy(), sic2.copy()
        plus.positions[atom, axis] += step
        minus.positions[atom, axis] -= step
        fd = -(efs(potential, plus)[1] - efs(potential, minus)[1]).reshape(-1) / (2 * step)
        np.testing.assert_allclose(h_auto[:, col], fd, atol=2e-5 * max(1.0, np.abs(fd).max()))
    np.testing.assert_allclose(h_auto, h_auto.T, atol=1e-9)  # raw, not symmetrised
    np.testing.assert_allclose(h_auto.reshape(len(sic2), 3, -1).sum(0), 0.0, atol=1e-8)  # acoustic sum rule


def test_batched_hvp_gives_each_structures_column(potential, sic2, si2):
    """One HVP over a batch = every structure's own Hessian column (block-diagonal batch Hessian)."""
    structures = [sic2, si2]
    graph = build_graph(structures, potential.cutoff, torch.float64)
    rng = np.random.default_rng(0)
    vectors = torch.zeros_like(graph.positions)
    cols = []
    start = 0
    for atoms in structures:
        j = int(rng.integers(3 * len(atoms)))
        vectors.view(-1)[3 * start + j] = 1.0
        cols.append(j)
        start += len(atoms)
    hv = hessian_vector_product(potential, graph, vectors).detach().numpy()
    start = 0
    for atoms, j in zip(structures, cols):
        full = hessian(potential, build_graph(atoms, potential.cutoff, torch.float64)).numpy()
        np.testing.assert_allclose(hv[start:start + len(atoms)].reshape(-1), full[:, j], atol=1e-8)
        start += len(atoms)


def test_batch_equals_separate_structures(potential, sic8, si8):
    graph = build_graph([sic8, si8], potential.cutoff, torch.float64)
    out = energy_forces_stress(potential, graph)
    for k, atoms in enumerate([sic8, si8]):
        e, f, s = efs(potential, atoms)
        assert out["energy"][k].item() == pytest.approx(e, abs=1e-9)
        np.testing.assert_allclose(out["stress"][k].detach().numpy(), s, atol=1e-10)
    n = len(sic8)
    np.testing.assert_allclose(out["forces"][:n].detach().numpy(), efs(potential, sic8)[1], atol=1e-10)


def test_hvp_is_differentiable_in_parameters(potential, si2):
    """Training on Hessian columns needs gradients through the HVP (third-order autograd)."""
    pot = potential
    params = [p for p in pot.parameters() if p.is_floating_point()]
    for p in params:
        p.requires_grad_(True)
    graph = build_graph(si2, pot.cutoff, torch.float64)
    v = torch.zeros_like(graph.positions)
    v[0, 0] = 1.0
    hv = hessian_vector_product(pot, graph, v, create_graph=True)
    grads = torch.autograd.grad(hv.abs().sum(), params, allow_unused=True)
    assert sum(float(g.abs().sum()) for g in grads if g is not None) > 0


def test_unknown_element_is_named(potential):
    atoms = Atoms("SiOg", positions=[[0, 0, 0], [0, 0, 2.0]], cell=[8, 8, 8], pbc=True)
    with pytest.raises(potentials.UnknownElementError, match=r"Og.*supports.*Si"):
        efs(potential, atoms)


def test_save_and_load_round_trip(potential, sic8, tmp_path):
    path = potentials.save(potential, tmp_path / "model.pt", note="test")
    # a MACE backbone is saved as MACE saves it, a pickled module: its reader must be trusted explicitly
    again = potentials.load(path, allow_pickle=potential.backbone_name == "mace").double()
    assert efs(again, sic8)[0] == pytest.approx(efs(potential, sic8)[0], abs=1e-10)


class _Payload:
    """Unpickling this runs a shell command: what a malicious model file would do."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        import os

        return (os.system, (f"touch {self.marker}",))


def test_a_crafted_pickle_is_refused_without_running_its_payload(tmp_path):
    import torch

    import almd

    marker, path = tmp_path / "ran", tmp_path / "model.pt"
    torch.save({"format": "almd-potential-1", "backbone": _Payload(marker)}, path)
    with pytest.raises(potentials.files.UnsafeModelFile, match="allow_pickle"):
        almd.Calculator(model=path)
    with pytest.raises(potentials.files.UnsafeModelFile):
        almd.load_model(path)
    assert not marker.exists()


def test_almd_files_read_weights_only(tmp_path):
    """A saved SevenNet model and an ensemble on it are plain tensors, numbers and arrays."""
    from almd.uncertainty import Ensemble

    pot = potentials.load("sevennet-0")
    path = potentials.save(pot, tmp_path / "model.pt")
    again = potentials.files.read_payload(path)  # would raise if it needed unpickling
    assert again["format"] == "almd-potential-1"
    ens = Ensemble(pot, k=2)
    back = Ensemble.load(ens.save(tmp_path / "ensemble.pt"))
    original = pot.state_dict()
    assert back.k == 2 and all(torch.equal(v, original[k].to(v.dtype)) for k, v in back.backbone.state_dict().items())


def test_streamlined_e3nn_graphs_give_the_same_values_and_derivatives():
    """One split instead of per-block slices, dead einsums dropped: first and second derivatives unchanged."""
    import copy

    from e3nn import o3

    from almd.potentials.e3nn_graphs import streamline

    irreps_x, irreps_y = o3.Irreps("8x0e+4x1o+2x2e"), o3.Irreps("1x0e+1x1o+1x2e")
    product = o3.FullyConnectedTensorProduct(irreps_x, irreps_y, "4x0e+3x1o+2x2e", shared_weights=False).double()
    linear = o3.Linear(irreps_x, "6x0e+2x1o+3x2e").double()
    for module, n_inputs in ((product, 3), (linear, 1)):
        plain = copy.deepcopy(module)
        assert streamline(module) >= 1
        code = "".join(m.code for m in module.modules() if isinstance(m, torch.fx.GraphModule))
        assert "split" in code
        gen = torch.Generator().manual_seed(0)
        dims = (irreps_x.dim, irreps_y.dim, product.weight_numel)[:n_inputs]
        inputs = [torch.randn(5, d, generator=gen, dtype=torch.float64, requires_grad=True) for d in dims]
        results = []
        for m in (plain, module):
            out = m(*inputs)
            probe = torch.sin(out).sum()  # a non-linear readout, so second derivatives are not trivial
            grads = torch.autograd.grad(probe, inputs, create_graph=True)
            second = torch.autograd.grad(sum((g**2).sum() for g in grads), inputs)
            results.append([out, *grads, *second])
        for a, b in zip(*results):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-13)


@pytest.mark.parametrize("backbone", ["sevennet-0", "mace"])
def test_backbones_are_streamlined_and_unchanged(backbone, sic8):
    if backbone == "mace":
        pytest.importorskip("mace")
        from almd.potentials.mace import small_random_mace

        fast, plain = (small_random_mace([14, 6], cutoff=4.5, seed=1, streamlined=s).double().eval()
                       for s in (True, False))
    else:
        from almd.potentials.sevennet import SevenNet

        fast = potentials.load("sevennet-0").double().eval()
        plain = SevenNet.from_checkpoint("sevennet-0", streamlined=False).double().eval()
    graphs = [m.code for m in fast.modules() if isinstance(m, torch.fx.GraphModule)]
    assert sum("split" in code for code in graphs) >= (10 if backbone == "sevennet-0" else 2)  # sliced layers
    e_fast, f_fast, s_fast = efs(fast, sic8)
    e_plain, f_plain, s_plain = efs(plain, sic8)
    assert e_fast == pytest.approx(e_plain, abs=1e-10)
    np.testing.assert_allclose(f_fast, f_plain, rtol=0, atol=1e-10)
    np.testing.assert_allclose(s_fast, s_plain, rtol=0, atol=1e-12)
    u = torch.as_tensor(np.random.default_rng(3).normal(size=(len(sic8), 3)))
    graph = build_graph(sic8, fast.cutoff, torch.float64)
    np.testing.assert_allclose(hessian_vector_product(fast, graph, u).numpy(),
                               hessian_vector_product(plain, graph, u).numpy(), rtol=0, atol=1e-9)
