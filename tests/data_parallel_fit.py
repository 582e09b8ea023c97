"""A data-parallel fine-tune of SevenNet-0 on Stillinger–Weber labels (run under ``mpiexec``).

``python data_parallel_fit.py OUT``: every rank fits the same trainer on its share of each
batch and saves its trainable weights as ``OUT/weights-RANK.pt``; the test compares them
with one another and with the same fit in one process (:func:`fit` without a communicator).
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from ase.build import bulk
from ase.calculators.singlepoint import SinglePointCalculator

from almd.finetune import FinetuneConfig, Finetuner
from almd.phonons import get_hessian, stillinger_weber_si
from almd.references import build_calculator


def labelled(atoms):
    atoms.calc = build_calculator("stillinger-weber-si", atoms=atoms)
    atoms.calc = SinglePointCalculator(atoms, energy=atoms.get_potential_energy(), forces=atoms.get_forces(),
                                       stress=atoms.get_stress())
    return atoms


def data() -> tuple[list, list, list]:
    """(phonon, EFS, validation) labels: the 2-atom cell with its Hessian, rattled 8-atom cells."""
    unit = bulk("Si", "diamond", a=5.431)
    unit.info["hessian"] = get_hessian(stillinger_weber_si(), unit)  # matscipy's analytic Hessian
    frames = []
    for seed in range(6):
        a = bulk("Si", "diamond", a=5.431, cubic=True)
        a.rattle(0.05, seed=seed)
        frames.append(labelled(a))
    return [unit], frames[:4], frames[4:]


def fit(out: Path, comm=None) -> Finetuner:
    cfg = FinetuneConfig.from_dict({
        "model": {"dtype": "float64"},
        "data": {"validation_columns": 2},
        "run": {"steps": 3, "batch_size": 2, "efs_batch": 3, "eval_every": 1, "checkpoint_every": 3,
                "patience": 0, "output": str(out), "progress": False, "seed": 7},
    })
    phonon, efs, validation = data()
    trainer = Finetuner(cfg, potential="sevennet-0", phonon=phonon, efs=efs, validation=validation, comm=comm)
    trainer.fit(save_model=False)
    return trainer


if __name__ == "__main__":
    from mpi4py import MPI

    torch.set_num_threads(1)
    out = Path(sys.argv[1])
    comm = MPI.COMM_WORLD
    trainer = fit(out / "fit", comm)
    weights = {k: p.detach().clone() for k, p in trainer.named_trainable.items()}
    torch.save({"weights": weights, "history": trainer.history}, out / f"weights-{comm.rank}.pt")
