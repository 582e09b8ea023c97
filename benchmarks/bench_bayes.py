"""Cost per MD step of the Bayesian lattice-dynamics model (forces + score).

System: 64-atom Si (2×2×2 conventional), ClusterSpace cutoffs [5.0, 4.0] Å
(37 parameters), fitted to 5 Stillinger–Weber-labelled structures with 0.06 Å
Gaussian displacements. Langevin MD at 300 K, 1 fs.

Baseline (named): one Stillinger–Weber call (matscipy Manybody), i.e. the
cost of an MD step with the reference potential itself.

Rows:
  sw            MD step with the SW reference (baseline)
  bayes         MD step with BayesianCalculator: forces, energy and the
                per-component posterior std (trigger score) from one design block
  fcc+score     MD step with hiphive's ForceConstantCalculator for the forces
                plus model.score() for the uncertainty (two evaluations)
  fcc           MD step with hiphive's ForceConstantCalculator alone (no score)

Sub-block convergence (Callsen et al.: "Bayesian errors evaluated on sub-blocks
of larger-supercell MD show when training has converged"; almd.uncertainty.bayes_convergence):
models trained on 1, 2, 3, 5, 8, 12 rattled 64-atom structures evaluate their
posterior force std on the same Langevin MD frames (300 K) of a larger supercell
(default 3×3×3 conventional, 216 atoms; the MD is run with the 12-structure
model, no reference calls), cut into blocks no larger than the training cell
(2×2×2 blocks). Rows: max and 95 % quantile of the sub-block errors, the noise
level √(1/β) of the fit, and the true force error against SW on those frames
(RMSE and the largest per-block RMSE), and the convergence decision at --target.

Usage: python benchmarks/bench_bayes.py [--steps 200] [--repeats 3] [--hiphive]
       [--big 3] [--frames 8] [--target 0.01] [--subblock-only]
(--hiphive also times hiphive's own fit-matrix call, after its numba warm-up.)
Timings are the best of the repeats (the machine is shared).
"""

from __future__ import annotations

import argparse
import time

import numpy as np
from ase import units
from ase.build import bulk
from ase.md.langevin import Langevin
from ase.md.velocitydistribution import thermalize_momenta

from almd.uncertainty.bayes import BayesianCalculator, BayesianForceConstantModel
from almd.uncertainty.bayes_convergence import block_labels, subblock_convergence


def sw_calc():
    from matscipy.calculators.manybody import Manybody
    from matscipy.calculators.manybody.explicit_forms.stillinger_weber import (
        Stillinger_Weber_PRB_31_5262_Si,
        StillingerWeber,
    )

    return Manybody(**StillingerWeber(Stillinger_Weber_PRB_31_5262_Si))


def per_step(atoms, calc, steps: int, repeats: int, score=None) -> float:
    """Best-of-repeats wall time (s) per Langevin step; ``score(atoms)`` is called
    after every step when given (the uncertainty a walker needs).
    """
    best = np.inf
    for r in range(repeats):
        a = atoms.copy()
        a.calc = calc
        thermalize_momenta(a, temperature_K=300, rng=np.random.default_rng(r))
        dyn = Langevin(a, 1 * units.fs, temperature_K=300, friction=0.01 / units.fs,
                       fixcm=False, rng=np.random.default_rng(100 + r))
        dyn.run(2)  # warm-up (first calls, JIT)
        if score is not None:
            dyn.attach(lambda: score(a), interval=1)
        t = time.perf_counter()
        dyn.run(steps)
        best = min(best, (time.perf_counter() - t) / steps)
    return best


def rattled_labelled(ideal, n: int, std: float, seed: int, calc) -> list:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        a = ideal.copy()
        a.positions += rng.normal(0, std, a.positions.shape)
        a.calc = calc
        a.arrays["forces"] = a.get_forces()
        a.calc = None
        out.append(a)
    return out


