"""Trigger policies side by side: held-out force error against reference calls.

Every policy drives the same campaign: 64-atom Si, a SevenNet-0 ensemble of 4
heads, Stillinger–Weber as the reference, Langevin MD from the same start with
the same seed, the heads refitted after every label. The backbone fine-tune is
off, so the only difference between the rows is which frames are sent to the
reference, and when.

Policies (all on the same calibrated per-frame score, RMS over atoms, eV/Å):

  almd            the campaign's trigger as shipped: target, trajectory average,
                  history threshold, audits, convergence then production
  per-frame       a fixed threshold on each frame (FLARE; VASP ML_ICRITERIA = 0)
                  — the baseline the target is stated against
  vasp-adaptive   the threshold moves to the history mean × (1 + c_x) while the
                  history is stable (VASP ML_ICRITERIA = 1)
  aims-pax        every 25 steps the threshold becomes the mean of the last 400
                  scores × (1 + c_x)
  every-n         every n-th step, n = steps / budget
  random          each step with probability budget / steps

With ``--finetune N`` the campaign's fine-tune rounds are on (its [finetune]
defaults, a round after every N training labels) and only the final model's
held-out error is reported. With ``--model lattice-dynamics`` the campaign learns
the Bayesian lattice-dynamics model instead (``examples/campaigns/si_lattice_dynamics.toml``'s
cutoffs and bootstrap, convergence by the sub-block test at ``--subblock-target``),
and the final model's held-out error is reported likewise. Otherwise the curve of a run is rebuilt afterwards: its training labels are fitted again
one by one, in the order the run made them (the run's own heads after each
call), and scored on held-out frames it never saw: FLARE's 300 K frames
(``../shared/peers/flare/heldout_sw_300K.xyz``) and frames of an independent
Stillinger–Weber run at the top temperature (made here, seeded). Target:
almd reaches the per-frame policy's final held-out error with at most half its
calls (the printed ratio). With ``--flare PYTHON`` (FLARE built with
``../shared/peers/flare/build.sh``), FLARE's own OTF runs on the same system
(``otf_si.py`` at 300 K; with ``--ramp``, ``benchmarks/flare_ramp.py``: the same
settings on the same ramp) and its calls and held-out errors are printed beside them.

    python benchmarks/bench_policies.py [--steps 300] [--top 900] [--ramp 0] [--budget 20]
        [--policies almd,per-frame,...] [--uncertainty-every 2] [--finetune 0] [--flare DIR/venv/bin/python]
        [--model ensemble|lattice-dynamics] [--subblock-target 0.01]
        [--out bench-out/policies]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

from almd.campaign.config import CampaignConfig
from almd.campaign.loop import Campaign
from almd.campaign.trigger import Action, Trigger

ROOT = Path(__file__).resolve().parents[1]
FLARE_DIR = ROOT.parent / "shared" / "peers" / "flare"
POLICIES = ("almd", "per-frame", "vasp-adaptive", "aims-pax", "every-n", "random")
NEVER = {"target": None, "abs_cap": None, "adaptive": False, "rel_factor": 1e6, "audit_every": 0}


class AimsPaxTrigger(Trigger):
    """aims-PAX: every 25 steps, threshold = mean of the last 400 scores × (1 + c_x); no stability test."""

    def _adapt_threshold(self, step: int, score: float) -> None:
        self._adapt.append(score)
        self._asteps.append(step)
        if step % 25 == 0:
            recent = list(self._adapt)[-400:]
            self._threshold = float(np.mean(recent)) * (1.0 + self.settings.adaptive_cx)


class RandomTrigger(Trigger):
    """A call at each scored step with probability ``p`` (seeded), ``min_spacing`` apart."""

    p = 0.0
    rng = np.random.default_rng(0)

    def update(self, step: int, score: float):
        decision = super().update(step, score)
        spaced = self._last_call is None or step - self._last_call >= self.settings.min_spacing
        if decision.action is Action.NONE and spaced and self.rng.random() < self.p:
            self._register_call(step)
            return replace(decision, action=Action.LABEL, reasons=("random",))
        return decision


def policy_trigger(name: str, args: argparse.Namespace) -> tuple[dict, type[Trigger]]:
    """Trigger settings and class of a policy."""
    every = max(1, args.steps // args.budget)
    return {
        "almd": ({"target": args.target}, Trigger),
        "per-frame": ({**NEVER, "abs_cap": args.target}, Trigger),
        "vasp-adaptive": ({**NEVER, "abs_cap": args.target, "adaptive": True, "adaptive_history": 50}, Trigger),
        "aims-pax": ({**NEVER, "abs_cap": args.target, "adaptive": True, "adaptive_history": 400}, AimsPaxTrigger),
        "every-n": ({**NEVER, "abs_cap": 1e-9, "min_spacing": every}, Trigger),
        "random": ({**NEVER, "min_spacing": 2}, RandomTrigger),
    }[name]


def campaign_config(name: str, args: argparse.Namespace, out: Path) -> CampaignConfig:
    """The shared campaign with the policy's trigger settings (through the dataclass: TOML cannot spell None)."""
    from almd.campaign.trigger import TriggerSettings

    trigger, _ = policy_trigger(name, args)
    md = {"temperature": 300.0, "seed": args.seed}
    if args.ramp:
        md["schedule"] = [[args.ramp, 300.0, float(args.top)]]
    model: dict = {"uncertainty_every": args.uncertainty_every}
    learning: dict = {"phonons": False, "test_frames": 0}
    if args.model == "lattice-dynamics":  # the example file's model and bootstrap
        example = CampaignConfig.from_toml(ROOT / "examples" / "campaigns" / "si_lattice_dynamics.toml")
        model = {**example.to_dict()["model"], "uncertainty_every": 1}
        learning = {**example.to_dict()["learning"], "test_frames": 0}
        if trigger.get("target") is not None:  # the fixed-threshold policies have no convergence test
            trigger = {**trigger, "subblock_target": args.subblock_target}
    cfg = CampaignConfig.from_dict({
        "system": {"structure": "si", "supercell": [2, 2, 2]}, "md": md, "model": model,
        "learning": learning, "finetune": {"every": 0 if args.model == "lattice-dynamics" else args.finetune},
        "run": {"steps": args.steps, "output": str(out), "progress": False, "checkpoint_every": args.steps}})
    return replace(cfg, trigger=TriggerSettings(**trigger))


