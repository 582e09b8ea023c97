"""Forgetting under Si phonon fine-tuning, with and without co-training (issue 4, must-show 4).

What it measures
----------------
SevenNet-0 is PFT-fine-tuned on the VASP PBE silicon data shipped in
almd.data.SI_PBE (perfect 64-atom supercell with one random DFT Hessian column
per step + DFT displaced supercells), exactly as examples/pft_silicon.py, in
variants that differ only in co-training:

  none  no replay (PFT without co-training; λ_E = 20 on the Si batches)
  self  co-training on self-distilled replay (data.replay = "self": the Si
        training structures rattled/strained, labelled by the frozen base)
  file  co-training on a file of diverse structures of OTHER materials labelled
        by the frozen base (written to OUT/replay.extxyz; no Si in it)

Co-training is PFT's: replay_ratio = 4 replay steps after each phonon step,
Huber (δ 0.1) EFS loss with weights E 500 / F 200 / σ 50, λ_E = 0 on the Si
batches. The EMA is updated once per step (after its replay steps) in every
variant; before 2026-11-22 ~06:30 UTC the trainer updated it after every
optimiser update, i.e. 5× per step with replay (the first forgetting numbers in RESULTS.md). Everything else (steps, lr, EMA, seed, validation) is identical; the
step budget is fixed (patience 0) and the best-validation EMA weights are kept,
as in the example.

Each model is then scored on
  * a held-out set of other materials (Ge, C, SiC, GaAs, Al, Cu, Mg, NaCl, MgO,
    Fe, AlN, InP; 1–16 atoms; bulk, strained and rattled; fixed seeds) labelled
    by the frozen base: energy MAE per atom, force MAE, stress MAE against the
    base labels (the base scores 0 by construction, so these are the drift the
    fine-tune caused), next to the RMS force / stress of the set. Energies are
    compared after removing the per-element energy shifts the fine-tune fits to
    the VASP reference (they only move Si, i.e. SiC, by a constant per atom);
    the raw figure is in the JSON. The set's materials are also split into those
    whose prototypes occur (other seeds) in the replay file and those that don't
    (SiC, Fe, AlN, InP).
  * silicon: phonons against VASP (almd.phonons.phonons_vs_reference: ω_max, F, S,
    C_V errors at 300 K) and the force MAE on the held-out DFT displaced supercells.

How to run (1 thread per process; everything cached under OUT, a rerun skips
finished stages and resumes interrupted trainings from their checkpoints):

    python benchmarks/bench_forgetting.py all [--steps 10] [--out bench-out/forget]
    # or in parallel, one process per variant:
    python benchmarks/bench_forgetting.py data
    python benchmarks/bench_forgetting.py train none &   # ... self, file
    python benchmarks/bench_forgetting.py report
    python benchmarks/bench_forgetting.py measure        # seconds per training step of each variant
    # equal smaller budget when the slowest run cannot finish: EMA weights of a checkpoint
    python benchmarks/bench_forgetting.py snapshot self --checkpoint OUT/self/checkpoint_step5.pt

Writes OUT/results.json and prints the table. Budget: 10 PFT steps (validation at
0 and 10), chosen from the step times measured on the shared 2-core machine on
2026-11-22 (load 11-14, one nice -10 job taking a core: 150-330 s wall per plain
PFT step, ~12 CPU-s; self-distilled 64-atom replay adds 4 EFS passes on 64 atoms,
~2.5x; the other-materials replay ~+10 %) so that the three fine-tunes finish
within about an hour in parallel. On a free machine use --steps 30 or more: the
Si gain grows with steps (examples/pft_silicon.py: 83 % after 90 steps).
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")  # before torch is imported

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

VARIANTS = ("none", "self", "file")
METRICS = ("omega_max_K_abs_error", "F_kJ_mol_abs_error", "S_J_K_mol_abs_error", "Cv_J_K_mol_abs_error")

# (name, prototype, lattice parameters in Å): held-out materials
HELD_OUT = [
    ("Ge", "diamond", {"a": 5.66}), ("C", "diamond", {"a": 3.567}), ("SiC", "zincblende", {"a": 4.36}),
    ("GaAs", "zincblende", {"a": 5.65}), ("Al", "fcc", {"a": 4.05}), ("Cu", "fcc", {"a": 3.61}),
    ("Mg", "hcp", {"a": 3.21, "c": 5.21}), ("NaCl", "rocksalt", {"a": 5.64}), ("MgO", "rocksalt", {"a": 4.21}),
    ("Fe", "bcc", {"a": 2.87}), ("AlN", "wurtzite", {"a": 3.11, "c": 4.98}), ("InP", "zincblende", {"a": 5.87}),
]
NOT_IN_REPLAY = {"SiC", "Fe", "AlN", "InP"}
# replay file: the held-out prototypes without Si/Fe/AlN/InP (other seeds, other strains) + other materials
REPLAY = [m for m in HELD_OUT if m[0] not in NOT_IN_REPLAY] + [
    ("W", "bcc", {"a": 3.165}), ("Ti", "hcp", {"a": 2.95, "c": 4.68}), ("Ni", "fcc", {"a": 3.52}),
    ("GaN", "wurtzite", {"a": 3.19, "c": 5.19}), ("ZnO", "wurtzite", {"a": 3.25, "c": 5.21}),
    ("LiF", "rocksalt", {"a": 4.03}), ("Ag", "fcc", {"a": 4.09}), ("CdTe", "zincblende", {"a": 6.48}),
]


# ------------------------------------------------------------------ structures
def _bulk(name: str, proto: str, lat: dict[str, float], cubic: bool):
    from ase.build import bulk

    if proto == "hcp" or proto == "wurtzite":  # no cubic cell: orthorhombic-ish supercells by repeat
        return bulk(name, proto, **lat)
    return bulk(name, proto, **lat, cubic=cubic)


def _strain(atoms, rng: np.random.Generator, amount: float) -> None:
    eps = rng.uniform(-amount, amount, (3, 3))
    atoms.set_cell(atoms.cell.array @ (np.eye(3) + 0.5 * (eps + eps.T)), scale_atoms=True)


def _repeat_to(atoms, lo: int, hi: int):
    """Repeat along the shortest axes until at least ``lo`` atoms (never more than ``hi``)."""
    reps = [1, 1, 1]
    while len(atoms) * np.prod(reps) < lo:
        lengths = atoms.cell.lengths() * reps
        k = int(np.argmin(lengths))
        if len(atoms) * np.prod(reps) * (reps[k] + 1) / reps[k] > hi:
            break
        reps[k] += 1
    return atoms.repeat(reps)


def make_structures(materials: list, seed: int, count: int) -> list:
    """Per material: strained primitive cells, rattled conventional cells and supercells (1–16 atoms)."""
    out = []
    for m, (name, proto, lat) in enumerate(materials):
        rng = np.random.default_rng(seed + 101 * m)
        recipes = [  # (cell, max strain, rattle Å)
            ("prim", 0.02, 0.0), ("conv", 0.0, 0.03), ("conv", 0.0, 0.08), ("conv", 0.03, 0.05),
            ("super", 0.01, 0.05), ("prim", 0.04, 0.05), ("super", 0.02, 0.1),
        ][:count]
        for k, (cell, strain, rattle) in enumerate(recipes):
            a = _bulk(name, proto, lat, cubic=cell != "prim")
            if cell == "super":
                a = _repeat_to(a, 8, 16)
            elif cell == "conv" and len(a) < 4:
                a = _repeat_to(a, 4, 8)
            if strain > 0:
                _strain(a, rng, strain)
            if rattle > 0:
                a.positions += rng.normal(0.0, rattle, a.positions.shape)
            a.info.update(material=name, recipe=f"{cell}/strain{strain}/rattle{rattle}", index=k)
            out.append(a)
    return out


def label(frames: list, model: str = "sevennet-0") -> list:
    """Energy, forces, stress of ``model`` stored as single-point results."""
    from ase.calculators.singlepoint import SinglePointCalculator

    import almd

    calc = almd.Calculator(model)
    out = []
    for a in frames:
        b = a.copy()
        b.calc = calc
        e, f, s = b.get_potential_energy(), b.get_forces(), b.get_stress()
        b.calc = SinglePointCalculator(b, energy=e, forces=f, stress=s)
        out.append(b)
    return out


def stage_data(out: Path) -> None:
    import ase.io

    for fname, mats, seed, count in (("held_out.extxyz", HELD_OUT, 0, 7), ("replay.extxyz", REPLAY, 1000, 5)):
        path = out / fname
        if path.exists():
            print(f"{path} exists", flush=True)
            continue
        t0 = time.perf_counter()
        frames = label(make_structures(mats, seed, count))
        ase.io.write(str(path), frames, format="extxyz")
        print(f"{path}: {len(frames)} structures, {sum(len(a) for a in frames)} atoms, "
              f"{time.perf_counter() - t0:.1f} s", flush=True)


# ------------------------------------------------------------------ training
def config(variant: str, out: Path, steps: int):
    from almd.data import SI_PBE
    from almd.finetune import FinetuneConfig

    replay = {"none": "", "self": "self", "file": str(out / "replay.extxyz")}[variant]
    return FinetuneConfig.from_dict({
        "model": {"name": "sevennet-0", "strategy": "full"},
        "data": {"phonon": [str(SI_PBE)], "efs": [str(SI_PBE)], "validation_fraction": 0.1,
                 "max_validation": 4, "validation_columns": 3, "replay": replay},
        "loss": {"replay_ratio": 4, "huber_delta": 0.1, "replay_energy": 500.0, "replay_forces": 200.0,
                 "replay_stress": 50.0},
        "run": {"steps": steps, "eval_every": 10, "patience": 0, "checkpoint_every": 5, "seed": 0,
                "threads": 1, "output": str(out / variant), "progress": False},
    })


def stage_train(variant: str, out: Path, steps: int) -> dict[str, Any]:
    from almd.finetune import Finetuner

    done = out / variant / "train.json"
    if done.exists():
        info = json.loads(done.read_text())
        if info["steps"] == steps:
            print(f"{variant}: trained already ({done})", flush=True)
            return info
    cfg = config(variant, out, steps)
    t0 = time.perf_counter()
    trainer = Finetuner(cfg)
    print(f"{variant}: {len(trainer.phonon)} phonon, {len(trainer.efs)} EFS, {len(trainer.replay)} replay "
          f"structures; λ_E {cfg.energy_weight}; shifts {trainer.energy_shifts}", flush=True)
    result = trainer.fit(resume=True)
    plain = [h["seconds"] for h in result.history if "val_loss" not in h]
    info = {"variant": variant, "steps": steps, "model": str(result.model_path), "best_step": result.best_step,
            "steps_done": result.steps_done, "energy_shifts": {str(k): v for k, v in result.energy_shifts.items()},
            "initial_validation": result.initial_validation, "best_validation": result.best_validation,
            "seconds_per_step_median": float(np.median(plain)) if plain else None,
            "wall_minutes_this_process": (time.perf_counter() - t0) / 60,
            "replay_structures": len(trainer.replay), "held_out_si": [s.name for s in trainer.val_efs],
            "config": cfg.to_dict()}
    done.write_text(json.dumps(info, indent=1))
    print(f"{variant}: done, best step {result.best_step} of {result.steps_done}, "
          f"{info['seconds_per_step_median']} s/step", flush=True)
    return info


def stage_measure(out: Path, steps: int = 2) -> dict[str, float]:
    """Median seconds per training step (phonon step + its replay steps) of each variant."""
    from almd.finetune import Finetuner

    times = {}
    for variant in VARIANTS:
        cfg = config(variant, out / "measure", steps)
        trainer = Finetuner(cfg)
        t = []
        for _ in range(steps):
            t0 = time.perf_counter()
            trainer.train_step()
            t.append(time.perf_counter() - t0)
        times[variant] = float(np.median(t))
        print(f"{variant}: {t} s per step", flush=True)
    (out / "measure.json").write_text(json.dumps(times, indent=1))
    return times


def stage_snapshot(variant: str, out: Path, checkpoint: Path) -> dict[str, Any]:
    """Export the EMA weights of a training checkpoint (no validation-based selection).

    Used to compare variants at an equal, smaller step budget when the slowest run
    cannot reach the full one: every variant is taken at the same step, EMA weights.
    """
    import torch

    from almd import potentials

    state = torch.load(checkpoint, map_location="cpu", weights_only=False)
    step = int(state["step"])
    done = out / variant / f"train_step{step}.json"
    if done.exists():
        return json.loads(done.read_text())
    pot = potentials.load(state["config"]["model"]["name"])  # strategy "full": same modules as the base
    pot.load_state_dict(state["model"])
    params = dict(pot.named_parameters())
    with torch.no_grad():
        for k, v in state["ema"]["shadow"].items():
            params[k].copy_(v)
    model = potentials.save(pot.float(), out / variant / f"model_step{step}_ema.pt", snapshot_of=str(checkpoint))
    plain = [h["seconds"] for h in state["history"] if "val_loss" not in h]
    log = out / variant / "log.json"  # shifts are in the weights already; recorded for the energy comparison
    shifts = json.loads(log.read_text()).get("energy_shifts", {}) if log.exists() else {}
    info = {"variant": variant, "steps": step, "model": str(model), "best_step": f"{step} (EMA)",
            "steps_done": step, "energy_shifts": shifts, "seconds_per_step_median": float(np.median(plain)),
            "replay_structures": None, "history": state["history"]}
    done.write_text(json.dumps(info, indent=1))
    print(f"{variant}: step {step} EMA weights -> {model}", flush=True)
    return info


# ------------------------------------------------------------------ evaluation
def _si_held_out(out: Path):
    """The DFT displaced supercells the Si fine-tunes held out (same split in every variant)."""
    from almd.data import SI_PBE
    from almd.finetune.data import load_efs, split_validation

    _, val = split_validation(load_efs(SI_PBE), 0.1)
    return val[:4]


def evaluate(model: str, out: Path, key: str, shifts: dict[int, float]) -> dict[str, Any]:
    """Held-out other-material errors vs the base labels, Si phonons vs VASP, Si held-out force MAE."""
    path = out / f"eval_{key}.json"
    if path.exists():
        return json.loads(path.read_text())
    import ase.io

    import almd
    from almd.data import SI_PBE
    from almd.phonons import phonons_vs_reference

    t0 = time.perf_counter()
    calc = almd.Calculator(model)
    frames = ase.io.read(str(out / "held_out.extxyz"), index=":")
    rows = []
    for ref in frames:
        a = ref.copy()
        a.calc = calc
        n = len(a)
        e_raw = a.get_potential_energy()
        e = e_raw - sum(shifts.get(int(z), 0.0) for z in a.numbers)  # undo the fitted VASP reference shift
        rows.append({"material": ref.info["material"], "n": n,
                     "dE_per_atom": abs(e - ref.get_potential_energy()) / n,
                     "dE_raw_per_atom": abs(e_raw - ref.get_potential_energy()) / n,
                     "dF": np.abs(a.get_forces() - ref.get_forces()).ravel().tolist(),
                     "dS": np.abs(a.get_stress() - ref.get_stress()).tolist()})
    _, _, err = phonons_vs_reference(SI_PBE, calc)
    si = {k: float(err[k]) for k in METRICS + ("band_mae_thz",)}
    ferr = []
    for s in _si_held_out(out):
        a = s.atoms.copy()
        a.calc = calc
        ferr.append(np.abs(a.get_forces() - s.forces).mean())
    si["held_out_force_mae_meV_A"] = float(np.mean(ferr)) * 1000
    res = {"model": model, "rows": rows, "si": si, "seconds": time.perf_counter() - t0}
    path.write_text(json.dumps(res))
    return res


def summarise(rows: list[dict], subset=None) -> dict[str, float]:
    rows = [r for r in rows if subset is None or subset(r["material"])]
    return {"energy_meV_atom": 1000 * float(np.mean([r["dE_per_atom"] for r in rows])),
            "energy_raw_meV_atom": 1000 * float(np.mean([r["dE_raw_per_atom"] for r in rows])),
            "forces_meV_A": 1000 * float(np.mean(np.concatenate([r["dF"] for r in rows]))),
            "stress_GPa": 160.21766 * float(np.mean(np.concatenate([r["dS"] for r in rows])))}


def set_scale(out: Path) -> dict[str, float]:
    """Size of the held-out labels: RMS force component, RMS stress, mean |E/N − E/N of the material's bulk|."""
    import ase.io

    frames = ase.io.read(str(out / "held_out.extxyz"), index=":")
    f = np.concatenate([a.get_forces().ravel() for a in frames])
    s = np.concatenate([a.get_stress() for a in frames])
    e0 = {}
    for a in frames:  # first structure of each material: the strained primitive cell, no rattle
        e0.setdefault(a.info["material"], a.get_potential_energy() / len(a))
    de = [abs(a.get_potential_energy() / len(a) - e0[a.info["material"]]) for a in frames]
    return {"structures": len(frames), "atoms": sum(len(a) for a in frames),
            "rms_force_meV_A": 1000 * float(np.sqrt(np.mean(f**2))),
            "mean_abs_force_meV_A": 1000 * float(np.mean(np.abs(f))),
            "rms_stress_GPa": 160.21766 * float(np.sqrt(np.mean(s**2))),
            "energy_spread_meV_atom": 1000 * float(np.mean(de))}


