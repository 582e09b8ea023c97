r"""NaCl: fine-tuning SevenNet-0 on n DFT structures, by adapter strategy (issue 4, must-show 2).

Data: phono3py's NaCl example (VASP PBE; Togo & Seko 2024), the fc3 set of 100
supercells of 64 atoms (2×2×2 conventional), every atom displaced by 0.03 Å in
a random direction, with DFT forces and supercell energies
(../shared/data/dft/nacl-rd/phono3py_params_NaCl.yaml.xz beside the clone; --data to point elsewhere).

  * test set: the last 50 supercells (indices 50–99), never trained or validated on;
  * training pools: the first n = 10, 25, 50 supercells (indices 0…n−1);
  * validation (early stopping): supercells 8 and 9, which are in every pool —
    there is no held-out slice left for n = 50, and the same two structures for
    every n keep the runs comparable. Early stopping here guards against
    divergence; it is not an independent generalisation check (the test set is).

For each n and strategy (lora, delta, full, scratch; almd.potentials.adapters)
SevenNet-0 (float32) is fine-tuned with almd.finetune.Finetuner on energy + forces
(λ_F = 20 as in PFT, λ_E = 1 by default (on |ΔE|/N in eV/atom), batch of one structure per step,
AdamW with weight decay 1e-3, EMA, the best validation EMA weights kept), with the
same fixed step budget for every run. λ_E is lowered from PFT's 20 because the
displaced cells' energies differ by < 0.1 meV/atom: the energy label only fixes
the offset, and Adam's first sign-like steps jitter that offset by a few meV/atom,
which at λ_E = 20 outweighs any force improvement in the validation loss.
Learning rates: 1e-4 for full and delta (PFT's), 1e-3 for lora (B starts at zero)
and scratch (random weights). AdamW's decoupled weight decay alone pulls Δω by
lr·wd = 1e-7 per step, so without more delta (ω₀ + Δω) takes the same steps as
full; delta runs therefore carry the fine-tuner's explicit λ_Δ·‖Δω‖² penalty
(optim.delta_l2; the fine-tuner's default, 0.01 since 2026-11-22 (1 before), --delta-l2 to change it; recorded in each result as
"delta_l2", absent from results made before the penalty existed). Per-element energy shifts are fitted once per pool (least squares
on the starting model's energies; for 'scratch' on the re-initialised model,
whose energies they must correct) and applied before training.

Reported per run, on the 50 test supercells:
  * force MAE (meV/Å, mean |ΔF| over components);
  * energy MAE per atom (meV/atom), raw and with the mean offset over the test set
    removed (the displaced cells differ in energy by only ~3 meV per cell, so the
    raw number is mostly the constant offset);
  * phonons: fc2 fitted with symfc in the SAME 2×2×2 supercell from the SAME 50
    displacements, with the model's forces and with the DFT forces; no
    non-analytic (LO–TO) correction for either. From each fc2: ω_max, F, S, C_V at
    300 K (per mole of primitive cells) and the frequency MAE along the band path
    and over the BZ mesh (almd.phonons.analyse / compare). The model is evaluated at
    the DFT geometry (a = 5.603 Å), where the perfect supercell's forces vanish by symmetry.
Also the base SevenNet-0 row, and a reference-noise row: the DFT fc2 from all 100
supercells against the DFT fc2 from the 50 test ones.

    OMP_NUM_THREADS=1 python benchmarks/bench_nacl_peft.py [--steps 30] [--eval-every 10] [--patience 2] \\
        [--n 10 50] [--later 25] [--strategies lora full scratch delta] [--energy-weight 1] \\
        [--root bench-out/nacl] [--stop-by 05:05] [--delta-l2 1]

Runs go strategy by strategy over --n, then every strategy for the --later sizes,
so that under a time limit each strategy is measured at the smallest and largest
pool first. A training step (one 64-atom cell; the force loss needs
second-order autograd) took ~7 s on one lightly loaded core and ~17 s on the
shared 2-core machine at load 9–10; the default 30-step budget was chosen for that.

Each run's result is cached in <root>/n<NN>_<strategy>.json (a rerun skips it;
an interrupted training resumes from its checkpoint); the table is printed and
written to <root>/summary.json and <root>/table.md. --stop-by (UTC HH:MM) skips
runs that would not finish in time. Single-threaded throughout (torch and BLAS).
"""

