"""SevenNet-0 against VASP PBE silicon: frequencies, thermal properties, κ(300 K), bands.

The DFT data are phono3py's Si-PBE example (2×2×2 conventional supercell,
64 atoms, 111 displaced supercells, VASP forces).  The model is evaluated on the
same supercells and displacements at the DFT geometry (or, with --relax, relaxed
first and displaced afresh — the MDR protocol).

    python examples/si_sevennet_vs_vasp.py [--model sevennet-0] [--mesh 11] [--plot si_bands.png]

DFT reference κ(300 K) at 11×11×11, RTA: 119.5 W/m·K.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def find_si_pbe() -> Path:
    from almd.data import SI_PBE  # shipped with the package (phono3py's example, BSD-3)

    return SI_PBE


def table(model, dft, err, k_model, k_dft) -> str:
    rows = [("quantity", "model", "DFT (PBE)", "model − DFT")]
    for name in ("Γ", "X", "L"):
        fm, fd = sorted(model.frequencies_thz[name]), sorted(dft.frequencies_thz[name])
        for i, (a, b) in enumerate(zip(fm, fd)):
            if i == 0 or abs(fd[i] - fd[i - 1]) > 1e-3:  # one row per distinct DFT frequency
                rows.append((f"ν {name} mode {i + 1} (THz)", f"{a:.3f}", f"{b:.3f}", f"{a - b:+.3f}"))
    rows.append(("ω_max (K)", f"{model.omega_max_K:.1f}", f"{dft.omega_max_K:.1f}", f"{model.omega_max_K - dft.omega_max_K:+.1f}"))
    for key, label in (("F_kJ_mol", "F 300 K (kJ/mol)"), ("S_J_K_mol", "S 300 K (J/K/mol)"), ("Cv_J_K_mol", "C_V 300 K (J/K/mol)")):
        a, b = model.thermal_300K[key], dft.thermal_300K[key]
        rows.append((label, f"{a:.3f}", f"{b:.3f}", f"{a - b:+.3f}"))
    rows.append(("band MAE (THz)", f"{err['band_mae_thz']:.3f}", "", ""))
    rows.append(("BZ MAE (THz)", f"{err['bz_mae_thz']:.3f}", "", f"mean shift {err['bz_mean_shift_thz']:+.3f}"))
    if k_model is not None:
        rows.append(("κ 300 K (W/m·K)", f"{k_model:.1f}", f"{k_dft:.1f}", f"{100 * (k_model / k_dft - 1):+.1f} %"))
    w = [max(len(r[i]) for r in rows) for i in range(4)]
    return "\n".join("  ".join(c.ljust(w[i]) for i, c in enumerate(r)) for r in rows)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="sevennet-0")
    p.add_argument("--data", type=Path, help="si-pbe folder (default: the copy shipped in almd.data)")
    p.add_argument("--mesh", type=int, default=11, help="κ mesh n×n×n (default 11)")
    p.add_argument("--no-kappa", action="store_true")
    p.add_argument("--relax", action="store_true", help="MDR protocol: relax with the model, then displace")
    p.add_argument("--method", choices=("displacement", "hvp"), default="displacement",
                   help="model forces on the displacements, or exact -H·u (almd.Calculator's HVPs)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1: fastest on 2 busy cores)")
    p.add_argument("--plot", default="si_sevennet_vs_vasp.png")
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)

    import torch

    torch.set_num_threads(args.threads)
    from almd.phonons import kappa, load_reference, phonons_vs_reference, resolve_calculator
    from almd.phonons.plot import plot_bands

    t0 = time.perf_counter()
    ref = load_reference(args.data or find_si_pbe())
    calc = resolve_calculator(args.model)
    model, dft, err = phonons_vs_reference(ref, calc, relax=args.relax, method=args.method)
    model.label, dft.label = args.model, "VASP PBE"
    t_harm = time.perf_counter()
    k_model = k_dft = None
    if not args.no_kappa:
        mesh = (args.mesh,) * 3
        km = kappa(ref, calc, mesh=mesh)
        kd = kappa(ref, None, mesh=mesh)
        k_model, k_dft = km.kappa_300K_W_mK, kd.kappa_300K_W_mK
    t_end = time.perf_counter()

    how = ("relaxed with the model, fresh 0.01 Å displacements (MDR protocol)" if args.relax
           else "model on the DFT displacements at the DFT geometry")
    print(f"Si: {args.model} vs VASP PBE ({ref.path}); {how}; harmonic forces: {args.method}")
    if "volume_per_atom" in model.extra:
        v_m, v_d = model.extra["volume_per_atom"], ref.atoms.get_volume() / len(ref.atoms)
        print(f"volume per atom: model {v_m:.3f} Å³, DFT {v_d:.3f} Å³ ({100 * (v_m / v_d - 1):+.2f} %)")
    print(table(model, dft, err, k_model, k_dft))
    print(f"\nMDR metrics at 300 K: |Δω_max| {err['omega_max_K_abs_error']:.1f} K, |ΔS| {err['S_J_K_mol_abs_error']:.2f} J/K/mol, "
          f"|ΔF| {err['F_kJ_mol_abs_error']:.2f} kJ/mol, |ΔC_V| {err['Cv_J_K_mol_abs_error']:.2f} J/K/mol (per mole of Si₂ cells)")
    print(f"time: harmonic {t_harm - t0:.0f} s, κ {t_end - t_harm:.0f} s" + ("" if args.no_kappa else f" (mesh {args.mesh}³, 111 supercells)"))
    if args.plot:
        print("bands:", plot_bands([model, dft], args.plot, title=f"Si: {args.model} vs VASP PBE"))
    if args.json:
        args.json.write_text(json.dumps({"model": model.to_dict(), "dft": dft.to_dict(), "errors": err,
                                         "kappa_300K_W_mK": {"model": k_model, "dft": k_dft}}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
