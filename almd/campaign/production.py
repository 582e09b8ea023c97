"""``almd md MODEL STRUCTURE``: production MD with a trained model and its uncertainty, no learning.

MODEL is a campaign's run directory (its last checkpointed model, the ensemble or
the lattice-dynamics model, and its ``trigger.target`` as the model's stated
accuracy), a model file of a checkpoint (``ensemble-G.pt``,
``lattice-dynamics-G.npz``), or any model ``almd.Calculator`` reads (then without
an uncertainty). A lattice-dynamics model runs in its own supercell only. The run warns, with the step and the value, when the calibrated
uncertainty crosses the target (once per excursion above it), and stops rather
than integrates on when a prediction is not finite or a force exceeds
``--max-force``: the exit status is then 3 and the last trajectory frame is the
last trusted one.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

from ase import Atoms

from almd.campaign.dynamics import DYNAMICS
from almd.campaign.trajectory import TrajectoryWriter
from almd.campaign.walker import StepRecord, Walker, WalkerError, WalkerSettings

__all__ = ["EXIT_BLOWN_UP", "ProductionModel", "load_production_model", "main", "run_md"]

#: exit status of a run stopped at a non-finite or blown-up prediction
EXIT_BLOWN_UP = 3


@dataclass
class ProductionModel:
    """A calculator for MD and the force error its maker stated (eV/Å; None when unknown)."""

    calculator: object
    target: float | None
    source: str


def load_production_model(model: str, uncertainty_every: int = 1) -> ProductionModel:
    """The calculator of a run directory, an ensemble file or a model file (see module docstring)."""
    from almd.settings import ConfigError

    path = Path(model)
    if path.is_dir():
        unit_path = path / "campaign.json"
        if not unit_path.is_file():
            raise ConfigError(f"MODEL {model}: a directory without campaign.json; give a campaign's run directory")
        unit = json.loads(unit_path.read_text())
        if "ensemble" not in unit:
            raise ConfigError(f"MODEL {model}: its campaign.json names no ensemble yet (no checkpoint written)")
        target = unit.get("config", {}).get("trigger", {}).get("target")
        return _checkpoint_model(path / unit["ensemble"], target, uncertainty_every)
    if path.is_file() and path.suffix == ".npz":
        return _checkpoint_model(path, None, uncertainty_every)
    if path.is_file():
        from almd.potentials.files import read_payload
        from almd.uncertainty.ensemble import FORMAT

        payload = read_payload(path, allow_pickle=False)
        if isinstance(payload, dict) and payload.get("format") == FORMAT:
            return _checkpoint_model(path, None, uncertainty_every)
    from almd.potentials.calculator import Calculator

    return ProductionModel(Calculator(model), None, str(model))


def _checkpoint_model(path: Path, target: float | None, uncertainty_every: int) -> ProductionModel:
    from almd.uncertainty import EnsembleCalculator

    if path.suffix == ".npz":  # a lattice-dynamics checkpoint
        from almd.uncertainty.lattice_dynamics import LatticeDynamicsModel

        return ProductionModel(LatticeDynamicsModel.load(path).calculator(), target, str(path))
    return ProductionModel(EnsembleCalculator(path, uncertainty_every=uncertainty_every), target, str(path))


def run_md(atoms: Atoms, model: ProductionModel, settings: WalkerSettings, steps: int,
           trajectory: TrajectoryWriter | None = None, target: float | None = None,
           report=print, report_every: int = 100) -> tuple[list[StepRecord], StepRecord | None]:
    """``steps`` MD steps of ``atoms`` with ``model``; the records and the blown-up one, if any.

    ``target`` (default: the model's own) is the force error above which a warning is reported.
    """
    target = model.target if target is None else target
    walker = Walker(atoms, model.calculator, settings, name="md")
    records, above, start = [], False, time.perf_counter()
    for record in walker.run(steps):
        if record.blown_up:
            report(f"almd md: stopped at step {record.step}: the prediction blew up "
                   f"(largest force {record.max_force:.4g} eV/Å, energy {record.energy:.6g} eV; "
                   f"allowed: finite and <= max_force {settings.max_force} eV/Å)")
            return records, record
        records.append(record)
        if trajectory is not None:
            trajectory.write(walker.atoms, record.step, record.score, record.temperature, 0)
        if target is not None and record.score is not None:
            if record.score > target and not above:
                report(f"almd md: warning: step {record.step}: calibrated uncertainty {record.score:.4f} eV/Å "
                       f"is above the model's target {target:.4f} eV/Å")
            above = record.score > target
        if report_every and record.step % report_every == 0:
            per_step = (time.perf_counter() - start) / len(records)
            score = "-" if record.score is None else f"{record.score:.4f}"
            report(f"step {record.step:6d}  T {record.temperature:7.1f} K  E {record.energy:12.5f} eV  "
                   f"uncertainty {score} eV/Å  {per_step:.3f} s/step")
    return records, None


def main(argv: list[str]) -> int:
    """Entry point of ``almd md``."""
    from almd.potentials import UnknownElementError
    from almd.settings import ConfigError

    p = argparse.ArgumentParser(prog="almd md", description=__doc__.splitlines()[0])
    p.add_argument("model", help="a campaign run directory, an ensemble file, or a model file / pretrained name")
    p.add_argument("structure", help="the start structure: any file ASE reads")
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--dynamics", default="langevin", help=f"one of {', '.join(DYNAMICS)}")
    p.add_argument("--temperature", type=float, default=300.0, help="K")
    p.add_argument("--timestep", type=float, default=1.0, help="fs")
    p.add_argument("--pressure", type=float, default=0.0, help="GPa (npt)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-force", type=float, default=50.0, help="eV/Å: a larger force stops the run")
    p.add_argument("--target", type=float, help="eV/Å: warn above it (default: the campaign's trigger.target)")
    p.add_argument("--uncertainty-every", type=int, default=1, help="the ensemble spread on every n-th step")
    p.add_argument("--trajectory", help="extxyz file to write frames to")
    p.add_argument("--every", type=int, default=10, help="steps between trajectory frames and progress lines")
    p.add_argument("--quiet", action="store_true", help="no progress lines (warnings and the stop still print)")
    args = p.parse_args(argv)
    try:
        settings, atoms = _checked(args)
        model = load_production_model(args.model, args.uncertainty_every)
        trajectory = TrajectoryWriter(args.trajectory, args.every) if args.trajectory else None
        if trajectory is not None and trajectory.path.exists():
            raise ConfigError(f"--trajectory {args.trajectory}: the file exists; give a new one")
        records, blown = run_md(atoms, model, settings, args.steps, trajectory, args.target,
                                report=lambda line: print(line, flush=True),
                                report_every=0 if args.quiet else args.every)
    except (ConfigError, WalkerError, UnknownElementError, FileNotFoundError, ValueError) as exc:
        print(f"almd md: error: {exc}", flush=True)
        return 2
    scores = [r.score for r in records if r.score is not None]
    print(json.dumps({"md_steps": len(records), "model": model.source, "target_eV_A": args.target or model.target,
                      "mean_uncertainty_eV_A": sum(scores) / len(scores) if scores else None,
                      "max_uncertainty_eV_A": max(scores) if scores else None,
                      "stopped_at_step": blown.step if blown else None,
                      "mean_temperature_K": sum(r.temperature for r in records) / len(records) if records else math.nan},
                     indent=1))
    return EXIT_BLOWN_UP if blown is not None else 0


def _checked(args: argparse.Namespace) -> tuple[WalkerSettings, Atoms]:
    """Every setting checked, and the structure read, before a model is loaded or a file made."""
    from ase.io import read

    from almd.settings import ConfigError

    for key, value, ok in (("--steps", args.steps, args.steps >= 1), ("--every", args.every, args.every >= 1),
                           ("--uncertainty-every", args.uncertainty_every, args.uncertainty_every >= 1)):
        if not ok:
            raise ConfigError(f"{key} = {value}: must be >= 1")
    if args.target is not None and not args.target > 0:
        raise ConfigError(f"--target = {args.target}: must be > 0 eV/Å")
    settings = WalkerSettings(dynamics=args.dynamics, temperature=args.temperature, timestep=args.timestep,
                              pressure=args.pressure, seed=args.seed, max_force=args.max_force, keep=1)
    if not Path(args.structure).is_file():
        raise ConfigError(f"STRUCTURE {args.structure}: no such file")
    try:
        atoms = read(args.structure)
    except Exception as exc:  # ASE raises many kinds for an unreadable file
        raise ConfigError(f"STRUCTURE {args.structure}: ASE cannot read it ({type(exc).__name__}: {exc})") from exc
    if settings.dynamics == "npt" and not (atoms.pbc.all() and not atoms.constraints):
        raise ConfigError(f"--dynamics npt: STRUCTURE {args.structure} must be periodic in all three directions "
                          f"with no constraints (pbc = {atoms.pbc.tolist()})")
    if args.trajectory and not Path(args.trajectory).resolve().parent.is_dir():
        raise ConfigError(f"--trajectory {args.trajectory}: its folder does not exist")
    return settings, atoms
