"""Fine-tuning: PFT (phonon fine-tuning, stochastic Hessian columns) and parameter-efficient variants.

    from almd.finetune import FinetuneConfig, Finetuner
    cfg = FinetuneConfig.from_toml("finetune.toml")
    result = Finetuner(cfg).fit()          # writes <run.output>/model.pt, log.csv, log.json, checkpoint.pt
    almd.Calculator(model=result.model_path)

Command line (:mod:`almd.finetune.cli`): ``almd finetune CONFIG.toml [--resume] [--steps N] [--output DIR]``.
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

from almd.finetune.cli import main
from almd.finetune.config import (
    DataConfig,
    FinetuneConfig,
    LossConfig,
    ModelConfig,
    OptimConfig,
    RunConfig,
)
from almd.finetune.data import DataError, Sample, sample_from_atoms
from almd.finetune.trainer import EMA, Finetuner, FinetuneResult
from almd.settings import ConfigError


def finetune(config: FinetuneConfig | str, resume: bool = False, **overrides) -> FinetuneResult:
    """Run a fine-tuning from a config (object or TOML path); ``overrides`` go to :class:`Finetuner`."""
    cfg = FinetuneConfig.from_toml(config) if isinstance(config, str) else config
    return Finetuner(cfg, **overrides).fit(resume=resume)


__all__ = [
    "ConfigError", "DataConfig", "DataError", "EMA", "FinetuneConfig", "FinetuneResult", "Finetuner",
    "LossConfig", "ModelConfig", "OptimConfig", "RunConfig", "Sample", "finetune", "main", "sample_from_atoms",
]