def heldout_sets(args: argparse.Namespace, out: Path) -> dict[str, list]:
    """FLARE's 300 K frames and seeded Stillinger–Weber frames at the top temperature."""
    from ase.build import bulk
    from ase.io import read, write
    from ase.md.langevin import Langevin
    from ase.md.velocitydistribution import MaxwellBoltzmannDistribution
    from ase.units import fs

    from almd.references import build_calculator

    sets = {"300K": read(FLARE_DIR / "heldout_sw_300K.xyz", index=":")}
    path = out / f"heldout_sw_{args.top}K.xyz"
    if not path.exists():
        atoms = bulk("Si", "diamond", a=5.431, cubic=True).repeat(2)
        rng = np.random.default_rng(12345)
        atoms.calc = build_calculator("stillinger-weber-si")
        MaxwellBoltzmannDistribution(atoms, temperature_K=args.top, rng=rng)
        dyn = Langevin(atoms, 1 * fs, temperature_K=args.top, friction=0.01 / fs, rng=rng)
        frames = []
        for i in range(1500):
            dyn.run(1)
            if i >= 500 and i % 100 == 0:
                frame = atoms.copy()
                frame.calc = build_calculator("stillinger-weber-si")
                frame.get_forces()
                frames.append(frame)
        write(path, frames)
    sets[f"{args.top}K"] = read(path, index=":")
    return sets


def rmse(ensemble, frames) -> float:
    errors = [f.get_forces() - ensemble.predict(f)["forces"] for f in frames]
    return float(np.sqrt(np.mean(np.concatenate(errors) ** 2)))


