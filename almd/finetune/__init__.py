"""Fine-tuning: PFT (phonon fine-tuning, stochastic Hessian columns) and parameter-efficient variants.

    from almd.finetune import FinetuneConfig, Finetuner
    cfg = FinetuneConfig.from_toml("finetune.toml")
    result = Finetuner(cfg).fit()          # writes <run.output>/model.pt, log.csv, log.json, checkpoint.pt
    almd.Calculator(model=result.model_path)

Command line (once almd.cli dispatches it): ``almd finetune CONFIG.toml [--resume] [--steps N] [--output DIR]``.
A minimal TOML::

    [model]
    name = "sevennet-0"
    strategy = "full"        # full | lora | delta | freeze | scratch
    [data]
    phonon = ["path/to/phono3py_disp.yaml"]   # perfect supercell + DFT Hessian
    efs = ["path/to/phono3py_disp.yaml"]      # its displaced supercells with DFT forces
    replay = "self"                           # co-training on self-distilled structures
    [run]
    steps = 200
"""

from __future__ import annotations

import argparse
import dataclasses

from almd.config import ConfigError
from almd.finetune.config import (
    DataConfig,
    FinetuneConfig,
    LossConfig,
    ModelConfig,
    OptimConfig,
    RunConfig,
)
from almd.finetune.data import DataError, Sample, sample_from_atoms
from almd.finetune.trainer import EMA, FinetuneResult, Finetuner


def finetune(config: FinetuneConfig | str, resume: bool = False, **overrides) -> FinetuneResult:
    """Run a fine-tuning from a config (object or TOML path); ``overrides`` go to :class:`Finetuner`."""
    cfg = FinetuneConfig.from_toml(config) if isinstance(config, str) else config
    return Finetuner(cfg, **overrides).fit(resume=resume)


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


__all__ = [
    "ConfigError", "DataConfig", "DataError", "EMA", "FinetuneConfig", "FinetuneResult", "Finetuner",
    "LossConfig", "ModelConfig", "OptimConfig", "RunConfig", "Sample", "finetune", "main", "sample_from_atoms",
]
