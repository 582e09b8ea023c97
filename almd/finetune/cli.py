"""``almd finetune CONFIG.toml``: a thin layer over :class:`~almd.finetune.trainer.Finetuner`."""

from __future__ import annotations

import argparse
import dataclasses

from almd.finetune.config import FinetuneConfig
from almd.finetune.data import DataError
from almd.finetune.trainer import Finetuner
from almd.settings import ConfigError

__all__ = ["main"]


def main(argv: list[str]) -> int:
    """Entry point of ``almd finetune``."""
    p = argparse.ArgumentParser(prog="almd finetune", description="Fine-tune a potential (PFT, LoRA, delta).")
    p.add_argument("config", nargs="?", help="TOML file ([model], [data], [loss], [optim], [run])")
    p.add_argument("--resume", action="store_true", help="continue from <output>/checkpoint.pt")
    p.add_argument("--steps", type=int, help="override run.steps")
    p.add_argument("--output", help="override run.output")
    p.add_argument("--phonon", metavar="DATASET",
                   help="the default phonon recipe (almd/data/phonon_recipe.toml) on one phonopy / phono3py "
                        "data set, instead of a TOML file; writes OUTPUT/phonon_report.json (before / after)")
    p.add_argument("--budget", type=float, default=15.0, help="--phonon: minutes of training (default 15)")
    p.add_argument("--kappa", type=int, nargs=3, metavar="N",
                   help="--phonon on a phono3py data set: also κ(300 K) on this q-mesh (e.g. 11 11 11) of the "
                        "data, the base and the fine-tuned model")
    p.add_argument("--seed", type=int, help="--phonon: the seed of the column draws (default: the recipe's, 0)")
    p.add_argument("--fold", default="auto",
                   help="--phonon: fold the labels onto a smaller supercell: auto (halve even directions), "
                        "none, or n1,n2,n3")
    args = p.parse_args(argv)
    if (args.config is None) == (args.phonon is None):
        p.error("give a TOML file or --phonon DATASET (one of the two)")
    if args.phonon is not None:
        return _phonon_recipe(args)
    try:
        cfg = FinetuneConfig.from_toml(args.config)
        if args.steps is not None or args.output is not None:
            run = dataclasses.replace(cfg.run, **{k: v for k, v in (("steps", args.steps), ("output", args.output))
                                                  if v is not None})
            cfg = dataclasses.replace(cfg, run=run)
            cfg.validate()
        result = Finetuner(cfg).fit(resume=args.resume)
    except (ConfigError, DataError, FileNotFoundError) as exc:
        print(f"almd finetune: error: {exc}")
        return 2
    v0, v1 = result.initial_validation, result.best_validation
    print(f"best step {result.best_step} of {result.steps_done}; validation loss {v0.get('val_loss', float('nan')):.4g}"
          f" -> {v1.get('val_loss', float('nan')):.4g}; model: {result.model_path}")
    return 0


def _phonon_recipe(args: argparse.Namespace) -> int:
    from almd.finetune.recipe import METRICS, run_phonon_recipe

    fold = args.fold
    if fold not in ("auto", "none"):
        try:
            fold = [int(n) for n in fold.split(",")]
        except ValueError:
            print(f"almd finetune: error: --fold = {args.fold!r} is not allowed; auto, none or n1,n2,n3")
            return 2
    try:
        report = run_phonon_recipe(args.phonon, 60.0 * args.budget, args.output or "finetune-phonon", fold,
                                   steps=args.steps, kappa_mesh=args.kappa,
                                   seed=args.seed)
    except (ConfigError, DataError, FileNotFoundError, ValueError) as exc:
        print(f"almd finetune: error: {exc}")
        return 2
    print(f"{report['steps']} steps in {report['train_s']:.0f} s (fold {report['fold'] or 'none'}); "
          f"kept step {report['best_step']}; model: {report['model']}")
    print(f"{'error':24s} {'base':>10s} {'fine-tuned':>11s}")
    for key in METRICS:
        if key in report["base"]:
            print(f"{key:24s} {report['base'][key]:10.4g} {report['final'][key]:11.4g}")
    if "kappa_300K_W_mK" in report:
        k = report["kappa_300K_W_mK"]
        print(f"{'kappa_300K_W_mK':24s} {k['base']:10.4g} {k['final']:11.4g}   (data {k['data']:.4g})")
    return 0
