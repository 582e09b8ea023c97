"""A long campaign with a failing reference and three SIGKILLs, against the same campaign uninterrupted.

The campaign of ``bench_soak.py`` (8-atom Si, SevenNet-0 ensemble, Langevin at 600 K,
target 0.05 eV/Å) with :class:`flaky_reference.FlakySW` as the reference: one frame in
five fails its first attempt (retried), one in ten returns NaN forces (recorded as
failed). It runs twice as ``almd run`` subprocesses: once straight through, once killed
with SIGKILL at 25 %, 50 % and 75 % of its steps and started again each time. Printed:
whether both complete, and whether their labels (content hash and status), their calls
by purpose, their failures and their final walker state agree.

    python benchmarks/bench_soak_faults.py [--steps 10000] [--out bench-out/soak-faults]
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def campaign_file(folder: Path, steps: int) -> Path:
    markers = folder / "markers"
    markers.mkdir(parents=True, exist_ok=True)
    path = folder / "campaign.toml"
    path.write_text(f"""[system]
structure = "si"
supercell = [1, 1, 1]
[md]
temperature = 600
seed = 0
[trigger]
target = 0.05
[learning]
test_frames = 0
[reference]
calculator = "flaky_reference:FlakySW"
retries = 1
options = {{ marker_dir = "{markers}" }}
[run]
steps = {steps}
output = "{folder / 'run'}"
progress = false
checkpoint_every = 500
""")
    return path


def start(toml: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(HERE) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return subprocess.Popen([sys.executable, "-m", "almd.cli", "run", str(toml)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def logged(run: Path) -> int:
    try:
        with open(run / "steps.csv") as fh:
            return sum(1 for _ in csv.DictReader(fh))
    except FileNotFoundError:
        return 0


def outcome(run: Path) -> dict:
    """What the two runs must share. Labels by structure (the content hash also holds the
    reference's settings, and each run has its own ``marker_dir``), with their purpose, step,
    status and attempts.
    """
    import ase.db

    from almd.structures import structure_hash

    rows = sorted((structure_hash(r.toatoms()), r.get("source"), r.get("step"), r.status, r.get("attempts"))
                  for r in ase.db.connect(run / "labels.db").select())
    summary = json.loads((run / "summary.json").read_text())
    return {"labels": rows, "calls": summary["oracle_calls"], "failures": summary["oracle_failures"],
            "walker": json.loads((run / "walker-0.json").read_text()), "converged_at": summary["converged_at_step"]}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=10000)
    p.add_argument("--out", default="bench-out/soak-faults")
    p.add_argument("--compare-only", action="store_true", help="compare the two runs already in --out")
    args = p.parse_args(argv)
    out = Path(args.out).resolve()
    report = {"steps": args.steps}
    if not args.compare_only:
        shutil.rmtree(out, ignore_errors=True)
        report.update(run_both(out, args.steps))
    report.update(compare(out))
    print(json.dumps(report, indent=1))
    (out / "soak-faults.json").write_text(json.dumps(report, indent=1))
    return 0 if all(report[k] for k in ("labels_equal", "calls_equal", "failures_equal", "walker_equal")) else 1


def run_both(out: Path, steps: int) -> dict:
    """The straight run, then the run killed three times and resumed; their wall times."""
    report = {}

    t0 = time.perf_counter()
    straight = start(campaign_file(out / "straight", steps))
    assert straight.wait() == 0, straight.stderr.read()
    report["straight_s"] = round(time.perf_counter() - t0, 1)

    toml = campaign_file(out / "killed", steps)
    run = out / "killed" / "run"
    t0, kills = time.perf_counter(), []
    for fraction in (0.25, 0.5, 0.75):
        proc = start(toml)
        while logged(run) < fraction * steps:
            if proc.poll() is not None:
                raise RuntimeError(f"the campaign ended before {fraction:.0%}: {proc.stderr.read()[-2000:]}")
            time.sleep(0.1)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        kills.append(logged(run))
    proc = start(toml)
    assert proc.wait() == 0, proc.stderr.read()
    report["killed_s"] = round(time.perf_counter() - t0, 1)
    report["killed_at_logged_rows"] = kills
    return report


def compare(out: Path) -> dict:
    a, b = outcome(out / "straight" / "run"), outcome(out / "killed" / "run")
    return {
        "labels": len(a["labels"]), "failed_labels": sum(r[3] == "failed" for r in a["labels"]),
        "retried_labels": sum((r[4] or 1) > 1 for r in a["labels"]),
        "calls": a["calls"], "failures": a["failures"], "converged_at_step": a["converged_at"],
        "labels_equal": a["labels"] == b["labels"], "calls_equal": a["calls"] == b["calls"],
        "failures_equal": a["failures"] == b["failures"], "walker_equal": a["walker"] == b["walker"]}


if __name__ == "__main__":
    sys.exit(main())