def stage_report(out: Path, steps: int) -> dict[str, Any]:
    results: dict[str, Any] = {"steps": steps, "scale": set_scale(out), "models": {}}
    base = evaluate("sevennet-0", out, "base", {})
    results["models"]["SevenNet-0"] = {"si": base["si"], "all": summarise(base["rows"])}
    runs = []  # (key, train info file, eval cache key)
    for variant in VARIANTS:
        if (out / variant / "train.json").exists():
            runs.append((variant, out / variant / "train.json", variant))
        else:
            print(f"{variant}: not trained to the full budget", flush=True)
        for snap in sorted((out / variant).glob("train_step*.json")) if (out / variant).exists() else []:
            k = snap.stem.removeprefix("train_step")
            runs.append((f"{variant}@{k}", snap, f"{variant}_step{k}"))
    for key, done, cache in runs:
        info = json.loads(done.read_text())
        shifts = {int(k): v for k, v in info["energy_shifts"].items()}
        ev = evaluate(info["model"], out, cache, shifts)
        results["models"][key] = {
            "si": ev["si"], "all": summarise(ev["rows"]),
            "in_replay": summarise(ev["rows"], lambda m: m not in NOT_IN_REPLAY),
            "not_in_replay": summarise(ev["rows"], lambda m: m in NOT_IN_REPLAY),
            "per_material": {m: summarise(ev["rows"], lambda x, m=m: x == m) for m, _, _ in HELD_OUT},
            "best_step": info["best_step"], "steps_done": info["steps_done"],
            "seconds_per_step": info["seconds_per_step_median"], "replay_structures": info["replay_structures"],
            "energy_shifts": info["energy_shifts"]}
    (out / "results.json").write_text(json.dumps(results, indent=1))
    print_table(results)
    return results