from __future__ import annotations

import argparse
import copy
import datetime as dt
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_NUM_THREADS", "1")  # before numpy/torch load their thread pools

import numpy as np

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "dft" / "nacl-rd" / "phono3py_params_NaCl.yaml.xz"
STRATEGIES = ("lora", "delta", "full", "scratch")
# Fine-tuning lr for full/delta (the PFT default); LoRA's zero-initialised B and a
# random network need larger steps to move at all within a short budget.
LEARNING_RATES = {"lora": 1e-3, "delta": 1e-4, "full": 1e-4, "scratch": 1e-3}
N_TEST, VALIDATION = 50, (8, 9)
PHONON_KEYS = ("omega_max_K_abs_error", "F_kJ_mol_abs_error", "S_J_K_mol_abs_error", "Cv_J_K_mol_abs_error",
               "band_mae_thz", "bz_mae_thz", "bz_mean_shift_thz")


# ---------------------------------------------------------------- data
def load_data(path: Path) -> tuple[Any, list]:
    """(phono3py object, the 100 fc3 supercells as Atoms with DFT energy and forces)."""
    from almd.phonons.datasets import displaced_supercells, load_phonon_dataset

    ph3 = load_phonon_dataset(path)
    cells = [a for a in displaced_supercells(ph3) if a.info["set"] == "fc3"]
    return ph3, cells


def harmonic_template(ph3: Any):
    """A Phonopy object on the fc3 (2×2×2) supercell; its symmetry is found once and shared."""
    from phonopy import Phonopy

    return Phonopy(ph3.unitcell, supercell_matrix=ph3.supercell_matrix, primitive_matrix=ph3.primitive_matrix,
                   symprec=ph3.symmetry.tolerance)


def fc2_phonopy(template: Any, displacements: np.ndarray, forces: np.ndarray):
    """fc2 fitted by symfc to (displacements, forces) of random-displacement supercells; no NAC."""
    from almd.phonons.harmonic import set_forces_and_fc

    ph = copy.copy(template)  # shallow: shares the symmetry; data set and fc are replaced, not mutated
    ph.dataset = {"displacements": np.asarray(displacements)}
    return set_forces_and_fc(ph, np.asarray(forces))


# ---------------------------------------------------------------- model evaluation
def predict(pot: Any, cells: list, forces: bool = True) -> tuple[np.ndarray, np.ndarray | None]:
    """Energies (eV per cell) and forces of a potential, one structure at a time (batching did not help)."""
    import torch

    from almd.potentials import build_graph, energy_forces_stress

    energies, all_forces = [], []
    for a in cells:
        # energies alone need no autograd graph at all
        with torch.no_grad() if not forces else torch.enable_grad():
            out = energy_forces_stress(pot, build_graph(a, pot.cutoff, torch.float32), forces=forces, stress=False)
        energies.append(float(out["energy"].detach().double().sum()))
        if forces:
            all_forces.append(out["forces"].detach().double().numpy())
    return np.array(energies), (np.array(all_forces) if forces else None)


def metrics(e_pred: np.ndarray, f_pred: np.ndarray, test: list, disp: np.ndarray, template: Any,
            dft: Any) -> dict[str, Any]:
    """Test-set force/energy errors and phonon errors (model fc2 vs DFT fc2, same supercell and displacements)."""
    from almd.phonons import analyse, compare

    e_ref = np.array([a.get_potential_energy() for a in test])
    f_ref = np.array([a.get_forces() for a in test])
    n_at = np.array([len(a) for a in test])
    de = (e_pred - e_ref) / n_at
    out: dict[str, Any] = {
        "force_mae_meV_A": float(np.abs(f_pred - f_ref).mean() * 1e3),
        "energy_mae_meV_atom": float(np.abs(de).mean() * 1e3),
        "energy_mae_offset_removed_meV_atom": float(np.abs(de - de.mean()).mean() * 1e3),
        "energy_mean_error_meV_atom": float(de.mean() * 1e3),
    }
    model = analyse(fc2_phonopy(template, disp, f_pred), "model", mesh=dft.mesh)
    err = compare(model, dft)
    out["phonons"] = {k: float(err[k]) for k in PHONON_KEYS}
    out["phonons"]["omega_max_thz"] = model.omega_max_thz
    out["phonons"]["thermal_300K"] = model.thermal_300K
    return out


