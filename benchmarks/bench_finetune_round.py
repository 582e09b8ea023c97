"""The campaign's fine-tune round: what it costs as labels pile up, and what it buys.

A round (:func:`almd.campaign.finetune_round.finetune_round`) fine-tunes the
backbone on the campaign's labels and rebuilds the ensemble on it. Here it runs
on a label database like a campaign's: 64-atom Si frames of a Stillinger–Weber
Langevin run at ``--temperature`` (seeded), labelled by Stillinger–Weber, a
quarter of them held out, plus the campaign's own phonon labels (phonopy's
displacement of the start structure), with a SevenNet-0 ensemble fitted and
calibrated on them as the campaign's would be. For each label count and each
set of ``[finetune]`` settings it prints the round's time (training, and the
ensemble's rebuild) and the force RMSE on test frames of an independent run
(eV/Å), of the ensemble before the round, the rebuilt ensemble and the
fine-tuned backbone alone.

The ensemble fitted and calibrated on every label before the round is the work an
unbounded rebuild does (printed as "ensemble fitted and calibrated in ... s"): the
baseline the bounded rebuild is measured against, in the same run.

Settings compared (``--variants``):

  unbounded   [finetune] as before this benchmark: 5 LoRA steps at lr 1e-3, heads
              refitted and calibrated on every label (recent_labels = 0)
  shipped     the campaign's defaults (almd.campaign.config.FinetuneSettings)
  long        60 LoRA steps, validated every 5, patience 3, self-distilled replay
  fast        60 LoRA steps at lr 3e-3, validated every 10, patience 3, no replay
  fast-full   as fast, every weight trained (strategy full) at lr 1e-4

    python benchmarks/bench_finetune_round.py [--labels 20 200] [--variants unbounded,shipped,long,fast,fast-full]
        [--temperature 900] [--out bench-out/finetune-round]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
from ase import Atoms

from almd.campaign.config import CampaignConfig
from almd.campaign.finetune_round import finetune_round
from almd.campaign.outcome import force_rmse
from almd.campaign.phonon_labels import phonon_labels
from almd.labels.database import LabelDatabase
from almd.references import build_calculator
from almd.uncertainty import Ensemble

VARIANTS = {
    "unbounded": {"steps": 5, "lr": 1e-3, "eval_every": 5, "patience": 0, "budget": 0.0, "recent_labels": 0},
    "shipped": {},
    "long": {"steps": 60, "lr": 1e-3, "eval_every": 5, "patience": 3, "replay": "self"},
    "fast": {"steps": 60, "lr": 3e-3, "eval_every": 10, "patience": 3},
    "fast-full": {"steps": 60, "strategy": "full", "lr": 1e-4, "eval_every": 10, "patience": 3},
}


def sw_frames(count: int, temperature: float, seed: int, spacing: int = 20) -> list[Atoms]:
    """``count`` frames of a seeded Stillinger–Weber Langevin run of 64-atom Si, labelled by it."""
    from ase.build import bulk
    from ase.calculators.singlepoint import SinglePointCalculator
    from ase.md.langevin import Langevin
    from ase.md.velocitydistribution import MaxwellBoltzmannDistribution
    from ase.units import fs

    atoms = bulk("Si", "diamond", a=5.431, cubic=True).repeat(2)
    rng = np.random.default_rng(seed)
    atoms.calc = build_calculator("stillinger-weber-si")
    MaxwellBoltzmannDistribution(atoms, temperature_K=temperature, rng=rng)
    dyn = Langevin(atoms, 1 * fs, temperature_K=temperature, friction=0.01 / fs, rng=rng)
    dyn.run(300)  # equilibrate
    frames = []
    for _ in range(count):
        dyn.run(spacing)
        frame = Atoms(atoms.numbers, atoms.positions, cell=atoms.cell, pbc=True)
        frame.calc = SinglePointCalculator(frame, energy=atoms.get_potential_energy(), forces=atoms.get_forces(),
                                           stress=atoms.get_stress())
        frames.append(frame)
    return frames


def label_database(folder: Path, train: list[Atoms], held: list[Atoms]) -> LabelDatabase:
    """A campaign-like labels.db: the training frames, then the held-out ones."""
    db = LabelDatabase(folder / "labels.db", validation_fraction=0.25)
    db.add_frames(train, split="train", oracle="stillinger-weber-si", source="trigger")
    db.add_frames(held, split="validation", oracle="stillinger-weber-si", source="trigger")
    return db


def sw_label(cells: list[Atoms]) -> list[Atoms]:
    """The reference's labels of ``cells`` (the campaign's phonon displacements)."""
    from ase.calculators.singlepoint import SinglePointCalculator

    out = []
    for cell in cells:
        a = cell.copy()
        a.calc = build_calculator("stillinger-weber-si")
        a.calc = SinglePointCalculator(a, energy=a.get_potential_energy(), forces=a.get_forces())
        out.append(a)
    return out


def backbone_rmse(model: str | Path, frames: list[Atoms]) -> float:
    from almd.potentials.calculator import Calculator

    calc = Calculator(model=str(model))
    return force_rmse(lambda a: {"forces": calc.get_forces(a)}, frames)


def run_round(name: str, n: int, args: argparse.Namespace, folder: Path, db: LabelDatabase, ensemble: Ensemble,
              test: list[Atoms]) -> dict:
    out = folder / name
    (out / "phonons").mkdir(parents=True, exist_ok=True)
    phonon_file = Path(args.out) / "phonons" / "phonopy_params.yaml"
    (out / "phonons" / "phonopy_params.yaml").write_bytes(phonon_file.read_bytes())
    config = CampaignConfig.from_dict({"finetune": {"every": 1, **VARIANTS[name]},
                                       "learning": {"validation_fraction": 0.25}, "md": {"seed": args.seed}})
    t0 = time.perf_counter()
    path, new, record = finetune_round(config, db, ensemble, "sevennet-0", 1, out)
    record.update({"variant": name, "labels": n, "round_seconds": round(time.perf_counter() - t0, 1),
                   "test_rmse_after": force_rmse(new.predict, test), "backbone_rmse": backbone_rmse(path, test)})
    return record


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--labels", type=int, nargs="+", default=[20, 200], help="training labels stored")
    p.add_argument("--variants", default="shipped")
    p.add_argument("--temperature", type=float, default=900.0, help="K, of the labelled and the test frames")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="bench-out/finetune-round")
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    phonon_labels(CampaignConfig(), out, sw_label)  # the campaign's own phonon set (SW, one displacement)
    test = sw_frames(6, args.temperature, seed=args.seed + 1000, spacing=100)
    base = backbone_rmse("sevennet-0", test)
    print(f"SevenNet-0 alone on the test frames: {base:.4f} eV/Å", flush=True)
    rows: list[dict] = []
    for n in args.labels:
        folder = out / f"labels-{n}"
        folder.mkdir(exist_ok=True)
        (folder / "labels.db").unlink(missing_ok=True)
        frames = sw_frames(n + -(-n // 3), args.temperature, seed=args.seed + n)
        db = label_database(folder, frames[:n], frames[n:])
        t0 = time.perf_counter()
        ensemble = Ensemble("sevennet-0", k=4, seed=args.seed, score="rms")
        ensemble.fit(db.training_set())
        ensemble.calibrate(db.validation_set())
        setup = time.perf_counter() - t0
        before = force_rmse(ensemble.predict, test)
        print(f"{n} labels: ensemble fitted and calibrated in {setup:.1f} s; test RMSE before the round "
              f"{before:.4f} eV/Å", flush=True)
        for name in args.variants.split(","):
            r = run_round(name, n, args, folder, db, ensemble, test)
            r.update({"test_rmse_before": before, "setup_seconds": round(setup, 1)})
            rows.append(r)
            print(f"  {name:10s} round {r['round_seconds']:7.1f} s (train {r['finetune_seconds']:6.1f}, rebuild "
                  f"{r['refit_seconds']:6.1f}; {r['steps']} steps, stopped: {r['stopped']}, heads on "
                  f"{r['heads_on']}) test RMSE {before:.4f} -> {r['test_rmse_after']:.4f} eV/Å; backbone alone "
                  f"{r['backbone_rmse']:.4f}", flush=True)
    (out / "results.json").write_text(json.dumps({"sevennet-0": base, "rounds": rows}, indent=1, default=str))
    by = {(r["variant"], r["labels"]): r for r in rows}
    if len(args.labels) >= 2:
        lo, hi = min(args.labels), max(args.labels)
        for name in args.variants.split(","):
            if (name, lo) in by and (name, hi) in by:
                print(f"{name}: round time at {hi} / at {lo} labels = "
                      f"{by[name, hi]['round_seconds'] / by[name, lo]['round_seconds']:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
