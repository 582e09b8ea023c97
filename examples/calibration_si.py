"""Is the ensemble's force spread a calibrated error? Si, Stillinger–Weber as the reference.

1. Reference MD with Stillinger–Weber itself (matscipy, ~7 ms per call), so the
   test frames do not depend on the model: 64-atom Si, Langevin, 300/900/1500 K.
2. Heads of a K=4 SevenNet-0 ensemble fitted (bootstrap) on SW labels of a few
   300 K and 900 K frames; calibrations fitted on other held-out 300/900 K
   frames; then tested on fresh frames at 300, 900 and 1500 K.
3. Reported, pooled and per temperature: Spearman(per-frame score, true force
   RMSE) for max / mean / rms over atoms, Spearman(per-atom σ, per-atom error),
   and the fraction of force components whose true error lies within the
   calibrated 1σ (target 0.68 ± 0.10), for
   * ``scale``: σ = s·spread (the spread alone decides the ranking);
   * ``scale+force``: σ² = (s·spread)² + a²|F̄|²/3, the model-form term that
     all members share (see almd.uncertainty.calibration), (s, a) by likelihood.
   And a ceiling: how well *any* score could rank frames within a temperature,
   from the split-half reliability of the true frame RMSE (random halves of
   the atoms; Spearman–Brown): frames of one temperature whose errors differ
   by less than their own sampling noise cannot be ranked.
4. ``--members 4,32,256`` (slow: r+1 trunk backwards per held-out frame)
   re-solves the heads with more members on the same design rows: does
   member-sampling noise limit the ranking?

    OMP_NUM_THREADS=1 python examples/calibration_si.py --plot calibration_si.png
"""

from __future__ import annotations

import argparse
import json
import pickle
import time
from pathlib import Path

import numpy as np
from ase import units
from ase.build import bulk
from ase.calculators.singlepoint import SinglePointCalculator
from ase.md.langevin import Langevin
from ase.md.velocitydistribution import MaxwellBoltzmannDistribution

from almd.references import build_calculator
from almd.uncertainty import Calibration, Ensemble
from almd.uncertainty.calibration import coverage, reduce_atoms, spearman
from almd.uncertainty.ensemble import per_atom_spread

REDUCTIONS = ("max", "mean", "rms")


def sw_frames(temperature: float, n_frames: int, *, repeat: int = 2, spacing: int = 40, equilibrate: int = 200,
              seed: int = 0) -> list:
    """Frames of a Langevin SW run, each with its SW energy and forces attached."""
    atoms = bulk("Si", "diamond", a=5.431, cubic=True).repeat(repeat)
    atoms.calc = build_calculator("stillinger-weber-si")
    rng = np.random.default_rng(seed)
    MaxwellBoltzmannDistribution(atoms, temperature_K=temperature, rng=rng)
    md = Langevin(atoms, 1.0 * units.fs, temperature_K=temperature, friction=0.02, rng=rng)
    md.run(equilibrate)
    frames = []
    for _ in range(n_frames):
        md.run(spacing)
        frame = atoms.copy()
        frame.calc = SinglePointCalculator(frame, energy=atoms.get_potential_energy(), forces=atoms.get_forces())
        frame.info["temperature"] = temperature
        frames.append(frame)
    return frames


def collect(ens: Ensemble, frames: list) -> list[dict]:
    """Per held-out frame: temperature, reference forces, every member's forces (one predict each)."""
    return [{"T": a.info["temperature"], "f_ref": a.get_forces(), "member_forces": ens.predict(a)["member_forces"]}
            for a in frames]


def rows_from_designs(designs: list, theta: np.ndarray) -> list[dict]:
    """The same rows from design rows and head coefficients (member k = pretrained + J·θ_k, exactly)."""
    rows = []
    for d in designs:
        pre = d["f_ref"].reshape(-1) - d["force_y"]  # the pretrained readout's forces
        members = pre[None] + theta @ d["force_x"].T
        rows.append({"T": d["T"], "f_ref": d["f_ref"], "member_forces": members.reshape(len(theta), -1, 3)})
    return rows


