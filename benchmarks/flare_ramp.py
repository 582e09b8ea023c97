"""FLARE's OTF on a temperature ramp: the peer's side of ``bench_policies.py --ramp``.

Runs under FLARE's own Python (``../shared/peers/flare/build.sh DIR`` → ``DIR/venv/bin/python``),
never under almd's. The system and FLARE settings are those of ``../shared/peers/flare/otf_si.py``
(64-atom Si, Langevin 1 fs, friction 0.01/fs, sparse GP on B2 descriptors with its example
hyper-parameters, Stillinger–Weber as the reference); the one change is the temperature, which
FLARE's own ``rescale_steps`` / ``rescale_temps`` raise from 300 K to ``--top`` over ``--ramp``
steps (every 10 steps, as a user of FLARE would ramp it), then hold.

    DIR/venv/bin/python benchmarks/flare_ramp.py --steps 1000 --ramp 500 --top 1200 \
        --heldout 300K=FRAMES.xyz --heldout 1200K=FRAMES.xyz

Prints one ``RESULT {json}`` line: reference calls, wall time and the held-out force RMSE per set.
"""

import argparse
import json
import time

import numpy as np
from ase import units
from ase.build import bulk
from ase.io import read
from ase.md.velocitydistribution import MaxwellBoltzmannDistribution, Stationary
from flare.atoms import FLARE_Atoms
from flare.bffs.sgp import SGP_Wrapper
from flare.bffs.sgp._C_flare import B2, NormalizedDotProduct
from flare.bffs.sgp.calculator import SGP_Calculator
from flare.learners.otf import OTF
from matscipy.calculators.manybody import Manybody
from matscipy.calculators.manybody.explicit_forms.stillinger_weber import (
    Stillinger_Weber_PRB_31_5262_Si,
    StillingerWeber,
)


def ramp(steps: int, top: float, every: int = 10) -> tuple[list[int], list[float]]:
    """FLARE's rescale points: 300 K → ``top`` linearly over ``steps`` MD steps."""
    at = list(range(every, steps + 1, every))
    return at, [300.0 + (top - 300.0) * s / steps for s in at]


def heldout_rmse(calc: SGP_Calculator, frames: list) -> float:
    errors = []
    for frame in frames:
        atoms = FLARE_Atoms.from_ase_atoms(frame)
        calc.reset()
        atoms.calc = calc
        errors.append(atoms.get_forces() - frame.get_forces())
    return float(np.sqrt(np.mean(np.concatenate(errors) ** 2)))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--ramp", type=int, default=500)
    p.add_argument("--top", type=float, default=1200.0)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--heldout", action="append", default=[], help="NAME=FRAMES.xyz (repeatable)")
    a = p.parse_args()

    sw = Manybody(**StillingerWeber(Stillinger_Weber_PRB_31_5262_Si))
    atoms = bulk("Si", "diamond", a=5.431, cubic=True).repeat(2)
    MaxwellBoltzmannDistribution(atoms, temperature_K=300, rng=np.random.RandomState(a.seed))
    Stationary(atoms)
    kernel = NormalizedDotProduct(2.0, 2)
    b2 = B2("chebyshev", "quadratic", [0.0, 5.0], [], [1, 8, 3])
    sgp = SGP_Wrapper([kernel], [b2], 5.0, 0.01, 0.05, 0.005, {14: 0}, variance_type="local",
                      single_atom_energies={0: 0.0}, energy_training=True, force_training=True,
                      stress_training=True, max_iterations=20, opt_method="L-BFGS-B")
    np.random.seed(a.seed + 100)  # ASE's Langevin draws from np.random when given no rng (FLARE's JSON cannot hold one)
    steps, temps = ramp(a.ramp, a.top)
    otf = OTF(atoms, dt=0.001, number_of_steps=a.steps, dft_calc=sw, md_engine="Langevin",
              md_kwargs={"temperature_K": 300, "friction": 0.01 / units.fs}, flare_calc=SGP_Calculator(sgp),
              rescale_steps=steps, rescale_temps=temps, std_tolerance_factor=-0.02, max_atoms_added=-1,
              update_style="threshold", update_threshold=0.01, train_hyps=[2, np.inf], write_model=0,
              force_only=False, output_name="ramp")
    t0 = time.time()
    otf.run()
    result = {"steps": a.steps, "ramp": a.ramp, "top_K": a.top, "dft_calls": otf.dft_count,
              "wall_s": round(time.time() - t0, 1), "final_temperature_K": float(otf.atoms.get_temperature())}
    for spec in a.heldout:
        name, path = spec.split("=", 1)
        result[name] = heldout_rmse(otf.flare_calc, read(path, index=":"))
    print("RESULT", json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
