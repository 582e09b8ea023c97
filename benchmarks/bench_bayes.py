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

Usage: python benchmarks/bench_bayes.py [--steps 200] [--repeats 3] [--hiphive]
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

from almd.bayes import BayesianCalculator, BayesianForceConstantModel


def sw_calc():
    from matscipy.calculators.manybody import Manybody
    from matscipy.calculators.manybody.explicit_forms.stillinger_weber import (
        Stillinger_Weber_PRB_31_5262_Si,
        StillingerWeber,
    )

    return Manybody(**StillingerWeber(Stillinger_Weber_PRB_31_5262_Si))


def per_step(atoms, calc, steps: int, repeats: int, score=None) -> float:
    """Best-of-repeats wall time (s) per Langevin step; ``score(atoms)`` is called
    after every step when given (the uncertainty a walker needs)."""
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--hiphive", action="store_true")
    args = ap.parse_args()

    sw = sw_calc()
    prim = bulk("Si", "diamond", a=5.431)
    ideal = bulk("Si", "diamond", a=5.431, cubic=True).repeat(2)

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


if __name__ == "__main__":
    main()
