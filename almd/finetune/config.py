"""The fine-tuning settings: settings classes (pydantic dataclasses, :mod:`almd.settings`), read from TOML.

An unknown key or a value of the wrong kind is an error that names the key,
the value and what is allowed, before anything is loaded or trained.
"""

from __future__ import annotations

from dataclasses import field

from almd.potentials.adapters import STRATEGIES
from almd.settings import OneOrMore, TomlSettings, bad, settings

__all__ = ["DataConfig", "FinetuneConfig", "LossConfig", "ModelConfig", "OptimConfig", "RunConfig"]


@settings
class ModelConfig:
    name: str = "sevennet-0"  #: pretrained name or model file (see almd.potentials.load)
    strategy: str = "full"  #: one of almd.potentials.adapters.STRATEGIES
    lora_rank: int = 4
    lora_alpha: float = 0.0  #: 0 means alpha = rank (scale 1)
    lora_radial: bool = True  #: also adapt the convolutions' radial MLPs
    freeze: OneOrMore[str] = field(default_factory=list)  #: layer groups kept fixed
    dtype: str = "float32"


@settings
class DataConfig:
    #: phonon data sets (phonopy/phono3py yaml or folder; or extxyz / ASE db frames with info['hessian'])
    phonon: OneOrMore[str] = field(default_factory=list)
    #: fold the phonopy data sets of ``phonon`` onto this supercell of their unit cell (3 ints,
    #: commensurate with the set's supercell): the model's Hessian of a small periodic cell
    #: against the folded DFT force constants. Empty: the data set's own supercell. Sets in
    #: ``validation`` are never folded: the model is judged on the data's own supercell
    phonon_fold: OneOrMore[int] = field(default_factory=list)
    #: energy/force/stress data (extxyz, ASE db, or a phonopy data set's displaced supercells)
    efs: OneOrMore[str] = field(default_factory=list)
    #: phono3py data sets whose displaced supercells become third-order samples (label
    #: Φ3·u of the data's force constants against the model's odd Hessian part); training
    #: steps then alternate between the phonon structures and these
    third_order: OneOrMore[str] = field(default_factory=list)
    validation: OneOrMore[str] = field(default_factory=list)  #: explicit validation files (else a split)
    validation_fraction: float = 0.1
    validation_columns: int = 3  #: fixed Hessian columns per validation phonon structure
    max_validation: int = 0  #: cap on validation EFS structures (0: no cap)
    replay: str = ""  #: "" (no co-training), "self" (self-distilled) or a labelled file
    replay_count: int = 16  #: self-distilled structures to generate
    replay_rattle: float = 0.03  #: Å, Gaussian displacement of self-distilled structures
    replay_strain: float = 0.01  #: max |ε| of their random symmetric strain
    fit_energy_shifts: bool = True
    #: add the fitted per-element energy shifts to the energies of a replay file (or of
    #: replay structures passed in): right when they were labelled by the base model, as
    #: PFT's co-training data are; false when they are at the fine-tuning data's reference
    #: already. Self-distilled replay is labelled by the shifted base and never shifted again.
    shift_replay: bool = True


@settings
class LossConfig:
    energy: float = -1.0  #: λ_E; negative means 0 with co-training and 20 without (PFT)
    forces: float = 20.0
    stress: float = 5.0
    hessian: float = 100.0
    #: λ_3 of the third-order term, the MAE of the odd Hessian part (H(x+u) − H(x−u))/2
    #: against Φ3·u. Negative: 100·λ_Φ, because that part is ~u·Φ3 and its gradient far
    #: smaller than a harmonic column's (the history of this default: benchmarks/RESULTS.md)
    third_order: float = -1.0
    replay_ratio: int = 4  #: replay steps after each phonon step (with replay data)
    huber_delta: float = 0.1
    replay_energy: float = 500.0
    replay_forces: float = 200.0
    replay_stress: float = 50.0


@settings
class OptimConfig:
    lr: float = 1e-4
    weight_decay: float = 1e-3
    clip: float = 100.0
    ema: float = 0.999  #: 0 disables the EMA (one update per step, after its replay batches)
    #: λ_Δ of the explicit penalty λ_Δ·‖Δω‖² (sum of squares over every Δω tensor) added to
    #: each fine-tuning batch's loss; strategy "delta" only. Negative: the default, 0.01 for
    #: "delta" (0 otherwise). AdamW's decoupled weight decay pulls Δω by only lr·wd per step,
    #: too little to make ω₀ + Δω train differently from full fine-tuning; the gradient
    #: 2λ_Δ·Δω of this term competes with the data's, so a weight settles where
    #: |∂L/∂ω| = 2λ_Δ|Δω| (the NaCl measurements behind 0.01: benchmarks/RESULTS.md).
    delta_l2: float = -1.0