def learning_curve(run_dir: Path, sets: dict[str, list], points: int) -> list[dict]:
    """Held-out errors after each of (up to ``points``) calls, from the run's labels in order."""
    from almd.labels.database import LabelDatabase
    from almd.uncertainty import Ensemble

    db = LabelDatabase(run_dir / "labels.db")
    rows = sorted(db.rows(status="ok", split="train"), key=lambda r: r.id)
    boot = [db.row_to_atoms(r) for r in rows if r.get("source") == "initial"]
    later = [(r, db.row_to_atoms(r)) for r in rows if r.get("source") != "initial"]
    calls = sorted(r.id for r in db.rows() if r.get("source") not in ("initial", "phonon", "test"))
    ens = Ensemble("sevennet-0", k=4, seed=0, score="rms")
    ens.fit(boot, append=False)
    keep = set(np.unique(np.linspace(0, len(later), min(points, len(later) + 1)).round().astype(int)))
    curve = []
    for i in range(len(later) + 1):
        if i > 0:
            ens.fit([later[i - 1][1]], append=True)
        if i in keep:
            made = sum(c <= later[i - 1][0].id for c in calls) if i > 0 else 0
            curve.append({"calls": made, **{name: rmse(ens, frames) for name, frames in sets.items()}})
    return curve


def run_policy(name: str, args: argparse.Namespace, sets: dict[str, list]) -> dict:
    kind = "" if args.model == "ensemble" else f"-{args.model}"
    out = Path(args.out) / f"{name}{kind}-{'ramp' if args.ramp else '300K'}"
    if out.exists():
        import shutil

        shutil.rmtree(out)
    settings, trigger_cls = policy_trigger(name, args)
    if trigger_cls is RandomTrigger:
        RandomTrigger.p, RandomTrigger.rng = args.budget / args.steps, np.random.default_rng(args.seed)

    class PolicyCampaign(Campaign):
        def _trigger(self, k: int) -> Trigger:
            cfg = self.config
            return trigger_cls(cfg.trigger.for_run(cfg.run.steps, scored_every=cfg.model.uncertainty_every),
                               stationary_from=cfg.md.schedule_steps)

    t0 = time.perf_counter()
    result = PolicyCampaign(campaign_config(name, args, out)).run()
    wall = time.perf_counter() - t0
    summary = json.loads((out / "summary.json").read_text())
    calls = summary["oracle_calls"]
    made = calls["total"] - calls["bootstrap"]
    if args.finetune or args.model != "ensemble":  # the run's own final model, no curve rebuilt on SevenNet-0
        from almd.campaign.bootstrap import load_model

        state = json.loads((out / "campaign.json").read_text())
        final = load_model(campaign_config(name, args, out), out / state["ensemble"])
        curve = [{"calls": made, **{key: rmse(final, frames) for key, frames in sets.items()}}]
        name = f"{name}+{args.model}" if args.model != "ensemble" else f"{name}+finetune"
    else:
        curve = learning_curve(out, sets, args.points)
    return {"policy": name, "calls": made, "converged": result.converged, "wall_s": round(wall, 1),
            "final": curve[-1], "curve": curve}


def calls_to_reach(curve: list[dict], error: float, key: str) -> int | None:
    for point in curve:
        if point[key] <= error:
            return point["calls"]
    return None