# ---------------------------------------------------------------- one fine-tuning run
def run_one(n: int, strategy: str, args: argparse.Namespace, cells: list, base: dict[str, np.ndarray],
            template: Any, dft: Any) -> dict[str, Any]:

    from almd import potentials
    from almd.finetune import FinetuneConfig, Finetuner
    from almd.finetune.data import apply_energy_shifts, composition_shifts
    from almd.potentials import adapters

    name = f"n{n:02d}_{strategy}"
    out_dir = args.root / name
    pool, test = cells[:n], cells[-N_TEST:]
    validation = [cells[i] for i in VALIDATION]
    t0 = time.perf_counter()

    pot = potentials.load("sevennet-0").float()
    if strategy == "scratch":
        # the shifts must fit the network that is trained; Finetuner re-draws the same weights (same seed)
        adapters.reinitialize(pot, args.seed)
        pool_e, _ = predict(pot, pool, forces=False)
    else:
        pool_e = base["pool_energies"][:n]
    shifts = composition_shifts([a.numbers for a in pool], np.array([a.get_potential_energy() for a in pool]) - pool_e)
    apply_energy_shifts(pot, shifts)

    optim: dict[str, Any] = {"lr": LEARNING_RATES[strategy]}
    if strategy == "delta" and args.delta_l2 is not None:
        optim["delta_l2"] = args.delta_l2
    cfg = FinetuneConfig.from_dict({
        "model": {"name": "sevennet-0", "strategy": strategy, "dtype": "float32"},
        "data": {"fit_energy_shifts": False},  # applied above, from cached energies
        "loss": {"energy": args.energy_weight},
        "optim": optim,
        "run": {"steps": args.steps, "eval_every": args.eval_every, "patience": args.patience,
                "checkpoint_every": args.eval_every, "seed": args.seed, "output": str(out_dir),
                "threads": 1, "progress": False},
    })
    trainer = Finetuner(cfg, potential=pot, efs=pool, validation=validation)
    n_trainable = adapters.count_trainable(trainer.potential)
    t1 = time.perf_counter()
    result = trainer.fit(resume=True)
    t2 = time.perf_counter()

    total_shift = sum(shifts[int(z)] for z in test[0].numbers)  # same composition in every cell
    if result.best_step == 0 and strategy != "scratch":
        # best = the starting weights (adapters at zero): the model is SevenNet-0 plus the shifts
        e_pred, f_pred = base["test_energies"] + total_shift, base["test_forces"]
    else:
        tuned = potentials.load(result.model_path).float().requires_grad_(False)  # forces need position grads only
        e_pred, f_pred = predict(tuned, test)
    res = metrics(e_pred, f_pred, test, base["displacements"], template, dft)
    step_times = [h["seconds"] for h in result.history if "val_loss" not in h]
    res.update({
        "n_train": n, "strategy": strategy, "lr": LEARNING_RATES[strategy], "energy_weight": args.energy_weight,
        "delta_l2": cfg.delta_l2_weight, "trainable_parameters": n_trainable,
        "energy_shifts_eV": {str(k): v for k, v in shifts.items()},
        "steps_budget": args.steps, "steps_done": result.steps_done, "best_step": result.best_step,
        "stopped_early": result.stopped_early,
        "initial_validation": result.initial_validation, "best_validation": result.best_validation,
        "seconds_per_step_median": float(np.median(step_times)) if step_times else None,
        "train_seconds": t2 - t1, "total_seconds": time.perf_counter() - t0,
        "validation_structures": list(VALIDATION), "test_structures": [len(cells) - N_TEST, len(cells) - 1],
    })
    return res


