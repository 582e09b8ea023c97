"""What a run says about itself: ``OUTPUT/summary.json``, rebuilt from the run directory alone.

Everything comes from the files a campaign writes: ``steps.csv`` (one row per MD
step), ``labels.db`` (every reference calculation, with its provenance) and
``campaign.json`` (the checkpoint: counters, fine-tune rounds, wall times and the
held-out errors measured at the end of the run), so the summary of a finished
run directory can be made again anywhere, without its models.
"""

from __future__ import annotations

import csv
import json
from collections import Counter
from pathlib import Path
from typing import Any

from almd.campaign.state import read_checkpoint
from almd.io import atomic_write

__all__ = ["PURPOSES", "STAGES", "main", "summarise", "write_summary"]

#: the stages whose wall time a campaign records (s): MD steps with their uncertainty,
#: reference calculations, model refits, backbone fine-tunes, phonons, the lattice-dynamics sub-block test
STAGES = ("md_and_uncertainty", "reference", "refit", "finetune", "phonons", "subblock_test")
#: what each reference calculation was for (the ``source`` of its row; trigger calls name their criteria)
PURPOSES = ("bootstrap", "phonon", "trigger", "brake", "audit", "test")


def _oracle_calls(database: Path) -> tuple[dict[str, int], int]:
    """Reference calculations by purpose, and how many failed (from the label database)."""
    import ase.db

    kinds: Counter[str] = Counter()
    failures = 0
    with ase.db.connect(database) as db:
        for row in db.select():
            source = row.get("source", "")
            kinds["bootstrap" if source == "initial" else source if source in PURPOSES else "trigger"] += 1
            failures += row.get("status") == "failed"
    return {"total": sum(kinds.values()), **{k: kinds.get(k, 0) for k in PURPOSES}}, failures


def summarise(run_dir: str | Path) -> dict[str, Any]:
    """The summary of a campaign's run directory (see the module docstring)."""
    run_dir = Path(run_dir)
    state = read_checkpoint(run_dir)
    with open(run_dir / "steps.csv", newline="") as fh:
        steps = [r for r in csv.DictReader(fh) if r["action"] != "brake"]
    calling = sum(r["action"] != "none" for r in steps)
    calls, failures = _oracle_calls(run_dir / "labels.db")
    heldout = state.get("heldout", {})
    at = state.get("converged_at_step")
    after = [r for r in steps if at is not None and int(r["step"]) > int(at)]
    audits = [a for t in state.get("triggers", {}).values() for a in t.get("audits", [])]
    phonons = state.get("phonons", {})
    # the last sub-block test of each walker (lattice-dynamics): [error eV/Å, the call count it was made at]
    subblock = {k: t["subblock"][0] for k, t in state.get("triggers", {}).items() if t.get("subblock")}
    return {
        "model": state.get("config", {}).get("model", {}).get("kind", "ensemble"),
        "md_steps": len(steps),
        "walkers": len(state.get("steps", {})),
        "oracle_calls": calls,
        "oracle_failures": failures,
        "finetunes": len(state.get("finetunes", [])),
        "converged": bool(state.get("converged", False)),
        "converged_at_step": state.get("converged_at_step"),
        "fraction_steps_without_oracle": (1 - calling / len(steps)) if steps else None,
        "fraction_steps_without_oracle_after_convergence":
            (1 - sum(r["action"] != "none" for r in after) / len(after)) if after else None,
        "trigger_calls_after_convergence": sum(r["action"] in ("label", "brake") for r in after),
        "audits": {"made": len(audits), "failed": sum(not a["passed"] for a in audits)},
        "subblock_error_eV_A": subblock or None,
        "heldout_set": heldout.get("set"),
        "heldout_frames": heldout.get("frames"),
        "heldout_force_rmse_eV_A": heldout.get("final"),
        "heldout_force_rmse_base_eV_A": heldout.get("base"),
        "phonon_errors": {"base": phonons.get("base"), "final": phonons.get("final"),
                          "units": "K, kJ/mol, J/K/mol per mole of primitive cells; THz"} if phonons else None,
        "wall_time_s": {stage: round(float(state.get("timings", {}).get(stage, 0.0)), 3) for stage in STAGES},
    }


def write_summary(run_dir: str | Path) -> dict[str, Any]:
    """Write ``summary.json`` into ``run_dir`` (atomically) and return it."""
    summary = summarise(run_dir)
    atomic_write(Path(run_dir) / "summary.json", json.dumps(summary, indent=1))
    return summary


def main(argv: list[str]) -> int:
    """Entry point of ``almd report RUN_DIR``: rebuild and print ``summary.json``, redraw the plots
    (:mod:`almd.campaign.plots`).
    """
    import argparse

    p = argparse.ArgumentParser(prog="almd report", description="Rebuild a campaign's summary.json from its run directory.")
    p.add_argument("run_dir", type=Path, help="the folder a campaign wrote (its run.output)")
    args = p.parse_args(argv)
    for name in ("campaign.json", "steps.csv", "labels.db"):
        if not (args.run_dir / name).is_file():
            print(f"almd report: error: {args.run_dir / name} not found; give the folder a campaign wrote")
            return 2
    from almd.campaign.plots import plot_run

    print(json.dumps(write_summary(args.run_dir), indent=1))
    plot_run(args.run_dir)
    return 0
