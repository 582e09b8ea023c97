r"""PFT of SevenNet-0 on VASP PBE chalcogenides: phonon errors before and after, beside MACE-MP-0b3.

Issue 4, must-show 3. ONE model is fine-tuned on several materials of
../shared/data/dft/chalcogenides-pbe/ at once, as PFT does (docs/methods.md §1):

- phonon structures: each material's perfect DFT supercell (216–512 atoms) with
  its supercell Hessian from the DFT force constants (almd.phonons.datasets.phonon_hessian),
  zero force/stress labels, one random Hessian column per step (a random material,
  then a random column of it other than its validation columns);
- EFS structures (--efs-batch 1): the DFT displaced supercells with their forces.
  Default --efs-batch 0: a step with the phonon supercell and a displaced one
  (up to 432 + 432 atoms) needs 7–10 GB, more than the shared machine had free
  (the first run was OOM-killed). The displaced supercells' forces are, to first
  order, 0.01 Å × the Hessian columns the DFT measured, so the Hessian labels
  carry their information; they are still used for the phonon errors below;
- validation: fixed Hessian columns at distinct sites — one per atom the DFT
  displaced (phonopy displaces one atom of each symmetry-distinct site), in the
  direction of its first displacement's largest component, one site of each element
  first, up to --val-columns per material. These exact columns are held out of the
  training draws; their symmetry images (other atoms of the same site, other
  directions) are not, so validation measures how well each material's force
  constants are fitted, not transfer. Every --eval-every steps on the EMA weights;
  early stopping (--patience evaluations without improvement) keeps the best EMA weights.
  The data carry no energies, so no per-element energy shifts are fitted.

Measured: (1) the wall time of each training step (one Hessian column + zero F/σ
of one perfect supercell, float32, 1 thread; forward, third-order backward, AdamW
and EMA update), per material, and of each validation pass; with --time-repeats > 0
also a forward + backward of EFS + one Hessian column (perfect + one displaced
supercell) on the smallest and (--time-512) on a 512-atom supercell; (2) per material, the phonon errors of
benchmarks/bench_chalcogenides.py (same metrics, at the DFT geometry, on the
DFT's own supercell and displacements, phonopy mesh length 100) for SevenNet-0
and for the fine-tuned model, beside MACE-MP-0b3's published errors
(mace-mp-0b3-vs-dft.csv; MACE relaxed with its own model, so that ratio is
indicative). All numbers are errors of fine-tuned *training* materials: this
shows that PFT fixes what it is trained on across several materials in one
model, not transfer to unseen materials.

Training stops at --max-steps, on early stopping, or at --train-minutes (the trainer's
run.budget: the step count adapts to the machine's load; the JSON records how many
steps ran and which material each step drew). Checkpoints and per-material
results are cached under --output, so re-running the same command resumes.

    OMP_NUM_THREADS=1 MALLOC_MMAP_THRESHOLD_=131072 nohup python benchmarks/bench_chalcogenides_pft.py \\
        --output bench-out/chalco2 --lr 1e-4 > chalco2.log 2>&1 &

Default materials: the 6 smallest supercells, BaTe (216 atoms), K₆Sb₂ (256),
Ba₈Pb₄ (288), SnSe (400), SnS (400), Na₂Tl₂ (432); --materials all takes the 16.
MALLOC_MMAP_THRESHOLD_=131072 keeps glibc from holding freed autograd buffers of
different sizes (resident memory stays near the peak of one step; without it two
earlier runs were OOM-killed at 6.4–7 GB).
Writes <output>/pft_chalcogenides.json and <output>/table.md; prints the table.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_chalcogenides import DATA, METRICS, mace_errors, run_material  # noqa: E402

# The 6 smallest supercells (a step's cost grows with the atom count): BaTe 216, K6Sb2 256,
# Ba8Pb4 288, SnSe 400, SnS 400, Na2Tl2 432 atoms. Next: Na2SbTl 432, Sb2Te3 and Bi2Te3 450,
# five at 512, ZnSb 576, Zn3As2 640.
DEFAULT_MATERIALS = ["mp-1000", "mp-14017", "mp-21246", "mp-691", "mp-2231", "mp-1564"]
BASELINE_CACHE = Path("bench-out/chalcogenides/sevennet-0")  # bench_chalcogenides.py's default cache
BASELINE_JSON = Path(__file__).resolve().parent / "chalcogenides_sevennet0.json"


def data_file(material: str, data: Path) -> Path:
    hits = sorted(data.glob(f"{material}.phonopy.yaml*"))
    if not hits:
        raise FileNotFoundError(f"{material}: no phonopy data set in {data}")
    return hits[0]


def load_material(material: str, data: Path, max_val_columns: int) -> dict[str, Any]:
    """Hessian sample, EFS samples and validation columns of one material.

    The yaml is read once (phonopy.load of a 512-atom set takes 10–20 s) and both
    the displaced supercells and the force constants come from that object.
    """
    from almd.finetune.data import sample_from_atoms
    from almd.phonons.datasets import displaced_supercells, load_phonon_dataset, phonon_hessian

    path = data_file(material, data)
    ph = load_phonon_dataset(path, is_compact_fc=False)
    efs = [sample_from_atoms(a, f"{material}:displaced[{i}]") for i, a in enumerate(displaced_supercells(ph))]
    supercell, hessian = phonon_hessian(ph)
    supercell.info["hessian"] = hessian
    phonon = sample_from_atoms(supercell, f"{material}:supercell")
    columns = validation_columns(ph.dataset["first_atoms"], supercell.get_chemical_symbols(), max_val_columns)
    # the validation columns are never drawn for training
    phonon.columns = tuple(j for j in range(3 * len(supercell)) if j not in columns)
    return {"material": material, "formula": supercell.get_chemical_formula(), "phonon": phonon, "efs": efs,
            "val_columns": columns, "n_atoms": len(supercell), "n_displacements": len(efs)}


def validation_columns(first_atoms: list[dict], symbols: list[str], limit: int) -> list[int]:
    """One Hessian column per atom the DFT displaced (one atom per symmetry-distinct site):
    3·atom + the largest component of its first displacement. One site of each element
    comes first, then the others, in the data set's order; at most ``limit``.
    """
    sites: dict[int, int] = {}  # displaced atom -> its column
    for d in first_atoms:
        sites.setdefault(int(d["number"]), 3 * int(d["number"]) + int(np.argmax(np.abs(d["displacement"]))))
    first, rest, seen = [], [], set()
    for atom, col in sites.items():
        (rest if symbols[atom] in seen else first).append(col)
        seen.add(symbols[atom])
    return (first + rest)[:limit]


def time_step(trainer: Any, phonon: Any, efs: Any, column: int, repeats: int) -> list[float]:
    """Wall time of one PFT step's forward + backward (EFS of the perfect and one displaced
    supercell, one Hessian column through third-order autograd). No optimiser step, so the
    training run that follows is unchanged.
    """
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        loss, _ = trainer.finetune_loss([phonon], [efs], [column])
        trainer.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        times.append(time.perf_counter() - t0)
    trainer.optimizer.zero_grad(set_to_none=True)
    return times


def baseline_row(material: str, path: Path, cache: Path, mesh: float) -> tuple[dict, str]:
    """SevenNet-0's errors: bench_chalcogenides.py's cached row or its JSON if present, else recomputed."""
    if BASELINE_JSON.exists():
        rows = {r["material"]: r for r in json.loads(BASELINE_JSON.read_text()).get("materials", [])}
        if material in rows and not rows[material].get("relaxed"):
            return rows[material], str(BASELINE_JSON)
    hit = BASELINE_CACHE / f"{material}.json"
    if hit.exists():
        row = json.loads(hit.read_text())
        if not row.get("relaxed") and row.get("errors"):
            return row, str(hit)
    own = cache / f"{material}.json"
    if own.exists():
        return json.loads(own.read_text()), str(own)
    from almd.phonons import resolve_calculator

    row = run_material(path, resolve_calculator("sevennet-0"), mesh)
    own.write_text(json.dumps(row, indent=1))
    return row, "recomputed"


def markdown(rows: list[dict], mace: dict[str, dict[str, float]]) -> str:
    head = ["material", "formula", "atoms", "disp"]
    for _, _, label in METRICS:
        head += [f"{label} 7net-0", "+PFT", "MACE"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["material"], r["formula"], str(r["n_atoms_supercell"]), str(r["n_displacements"])]
        for key, _, _ in METRICS:
            cells += [f"{r['before'][key]:.3g}", f"**{r['after'][key]:.3g}**",
                      f"{mace.get(r['material'], {}).get(key, float('nan')):.3g}"]
        lines.append("| " + " | ".join(cells) + " |")
    mean = ["**mean**", "", "", ""]
    ratio = ["ratio to MACE", "", "", ""]
    for key, _, _ in METRICS:
        b = np.mean([r["before"][key] for r in rows])
        a = np.mean([r["after"][key] for r in rows])
        m = np.mean([mace[r["material"]][key] for r in rows])
        mean += [f"{b:.3g}", f"**{a:.3g}**", f"{m:.3g}"]
        ratio += [f"{b / m:.2f}", f"**{a / m:.2f}**", "1"]
    return "\n".join(lines + ["| " + " | ".join(mean) + " |", "| " + " | ".join(ratio) + " |"])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--materials", nargs="*", default=DEFAULT_MATERIALS)
    p.add_argument("--data", type=Path, default=DATA)
    p.add_argument("--output", type=Path, default=Path("bench-out/chalco"))
    p.add_argument("--max-steps", type=int, default=400)
    p.add_argument("--train-minutes", type=float, default=30.0,
                   help="wall-time budget for training (the trainer stops after the step that crosses it)")
    p.add_argument("--eval-every", type=int, default=10)
    p.add_argument("--patience", type=int, default=4)
    p.add_argument("--lr", type=float, default=1e-4,
                   help="AdamW lr (PFT's; 3e-4 made the first 10-step run worse on Ba8Pb4 and SnSe)")
    p.add_argument("--efs-batch", type=int, default=0,
                   help="displaced DFT supercells added to each step (0: Hessian + zero-force labels only; memory)")
    p.add_argument("--val-columns", type=int, default=3,
                   help="fixed validation Hessian columns per material, at distinct displaced sites")
    p.add_argument("--time-repeats", type=int, default=0,
                   help="separately timed EFS + Hessian-column steps on the smallest supercell (0: none; "
                        "the training steps are timed anyway)")
    p.add_argument("--time-512", action="store_true", default=False,
                   help="also time one step on the first 512-atom supercell (the issue's reference size)")
    p.add_argument("--no-time-512", dest="time_512", action="store_false")
    p.add_argument("--mesh", type=float, default=100.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)

    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    import torch

    torch.set_num_threads(args.threads)  # 2 cores shared by ~6 processes: more threads only contend
    import almd
    from almd.finetune import FinetuneConfig, Finetuner

    t_start = time.perf_counter()
    out = args.output
    (out / "after").mkdir(parents=True, exist_ok=True)
    (out / "baseline").mkdir(parents=True, exist_ok=True)
    summary_path = out / "pft_chalcogenides.json"
    summary: dict[str, Any] = json.loads(summary_path.read_text()) if summary_path.exists() else {}

    def save() -> None:
        summary_path.write_text(json.dumps(summary, indent=1, default=float))

    wanted = sorted(p.name.split(".")[0] for p in args.data.glob("mp-*.phonopy.yaml*")) \
        if args.materials == ["all"] else args.materials
    materials = [load_material(m, args.data, args.val_columns) for m in wanted]
    names = [m["material"] for m in materials]
    print(f"loaded {len(materials)} materials in {time.perf_counter() - t_start:.0f} s: "
          + ", ".join(f"{m['material']} {m['formula']} {m['n_atoms']}×{m['n_displacements']}" for m in materials),
          file=sys.stderr, flush=True)

    cfg = FinetuneConfig.from_dict({
        "model": {"name": "sevennet-0", "strategy": "full", "dtype": "float32"},
        "data": {"validation_columns": args.val_columns, "fit_energy_shifts": True},
        "loss": {"hessian": 100.0, "forces": 20.0, "stress": 5.0},
        "optim": {"lr": args.lr},
        "run": {"steps": args.max_steps, "batch_size": 1, "efs_batch": args.efs_batch, "eval_every": args.eval_every,
                "patience": args.patience, "checkpoint_every": args.eval_every, "seed": args.seed,
                "budget": 60 * args.train_minutes,
                "output": str(out / "train"), "threads": args.threads, "progress": False},
    })
    phonon = [m["phonon"] for m in materials]
    efs = [s for m in materials for s in m["efs"]] if args.efs_batch > 0 else []
    # validation on the held-out, distinct-site columns (the training samples never draw them)
    validation = [dataclasses.replace(m["phonon"], columns=tuple(m["val_columns"])) for m in materials]
    trainer = Finetuner(cfg, phonon=phonon, efs=efs, validation=validation)
    summary.update(materials=names, formulas={m["material"]: m["formula"] for m in materials},
                   validation_columns={m["material"]: m["val_columns"] for m in materials},
                   energy_shifts=trainer.energy_shifts, config=cfg.to_dict(), threads=args.threads,
                   torch_threads=torch.get_num_threads())

    # (1) one PFT step, before any training (no optimiser step: the run is unaffected)
    if "step_time" not in summary and args.time_repeats > 0:
        small = min(materials, key=lambda m: m["n_atoms"])
        timing: dict[str, Any] = {"what": "forward + backward of one PFT step: perfect supercell (zero F/σ, "
                                  "one Hessian column) + one DFT displaced supercell (EFS)"}
        timing[f"{small['n_atoms']}_atoms"] = {"material": small["material"], "seconds": time_step(
            trainer, small["phonon"], small["efs"][0], small["val_columns"][0], args.time_repeats)}
        big = next((m for m in materials if m["n_atoms"] == 512), None)
        if args.time_512 and big is not None:
            timing["512_atoms"] = {"material": big["material"], "seconds": time_step(
                trainer, big["phonon"], big["efs"][0], big["val_columns"][0], 1)}
        timing["load_average_1min"] = os.getloadavg()[0]
        summary["step_time"] = timing
        save()
    for k, v in summary.get("step_time", {}).items():
        if isinstance(v, dict):
            print(f"one PFT step (EFS + 1 Hessian column), {k} ({v['material']}): "
                  f"{', '.join(f'{s:.1f}' for s in v['seconds'])} s", file=sys.stderr, flush=True)

    # (2) training until max_steps, early stopping or the time budget (a re-run resumes from the checkpoint)
    t_train = time.perf_counter()

    def report(record: dict[str, Any]) -> None:
        if "val_loss" in record:
            print(f"step {record['step']}: val loss {record['val_loss']:.4g}, val Hessian MAE "
                  f"{record.get('val_hessian_mae', float('nan')):.4g} eV/Å² (start "
                  f"{trainer.initial_validation['val_hessian_mae']:.4g}, best step {trainer.best['step']}); "
                  f"validation {record['val_seconds']:.0f} s", file=sys.stderr, flush=True)

    result = trainer.fit(resume=True, on_step=report)
    summary["stopped_by"] = {"steps": "max steps", "patience": "early stopping", "budget": "time budget"}[
        result.stop_reason]
    history = trainer.history
    plain = [h["seconds"] for h in history if "val_loss" not in h]
    val_s = [h["val_seconds"] for h in history if "val_seconds" in h]
    # batch_size 1: the step's phonon supercell first (steps of checkpoints older than the record: None)
    drawn = [h["drawn"][0].split(":")[0] if h.get("drawn") else None for h in history]
    by_material = {n: [h["seconds"] for h, d in zip(history, drawn) if d == n and "val_loss" not in h] for n in names}
    summary["training"] = {
        "steps_done": trainer.step, "best_step": trainer.best["step"], "lr": args.lr,
        "initial_validation": trainer.initial_validation, "best_validation": trainer.best["metrics"],
        "median_step_seconds": float(np.median(plain)) if plain else None,
        "validation_columns": sum(len(c) for c in trainer.val_columns),
        "validation_pass_seconds": val_s, "load_average_1_5_15min_end": os.getloadavg(),
        "train_minutes_this_run": (time.perf_counter() - t_train) / 60,
        "steps_per_material": {n: drawn.count(n) for n in names},
        "median_step_seconds_by_material": {n: float(np.median(v)) if v else None for n, v in by_material.items()},
        "model": str(result.model_path),
    }
    save()
    print(f"training: {trainer.step} steps, best step {trainer.best['step']}, stopped by {summary['stopped_by']}; "
          f"median step {summary['training']['median_step_seconds']}", file=sys.stderr, flush=True)

    # (3) phonon errors before (SevenNet-0) and after (fine-tuned), same protocol as bench_chalcogenides.py
    mace = mace_errors(args.data / "mace-mp-0b3-vs-dft.csv")
    tuned = almd.Calculator(model=str(result.model_path))
    rows = []
    for m in materials:
        path = data_file(m["material"], args.data)
        before, source = baseline_row(m["material"], path, out / "baseline", args.mesh)
        hit = out / "after" / f"{m['material']}.json"
        if hit.exists():
            after = json.loads(hit.read_text())
        else:
            after = run_material(path, tuned, args.mesh)
            hit.write_text(json.dumps(after, indent=1))
        rows.append({"material": m["material"], "formula": after["formula"],
                     "n_atoms_supercell": after["n_atoms_supercell"], "n_displacements": after["n_displacements"],
                     "before": before["errors"], "after": after["errors"], "baseline_source": source,
                     "model_after": after["model"], "dft": after["dft"], "model_before": before["model"],
                     "mace_mp_0b3": mace.get(m["material"])})
        e0, e1 = before["errors"], after["errors"]
        print(f"{m['material']:>10} {after['formula']:>8}: BZ MAE {e0['bz_mae_thz']:.3f} → {e1['bz_mae_thz']:.3f} THz "
              f"(MACE {mace[m['material']]['bz_mae_thz']:.3f}), |Δω_max| {e0['omega_max_thz_abs_error']:.3f} → "
              f"{e1['omega_max_thz_abs_error']:.3f}, |ΔS| {e0['S_J_K_mol_abs_error']:.2f} → "
              f"{e1['S_J_K_mol_abs_error']:.2f}", file=sys.stderr, flush=True)
    summary["results"] = rows
    summary["mean"] = {key: {"sevennet0": float(np.mean([r["before"][key] for r in rows])),
                             "pft": float(np.mean([r["after"][key] for r in rows])),
                             "mace_mp_0b3": float(np.mean([mace[r["material"]][key] for r in rows]))}
                       for key, _, _ in METRICS}
    summary["mean_shift_thz"] = {"sevennet0": float(np.mean([r["before"]["bz_mean_shift_thz"] for r in rows])),
                                 "pft": float(np.mean([r["after"]["bz_mean_shift_thz"] for r in rows]))}
    summary["wall_minutes_this_run"] = (time.perf_counter() - t_start) / 60
    save()
    table = markdown(rows, mace)
    (out / "table.md").write_text(table + "\n")
    print(table)
    s = summary["mean_shift_thz"]
    print(f"\nmean frequency shift model − DFT: SevenNet-0 {s['sevennet0']:+.3f} THz, +PFT {s['pft']:+.3f} THz; "
          f"{trainer.step} steps (best {trainer.best['step']}), {summary['stopped_by']}; "
          f"wall {summary['wall_minutes_this_run']:.0f} min this run; {summary_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
