"""Label one rattled 8-atom Si cell with three reference methods into one database.

    python examples/dft_single_points.py [--db labels.db] [--skip gpaw-pw,espresso-pw]

Stillinger-Weber (matscipy, milliseconds), GPAW plane waves and Quantum ESPRESSO
(pw.x; seconds to a minute each on one core). Each call runs in its own worker
process with a timeout; a failure becomes a 'failed' row, not a crash. Run it
twice: the second time every label comes from the database (cached). Inspect
the result with `ase db labels.db` or `ase db labels.db status=failed`.
"""

from __future__ import annotations

import argparse
import shutil

import numpy as np
from ase.build import bulk
from ase.units import GPa

from almd.labels.database import LabelDatabase
from almd.labels.labeller import Labeller
from almd.labels.oracle import Oracle, OracleConfigError

# small settings so that the example finishes in about a minute; raise them for science
ORACLES = {
    "stillinger-weber-si": {},
    "gpaw-pw": {"ecut": 300, "kpt_density": 2.5},
    "espresso-pw": {"ecutwfc": 25, "kpt_density": 2.5},
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--db", default="dft_single_points.db", help="label database (ASE SQLite)")
    parser.add_argument("--skip", default="", help="comma-separated oracles to leave out")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds per calculation")
    args = parser.parse_args(argv)

    atoms = bulk("Si", "diamond", a=5.466, cubic=True)
    atoms.rattle(stdev=0.05, seed=42)  # fixed seed: same structure, so reruns hit the cache
    db = LabelDatabase(args.db)

    results = {}
    for name, options in ORACLES.items():
        if name in args.skip.split(","):
            continue
        if name == "espresso-pw" and shutil.which("pw.x") is None:
            print("skipping espresso-pw: pw.x not found (apt-get install quantum-espresso)")
            continue
        try:
            oracle = Labeller(Oracle(name, timeout=args.timeout, retries=1, **options), db)
        except OracleConfigError as err:  # e.g. a code that is not installed
            print(f"skipping {name}: {err}")
            continue
        print(f"labelling with {name} ...", flush=True)
        results[name] = oracle.label(atoms, walker=0, step=0, model_version="example")

    reference = results.get("gpaw-pw")
    header = f"{'oracle':<22}{'status':<8}{'cached':<8}{'E (eV/atom)':>12}{'max|F| eV/Å':>13}" \
             f"{'P (GPa)':>9}{'ΔF vs GPAW':>12}{'time (s)':>10}"
    print("\n" + header + "\n" + "-" * len(header))
    for name, r in results.items():
        if not r.ok:
            print(f"{name:<22}{'failed':<8}{r.error.splitlines()[-1][:60]}")
            continue
        pressure = -r.stress[:3].mean() / GPa if r.stress is not None else float("nan")
        dforce = (np.sqrt(np.mean((r.forces - reference.forces) ** 2))
                  if reference is not None and reference.ok else float("nan"))
        print(f"{name:<22}{'ok':<8}{str(r.cached):<8}{r.energy / len(atoms):>12.4f}"
              f"{np.linalg.norm(r.forces, axis=1).max():>13.3f}{pressure:>9.2f}{dforce:>12.3f}"
              f"{r.wall_time:>10.1f}")
    print(f"\n{len(db)} rows in {args.db}  (ase db {args.db})")
    return 0 if all(r.ok for r in results.values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