def subblock_table(model, ideal, conv, sw, rep: int, n_frames: int, target: float) -> None:
    """Sub-block Bayesian error vs training-set size on fixed larger-cell MD frames."""
    big = conv.repeat(rep)
    sizes = (1, 2, 3, 5, 8, 12)
    train = rattled_labelled(ideal, max(sizes), 0.06, 0, sw)
    model.fit(train, ideal=ideal)
    t = time.perf_counter()
    model.design_matrix(big, ideal=big)  # builds the large-cell basis
    t_basis = time.perf_counter() - t
    # MD of the larger cell with the model itself (the no-DFT protocol).
    a = big.copy()
    a.calc = BayesianCalculator(model, big)
    thermalize_momenta(a, temperature_K=600, rng=np.random.default_rng(3))
    dyn = Langevin(a, 2 * units.fs, temperature_K=300, friction=0.02 / units.fs,
                   fixcm=False, rng=np.random.default_rng(4))
    dyn.run(100)  # equilibrate (from 600 K kinetic into the 300 K bath)
    frames = []
    for _ in range(n_frames):
        dyn.run(20)
        frames.append(a.copy())
    # True forces only to judge the estimate; the decision itself never uses them.
    f_sw = []
    for f in frames:
        g = f.copy()
        g.calc = sw
        f_sw.append(g.get_forces())
    labels = block_labels(big, ideal)  # blocks no larger than the training cell
    n_blocks = labels.max() + 1
    f_scale = float(np.sqrt(np.mean(np.square(f_sw))))
    print(f"\nsub-block convergence: {len(big)}-atom cell ({rep}x{rep}x{rep} conventional), "
          f"{n_blocks} blocks of ~{len(big) // n_blocks} atoms, {n_frames} MD frames at 300 K "
          f"(force rms {f_scale:.3f} eV/Å); large-cell basis {t_basis:.1f} s; target {target} eV/Å")
    print(f"{'train':>5} {'max':>8} {'q95':>8} {'median':>8} {'noise':>8} "
          f"{'RMSE':>8} {'maxblkRMSE':>10} {'rank r':>7} {'converged':>9} {'ms/frame':>8}")
    for n in sizes:
        model.fit(train[:n], ideal=ideal)
        t = time.perf_counter()
        dec = subblock_convergence(model, frames, big, target=target, block=ideal)
        t_eval = (time.perf_counter() - t) / n_frames
        err = np.array([model.predict_forces(f, ideal=big) - fs for f, fs in zip(frames, f_sw)])
        sq = np.square(err).sum(axis=2)  # (frames, atoms)
        blk = np.array([[np.sqrt(sq[k, labels == b].mean() / 3) for b in range(n_blocks)]
                        for k in range(n_frames)])
        # Does the Bayesian block error rank the blocks like their true error?
        r = _spearman(dec.errors.ravel(), blk.ravel())
        print(f"{n:5d} {dec.max:8.4f} {dec.q95:8.4f} {np.median(dec.errors):8.4f} "
              f"{1 / np.sqrt(model.fit_result.beta):8.4f} {np.sqrt(np.mean(np.square(err))):8.4f} "
              f"{blk.max():10.4f} {r:7.2f} {str(dec.converged):>9} {t_eval * 1e3:8.1f}")
    print("(errors in eV/Å: max/q95/median of the sub-block Bayesian errors; noise = √(1/β); "
          "RMSE = true force error vs SW on the same frames; rank r = Spearman correlation of "
          "block Bayesian error with block RMSE)")


