"""The campaign file (TOML) → typed, validated settings.

Each section is a settings class (:func:`almd.settings.settings`, a pydantic
dataclass): an unknown section or key, or a value of the wrong kind, is an error
that names the key, the value and what is allowed — before anything is loaded or
run; the range and cross-section checks follow in :meth:`CampaignConfig.validate`.
The MD and trigger sections are the walker's and the trigger's own settings
classes, so their checks (and their names) are the ones used here.

A minimal campaign::

    [system]
    structure = "si"            # a built-in crystal or any file ASE reads
    supercell = [2, 2, 2]
    [reference]
    calculator = "stillinger-weber-si"   # an oracle preset, "module:Class", or a table
    [md]
    temperature = 900
    [run]
    steps = 400
"""

from __future__ import annotations

import dataclasses
from dataclasses import field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from almd.campaign.trigger_settings import TriggerSettings
from almd.campaign.walker import WalkerSettings
from almd.settings import ConfigError, OneOrMore, TomlSettings, bad, read_section, settings

if TYPE_CHECKING:
    from ase import Atoms

__all__ = ["starting_structure", "unit_structure", "ideal_supercell", "builtin_campaign", "MODEL_KINDS",
    "BUILTIN_STRUCTURES", "CampaignConfig", "FINETUNE_STRATEGIES", "FinetuneSettings", "LearningConfig",
    "ModelConfig", "ReferenceConfig", "RunConfig", "SystemConfig",
]

BUILTIN_STRUCTURES = ("si",)
#: fine-tune strategies a campaign may use (almd.potentials.adapters.STRATEGIES without
#: "scratch": re-initialising the backbone every round would throw away what it learnt)
FINETUNE_STRATEGIES = ("lora", "delta", "full", "freeze")


@settings
class SystemConfig:
    structure: str = "si"  #: a built-in name (BUILTIN_STRUCTURES) or a structure file
    supercell: OneOrMore[int] = field(default_factory=lambda: [2, 2, 2])
    rattle: float = 0.0  #: Å, Gaussian displacement of the starting structure


#: the models a campaign can learn (see ModelConfig.kind)
MODEL_KINDS = ("ensemble", "lattice-dynamics")


@settings
class ModelConfig:
    #: "ensemble": heads on a fine-tuned backbone (almd.uncertainty.ensemble); "lattice-dynamics": the
    #: Bayesian force-constant expansion of the campaign's supercell (almd.uncertainty.lattice_dynamics)
    kind: str = "ensemble"
    #: pretrained name or model file (almd.potentials.load); with "lattice-dynamics" only the
    #: held-out comparison ("base") uses it
    backbone: str = "sevennet-0"
    members: int = 4  #: ensemble size K
    #: per-frame score over atoms: rms (default: the calibrated force RMSE a target is stated in) | mean | max
    score: str = "rms"
    uncertainty_every: int = 2  #: evaluate the member spread on every n-th MD step (the trigger scores those)
    dtype: str = "float32"
    #: lattice-dynamics: cluster cutoffs (Å) of orders 2, 3, … (hiphive's ClusterSpace)
    cutoffs: OneOrMore[float] = field(default_factory=lambda: [5.0, 4.0])
    #: lattice-dynamics: the larger supercell (repeats of the unit cell) whose MD, run with the model
    #: itself, gives the sub-block errors of the convergence test (trigger.subblock_target)
    subblock_supercell: OneOrMore[int] = field(default_factory=lambda: [3, 3, 3])
    subblock_steps: int = 200  #: MD steps of that test, at the walker's temperature (no reference call)
    subblock_frames: int = 8  #: frames of it whose sub-blocks are scored

    @property
    def lattice_dynamics(self) -> bool:
        """The campaign learns the lattice-dynamics model, not an ensemble."""
        return self.kind == "lattice-dynamics"

    @property
    def scored_every(self) -> int:
        """MD steps between two scores the trigger gets (the lattice-dynamics score costs nothing: every step)."""
        return 1 if self.lattice_dynamics else self.uncertainty_every


