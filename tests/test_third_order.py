"""Third-order labels: the Hessian Φ2 + Φ3·u that a phono3py data set's own force
constants give at its displaced geometries, checked against an exact Hessian.
"""

import numpy as np
import pytest
import torch
from ase.build import bulk

from almd import potentials
from almd.finetune import Sample, losses
from almd.finetune.data import sample_from_atoms
from almd.phonons import resolve_calculator
from almd.phonons._calculators import get_hessian
from almd.phonons.datasets import third_order_hessians
from almd.phonons.harmonic import to_ase_atoms, to_phonopy_atoms
from almd.potentials import build_graph, energy_forces_stress, hessian_vector_product


@pytest.fixture(scope="module")
def sw_phono3py():
    """phono3py's pair displacements (0.03 Å) of 64-atom Si, Stillinger–Weber forces."""
    from phono3py import Phono3py

    calc = resolve_calculator("stillinger-weber-si")
    unit = bulk("Si", "diamond", a=5.431, cubic=True)
    ph3 = Phono3py(to_phonopy_atoms(unit), supercell_matrix=2 * np.eye(3, dtype=int),
                   primitive_matrix="F", log_level=0)
    ph3.generate_displacements(distance=0.03)
    forces = []
    for cell in ph3.supercells_with_displacements:
        atoms = to_ase_atoms(cell)
        atoms.calc = calc
        forces.append(atoms.get_forces())
    ph3.forces = np.array(forces)
    return ph3, calc


def test_label_is_the_hessian_at_the_displaced_geometry(sw_phono3py):
    ph3, calc = sw_phono3py
    frames = third_order_hessians(ph3, symmetrize=False)  # exact forces: symmetrisation adds nothing but a minute
    assert len(frames) == len(ph3.supercells_with_displacements)
    perfect = to_ase_atoms(ph3.supercell)
    h_perfect = get_hessian(calc, perfect)
    for atoms in frames[::50]:  # single and pair displacements
        exact = get_hessian(calc, atoms)
        label = atoms.info["hessian"]
        third = np.abs(exact - h_perfect).max()  # what the displacement changed: Φ3·u (+ O(u²))
        assert third > 0.1  # eV/Å²: a real third-order signal at 0.03 Å
        # the label carries it: its error is a small fraction of the change, where Φ2 alone misses all of it
        assert np.abs(label - exact).max() < 0.05 * third
        # the columns kept for training are the ones the displacement changed
        cols = atoms.info["hessian_columns"]
        moved = np.flatnonzero(np.linalg.norm(atoms.positions - perfect.positions, axis=1) > 1e-3)
        assert {3 * i + c for i in moved for c in range(3)} <= set(cols)
        changed = np.linalg.norm(exact - h_perfect, axis=0)
        assert changed[cols].min() > 0.05 * changed.max()
        # the odd part alone (the label of the mirrored form): (H(x+u) − H(x−u))/2 = Φ3·u + O(u³)
        mirror = atoms.copy()
        mirror.positions = 2 * atoms.info["perfect_positions"] - atoms.positions
        odd = 0.5 * (exact - get_hessian(calc, mirror))
        assert np.abs(atoms.info["hessian_third_order"] - odd).max() < 0.02 * np.abs(odd).max()


def test_third_order_sample_keeps_forces_not_relaxed_stress(sw_phono3py):
    ph3, _ = sw_phono3py
    atoms = third_order_hessians(ph3, symmetrize=False)[0]
    s = sample_from_atoms(atoms)
    assert s.hessian is not None and s.columns == tuple(atoms.info["hessian_columns"])
    assert s.stress is None  # a displaced cell is not relaxed: no zero-stress label
    assert np.allclose(s.forces, atoms.get_forces())


def test_mirrored_term_is_the_odd_part_of_the_model_hessian(same_losses_and_gradients):
    """A third-order sample's column term compares (H(x+u) − H(x−u))/2 from one batched
    HVP; its EFS terms are those of x + u alone. Same values and gradients as separate calls.
    """
    base = potentials.load("sevennet-0").double().eval()
    perfect = bulk("Si", "diamond", a=5.43, cubic=True)
    atoms, mirror = perfect.copy(), perfect.copy()
    u = np.array([0.03, -0.01, 0.02])
    atoms.positions[1] += u
    mirror.positions[1] -= u
    rng = np.random.default_rng(3)
    label = rng.normal(0, 0.05, (24, 24))
    sample = Sample(atoms, forces=rng.normal(0, 0.1, (8, 3)), hessian=label, mirror=mirror, columns=(4,))
    params = [p for p in base.parameters() if p.requires_grad]

    fused = losses.pft_terms(base, [sample], [4], torch.float64)
    columns = []
    for geometry in (atoms, mirror):
        graph = build_graph(geometry, base.cutoff, torch.float64)
        e = torch.zeros_like(graph.positions)
        e.view(-1)[4] = 1.0
        columns.append(hessian_vector_product(base, graph, e, create_graph=True).reshape(-1))
    odd = 0.5 * (columns[0] - columns[1])
    assert float(odd.abs().max()) > 0.05  # eV/Å²: the displacement's third-order signal is there
    separate = {"third_order": (odd - torch.as_tensor(label[:, 4])).abs().mean()}
    forces = energy_forces_stress(base, build_graph(atoms, base.cutoff, torch.float64), stress=False,
                                  create_graph=True)["forces"]
    separate["forces"] = torch.sqrt(((forces - torch.as_tensor(sample.forces)) ** 2).sum(-1) + 1e-20).mean()
    same_losses_and_gradients(fused, separate, params)


def test_finetune_config_takes_third_order_data(tmp_path):
    """data.third_order: the shipped VASP Si set's displaced supercells become mirrored
    third-order samples, 4 held out for validation; steps alternate with the phonon set.
    """
    from almd.data import SI_PBE
    from almd.finetune import FinetuneConfig, Finetuner

    cfg = FinetuneConfig.from_dict({
        "data": {"phonon": [str(SI_PBE)], "third_order": [str(SI_PBE)], "max_validation": 4,
                 "validation_columns": 1},
        "run": {"steps": 2, "output": str(tmp_path), "progress": False, "threads": 1},
    })
    trainer = Finetuner(cfg)
    assert len(trainer.third_order) > 90 and all(s.mirror is not None for s in trainer.third_order)
    held_out = [s for s in trainer.val_phonon if s.mirror is not None]
    assert len(held_out) == 4 and not {id(s) for s in held_out} & {id(s) for s in trainer.third_order}
    assert trainer.val_columns[-1] == list(held_out[-1].columns[:1])
    first, second = trainer.train_step(), trainer.train_step()
    # step 1 on the perfect supercell's Hessian (eV/Å² entries ~0.3), step 2 on Φ3·u (~0.01)
    assert "third_order" not in first and "hessian" not in second
    assert first["hessian"] > 3 * second["third_order"]
    val = trainer.validate()
    assert 0 < val["val_third_order_mae"] < val["val_hessian_mae"]


def test_third_order_weight_defaults_to_a_hundred_times_the_hessian_weight():
    """loss.third_order (λ_3) weighs the odd-Hessian term on its own; unset, it is 100·λ_Φ."""
    from almd.finetune import FinetuneConfig

    assert FinetuneConfig.from_dict({"loss": {"hessian": 50.0}}).third_order_weight == 5000.0
    assert FinetuneConfig.from_dict({"loss": {"hessian": 50.0, "third_order": 3000.0}}).third_order_weight == 3000.0
    assert FinetuneConfig.from_dict({"loss": {"third_order": 0.0}}).third_order_weight == 0.0