def _spearman(x: np.ndarray, y: np.ndarray) -> float:
    rx, ry = np.argsort(np.argsort(x)), np.argsort(np.argsort(y))
    return float(np.corrcoef(rx, ry)[0, 1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--hiphive", action="store_true")
    ap.add_argument("--big", type=int, default=3, help="larger cell: N×N×N conventional")
    ap.add_argument("--frames", type=int, default=8)
    ap.add_argument("--target", type=float, default=0.01, help="sub-block target, eV/Å")
    ap.add_argument("--subblock-only", action="store_true")
    args = ap.parse_args()

    sw = sw_calc()
    prim = bulk("Si", "diamond", a=5.431)
    conv = bulk("Si", "diamond", a=5.431, cubic=True)
    ideal = conv.repeat(2)
    if args.subblock_only:
        model = BayesianForceConstantModel(prim, [5.0, 4.0], supercell=ideal)
        subblock_table(model, ideal, conv, sw, args.big, args.frames, args.target)
        return

    t = time.perf_counter()
    model = BayesianForceConstantModel(prim, [5.0, 4.0])
    t_cs = time.perf_counter() - t
    t = time.perf_counter()
    model.design_matrix(ideal, ideal=ideal)  # builds the supercell basis
    t_basis = time.perf_counter() - t
    rng = np.random.default_rng(0)
    train = []
    for _ in range(5):
        a = ideal.copy()
        a.positions += rng.normal(0, 0.06, a.positions.shape)
        a.calc = sw
        a.arrays["forces"] = a.get_forces()
        a.calc = None
        train.append(a)
    t = time.perf_counter()
    model.fit(train, ideal=ideal)
    t_fit = time.perf_counter() - t
    fcc = model.calculator(ideal)

    # Component costs on one 300 K-like frame.
    frame = ideal.copy()
    frame.positions += rng.normal(0, 0.06, frame.positions.shape)
    n = 50
    t = time.perf_counter()
    for _ in range(n):
        model.design_matrix(frame)
    t_design = (time.perf_counter() - t) / n
    t = time.perf_counter()
    for _ in range(n):
        model.predict(frame)
    t_predict = (time.perf_counter() - t) / n
    f = frame.copy()
    f.calc = sw
    t = time.perf_counter()
    for _ in range(n):
        f.calc.results.clear()
        f.get_forces()
    t_sw_call = (time.perf_counter() - t) / n

    rows = {
        "sw": per_step(ideal, sw, args.steps, args.repeats),
        "bayes": per_step(ideal, BayesianCalculator(model, ideal), args.steps, args.repeats),
        "fcc+score": per_step(ideal, fcc, args.steps, args.repeats, score=model.score),
        "fcc": per_step(ideal, fcc, args.steps, args.repeats),
    }

    print(f"64-atom Si, {model.n_parameters} parameters, {args.steps} Langevin steps, "
          f"best of {args.repeats}")
    print(f"one-off: ClusterSpace {t_cs:.2f} s, supercell basis {t_basis:.2f} s, "
          f"evidence fit (5 structures) {t_fit * 1e3:.0f} ms "
          f"({model.fit_result.n_iter} iterations)")
    print(f"per call: design block {t_design * 1e3:.2f} ms, forces+std {t_predict * 1e3:.2f} ms, "
          f"SW reference call {t_sw_call * 1e3:.2f} ms "
          f"(ratio {t_predict / t_sw_call:.2f} x SW)")
    if args.hiphive:
        from hiphive.force_constant_model import ForceConstantModel

        fcm = ForceConstantModel(ideal, model.cs)
        u = frame.positions - ideal.positions
        fcm.get_fit_matrix(u)  # numba compilation
        t = time.perf_counter()
        for _ in range(5):
            fcm.get_fit_matrix(u)
        t_h = (time.perf_counter() - t) / 5
        print(f"hiphive get_fit_matrix {t_h * 1e3:.1f} ms per call "
              f"({t_h / t_design:.0f} x our design block)")
    base = rows["sw"]
    print(f"{'MD step with':<12} {'ms/step':>9} {'ratio vs SW':>12}")
    for name, v in rows.items():
        print(f"{name:<12} {v * 1e3:9.2f} {v / base:12.2f}")
    subblock_table(model, ideal, conv, sw, args.big, args.frames, args.target)


if __name__ == "__main__":
    main()