@settings
class ReferenceConfig:
    calculator: str = "stillinger-weber-si"  #: oracle preset or "module:Class"
    options: dict[str, Any] = field(default_factory=dict)  #: keyword arguments of the calculator
    timeout: float = 3600.0  #: s per attempt
    retries: int = 1
    #: OpenMP/BLAS threads of each calculation; an MPI code brings its own launcher in
    #: ``options.command`` (e.g. "mpirun -np 4 pw.x"), outside almd's communicator
    threads: int = 1


@settings
class LearningConfig:
    initial_labels: int = 4  #: training labels before MD: the start and rattled copies
    initial_calibration: int = 2  #: rattled copies labelled and held out for the calibration
    initial_rattle: float = 0.05  #: Å
    frames_per_call: int = 1  #: frames labelled per trigger call
    min_distance: float = 0.05  #: Å, frames closer than this to a chosen one are skipped
    validation_fraction: float = 0.25  #: labels held out for calibration
    phonons: bool = True  #: label phonopy's displacements of the start structure at bootstrap (PFT labels)
    phonon_distance: float = 0.01  #: Å, those displacements
    test_frames: int = 6  #: frames after the last step, labelled at the end and never learnt from (0: none)
    test_spacing: int = 10  #: MD steps between two of them


@settings
class RunConfig:
    steps: int = 200  #: MD steps per walker
    walkers: int = 1
    checkpoint_every: int = 50  #: steps
    output: str = "almd-run"
    progress: bool = True  #: a progress bar and the lines below; false for batch jobs
    progress_every: int = 50  #: MD steps between a walker's progress lines (0: none)
    trajectory_every: int = 10  #: steps between frames of OUTPUT/trajectory-<walker>.extxyz (0: none)


#: the fewest labels a bounded rebuild fits the heads on (fewer: bootstrap members alike, no spread)
MIN_RECENT_LABELS = 4


@settings
class FinetuneSettings:
    """The campaign's backbone fine-tune (almd.finetune) on its own labels; see almd.campaign.finetune_round."""

    every: int = 10  #: fine-tune after every N new training labels (0: never; the heads are still refitted)
    steps: int = 100  #: most fine-tune steps per round (warm-started from the last round's backbone)
    strategy: str = "lora"  #: lora | delta | full | freeze (as almd finetune's model.strategy)
    lr: float = 3e-3  #: LoRA's adapters start at zero: almd finetune's 1e-4 hardly moves them in a round
    freeze: OneOrMore[str] = field(default_factory=list)  #: layer groups kept fixed (strategy "freeze" needs some)
    eval_every: int = 10  #: steps between validations on the held-out labels (the best one is kept)
    patience: int = 3  #: validations without improvement before a round stops early (0: never)
    #: s of wall time per round's training (0: none). A round that reaches it ends there, so its
    #: step count, and the run after it, then depend on the machine's speed: no bit-for-bit resume
    budget: float = 0.0
    #: "self": co-train on structures labelled by the round's start model (against forgetting); as
    #: in PFT, the energy weight is then 0 unless an `almd finetune` file (config) sets loss.energy
    replay: str = ""
    #: a round's cost stays bounded as labels accumulate: the rebuilt heads are fitted on the newest N
    #: training labels, and the calibration and the round's validation use the newest N held-out ones
    #: (the backbone itself trains on every label: its cost per step does not grow); 0: all
    recent_labels: int = 32
    #: an `almd finetune` TOML whose [model] (LoRA rank, …), [loss], [optim], [run] batch settings and
    #: [data] phonon / third-order / replay sets are used; the campaign gives the backbone, its labels
    #: (training and validation), steps, strategy, lr and seed
    config: str = ""


