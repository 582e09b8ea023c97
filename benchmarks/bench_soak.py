"""A long campaign: does a converged run stay quiet, and do its step time and memory stay flat?

One walker of 8-atom Si (``--supercell 1``) or 64-atom Si, a SevenNet-0 ensemble,
Stillinger–Weber as the reference (cheap, so the run measures almd, not the
reference), Langevin at ``--temperature``, ``--steps`` MD steps with the
campaign's own trigger (target ``--target`` eV/Å). Every lockstep round is
timed and the process's resident memory (``/proc/self/statm``) sampled.

Printed: the convergence step, ``fraction_steps_without_oracle`` (target ≥
0.995), and the time per MD step and the resident memory in the last 10 % of the
steps against the first 10 % after convergence (target: within 20 %; the ratio is
last / first), the median step time of each tenth of the run, and how much of it is
spent in the walkers' calculator (the model). Figures go to ``OUT/soak.json``.

    OMP_NUM_THREADS=2 python benchmarks/bench_soak.py [--steps 10000] [--supercell 1] [--out bench-out/soak]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np

from almd.campaign.config import CampaignConfig
from almd.campaign.loop import Campaign


def resident_mib() -> float:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


class TimedCampaign(Campaign):
    """The campaign with each round's wall time, the part of it inside the walkers' calculator
    (the model: forces and spread) and the resident memory after it recorded.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.samples: list[tuple[int, float, float, float]] = []  # (step, s, MiB, calculator s)
        self._in_model = 0.0
        for walker in self.walkers.values():
            calculate = walker.calculator.calculate

            def timed(*a, _calculate=calculate, **k):
                t0 = time.perf_counter()
                try:
                    return _calculate(*a, **k)
                finally:
                    self._in_model += time.perf_counter() - t0

            walker.calculator.calculate = timed

    def _round(self):
        t0, self._in_model = time.perf_counter(), 0.0
        rows, busy = super()._round()
        if rows:
            self.samples.append((rows[0]["step"], time.perf_counter() - t0, resident_mib(), self._in_model))
        return rows, busy


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=10000)
    p.add_argument("--supercell", type=int, default=1)
    p.add_argument("--temperature", type=float, default=600.0)
    p.add_argument("--target", type=float, default=0.05)
    p.add_argument("--out", default="bench-out/soak")
    args = p.parse_args(argv)
    out = Path(args.out)
    shutil.rmtree(out / "run", ignore_errors=True)
    cfg = CampaignConfig.from_dict({
        "system": {"structure": "si", "supercell": [args.supercell] * 3},
        "md": {"temperature": args.temperature, "seed": 0},
        "trigger": {"target": args.target},
        "learning": {"test_frames": 0},
        "run": {"steps": args.steps, "output": str(out / "run"), "progress": False, "checkpoint_every": 500}})
    t0 = time.perf_counter()
    campaign = TimedCampaign(cfg)
    result = campaign.run()
    wall = time.perf_counter() - t0
    summary = json.loads((out / "run" / "summary.json").read_text())
    samples = np.array(campaign.samples)
    at = summary["converged_at_step"]
    tenth = max(1, args.steps // 10)
    report = {"steps": args.steps, "atoms": 8 * args.supercell**3, "wall_s": round(wall, 1),
              "converged_at_step": at, "oracle_calls": summary["oracle_calls"],
              "fraction_steps_without_oracle": summary["fraction_steps_without_oracle"],
              "fraction_after_convergence": summary["fraction_steps_without_oracle_after_convergence"]}
    if at is not None:
        after = samples[samples[:, 0] > at]
        first, last = after[:tenth], samples[-tenth:]
        # medians: a round with a reference call or a checkpoint is an outlier, not the step cost
        report.update({
            "step_s_first": float(np.median(first[:, 1])), "step_s_last": float(np.median(last[:, 1])),
            "rss_mib_first": float(np.median(first[:, 2])), "rss_mib_last": float(np.median(last[:, 2]))})
        report["step_time_ratio"] = report["step_s_last"] / report["step_s_first"]
        report["rss_ratio"] = report["rss_mib_last"] / report["rss_mib_first"]
        report["model_share_of_step"] = float(np.median(samples[:, 3] / samples[:, 1]))
    # the step time's course: is a change a trend of almd's or the machine's load?
    blocks = range(0, len(samples), tenth)
    report["step_s_by_tenth"] = [round(float(np.median(samples[i:i + tenth, 1])), 4) for i in blocks]
    report["model_s_by_tenth"] = [round(float(np.median(samples[i:i + tenth, 3])), 4) for i in blocks]
    print(json.dumps(report, indent=1))
    (out / "soak.json").write_text(json.dumps(report, indent=1))
    del result
    return 0


if __name__ == "__main__":
    sys.exit(main())
