"""Is the ensemble's force spread a calibrated error? Si, Stillinger–Weber as the reference.

1. Reference MD with Stillinger–Weber itself (matscipy, ~7 ms per call), so the
   test frames do not depend on the model: 64-atom Si, Langevin, 300/900/1500 K.
2. Heads of a K=4 SevenNet-0 ensemble fitted (bootstrap) on SW labels of a few
   300 K and 900 K frames; the calibration scale fitted on other held-out
   300/900 K frames; then tested on fresh frames at 300, 900 and 1500 K.
3. Reported: Spearman(per-frame score, true force RMSE), pooled and per
   temperature, and the fraction of force components whose true error lies
   within the calibrated 1σ (target 0.68 ± 0.10), for the scale and the
   isotonic map.

    OMP_NUM_THREADS=1 python examples/calibration_si.py --plot calibration_si.png
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
from ase import units
from ase.build import bulk
from ase.calculators.singlepoint import SinglePointCalculator
from ase.md.langevin import Langevin
from ase.md.velocitydistribution import MaxwellBoltzmannDistribution

from almd.ensemble import Ensemble
from almd.ensemble.calibration import coverage, spearman
from almd.ensemble.model import frame_score
from almd.oracle import build_calculator


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


def predict_all(ens: Ensemble, frames: list) -> list:
    """Raw (uncalibrated) predictions, once per frame; calibrations are applied afterwards."""
    rows = []
    for atoms in frames:
        p = ens.predict(atoms)
        rows.append({"T": atoms.info["temperature"], "err": atoms.get_forces() - p["forces"],
                     "spread": p["forces_std_raw"], "raw": p["uncertainty_raw"]})
    return rows


def calibrated(ens: Ensemble, raw_rows: list) -> list:
    cal = ens.calibration
    return [{"T": r["T"], "err": r["err"], "rmse": float(np.sqrt(np.mean(r["err"] ** 2))),
             "score": cal.score(r["raw"]), "score_rms": frame_score(cal.sigma(r["spread"]), "rms"),
             "sigma": cal.sigma(r["spread"])[:, None]} for r in raw_rows]


def summary(rows: list, ens: Ensemble) -> dict:
    out = {}
    for label, sel in [("pooled", rows)] + [(f"{T:.0f}K", [r for r in rows if r["T"] == T])
                                           for T in sorted({r["T"] for r in rows})]:
        err = np.concatenate([r["err"].ravel() for r in sel])
        sig = np.concatenate([np.broadcast_to(r["sigma"], r["err"].shape).ravel() for r in sel])
        out[label] = {
            "frames": len(sel),
            "spearman_max": spearman([r["score"] for r in sel], [r["rmse"] for r in sel]),
            "spearman_rms": spearman([r["score_rms"] for r in sel], [r["rmse"] for r in sel]),
            "coverage_1sigma": coverage(err, sig),
            "z_std": float(np.std(err / sig)),
            "force_rmse": float(np.sqrt(np.mean(err**2))),
            "mean_calibrated_sigma": float(np.sqrt(np.mean(sig**2))),
        }
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--train", type=int, default=4, help="training frames per temperature (300 K, 900 K)")
    ap.add_argument("--calib", type=int, default=4, help="calibration frames per temperature (300 K, 900 K)")
    ap.add_argument("--test", type=int, default=10, help="test frames per temperature (300, 900, 1500 K)")
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--ridge", type=float, default=1e-3)
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--score", default="max")
    ap.add_argument("--plot", default=None, help="write a figure (png) here")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()

    t0 = time.perf_counter()
    train = sw_frames(300, args.train, seed=1) + sw_frames(900, args.train, seed=2)
    calib = sw_frames(300, args.calib, seed=3) + sw_frames(900, args.calib, seed=4)
    test = sum((sw_frames(T, args.test, seed=10 + i) for i, T in enumerate((300, 900, 1500))), [])
    print(f"SW frames: {len(train)} train, {len(calib)} calibration, {len(test)} test "
          f"({time.perf_counter() - t0:.0f} s)")

    ens = Ensemble("sevennet-0", k=args.k, rank=args.rank, score=args.score)
    with np.errstate(divide="ignore", invalid="ignore"):  # unfitted: zero spread
        base = summary(calibrated(ens, predict_all(ens, test)), ens)
    print("pretrained SevenNet-0 vs SW, test force RMSE:",
          {k: round(v["force_rmse"], 3) for k, v in base.items()})
    t1 = time.perf_counter()
    fit = ens.fit(train, ridge=args.ridge)
    print(f"fit: {fit} ({time.perf_counter() - t1:.0f} s)")
    ens.calibrate(calib)
    print(f"calibration scale s = {ens.calibration.scale:.2f} from {ens.calibration.n_components} components")
    raw = predict_all(ens, test)
    rows = calibrated(ens, raw)
    results = {"scale": summary(rows, ens)}
    ens.calibration.method = "isotonic"
    rows_iso = calibrated(ens, raw)
    results["isotonic"] = {k: {"spearman_max": v["spearman_max"]} for k, v in summary(rows_iso, ens).items()}
    ens.calibration.method = "scale"
    ens.calibration.fit = "quantile"
    print(f"quantile-fitted scale s = {ens.calibration.scale:.2f}")
    results["quantile"] = summary(calibrated(ens, raw), ens)
    ens.calibration.fit = "variance"

    print("\n| set | frames | force RMSE (eV/Å) | mean cal. σ | Spearman (max) | Spearman (rms) | 1σ coverage | std(e/sσ) |")
    print("|---|---|---|---|---|---|---|---|")
    for k, v in [(f"{k} (variance fit)", v) for k, v in results["scale"].items()] + \
            [(f"{k} (quantile fit)", v) for k, v in results["quantile"].items()]:
        print(f"| {k} | {v['frames']} | {v['force_rmse']:.3f} | {v['mean_calibrated_sigma']:.3f} | "
              f"{v['spearman_max']:.2f} | {v['spearman_rms']:.2f} | {v['coverage_1sigma']:.3f} | {v['z_std']:.2f} |")
    print("isotonic per-frame map, Spearman:", {k: round(v["spearman_max"], 2) for k, v in results["isotonic"].items()})
    print(f"total {time.perf_counter() - t0:.0f} s")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"args": vars(args), "scale": ens.calibration.scale, **results}, fh, indent=1)
    if args.plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 4))
        for T, c in zip((300, 900, 1500), ("C0", "C1", "C3")):
            sel = [r for r in rows if r["T"] == T]
            a1.scatter([r["score_rms"] for r in sel], [r["rmse"] for r in sel], c=c, label=f"{T} K")
            z = np.concatenate([(r["err"] / r["sigma"]).ravel() for r in sel])
            a2.hist(z, bins=60, range=(-5, 5), histtype="step", density=True, color=c, label=f"{T} K")
        lim = max(max(r["rmse"] for r in rows), max(r["score_rms"] for r in rows)) * 1.05
        a1.plot([0, lim], [0, lim], "k--", lw=0.8)
        a1.set_xlabel("calibrated σ, RMS over atoms (eV/Å)")
        a1.set_ylabel("true force RMSE vs SW (eV/Å)")
        a1.legend()
        x = np.linspace(-5, 5, 200)
        a2.plot(x, np.exp(-x**2 / 2) / np.sqrt(2 * np.pi), "k--", lw=0.8, label="N(0,1)")
        a2.set_xlabel("error / calibrated σ (force components)")
        a2.legend()
        fig.tight_layout()
        fig.savefig(args.plot, dpi=120)
        print("figure:", args.plot)


if __name__ == "__main__":
    main()