@settings
class RunConfig:
    steps: int = 200  #: phonon (fine-tuning) steps
    batch_size: int = 1  #: phonon structures per step
    efs_batch: int = 1  #: EFS structures added to each fine-tuning step
    replay_batch: int = 1
    eval_every: int = 10
    patience: int = 5  #: evaluations without improvement before stopping (0: never stop)
    #: s of wall time for the fit (0: none); the run stops after the step that crosses it and is
    #: validated there. A budget makes the number of steps depend on the machine's speed.
    budget: float = 0.0
    checkpoint_every: int = 10
    seed: int = 0
    output: str = "finetune-out"
    threads: int = 0  #: torch threads (0: leave as is)
    progress: bool = True


@settings
class FinetuneConfig(TomlSettings):
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    run: RunConfig = field(default_factory=RunConfig)

    def validate(self) -> None:
        if self.model.strategy not in STRATEGIES:
            raise bad("model.strategy", self.model.strategy, f"allowed: {', '.join(STRATEGIES)}")
        if self.model.dtype not in ("float32", "float64"):
            raise bad("model.dtype", self.model.dtype, "allowed: float32, float64")
        if self.model.lora_rank < 1:
            raise bad("model.lora_rank", self.model.lora_rank, "must be >= 1")
        fold = self.data.phonon_fold
        if fold and (len(fold) != 3 or any(n < 1 for n in fold)):
            raise bad("data.phonon_fold", fold, "3 positive ints (a supercell of the data set's unit cell) "
                      "or [] for the data set's own supercell")
        if not 0.0 <= self.data.validation_fraction < 1.0:
            raise bad("data.validation_fraction", self.data.validation_fraction, "must be in [0, 1)")
        for key in ("forces", "stress", "hessian", "huber_delta", "replay_energy", "replay_forces", "replay_stress"):
            if getattr(self.loss, key) < 0:
                raise bad(f"loss.{key}", getattr(self.loss, key), "must be >= 0")
        if self.loss.replay_ratio < 0:
            raise bad("loss.replay_ratio", self.loss.replay_ratio, "must be >= 0")
        if self.optim.lr <= 0:
            raise bad("optim.lr", self.optim.lr, "must be > 0")
        if self.optim.delta_l2 > 0 and self.model.strategy != "delta":
            raise bad("optim.delta_l2", self.optim.delta_l2,
                      f"the Δω penalty needs model.strategy = 'delta' (here {self.model.strategy!r}); "
                      "allowed: unset (negative) or 0 for other strategies, >= 0 for 'delta'")
        if not 0.0 <= self.optim.ema < 1.0:
            raise bad("optim.ema", self.optim.ema, "must be in [0, 1)")
        if self.run.budget < 0:
            raise bad("run.budget", self.run.budget, "must be >= 0 (s; 0: no budget)")
        for key in ("steps", "batch_size", "eval_every", "checkpoint_every", "replay_batch"):
            if getattr(self.run, key) < 1:
                raise bad(f"run.{key}", getattr(self.run, key), "must be >= 1")

    @property
    def energy_weight(self) -> float:
        """λ_E as PFT sets it: 0 with co-training (replay), 20 without, unless given."""
        if self.loss.energy >= 0:
            return self.loss.energy
        return 0.0 if self.co_training else 20.0

    @property
    def third_order_weight(self) -> float:
        """λ_3: loss.third_order if given, else 100·λ_Φ."""
        return self.loss.third_order if self.loss.third_order >= 0 else 100.0 * self.loss.hessian

    @property
    def delta_l2_weight(self) -> float:
        """λ_Δ of the ‖Δω‖² penalty: optim.delta_l2 if given, else 0.01 for strategy "delta", 0 otherwise."""
        if self.optim.delta_l2 >= 0:
            return self.optim.delta_l2
        return 0.01 if self.model.strategy == "delta" else 0.0

    @property
    def co_training(self) -> bool:
        return bool(self.data.replay) and self.loss.replay_ratio > 0
