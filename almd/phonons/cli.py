"""`almd phonons`: a thin command-line layer over almd.phonons."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["build_parser", "DESCRIPTION", "main"]

DESCRIPTION = """\
Phonons, thermal properties and (optionally) lattice thermal conductivity of a
structure with any calculator: an oracle preset (stillinger-weber-si, emt,
gpaw-pw, espresso-pw, module:Class) or an almd model (sevennet-0, a path).
With --reference DATA (a phonopy/phono3py data set with DFT forces) the
structure and supercell come from the data set, the model is evaluated on the
same displaced supercells (or relaxed first with --relax) and compared.
Thermal properties are per mole of primitive cells (phonopy's convention)."""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="almd phonons", description=DESCRIPTION)
    p.add_argument("structure", nargs="?", help="structure file readable by ASE (optional with --reference)")
    p.add_argument("--calculator", "-c", required=True, help="oracle preset or model name/path")
    p.add_argument("--supercell", type=int, nargs="+", metavar="N", help="1 or 3 integers (default 2 2 2, or the reference's)")
    p.add_argument("--reference", "-r", help="phonopy.yaml(.xz), phono3py_disp.yaml, phono3py_params*.yaml(.xz) or a folder")
    p.add_argument("--relax", action="store_true", help="relax with the calculator first (FIRE, FrechetCellFilter, FixSymmetry)")
    p.add_argument("--fmax", type=float, default=0.005, help="relaxation threshold, eV/Å (default 0.005)")
    p.add_argument("--distance", type=float, default=0.01, help="displacement amplitude, Å (default 0.01)")
    p.add_argument("--plusminus", action="store_true",
                   help="±u displacements everywhere (central differences; default: phonopy's choice)")
    p.add_argument("--method", choices=("auto", "displacement", "hessian", "hvp"), default="auto",
                   help="force constants from finite displacements, the calculator's Hessian, or exact -H·u forces "
                        "of phonopy's displacements (hvp); default: analytic Hessian if cheap, else displacements")
    p.add_argument("--mesh", type=float, nargs="+", default=[100.0],
                   help="q-mesh for DOS/thermal/ω_max: a length (default 100) or 3 integers")
    p.add_argument("--kappa", action="store_true", help="also κ(300 K) through phono3py (RTA)")
    p.add_argument("--kappa-mesh", type=int, nargs=3, default=[11, 11, 11], metavar="N", help="q-mesh for κ (default 11 11 11)")
    p.add_argument("--temperatures", type=float, nargs="+", default=[0, 100, 200, 300, 400, 500, 600, 800, 1000])
    p.add_argument("--modes", action="store_true",
                   help="with --reference: the energy along each imaginary mode of the reference at its supercell's "
                        "q-points (frozen phonons, the calculator's energies): double-well depth and minimum")
    p.add_argument("--mode", type=float, nargs=4, metavar=("Q1", "Q2", "Q3", "BAND"),
                   help="with --reference: scan this mode (q in primitive reciprocal units, band index from 0)")
    p.add_argument("--mode-amplitude", type=float, default=0.3, help="largest atomic displacement scanned, Å (0.3)")
    p.add_argument("--mode-points", type=int, default=13, help="amplitudes scanned, from -A to +A (13)")
    p.add_argument("--mode-reference", help="also the energies of this calculator (e.g. gpaw-pw) along the modes")
    p.add_argument("--mode-cell", type=int, nargs=3, metavar="N",
                   help="scan in this smaller supercell of the reference's unit cell (its force constants folded "
                        "onto it): where a DFT energy is affordable; only the modes it holds")
    p.add_argument("--modes-plot", help="write the energy-along-mode PNG here")
    p.add_argument("--json", dest="json_out", help="write results as JSON here")
    p.add_argument("--plot", help="write a band-structure PNG here")
    return p


def _mesh(values: list[float]) -> float | list[int]:
    if len(values) == 1:
        return float(values[0])
    if len(values) == 3:
        return [int(v) for v in values]
    raise SystemExit("almd phonons: --mesh takes one length or three integers")


def _supercell(values: list[int] | None) -> list[int] | None:
    if values is None:
        return None
    if len(values) == 1:
        return values * 3
    if len(values) == 3:
        return values
    raise SystemExit("almd phonons: --supercell takes 1 or 3 integers")


def _summary(d: dict[str, Any]) -> str:
    t = d["thermal_300K"]
    lines = [f"{d['label']}: {d['formula']}, supercell {d['supercell_matrix']}, mesh {d['mesh']}"]
    for name, f in d["frequencies_thz"].items():
        lines.append(f"  {name:>4}: " + " ".join(f"{x:7.3f}" for x in f) + " THz")
    lines.append(f"  ω_max {d['omega_max_thz']:.3f} THz = {d['omega_max_K']:.1f} K")
    lines.append(f"  300 K: F {t['F_kJ_mol']:.3f} kJ/mol, S {t['S_J_K_mol']:.3f} J/K/mol, C_V {t['Cv_J_K_mol']:.3f} J/K/mol")
    if d.get("kappa_300K_W_mK") is not None:
        lines.append(f"  κ(300 K) {d['kappa_300K_W_mK']:.1f} W/m·K")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from almd.phonons import kappa, load_reference, phonons, phonons_vs_reference, resolve_calculator
    from almd.phonons.plot import plot_bands

    if args.structure is None and args.reference is None:
        print("almd phonons: give a STRUCTURE or --reference DATA", file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    try:  # every input checked before any work: one line, status 2
        calc = resolve_calculator(args.calculator)
        ref = load_reference(args.reference) if args.reference else None
        if (args.modes or args.mode) and ref is None:
            raise ValueError("--modes / --mode need --reference DATA (the modes are the reference's)")
        if args.mode_points < 2 or not args.mode_amplitude > 0:
            raise ValueError(f"--mode-points = {args.mode_points}, --mode-amplitude = {args.mode_amplitude} are not "
                             "allowed; need >= 2 points and an amplitude > 0 Å")
        mode_reference = None
        if args.mode_reference:
            resolve_calculator(args.mode_reference)  # a bad name fails here, before any work

            def mode_reference() -> Any:  # a fresh calculator per structure (GPAW keeps the first's symmetry)
                return resolve_calculator(args.mode_reference)
    except (ValueError, FileNotFoundError, KeyError) as exc:
        print(f"almd phonons: error: {exc}", file=sys.stderr)
        return 2
    mesh = _mesh(args.mesh)
    supercell = _supercell(args.supercell)
    out: dict[str, Any] = {"calculator": args.calculator}

    if ref is not None and args.structure is None and supercell is None:
        model, dft, errors = phonons_vs_reference(
            ref, calc, relax=args.relax, fmax=args.fmax, distance=args.distance, mesh=mesh, temperatures=args.temperatures
        )
        model.label = args.calculator
        out["reference"] = dft.to_dict()
        out["reference"]["path"] = ref.path
        out["mae"] = errors
    else:
        from ase.io import read

        atoms = read(args.structure) if args.structure else ref.atoms
        model = phonons(atoms, calc, supercell or [2, 2, 2], relax=args.relax, fmax=args.fmax,
                        distance=args.distance, method=args.method, plusminus=args.plusminus or "auto",
                        mesh=mesh, temperatures=args.temperatures)
        model.label = args.calculator
        dft = None
        if ref is not None:  # a structure of one's own and a reference: compare on the reference's q-points
            from almd.phonons import compare

            dft = ref.result(mesh=model.mesh, temperatures=args.temperatures)
            out["reference"] = dft.to_dict()
            out["mae"] = compare(model, dft)

    if args.kappa:
        if ref is not None and args.structure is None:
            k = kappa(ref, calc, mesh=args.kappa_mesh)
        else:
            from ase.io import read

            k = kappa(read(args.structure), calc, supercell or [2, 2, 2], mesh=args.kappa_mesh)
        model.kappa_300K_W_mK = k.kappa_300K_W_mK
        out["kappa"] = k.to_dict()
        if ref is not None and ref.phono3py is not None:
            kr = kappa(ref, None, mesh=args.kappa_mesh)
            out["reference"]["kappa_300K_W_mK"] = kr.kappa_300K_W_mK
            out["mae"]["kappa_300K_abs_error_W_mK"] = abs(k.kappa_300K_W_mK - kr.kappa_300K_W_mK)

    if args.modes or args.mode:
        out["modes"] = _mode_scans(args, ref, calc, mode_reference)

    result = model.to_dict()
    out = {**result, **out, "seconds": time.perf_counter() - t0}
    print(_summary(result))
    if "reference" in out:
        print(_summary(out["reference"]))
        e = out["mae"]
        print(f"  errors: ω_max {e['omega_max_K_abs_error']:.1f} K, F {e['F_kJ_mol_abs_error']:.3f} kJ/mol, "
              f"S {e['S_J_K_mol_abs_error']:.3f} J/K/mol, C_V {e['Cv_J_K_mol_abs_error']:.3f} J/K/mol, "
              f"band MAE {e.get('band_mae_thz', float('nan')):.3f} THz, BZ MAE {e.get('bz_mae_thz', float('nan')):.3f} THz")
    if args.json_out:
        from almd.io import atomic_write

        atomic_write(Path(args.json_out), json.dumps(out, indent=1, default=_default))
    if args.plot:
        plot_bands([model] + ([dft] if dft is not None else []), args.plot)
    return 0


def _mode_scans(args: argparse.Namespace, ref: Any, calc: Any, mode_reference: Any) -> list[dict[str, Any]]:
    """Frozen-phonon scans along the reference's imaginary modes (or --mode), printed and returned."""
    from almd.phonons.modes import commensurate_modes, frozen_phonon_scan, in_smaller_cell, plot_scans

    phonon = in_smaller_cell(ref.phonopy, args.mode_cell) if args.mode_cell else ref.phonopy
    modes = ([([float(x) for x in args.mode[:3]], int(args.mode[3]), None)] if args.mode
             else commensurate_modes(phonon))
    if not modes:
        print("  modes: the reference has no imaginary mode at its supercell's q-points")
    amplitudes = np.linspace(-args.mode_amplitude, args.mode_amplitude, args.mode_points)
    scans = []
    for q, band, _ in modes:
        for label, c in ((args.calculator, calc), (args.mode_reference, mode_reference)):
            if c is None:
                continue
            scan = frozen_phonon_scan(phonon, c, q, band, amplitudes, label=label)
            scans.append(scan)
            print(f"  mode q {q} band {band} ({scan.frequency_thz:.3f} THz in the reference), {label}: "
                  f"depth {1e3 * scan.depth / scan.n_atoms:.3f} meV/atom, minimum at {scan.minimum_at:.3f} Å")
    if args.modes_plot and scans:
        plot_scans(scans, args.modes_plot)
    return [s.to_dict() for s in scans]


def _default(o: Any) -> Any:
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    raise TypeError(type(o).__name__)


if __name__ == "__main__":
    sys.exit(main())
