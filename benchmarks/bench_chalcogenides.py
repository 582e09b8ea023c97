"""SevenNet-0 (or any model) vs VASP PBE phonons of 16 chalcogenides, beside MACE-MP-0b3.

For each material of ../shared/data/dft/chalcogenides-pbe/ the model's forces
are computed on the DFT data set's own supercell and displacements (at the DFT
geometry; --relax: relaxed with the model first, the MDR protocol, fresh
displacements), force constants are built the same way for both, and the MDR-style
errors at 300 K are taken: |Δω_max|, |ΔS|, |ΔF|, |ΔC_V| (per mole of primitive
cells), plus frequency MAEs along a band path and over the Brillouin zone.
The baseline is the published MACE-MP-0b3 comparison in mace-mp-0b3-vs-dft.csv
(MACE relaxed with the model; band path and mesh of that study, not ours), so
the ratio model/MACE is indicative, not exact.

    python benchmarks/bench_chalcogenides.py --json benchmarks/chalcogenides_sevennet0.json

Per-material results are cached (--cache) so an interrupted run resumes.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "dft" / "chalcogenides-pbe"

# (our key, MACE csv columns (model, dft) or single error column, label); errors are absolute
# values per material (no "|" in labels: they would split markdown cells)
METRICS = [
    ("band_mae_thz", "mae", "band MAE (THz)"),
    ("bz_mae_thz", "phonon_mae", "BZ MAE (THz)"),
    ("omega_max_thz_abs_error", ("max_frequency", "benchmark_max_frequency"), "ω_max err (THz)"),
    ("S_J_K_mol_abs_error", ("entropy", "benchmark_entropy"), "S err (J/K/mol)"),
    ("F_kJ_mol_abs_error", ("free_energy", "benchmark_free_energy"), "F err (kJ/mol)"),
    ("Cv_J_K_mol_abs_error", ("heat_capacity", "benchmark_heat_capacity"), "C_V err (J/K/mol)"),
]


def mace_errors(csv_path: Path) -> dict[str, dict[str, float]]:
    out = {}
    with open(csv_path) as f:
        for row in csv.DictReader(f):
            errs = {}
            for key, col, _ in METRICS:
                if isinstance(col, tuple):
                    errs[key] = abs(float(row[col[0]]) - float(row[col[1]]))
                else:
                    errs[key] = float(row[col])
            errs["dft_S_J_K_mol"] = float(row["benchmark_entropy"])
            errs["dft_Cv_J_K_mol"] = float(row["benchmark_heat_capacity"])
            out[row["material"]] = errs
    return out


def run_material(path: Path, calc, mesh: float, relax: bool = False) -> dict:
    from almd.phonons import load_reference, phonons_vs_reference

    t0 = time.perf_counter()
    ref = load_reference(path)
    t_load = time.perf_counter()
    model, dft, err = phonons_vs_reference(ref, calc, relax=relax, mesh=mesh, temperatures=[300.0])
    t_end = time.perf_counter()
    n_disp = len(ref.phonopy.supercells_with_displacements)
    return {
        "material": path.name.split(".")[0],
        "formula": dft.formula,
        "n_atoms_supercell": len(ref.phonopy.supercell),
        "n_displacements": n_disp,
        "mesh": dft.mesh,
        "errors": {k: v for k, v in err.items() if not isinstance(v, (dict, str))},
        "model": {"omega_max_thz": model.omega_max_thz, "omega_min_thz": model.omega_min_thz, **model.thermal_300K},
        "dft": {"omega_max_thz": dft.omega_max_thz, "omega_min_thz": dft.omega_min_thz, **dft.thermal_300K},
        "relaxed": relax,
        "cutoff_margin_A": model.extra.get("cutoff_margin_A"),
        "volume_ratio_model_dft": model.extra["volume_per_atom"] / (ref.atoms.get_volume() / len(ref.atoms)),
        "seconds": {"load": t_load - t0, "model": t_end - t_load},
        # calls: one per displacement + the undisplaced supercell (residual forces)
        "ms_per_atom_call": 1000 * (t_end - t_load) / ((n_disp + 1) * len(ref.phonopy.supercell)),
    }


def markdown(rows: list[dict], mace: dict[str, dict[str, float]], model_name: str) -> str:
    head = ["material", "formula", "atoms", "disp"]
    for _, _, label in METRICS:
        head += [f"{label} {model_name}", "MACE-MP-0b3"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["material"], r["formula"], str(r["n_atoms_supercell"]), str(r["n_displacements"])]
        for key, _, _ in METRICS:
            cells += [f"{r['errors'][key]:.3g}", f"{mace.get(r['material'], {}).get(key, float('nan')):.3g}"]
        lines.append("| " + " | ".join(cells) + " |")
    avg = ["**mean**", "", "", ""]
    ratio = ["**ratio model/MACE**", "", "", ""]
    for key, _, _ in METRICS:
        ours = np.mean([r["errors"][key] for r in rows])
        theirs = np.mean([mace[r["material"]][key] for r in rows if r["material"] in mace])
        avg += [f"**{ours:.3g}**", f"**{theirs:.3g}**"]
        ratio += [f"{ours / theirs:.2f}", ""]
    lines += ["| " + " | ".join(avg) + " |", "| " + " | ".join(ratio) + " |"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="sevennet-0", help="calculator name for almd.phonons.resolve_calculator")
    p.add_argument("--data", type=Path, default=DATA)
    p.add_argument("--materials", nargs="*", help="subset, e.g. mp-691 mp-1000")
    p.add_argument("--mesh", type=float, default=100.0, help="phonopy mesh length (default 100)")
    p.add_argument("--relax", action="store_true",
                   help="MDR protocol: relax with the model first (as MACE-MP-0b3 was), then fresh 0.01 Å displacements")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (default 1: on 2 shared cores 2 threads ran 5× slower)")
    p.add_argument("--cache", type=Path, default=Path("bench-out/chalcogenides"))
    p.add_argument("--json", type=Path, help="write all results here")
    args = p.parse_args(argv)

    try:
        import torch

        torch.set_num_threads(args.threads)
    except ImportError:
        pass
    from almd.phonons import resolve_calculator

    mace = mace_errors(args.data / "mace-mp-0b3-vs-dft.csv")
    files = sorted(args.data.glob("mp-*.phonopy.yaml*"), key=lambda f: int(f.name.split(".")[0][3:]))
    if args.materials:
        files = [f for f in files if f.name.split(".")[0] in args.materials]
    cache = args.cache / (args.model.replace("/", "_") + ("-relaxed" if args.relax else ""))
    cache.mkdir(parents=True, exist_ok=True)
    calc = None
    rows = []
    t0 = time.perf_counter()
    for f in files:
        done = cache / (f.name.split(".")[0] + ".json")
        if done.exists():
            rows.append(json.loads(done.read_text()))
            continue
        if calc is None:
            calc = resolve_calculator(args.model)
        row = run_material(f, calc, args.mesh, relax=args.relax)
        done.write_text(json.dumps(row, indent=1))
        rows.append(row)
        e = row["errors"]
        print(f"{row['material']:>10} {row['formula']:>10} {row['n_atoms_supercell']:4d} atoms × {row['n_displacements']:2d}: "
              f"BZ MAE {e['bz_mae_thz']:.3f} THz, |Δω_max| {e['omega_max_thz_abs_error']:.3f} THz, "
              f"|ΔS| {e['S_J_K_mol_abs_error']:.2f}, model {row['seconds']['model']:.0f} s "
              f"({row['ms_per_atom_call']:.1f} ms/atom/call)", file=sys.stderr, flush=True)
    table = markdown(rows, mace, args.model)
    print(table)
    shift = np.mean([r["errors"]["bz_mean_shift_thz"] for r in rows])
    model_s = sum(r["seconds"]["model"] for r in rows)
    print(f"\nmean frequency shift model − DFT: {shift:+.3f} THz; model time {model_s:.0f} s "
          f"for {sum(r['n_displacements'] + 1 for r in rows)} supercells; wall {time.perf_counter() - t0:.0f} s this run")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        summary = {
            key: {"model": float(np.mean([r["errors"][key] for r in rows])),
                  "mace_mp_0b3": float(np.mean([mace[r["material"]][key] for r in rows]))}
            for key, _, _ in METRICS
        }
        args.json.write_text(json.dumps({"model": args.model, "relaxed": args.relax, "threads": args.threads,
                                         "mesh_length": args.mesh,
                                         "mean": summary, "mean_shift_thz": shift, "materials": rows,
                                         "mace_mp_0b3": {r["material"]: mace[r["material"]] for r in rows}}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
