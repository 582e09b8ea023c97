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
    p.add_argument("config", help="TOML file ([model], [data], [loss], [optim], [run])")
    p.add_argument("--resume", action="store_true", help="continue from <output>/checkpoint.pt")
    p.add_argument("--steps", type=int, help="override run.steps")
    p.add_argument("--output", help="override run.output")
    args = p.parse_args(argv)
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