@settings
class CampaignConfig(TomlSettings):
    system: SystemConfig = field(default_factory=SystemConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    reference: ReferenceConfig = field(default_factory=ReferenceConfig)
    md: WalkerSettings = field(default_factory=WalkerSettings)
    trigger: TriggerSettings = field(default_factory=TriggerSettings)
    learning: LearningConfig = field(default_factory=LearningConfig)
    run: RunConfig = field(default_factory=RunConfig)
    finetune: FinetuneSettings = field(default_factory=FinetuneSettings)
    #: ``[[walker]]`` tables, one per walker: its own [md] values (temperature, schedule, pressure,
    #: dynamics, seed, ...) and ``structure`` (a file, repeated by system.supercell); empty: all alike
    walker: list[dict[str, Any]] = field(default_factory=list)

    def walker_settings(self, k: int) -> WalkerSettings:
        """Walker ``k``'s MD settings: [md], its [[walker]] table over them, and its own seed."""
        own = {key: v for key, v in (self.walker[k] if self.walker else {}).items() if key != "structure"}
        if k > 0 and "seed" not in own:  # independent trajectories: each walker its own seed
            own["seed"] = self.md.seed + 1000 * k
        return read_section(f"walker[{k}]", WalkerSettings, {**dataclasses.asdict(self.md), **own})

    def validate(self) -> None:
        s, m, le, r = self.system, self.model, self.learning, self.run
        self._validate_names()
        if s.structure not in BUILTIN_STRUCTURES and not Path(s.structure).exists():
            raise bad("system.structure", s.structure,
                      f"give a built-in ({', '.join(BUILTIN_STRUCTURES)}) or an existing structure file")
        if len(s.supercell) not in (1, 3) or min(s.supercell) < 1:
            raise bad("system.supercell", s.supercell, "one or three integers >= 1")
        self._validate_walkers()
        if m.kind not in MODEL_KINDS:
            raise bad("model.kind", m.kind, f"allowed: {', '.join(MODEL_KINDS)}")
        if m.kind == "ensemble" and m.members < 2:
            raise bad("model.members", m.members, "an ensemble needs >= 2 members")
        if m.score not in ("max", "mean", "rms"):
            raise bad("model.score", m.score, "allowed: max, mean, rms")
        if m.dtype not in ("float32", "float64"):
            raise bad("model.dtype", m.dtype, "allowed: float32, float64")
        for key, value in (("model.uncertainty_every", m.uncertainty_every), ("learning.initial_labels", le.initial_labels),
                           ("learning.frames_per_call", le.frames_per_call), ("run.steps", r.steps),
                           ("run.walkers", r.walkers), ("run.checkpoint_every", r.checkpoint_every)):
            if value < 1:
                raise bad(key, value, "must be >= 1")
        if self.reference.retries < 0 or not self.reference.timeout > 0:
            raise bad("reference.retries/timeout", (self.reference.retries, self.reference.timeout),
                      "need retries >= 0 and timeout > 0 s")
        if r.progress_every < 0:
            raise bad("run.progress_every", r.progress_every, "an integer >= 0 (0: no progress lines)")
        if r.trajectory_every < 0:
            raise bad("run.trajectory_every", r.trajectory_every, "an integer >= 0 (0: no trajectory)")
        if self.reference.threads < 1:
            raise bad("reference.threads", self.reference.threads, "an integer >= 1")
        if le.test_frames < 0 or le.test_spacing < 1:
            raise bad("learning.test_frames/test_spacing", (le.test_frames, le.test_spacing),
                      "need test_frames >= 0 and test_spacing >= 1")
        if not le.phonon_distance > 0:
            raise bad("learning.phonon_distance", le.phonon_distance, "must be > 0 Å")
        if m.lattice_dynamics:
            self._validate_lattice_dynamics()
        elif self.trigger.subblock_target is not None:
            raise bad("trigger.subblock_target", self.trigger.subblock_target,
                      "the sub-block test needs model.kind = 'lattice-dynamics'; leave it out")
        if not 0.0 <= le.validation_fraction < 1.0:
            raise bad("learning.validation_fraction", le.validation_fraction, "must be in [0, 1)")
        self._validate_finetune()

    def _validate_lattice_dynamics(self) -> None:
        m, s, t = self.model, self.system, self.trigger
        if not m.cutoffs or min(m.cutoffs) <= 0:
            raise bad("model.cutoffs", m.cutoffs, "cluster cutoffs > 0 Å for orders 2, 3, ...")
        if self.learning.initial_labels < 2 or not self.learning.initial_rattle > 0:
            raise bad("learning.initial_labels/initial_rattle", (self.learning.initial_labels, self.learning.initial_rattle),
                      "the lattice-dynamics model needs rattled copies: initial_labels >= 2 (the start cell itself "
                      "has no displacement to learn from) and initial_rattle > 0 Å")
        if self.finetune.every != 0:
            raise bad("finetune.every", self.finetune.every,
                      "the lattice-dynamics model has no backbone to fine-tune; set [finetune] every = 0")
        if t.subblock_target is not None and not (t.subblock_target > 0 and t.target is not None):
            raise bad("trigger.subblock_target", t.subblock_target, "a force > 0 eV/Å, with trigger.target set")
        small = s.supercell * 3 if len(s.supercell) == 1 else s.supercell
        large = m.subblock_supercell * 3 if len(m.subblock_supercell) == 1 else m.subblock_supercell
        if len(large) != 3 or any(b < a for a, b in zip(small, large)) or list(large) == list(small):
            raise bad("model.subblock_supercell", m.subblock_supercell,
                      f"one or three integers, each >= system.supercell's ({small}), and a larger cell")
        if m.subblock_steps < 1 or not 1 <= m.subblock_frames <= m.subblock_steps:
            raise bad("model.subblock_steps/subblock_frames", (m.subblock_steps, m.subblock_frames),
                      "need subblock_steps >= 1 and 1 <= subblock_frames <= subblock_steps")
        for k in range(self.run.walkers):
            if self.walker_settings(k).dynamics == "npt":
                raise bad(f"walker[{k}].dynamics" if self.walker else "md.dynamics", "npt",
                          "the lattice-dynamics model expands about a fixed cell: use langevin, nose-hoover or nve")
            if self.walker and self.walker[k].get("structure") is not None:
                raise bad(f"walker[{k}].structure", self.walker[k]["structure"],
                          "the lattice-dynamics model has one ideal supercell: leave [[walker]] structure out")

    def _validate_walkers(self) -> None:
        if self.walker and len(self.walker) != self.run.walkers:
            raise bad("run.walkers", self.run.walkers, f"{len(self.walker)} [[walker]] tables are given: one per walker")
        allowed = ["structure", *(f.name for f in dataclasses.fields(WalkerSettings))]
        for k, table in enumerate(self.walker):
            unknown = sorted(set(table) - set(allowed))
            if unknown:
                raise ConfigError(f"unknown key 'walker[{k}].{unknown[0]}'; allowed in [[walker]]: {', '.join(allowed)}")
            structure = table.get("structure")
            if structure is not None and (not isinstance(structure, str) or not Path(structure).is_file()):
                raise bad(f"walker[{k}].structure", structure, "an existing structure file ASE reads")
            self.walker_settings(k)  # every value checked now, before any file is made

    def _validate_finetune(self) -> None:
        ft = self.finetune
        if ft.every < 0:
            raise bad("finetune.every", ft.every, "must be >= 0 (0: no fine-tuning)")
        if ft.steps < 1:
            raise bad("finetune.steps", ft.steps, "must be >= 1")
        if ft.strategy not in FINETUNE_STRATEGIES:
            raise bad("finetune.strategy", ft.strategy, f"allowed: {', '.join(FINETUNE_STRATEGIES)}")
        if not ft.lr > 0:
            raise bad("finetune.lr", ft.lr, "must be > 0")
        for key, low in (("eval_every", 1), ("patience", 0), ("budget", 0)):
            if getattr(ft, key) < low:
                raise bad(f"finetune.{key}", getattr(ft, key), f"must be >= {low}")
        if ft.recent_labels < 0 or 0 < ft.recent_labels < MIN_RECENT_LABELS:  # members alike: no spread
            raise bad("finetune.recent_labels", ft.recent_labels, f"0 (all) or >= {MIN_RECENT_LABELS}")
        if ft.replay not in ("", "self"):
            raise bad("finetune.replay", ft.replay, "allowed: '' (none) or 'self' (self-distilled structures)")
        freeze = ft.freeze
        if ft.config:
            if not Path(ft.config).is_file():
                raise bad("finetune.config", ft.config, "give an existing `almd finetune` TOML file, or leave it out")
            from almd.finetune.config import FinetuneConfig  # torch: only when a file is named

            try:
                file = FinetuneConfig.from_toml(ft.config)
            except ConfigError as exc:
                raise ConfigError(f"finetune.config = {ft.config!r}: {exc}") from None
            freeze = freeze or file.model.freeze
        if ft.strategy == "freeze" and not freeze:
            raise bad("finetune.freeze", freeze, "strategy 'freeze' needs layer groups to keep fixed "
                      "(e.g. [\"embedding\"]; almd.potentials.adapters.layer_groups lists a model's)")

    def _validate_names(self) -> None:
        """The reference calculator and the backbone exist, checked before any file is made."""
        from almd.references import OracleConfigError, resolve_spec

        try:
            resolve_spec(self.reference.calculator, **self.reference.options)
        except OracleConfigError as exc:
            raise ConfigError(f"reference.calculator = {self.reference.calculator!r}: {exc}") from None
        backbone = self.model.backbone
        if not Path(backbone).is_file():
            from almd.potentials.sevennet import PRETRAINED

            if backbone.lower() not in PRETRAINED:
                raise bad("model.backbone", backbone,
                          f"a model file, or a pretrained name: {', '.join(PRETRAINED)}")


def unit_structure(config: CampaignConfig) -> "Atoms":
    """The cell the campaign's supercell repeats: a built-in crystal or a file."""
    s = config.system
    if s.structure == "si":
        from ase.build import bulk

        return bulk("Si", "diamond", a=5.431, cubic=True)
    from ase.io import read

    return read(s.structure)


def ideal_supercell(config: CampaignConfig) -> "Atoms":
    """The campaign's supercell before any rattle: the lattice-dynamics model's ideal."""
    s = config.system
    return unit_structure(config).repeat(s.supercell * 3 if len(s.supercell) == 1 else s.supercell)


def starting_structure(config: CampaignConfig, walker: int | None = None) -> "Atoms":
    """The campaign's start (or ``walker``'s own, from its [[walker]] structure): the unit repeated, rattled."""
    s = config.system
    own = config.walker[walker].get("structure") if walker is not None and config.walker else None
    if own is not None:
        from ase.io import read

        unit = read(own)
    else:
        unit = unit_structure(config)
    atoms = unit.repeat(s.supercell * 3 if len(s.supercell) == 1 else s.supercell)
    if s.rattle > 0:
        atoms.rattle(s.rattle, seed=config.md.seed)
    return atoms


#: the built-in campaign of ``almd run`` without a file (a TOML a user can copy)
BUILTIN_CAMPAIGN = Path(__file__).resolve().parent.parent / "data" / "campaign.toml"


def builtin_campaign() -> CampaignConfig:
    """The built-in campaign: 64-atom Si, SevenNet-0 ensemble, Stillinger–Weber reference, 300 → 900 K."""
    return CampaignConfig.from_toml(BUILTIN_CAMPAIGN)