def run_flare(python: str, args: argparse.Namespace) -> dict | None:
    """FLARE's OTF on the same system: its own script at 300 K, ``flare_ramp.py`` on a ramp."""
    work = (Path(args.out) / ("flare-ramp" if args.ramp else "flare")).resolve()
    work.mkdir(parents=True, exist_ok=True)
    if args.ramp:
        top = Path(args.out).resolve() / f"heldout_sw_{args.top}K.xyz"
        command = [python, str(ROOT / "benchmarks" / "flare_ramp.py"), "--steps", str(args.steps),
                   "--ramp", str(args.ramp), "--top", str(args.top),
                   "--heldout", f"300K={FLARE_DIR / 'heldout_sw_300K.xyz'}", "--heldout", f"{args.top}K={top}"]
    else:
        command = [python, str(FLARE_DIR / "otf_si.py"), "--steps", str(args.steps), "--name", "si"]
    t0 = time.perf_counter()
    done = subprocess.run(command, cwd=work, capture_output=True, text=True)
    line = [ln for ln in done.stdout.splitlines() if ln.startswith("RESULT ")]
    if done.returncode != 0 or not line:
        print(f"FLARE failed (rc {done.returncode}): {done.stderr[-500:]}")
        return None
    res = json.loads(line[0][len("RESULT "):])
    final = {"calls": res["dft_calls"], "300K": res.get("300K", res.get("force_rmse_eV_A"))}
    if f"{args.top}K" in res:
        final[f"{args.top}K"] = res[f"{args.top}K"]
    return {"policy": "FLARE (its OTF)", "calls": res["dft_calls"], "wall_s": round(time.perf_counter() - t0, 1),
            "final": final}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--top", type=int, default=900, help="top temperature (K) of the ramp and of the held-out frames")
    p.add_argument("--ramp", type=int, default=0, help="MD steps of a 300 K → --top ramp (0: 300 K throughout)")
    p.add_argument("--budget", type=int, default=20, help="calls of every-n and random")
    p.add_argument("--target", type=float, default=0.015,
                   help="almd's target = the fixed policies' threshold (eV/Å); below the bootstrap model's 300 K error")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--points", type=int, default=12, help="points per learning curve")
    p.add_argument("--policies", default=",".join(POLICIES))
    p.add_argument("--uncertainty-every", type=int, default=2,
                   help="the member spread (the score) on every n-th step (the campaign's default: 2)")
    p.add_argument("--finetune", type=int, default=0,
                   help="the campaign's fine-tune round after every N training labels (0: off, the heads alone); "
                        "then only the final model's error is reported")
    p.add_argument("--model", default="ensemble", choices=("ensemble", "lattice-dynamics"),
                   help="the campaign's model kind ([model] kind)")
    p.add_argument("--subblock-target", type=float, default=0.01,
                   help="lattice-dynamics: the sub-block error (eV/Å) convergence needs")
    p.add_argument("--flare", help="FLARE's python (build.sh DIR → DIR/venv/bin/python); skipped without it")
    p.add_argument("--out", default="bench-out/policies")
    args = p.parse_args(argv)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    sets = heldout_sets(args, Path(args.out))
    rows = [run_policy(name, args, sets) for name in args.policies.split(",")]
    if args.flare:
        flare = run_flare(args.flare, args)
        if flare:
            rows.append(flare)
    else:
        print("FLARE: skipped (give --flare DIR/venv/bin/python after ../shared/peers/flare/build.sh DIR)")
    key = "300K" if not args.ramp else f"{args.top}K"
    print(f"\n{'policy':16s} {'calls':>5s} {'300K RMSE':>10s} {args.top:>6d}K RMSE {'wall s':>7s}")
    for r in rows:
        f = r["final"]
        top = f.get(f"{args.top}K")
        print(f"{r['policy']:16s} {r['calls']:5d} {f['300K']:10.4f} {top if top is None else round(top, 4)!s:>12s} "
              f"{r['wall_s']:7.1f}")
    by = {r["policy"]: r for r in rows}
    if "almd" in by and "per-frame" in by:
        goal = by["per-frame"]["final"][key]
        need = calls_to_reach(by["almd"]["curve"], goal, key)
        ratio = None if need is None or not by["per-frame"]["calls"] else need / by["per-frame"]["calls"]
        print(f"\nalmd reaches per-frame's final {key} error ({goal:.4f} eV/Å, {by['per-frame']['calls']} calls) "
              f"with {need} calls: ratio {ratio} (target <= 0.5)")
    (Path(args.out) / f"results-{'ramp' if args.ramp else '300K'}.json").write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