# ---------------------------------------------------------------- table
def table(rows: list[dict[str, Any]]) -> str:
    head = ("n", "strategy", "trainable", "best/done steps", "F MAE meV/Å", "E MAE meV/at", "E MAE−offset meV/at",
            "|Δω_max| K", "|ΔF| kJ/mol", "|ΔS| J/K/mol", "|ΔC_V| J/K/mol", "band MAE THz", "BZ MAE THz",
            "BZ shift THz")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        p = r["phonons"]
        steps = f"{r['best_step']}/{r['steps_done']}" if "best_step" in r else "–"
        name = r["strategy"]
        if name == "delta":  # results from before the Δω penalty carry no "delta_l2"
            name = f"delta, λ_Δ {r['delta_l2']:g}" if "delta_l2" in r else "delta, no L2 (wd only)"
        cells = [str(r.get("n_train", "–")), name,
                 f"{r['trainable_parameters']:,}" if "trainable_parameters" in r else "–", steps,
                 f"{r['force_mae_meV_A']:.2f}" if "force_mae_meV_A" in r else "–",
                 f"{r['energy_mae_meV_atom']:.2f}" if "energy_mae_meV_atom" in r else "–",
                 f"{r['energy_mae_offset_removed_meV_atom']:.3f}" if "energy_mae_offset_removed_meV_atom" in r else "–",
                 f"{p['omega_max_K_abs_error']:.2f}", f"{p['F_kJ_mol_abs_error']:.3f}",
                 f"{p['S_J_K_mol_abs_error']:.2f}", f"{p['Cv_J_K_mol_abs_error']:.3f}",
                 f"{p['band_mae_thz']:.3f}", f"{p['bz_mae_thz']:.3f}", f"{p['bz_mean_shift_thz']:+.3f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def stop_time(hhmm: str | None) -> dt.datetime | None:
    if not hhmm:
        return None
    h, m = (int(x) for x in hhmm.split(":"))
    now = dt.datetime.now(dt.timezone.utc)
    return now.replace(hour=h, minute=m, second=0, microsecond=0)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", type=Path, default=DATA)
    p.add_argument("--root", type=Path, default=Path("bench-out/nacl"))
    p.add_argument("--n", type=int, nargs="+", default=[10, 50], help="pool sizes, run first")
    p.add_argument("--later", type=int, nargs="*", default=[25], help="pool sizes run after all the others")
    p.add_argument("--strategies", nargs="+", default=["lora", "full", "scratch", "delta"])
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--eval-every", type=int, default=10)
    p.add_argument("--patience", type=int, default=2)
    p.add_argument("--energy-weight", type=float, default=1.0, help="λ_E (eV/atom); λ_F stays 20")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--delta-l2", type=float, default=None,
                   help="λ_Δ of the ‖Δω‖² penalty for strategy delta (default: the fine-tuner's, 1)")
    p.add_argument("--stop-by", default=None, help="UTC HH:MM: do not start a run that would end later")
    args = p.parse_args(argv)

    import torch

    torch.set_num_threads(1)
    try:  # numpy/scipy BLAS too (symfc, lstsq): one thread on the shared machine
        from threadpoolctl import threadpool_limits

        threadpool_limits(1)
    except ImportError:
        pass
    from almd import potentials
    from almd.phonons import analyse, compare

    args.root.mkdir(parents=True, exist_ok=True)
    deadline = stop_time(args.stop_by)
    ph3, cells = load_data(args.data)
    assert len(cells) == 100, f"expected the 100 fc3 supercells, got {len(cells)}"
    test = cells[-N_TEST:]
    disp_all = np.asarray(ph3.dataset["displacements"])
    forces_all = np.asarray(ph3.dataset["forces"])
    template = harmonic_template(ph3)
    # DFT reference fc2 from the 50 test cells (the model's fc2 uses exactly these displacements)
    dft = analyse(fc2_phonopy(template, disp_all[-N_TEST:], forces_all[-N_TEST:]), "DFT (50 test cells)")
    dft100 = analyse(fc2_phonopy(template, disp_all, forces_all), "DFT (100 cells)", mesh=dft.mesh)
    noise = {k: float(v) for k, v in compare(dft100, dft).items() if k in PHONON_KEYS}

    cache = args.root / "base_predictions.npz"
    if cache.exists():
        z = np.load(cache)
        base = {k: z[k] for k in z.files}
    else:
        t = time.perf_counter()
        pot = potentials.load("sevennet-0").float().requires_grad_(False)
        te, tf = predict(pot, test)
        pe, _ = predict(pot, cells[:-N_TEST], forces=False)  # for the energy shifts of every pool
        base = {"test_energies": te, "test_forces": tf, "pool_energies": pe}
        np.savez(cache, **base)
        print(f"base predictions: {time.perf_counter() - t:.0f} s", flush=True)
    base["displacements"] = disp_all[-N_TEST:]
    base_row = {"strategy": "SevenNet-0 (base)",
                **metrics(base["test_energies"], base["test_forces"], test, base["displacements"], template, dft)}

    rows: list[dict[str, Any]] = [base_row]
    durations: list[float] = []
    # strategy by strategy over the main pool sizes, then the later ones: under a time limit
    # the comparisons that matter most (each strategy at the smallest and largest n) come first
    order = [(n, s) for s in args.strategies for n in args.n] + [(n, s) for n in args.later for s in args.strategies]
    for n, strategy in order:
        path = args.root / f"n{n:02d}_{strategy}.json"
        if path.exists():
            rows.append(json.loads(path.read_text()))
            continue
        # a run's duration is estimated by the longest so far (this process, else the cached runs)
        known = durations or [r["total_seconds"] for r in rows if "total_seconds" in r]
        if deadline is not None and known:
            eta = dt.datetime.now(dt.timezone.utc) + dt.timedelta(seconds=max(known))
            if eta > deadline:
                print(f"skip n={n} {strategy}: would end ~{eta:%H:%M} UTC, after --stop-by", flush=True)
                continue
        print(f"run n={n} {strategy} ({time.strftime('%H:%M:%S', time.gmtime())} UTC)", flush=True)
        t = time.perf_counter()
        res = run_one(n, strategy, args, cells, base, template, dft)
        durations.append(time.perf_counter() - t)
        path.write_text(json.dumps(res, indent=1))
        rows.append(res)
        print(f"  done in {durations[-1] / 60:.1f} min: F MAE {res['force_mae_meV_A']:.2f} meV/Å, "
              f"BZ MAE {res['phonons']['bz_mae_thz']:.3f} THz, best step {res['best_step']}/{res['steps_done']}",
              flush=True)

    dft_summary = {"omega_max_thz": dft.omega_max_thz, "thermal_300K": dft.thermal_300K, "mesh": dft.mesh,
                   "supercell": "2x2x2 conventional (64 atoms), symfc fc2, no NAC"}
    runs = sorted(rows[1:], key=lambda r: (STRATEGIES.index(r["strategy"]), r["n_train"]))
    md = table([base_row] + runs)
    noise_line = (f"Reference noise (DFT fc2 from all 100 cells vs from the 50 test cells): |Δω_max| "
                  f"{noise['omega_max_K_abs_error']:.2f} K, |ΔS| {noise['S_J_K_mol_abs_error']:.3f} J/K/mol, "
                  f"BZ MAE {noise['bz_mae_thz']:.4f} THz.")
    (args.root / "summary.json").write_text(json.dumps(
        {"dft": dft_summary, "reference_noise": noise, "rows": rows, "steps": args.steps,
         "eval_every": args.eval_every, "patience": args.patience, "learning_rates": LEARNING_RATES,
         "energy_weight": args.energy_weight},
        indent=1, default=float))
    (args.root / "table.md").write_text(md + "\n\n" + noise_line + "\n")
    print(f"DFT (2×2×2, no NAC): ω_max {dft.omega_max_thz:.3f} THz, 300 K: {json.dumps(dft.thermal_300K)}")
    print(md)
    print(noise_line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
