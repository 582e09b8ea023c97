r"""The default phonon recipe (``almd finetune --phonon``), folded against full-supercell labels, per CPU-minute.

For each data set and each label kind (``--folds``: ``auto``, the recipe's default, folds
the DFT force constants onto a supercell with the even directions halved; ``none`` trains
on the data set's own supercell), the recipe runs for ``--budget`` minutes from SevenNet-0,
one torch thread, and its kept model's phonon errors (the data set's own displacements at
the DFT geometry) are printed beside SevenNet-0's and, for the chalcogenides, beside
MACE-MP-0b3's published ones (mace-mp-0b3-vs-dft.csv). Ratio printed: each error after /
SevenNet-0's, measured in the same run.

    OMP_NUM_THREADS=1 python benchmarks/bench_phonon_recipe.py --budget 10 \
        --datasets almd/data/si-pbe ../shared/data/dft/chalcogenides-pbe/mp-2534.phonopy.yaml.xz \
        [--folds auto,none] [--out bench-out/recipe]

Writes OUT/<name>-<fold>/phonon_report.json (re-running skips a finished one) and OUT/table.md.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from almd.finetune.recipe import run_phonon_recipe

ROOT = Path(__file__).resolve().parents[1]
MACE_CSV = ROOT.parent / "shared" / "data" / "dft" / "chalcogenides-pbe" / "mace-mp-0b3-vs-dft.csv"
SHOWN = (("bz_mae_thz", "BZ MAE (THz)"), ("band_mae_thz", "band MAE (THz)"),
         ("omega_max_thz_abs_error", "ω_max err (THz)"), ("S_J_K_mol_abs_error", "S err (J/K/mol)"),
         ("F_kJ_mol_abs_error", "F err (kJ/mol)"), ("Cv_J_K_mol_abs_error", "C_V err (J/K/mol)"))


def mace(name: str) -> dict[str, float]:
    """MACE-MP-0b3's published errors of a chalcogenide (empty for other sets)."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from bench_chalcogenides import mace_errors

    return mace_errors(MACE_CSV).get(name, {}) if MACE_CSV.exists() else {}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--datasets", nargs="+", required=True)
    p.add_argument("--budget", type=float, default=10.0, help="minutes of training per run")
    p.add_argument("--folds", default="auto,none")
    p.add_argument("--out", default="bench-out/recipe")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    lines = ["| data set | labels | fold | steps | kept | " + " | ".join(label for _, label in SHOWN) + " |",
             "|---" * (5 + len(SHOWN)) + "|"]
    for dataset in args.datasets:
        name = Path(dataset).name.split(".")[0]
        ref = mace(name)
        for fold in args.folds.split(","):
            out = Path(args.out) / f"{name}-{fold}"
            done = out / "phonon_report.json"
            report = json.loads(done.read_text()) if done.exists() else \
                run_phonon_recipe(dataset, 60.0 * args.budget, out, fold)
            cells = []
            for key, _ in SHOWN:
                base, final = report["base"].get(key), report["final"].get(key)
                cell = f"{base:.3g} → **{final:.3g}** ({final / base:.2f}×)" if base else "–"
                if key in ref:
                    cell += f" / MACE {ref[key]:.3g}"
                cells.append(cell)
            lines.append(f"| {name} | {fold} | {report['fold'] or 'none'} | {report['steps']} | "
                         f"{report['best_step']} | " + " | ".join(cells) + " |")
            print(lines[-1], flush=True)
    Path(args.out, "table.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