def fit_calibration(rows: list[dict], force_term: bool) -> Calibration:
    cal = Calibration(force_term=force_term)
    for r in rows:
        mean = r["member_forces"].mean(0)
        cal.update(r["f_ref"] - mean, per_atom_spread(r["member_forces"])[:, None], forces=mean)
    return cal


def split_half_ceiling(errors: list[np.ndarray], rng: np.random.Generator, repeats: int = 200) -> float:
    """Upper bound on Spearman(any score, frame RMSE) set by the RMSE's own sampling noise.

    Random halves of each frame's atoms give two RMSEs; their rank correlation
    across frames is the split-half reliability, stepped up to whole frames
    (Spearman–Brown); a score that knew each frame's expected error exactly
    would correlate with the measured RMSE by √(reliability).
    """
    rel = []
    for _ in range(repeats):
        a, b = [], []
        for e in errors:
            idx = rng.permutation(len(e))
            a.append(np.sqrt(np.mean(e[idx[: len(e) // 2]] ** 2)))
            b.append(np.sqrt(np.mean(e[idx[len(e) // 2:]] ** 2)))
        rel.append(spearman(a, b))
    r = float(np.mean(rel))
    full = 2 * r / (1 + r) if r > 0 else r
    return float(np.sqrt(full)) if full > 0 else 0.0


def summary(rows: list[dict], cal: Calibration, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    out = {}
    groups = [("pooled", rows)] + [(f"{T:.0f}K", [r for r in rows if r["T"] == T]) for T in sorted({r["T"] for r in rows})]
    for label, sel in groups:
        errs, sigmas, atom_err, rmse, scores = [], [], [], [], {k: [] for k in REDUCTIONS}
        for r in sel:
            mean = r["member_forces"].mean(0)
            err = r["f_ref"] - mean
            sigma = cal.sigma(per_atom_spread(r["member_forces"]), mean)
            errs.append(err)
            sigmas.append(np.broadcast_to(sigma[:, None], err.shape))
            atom_err.append(np.sqrt((err**2).mean(1)))
            rmse.append(float(np.sqrt(np.mean(err**2))))
            for k in REDUCTIONS:
                scores[k].append(reduce_atoms(sigma, k))
        e, s = np.concatenate([x.ravel() for x in errs]), np.concatenate([x.ravel() for x in sigmas])
        out[label] = {"frames": len(sel), "force_rmse": float(np.sqrt(np.mean(e**2))),
                      "mean_sigma": float(np.sqrt(np.mean(s**2))),
                      **{f"spearman_{k}": spearman(scores[k], rmse) for k in REDUCTIONS},
                      "spearman_atoms": spearman(np.concatenate([x[:, 0] for x in sigmas]), np.concatenate(atom_err)),
                      "coverage_1sigma": coverage(e, s),
                      "ceiling": split_half_ceiling(errs, rng) if label != "pooled" else float("nan")}
    return out


def print_table(name: str, res: dict, cal: Calibration) -> None:
    print(f"\n{name}: s = {cal.scale:.2f}, a = {cal.relative:.4f}")
    print("| set | frames | RMSE (eV/Å) | mean σ | Spearman max | mean | rms | per-atom | ceiling | 1σ coverage |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for k, v in res.items():
        print(f"| {k} | {v['frames']} | {v['force_rmse']:.3f} | {v['mean_sigma']:.3f} | {v['spearman_max']:.2f} | "
              f"{v['spearman_mean']:.2f} | {v['spearman_rms']:.2f} | {v['spearman_atoms']:.2f} | {v['ceiling']:.2f} | "
              f"{v['coverage_1sigma']:.3f} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--train", type=int, default=4, help="training frames per temperature (300 K, 900 K)")
    ap.add_argument("--calib", type=int, default=4, help="calibration frames per temperature (300 K, 900 K)")
    ap.add_argument("--test", type=int, default=10, help="test frames per temperature (300, 900, 1500 K)")
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--ridge", type=float, default=1e-3)
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--members", default="", help="e.g. 4,32,256: re-solve heads with more members (slow)")
    ap.add_argument("--cache", default=None, help="pickle of the collected rows: reused if present")
    ap.add_argument("--plot", default=None, help="write a figure (png) here")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()

    t0 = time.perf_counter()
    if args.cache and Path(args.cache).is_file():
        with open(args.cache, "rb") as fh:
            data = pickle.load(fh)
        print(f"rows from {args.cache}")
    else:
        train = sw_frames(300, args.train, seed=1) + sw_frames(900, args.train, seed=2)
        calib = sw_frames(300, args.calib, seed=3) + sw_frames(900, args.calib, seed=4)
        test = sum((sw_frames(T, args.test, seed=10 + i) for i, T in enumerate((300, 900, 1500))), [])
        print(f"SW frames: {len(train)} train, {len(calib)} calibration, {len(test)} test "
              f"({time.perf_counter() - t0:.0f} s)")
        ens = Ensemble("sevennet-0", k=args.k, rank=args.rank)
        print(f"fit: {ens.fit(train, ridge=args.ridge)} ({time.perf_counter() - t0:.0f} s)")
        data = {"calib": collect(ens, calib), "test": collect(ens, test)}
        if args.members:
            # design rows once per held-out frame, then any number of members is a small solve
            designs = {}
            for name, frames in (("calib", calib), ("test", test)):
                designs[name] = [{**vars(ens.design(a)), "T": a.info["temperature"], "f_ref": a.get_forces()}
                                 for a in frames]
            check = rows_from_designs(designs["test"][:1], ens.coefficients())[0]["member_forces"]
            assert np.allclose(check, data["test"][0]["member_forces"], atol=2e-4), "design rows disagree with predict"
            for k in [int(x) for x in args.members.split(",")]:
                ens.k = k
                ens.fit([], ridge=args.ridge)  # the same training rows, k bootstrap members
                theta = ens.coefficients()
                data[f"K={k}"] = {name: rows_from_designs(designs[name], theta) for name in designs}
        if args.cache:
            with open(args.cache, "wb") as fh:
                pickle.dump(data, fh)

    results = {}
    variants = [("scale", data, False), ("scale+force", data, True)]
    variants += [(f"{key}, scale", data[key], False) for key in data if key.startswith("K=")]
    for name, d, force_term in variants:
        cal = fit_calibration(d["calib"], force_term)
        results[name] = {"s": cal.scale, "a": cal.relative, **summary(d["test"], cal)}
        print_table(name, summary(d["test"], cal), cal)
    print(f"total {time.perf_counter() - t0:.0f} s")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"args": vars(args), **results}, fh, indent=1)
    if args.plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
        for ax, (name, force_term) in zip(axes, (("scale", False), ("scale+force", True))):
            cal = fit_calibration(data["calib"], force_term)
            for T, c in zip((300, 900, 1500), ("C0", "C1", "C3")):
                sel = [r for r in data["test"] if r["T"] == T]
                x = [reduce_atoms(cal.sigma(per_atom_spread(r["member_forces"]), r["member_forces"].mean(0)), "rms")
                     for r in sel]
                y = [np.sqrt(np.mean((r["f_ref"] - r["member_forces"].mean(0)) ** 2)) for r in sel]
                ax.scatter(x, y, c=c, label=f"{T} K")
            lim = ax.get_xlim()[1]
            ax.plot([0, lim], [0, lim], "k--", lw=0.8)
            ax.set_xlabel(f"calibrated σ, RMS over atoms (eV/Å) — {name}")
            ax.legend()
        axes[0].set_ylabel("true force RMSE vs SW (eV/Å)")
        fig.tight_layout()
        fig.savefig(args.plot, dpi=120)
        print("figure:", args.plot)


if __name__ == "__main__":
    main()
