"""MPI speed-ups: walkers, data-parallel fine-tuning and reference labels on 2 ranks against 1.

Three measurements, each run under ``mpiexec -n 1`` and ``mpiexec -n 2`` (one torch
thread per rank), alternated ``--repeats`` times in one invocation so that both see
the same machine load; printed as the ratio 2 ranks / 1 rank:

- **walkers**: a campaign of 2 walkers of 64-atom Si (SevenNet-0 ensemble,
  Stillinger–Weber reference, a target no frame exceeds, so the loop is MD and
  uncertainty only), ``--steps`` steps each; walker-steps per second of
  :meth:`Campaign.run` (the bootstrap labels are made before it). Target ≥ 1.7.
- **finetune**: seconds per fine-tuning step at equal global batch (2 phonon
  structures with one Hessian column each + 2 EFS structures, 64-atom Si,
  Stillinger–Weber labels, LoRA, float32), data-parallel over the ranks.
- **labels**: wall time of labelling 4 rattled 8-atom Si frames with GPAW
  (``gpaw-pw``, PBE, 300 eV) through the campaign's :class:`Helpers` (one
  calculation per rank at a time) — skipped with a message when GPAW is missing.

    python benchmarks/bench_parallel.py [--steps 40] [--repeats 2] [--only walkers,finetune,labels]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


# ------------------------------------------------------------------ what each rank runs
def walkers(out: Path, steps: int) -> dict:
    from almd.campaign.config import CampaignConfig
    from almd.campaign.loop import Campaign

    cfg = CampaignConfig.from_dict({
        "system": {"supercell": [2, 2, 2]},
        "model": {"members": 4},
        "md": {"temperature": 300, "seed": 1},
        "trigger": {"target": 0.5, "audit_every": 0},  # no frame at 300 K comes near: MD and uncertainty only
        "learning": {"phonons": False, "test_frames": 0},
        "finetune": {"every": 0},
        "run": {"steps": steps, "walkers": 2, "output": str(out / "run"), "progress": False,
                "checkpoint_every": 10_000},
    })
    campaign = Campaign(cfg)
    t0 = time.perf_counter()
    campaign.run()
    seconds = time.perf_counter() - t0
    return {"seconds": seconds, "walker_steps_per_s": 2 * steps / seconds}


def finetune(out: Path, steps: int) -> dict:
    from mpi4py import MPI

    from almd.finetune import FinetuneConfig, Finetuner

    phonon, efs = _si64_labels()
    cfg = FinetuneConfig.from_dict({
        "model": {"strategy": "lora"},
        "data": {"validation_columns": 1},
        "run": {"steps": steps, "batch_size": 2, "efs_batch": 2, "eval_every": 10_000, "checkpoint_every": 10_000,
                "patience": 0, "output": str(out / "finetune"), "progress": False},
    })
    comm = MPI.COMM_WORLD
    trainer = Finetuner(cfg, potential="sevennet-0", phonon=phonon, efs=efs, validation=efs[:1],
                        comm=comm if comm.size > 1 else None)
    trainer.fit(save_model=False)
    per_step = [r["seconds"] for r in trainer.history[1:]]  # the first step pays for warm-up
    return {"seconds_per_step": float(np.median(per_step))}


def labels(out: Path, frames: int) -> dict:
    from ase.build import bulk
    from mpi4py import MPI

    from almd.campaign.parallel import Helpers, SerialComm
    from almd.labels.oracle import Oracle
    from almd.structures import content_hash

    comm = MPI.COMM_WORLD if MPI.COMM_WORLD.size > 1 else SerialComm()
    oracle = Oracle("gpaw-pw", workdir=out / "oracle-runs")
    helpers = Helpers(comm, {"compute": oracle.compute})
    jobs = []
    for seed in range(frames):
        a = bulk("Si", "diamond", a=5.431, cubic=True)
        a.rattle(0.05, seed=seed)
        jobs.append((a, content_hash(a, oracle.settings_hash)))
    t0 = time.perf_counter()
    if comm.rank == 0:
        results = [r for _, r in helpers.map("compute", jobs)]
        helpers.release()
        assert all(r.ok for r in results), [r.error for r in results]
    else:
        helpers.wait()
    return {"seconds": time.perf_counter() - t0}


def _si64_labels():
    """2 phonon structures (64-atom Si with the Stillinger–Weber Hessian) and 4 EFS ones."""
    from ase.build import bulk
    from ase.calculators.singlepoint import SinglePointCalculator

    from almd.phonons import get_hessian, stillinger_weber_si

    sw = stillinger_weber_si()
    phonon, efs = [], []
    for seed in range(2):
        a = bulk("Si", "diamond", a=5.431, cubic=True) * (2, 2, 2)
        a.rattle(0.01, seed=100 + seed)
        a.info["hessian"] = get_hessian(sw, a)  # matscipy's analytic Hessian
        phonon.append(a)
    for seed in range(4):
        a = bulk("Si", "diamond", a=5.431, cubic=True) * (2, 2, 2)
        a.rattle(0.05, seed=seed)
        a.calc = sw
        a.calc = SinglePointCalculator(a, energy=a.get_potential_energy(), forces=a.get_forces(), stress=a.get_stress())
        efs.append(a)
    return phonon, efs


KINDS = {"walkers": walkers, "finetune": finetune, "labels": labels}


# ------------------------------------------------------------------ the driver
def launch(kind: str, ranks: int, size: int) -> dict:
    mpiexec = shutil.which("mpiexec", path=os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"])
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    with tempfile.TemporaryDirectory() as tmp:
        result = Path(tmp) / "result.json"
        cmd = [mpiexec, "-n", str(ranks), sys.executable, __file__, "--rank-job", kind, "--size", str(size),
               "--result", str(result)]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=tmp)
        if proc.returncode != 0:
            raise RuntimeError(f"{kind} on {ranks} ranks failed:\n{proc.stderr[-3000:]}")
        return json.loads(result.read_text())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=40, help="MD steps per walker (walkers)")
    p.add_argument("--finetune-steps", type=int, default=6)
    p.add_argument("--frames", type=int, default=4, help="frames to label (labels)")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--only", default="walkers,finetune,labels")
    p.add_argument("--rank-job", choices=sorted(KINDS), help=argparse.SUPPRESS)
    p.add_argument("--size", type=int, help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args.rank_job:  # inside mpiexec
        import torch
        from mpi4py import MPI

        torch.set_num_threads(1)
        out = Path(args.result).parent
        value = KINDS[args.rank_job](out, args.size)
        if MPI.COMM_WORLD.rank == 0:
            Path(args.result).write_text(json.dumps(value))
        return 0

    if shutil.which("mpiexec", path=os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"]) is None:
        print("no mpiexec (pip install mpich): nothing to measure")
        return 1
    sizes = {"walkers": args.steps, "finetune": args.finetune_steps, "labels": args.frames}
    for kind in args.only.split(","):
        if kind == "labels" and subprocess.run([sys.executable, "-c", "import gpaw"], capture_output=True).returncode:
            print("labels: skipped (GPAW is not installed: pip install gpaw, see the README)")
            continue
        runs: dict[int, list[dict]] = {1: [], 2: []}
        for _ in range(args.repeats):
            for ranks in (1, 2):
                runs[ranks].append(launch(kind, ranks, sizes[kind]))
        key = {"walkers": "walker_steps_per_s", "finetune": "seconds_per_step", "labels": "seconds"}[kind]
        one, two = (float(np.median([r[key] for r in runs[n]])) for n in (1, 2))
        ratio = two / one if kind == "walkers" else one / two  # > 1: two ranks are faster
        print(f"{kind}: {key} 1 rank {one:.3f}, 2 ranks {two:.3f}: speed-up {ratio:.2f}"
              f"{'  (target >= 1.7)' if kind == 'walkers' else ''}   runs: "
              + json.dumps({n: [round(r[key], 3) for r in runs[n]] for n in runs}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