def print_table(results: dict[str, Any]) -> None:
    sc = results["scale"]
    names = {"SevenNet-0": "SevenNet-0 (base)", "none": "PFT, no co-training",
             "self": "PFT + co-training, self-distilled Si replay", "file": "PFT + co-training, other-materials replay"}
    print(f"\nHeld-out other materials ({sc['structures']} structures, {sc['atoms']} atoms), error vs the base labels; "
          f"scale: RMS force {sc['rms_force_meV_A']:.0f} meV/Å, RMS stress {sc['rms_stress_GPa']:.2f} GPa, "
          f"energy spread {sc['energy_spread_meV_atom']:.0f} meV/atom")
    print("| model | E MAE (meV/atom) | F MAE (meV/Å) | F MAE / RMS F | σ MAE (GPa) | F MAE not-in-replay (meV/Å) "
          "| ω_max err (K) | F err (kJ/mol) | S err (J/K/mol) | C_V err (J/K/mol) | Si held-out F MAE (meV/Å) "
          "| best step | s/step |")
    print("|" + "---|" * 13)
    for key, m in results["models"].items():
        a, si = m["all"], m["si"]
        variant, _, at = key.partition("@")
        label = names[variant] + (f", {at} steps, EMA weights" if at else "")
        nr = m.get("not_in_replay", {}).get("forces_meV_A", 0.0)
        print(f"| {label} | {a['energy_meV_atom']:.2f} | {a['forces_meV_A']:.2f} | "
              f"{a['forces_meV_A'] / sc['rms_force_meV_A']:.3f} | {a['stress_GPa']:.3f} | {nr:.2f} | "
              f"{si['omega_max_K_abs_error']:.1f} | {si['F_kJ_mol_abs_error']:.2f} | {si['S_J_K_mol_abs_error']:.2f} | "
              f"{si['Cv_J_K_mol_abs_error']:.2f} | {si['held_out_force_mae_meV_A']:.2f} | "
              f"{m.get('best_step', '–')} | {m.get('seconds_per_step') or '–'} |")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("stage", choices=("all", "data", "train", "snapshot", "measure", "report"))
    p.add_argument("variant", nargs="?", choices=VARIANTS, help="for 'train' and 'snapshot'")
    p.add_argument("--checkpoint", type=Path, help="for 'snapshot': a training checkpoint whose EMA weights to export")
    p.add_argument("--steps", type=int, default=10, help="fixed PFT step budget, the same for every variant")
    p.add_argument("--out", type=Path, default=Path("bench-out/forget"))
    args = p.parse_args(argv)

    import torch

    torch.set_num_threads(1)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.stage in ("all", "data", "train", "measure"):
        stage_data(args.out)
    if args.stage == "measure":
        stage_measure(args.out)
    if args.stage == "train":
        if args.variant is None:
            p.error("train needs a variant: " + ", ".join(VARIANTS))
        stage_train(args.variant, args.out, args.steps)
    if args.stage == "snapshot":
        if args.variant is None or args.checkpoint is None:
            p.error("snapshot needs a variant and --checkpoint")
        stage_snapshot(args.variant, args.out, args.checkpoint)
    if args.stage == "all":
        for v in VARIANTS:
            stage_train(v, args.out, args.steps)
    if args.stage in ("all", "report"):
        stage_report(args.out, args.steps)
    return 0


if __name__ == "__main__":
    sys.exit(main())
