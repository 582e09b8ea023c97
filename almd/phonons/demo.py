"""`almd demo`: silicon phonons from SevenNet-0 through almd.Calculator, against VASP PBE.

Needs no network and no user files: the DFT reference (phono3py's Si-PBE
example, BSD licence) ships inside the package. Two routes to the model's
force constants are shown side by side: phonopy's finite displacements on the
reference's own displaced supercells, and the exact Hessian by automatic
differentiation (``calc.get_hessian``).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from almd.data import SI_PBE

__all__ = ["main"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="almd demo", description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("almd-demo"), help="output folder (default: almd-demo)")
    parser.add_argument("--model", default="sevennet-0", help="model name or file (default: sevennet-0)")
    args = parser.parse_args(argv)

    from importlib.metadata import version

    from almd.phonons import load_reference, phonons, phonons_vs_reference
    from almd.phonons.plot import plot_bands

    args.out.mkdir(parents=True, exist_ok=True)
    from almd.potentials.calculator import Calculator

    calc = Calculator(args.model)
    reference = load_reference(SI_PBE)
    print(f"almd {version('almd')}: {args.model} vs VASP PBE silicon ({SI_PBE.name}, "
          f"{len(reference.phonopy.supercell)}-atom supercell)")

    t0 = time.perf_counter()
    model, dft, errors = phonons_vs_reference(reference, calc)
    t_fd = time.perf_counter() - t0
    t0 = time.perf_counter()
    exact = phonons(reference.atoms, Calculator(args.model, dtype="float64"),
                    supercell=reference.supercell_matrix, method="hvp", mesh=dft.mesh)
    t_hessian = time.perf_counter() - t0

    rows = [("", "VASP PBE", f"{args.model} (displacements)", f"{args.model} (exact HVP)")]
    for name in dft.frequencies_thz:
        rows.append((f"ω({name}) max, THz", f"{max(dft.frequencies_thz[name]):.2f}",
                     f"{max(model.frequencies_thz[name]):.2f}", f"{max(exact.frequencies_thz[name]):.2f}"))
    rows.append(("ω_max, K", f"{dft.omega_max_K:.0f}", f"{model.omega_max_K:.0f}", f"{exact.omega_max_K:.0f}"))
    for key, label in (("F_kJ_mol", "F(300 K), kJ/mol"), ("S_J_K_mol", "S(300 K), J/K/mol"),
                       ("Cv_J_K_mol", "C_V(300 K), J/K/mol")):
        rows.append((label, f"{dft.thermal_300K[key]:.2f}", f"{model.thermal_300K[key]:.2f}",
                     f"{exact.thermal_300K[key]:.2f}"))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)))
    print(f"band MAE vs DFT: {errors['bz_mae_thz']:.3f} THz over the Brillouin zone; "
          f"time: displacements {t_fd:.1f} s, HVP {t_hessian:.1f} s")

    model.to_json(args.out / "sevennet0_si.json")
    dft.to_json(args.out / "vasp_pbe_si.json")
    plot_bands([dft, model], args.out / "si_bands.png", title=f"Si: {args.model} vs VASP PBE")
    print(f"wrote {args.out / 'si_bands.png'} and JSON files")
    return 0
