"""``OnTheFlyCalculator``: on-the-fly learning inside a user's own ASE script.

Put it where any ASE calculator goes (MD, an optimiser, NEB). Each geometry it is
asked about passes through the campaign's own stages, one step::

    predicted = model(atoms)                    # ensemble mean + calibrated score (eV/Å)
    decision = trigger.update(step, score)      # target, rolling window, relative / absolute, min_spacing
    if decision.call:                           # (or no model trained yet)
        label = labeller.label(atoms, ...)      # the reference; every outcome stored in labels.db
        results = label                         # this step gets the reference's energy, forces, stress
        learn(label)                            # refit every `refit_every` labels, fine-tune every `finetune_every`
    else:
        results = predicted

``results["source"]`` says which answered ("reference" or "model"), and
``results["uncertainty"]`` is the model's calibrated score of the geometry (nan
before the first model). The very first step labels its geometry and rattled
copies of it (``initial_labels`` for training, ``initial_calibration`` held out),
as a campaign's bootstrap does; until ``initial_labels`` training labels are
fitted every step is answered by the reference.

The stages are the campaign's: :class:`~almd.labels.oracle.Oracle` and
:class:`~almd.labels.labeller.Labeller` (a preset such as
``"stillinger-weber-si"`` runs in worker processes with a timeout and retries; an
ASE calculator instance runs here, in this process), the
:class:`~almd.labels.database.LabelDatabase`, the :class:`~almd.uncertainty.Ensemble`
through its :class:`~almd.uncertainty.EnsembleCalculator`, the
:class:`~almd.campaign.trigger.Trigger`, :func:`~almd.campaign.finetune_round.finetune_round`
and the checkpoint of :mod:`almd.campaign.state`.

Everything lives in ``directory``: ``labels.db`` (every reference calculation, as
soon as it finishes, failures included), ``campaign.json`` (the checkpoint, one
unit, written after every reference call) with its ``ensemble-G.pt`` and a copy
``trigger-0.json``, ``models/backbone-vN.pt`` after a fine-tune, and ``almd.lock``
while a process uses it. Constructing the calculator again on the same
directory resumes: the saved model, trigger and counters are read back, labels
stored after the checkpoint are learnt from the database, and a geometry
labelled before is read back, never recomputed.
"""

from __future__ import annotations

import math
import os
import traceback
import warnings
import weakref
from collections.abc import Iterator, Mapping
from dataclasses import asdict, fields
from pathlib import Path
from typing import Any

import numpy as np
from ase import Atoms
from ase.calculators.calculator import Calculator as AseCalculator
from ase.calculators.calculator import all_changes

from almd.campaign.config import FinetuneSettings, LearningConfig, ModelConfig
from almd.campaign.state import RunLock, moved_backbone, read_checkpoint, write_checkpoint
from almd.campaign.trigger import Trigger, TriggerSettings
from almd.labels.oracle import LabelResult, Oracle, OracleConfigError
from almd.settings import ConfigError, bad, read_section
from almd.structures import bare

__all__ = ["KIND", "OnTheFlyCalculator"]

#: ``campaign.json["config"]["kind"]`` of a directory this calculator writes
KIND = "on-the-fly"
#: trigger settings that differ from the campaign's: no run length is known, so a fixed window
_TRIGGER_DEFAULTS = {"window": 100}
_LEARNING = LearningConfig()
_MODEL = ModelConfig()
_SCORES = ("max", "mean", "rms")


class OnTheFlyCalculator(AseCalculator):
    """An ASE calculator that learns as it goes: a calibrated ensemble, and the reference when it is unsure.

    Parameters
    ----------
    reference
        The reference method: an oracle preset (``"stillinger-weber-si"``, ``"gpaw-pw"``, …; see
        ``almd.labels.oracle.PRESETS``), ``"module:Class"``, a spec dict ``{"calculator": ..., **options}``,
        a calculator class, or an ASE calculator instance. Specs run in isolated worker processes
        (``timeout``, ``retries``; a script using one needs an ``if __name__ == "__main__":`` guard);
        an instance runs in this process, without a timeout, identified by its class and parameters.
    directory
        Where ``labels.db``, the checkpoint and the models go; an existing one is resumed.
    backbone
        The frozen backbone the ensemble's heads sit on: a pretrained name or a model file.
    target
        The force error you accept, eV/Å, compared with the calibrated score: a geometry scored
        under it is never sent to the reference (``None``: no target, no convergence).
    refit_every
        New labels between two refits of the heads (1: after every label).
    finetune_every
        New training labels between two fine-tunes of the backbone (0: never; the initial labels do
        not count). A round trains the backbone on every learnt label and rebuilds the ensemble on it.
    members
        Ensemble size K (>= 2).
    seed
        Seeds the ensemble's bootstrap resamples and the rattled initial copies.
    score
        Per-frame reduction over atoms of the calibrated spread: ``"rms"``, ``"mean"`` or ``"max"``.
    dtype
        ``"float32"`` or ``"float64"`` for the model.
    uncertainty_every
        Evaluate the member spread (and ask the trigger) on every n-th step only; the other steps
        cost one model.
    trigger
        Further :class:`~almd.campaign.trigger_settings.TriggerSettings` fields (a mapping or an
        instance; its ``target`` is replaced by ``target``). Windows and spacings count steps,
        i.e. calls of this calculator; the window defaults to 100 of them.
    finetune
        Further :class:`~almd.campaign.config.FinetuneSettings` fields (``steps``, ``strategy``, ``lr``,
        ``freeze``, ``eval_every``, ``patience``, ``budget``, ``replay``, ``recent_labels``,
        ``config``); ``every`` is ``finetune_every``.
    initial_labels, initial_calibration, initial_rattle
        The first step labels its geometry and ``initial_labels + initial_calibration - 1`` copies
        rattled by ``initial_rattle`` Å: the first ``initial_labels`` for training, the rest held out
        for the calibration.
    validation_fraction
        Share of later labels held out for the calibration (by content hash).
    reference_options
        Keyword arguments of a reference spec (not with an instance).
    timeout, retries, threads
        Seconds per attempt, extra attempts after a failure, and OpenMP / BLAS threads of a worker
        (a spec only).

    Attributes
    ----------
    steps : int
        Geometries evaluated (calls of :meth:`calculate`), over every resumed session.
    calls : int
        Steps answered by the reference: the first (bootstrap) step, every step before a model is
        trained, every trigger call (brakes and audits included).
    refits : int
        Refits of the ensemble's heads.
    labels, failures : int
        Successful and failed reference calculations in ``labels.db``.
    """

    implemented_properties = ["energy", "free_energy", "forces", "stress", "uncertainty"]

    def __init__(
        self,
        reference: Any,
        directory: str | os.PathLike,
        *,
        backbone: str | os.PathLike = _MODEL.backbone,
        target: float | None = TriggerSettings.target,
        refit_every: int = 1,
        finetune_every: int = 0,
        members: int = _MODEL.members,
        seed: int = 0,
        score: str = _MODEL.score,
        dtype: str = _MODEL.dtype,
        uncertainty_every: int = 1,
        trigger: TriggerSettings | Mapping[str, Any] | None = None,
        finetune: FinetuneSettings | Mapping[str, Any] | None = None,
        initial_labels: int = _LEARNING.initial_labels,
        initial_calibration: int = _LEARNING.initial_calibration,
        initial_rattle: float = _LEARNING.initial_rattle,
        validation_fraction: float = _LEARNING.validation_fraction,
        reference_options: Mapping[str, Any] | None = None,
        timeout: float = 3600.0,
        retries: int = 1,
        threads: int = 1,
    ) -> None:
        # ---- every argument checked before anything is loaded or written
        path = _check_directory(directory)
        for key, value, low in (("refit_every", refit_every, 1), ("finetune_every", finetune_every, 0),
                                ("members", members, 2), ("seed", seed, 0), ("uncertainty_every", uncertainty_every, 1),
                                ("initial_labels", initial_labels, 1), ("initial_calibration", initial_calibration, 0),
                                ("retries", retries, 0), ("threads", threads, 1)):
            _check_int(key, value, low)
        if target is not None and not _positive(target):
            raise bad("target", target, "give None or a finite force > 0 in eV/Å")
        if score not in _SCORES:
            raise bad("score", score, f"allowed: {', '.join(_SCORES)}")
        if dtype not in ("float32", "float64"):
            raise bad("dtype", dtype, "allowed: float32, float64")
        if not _positive(initial_rattle):
            raise bad("initial_rattle", initial_rattle, "must be a distance > 0 Å")
        if not (isinstance(validation_fraction, (int, float)) and 0.0 <= validation_fraction < 1.0):
            raise bad("validation_fraction", validation_fraction, "must be in [0, 1)")
        if not _positive(timeout):
            raise bad("timeout", timeout, "must be > 0 s")
        _check_backbone(backbone)
        settings = _trigger_settings(trigger, target)
        self._finetune_config = _finetune_config(finetune, finetune_every, backbone, members, score, dtype, seed)
        self.oracle = _oracle(reference, reference_options, path, timeout, retries, threads)

        super().__init__(directory=str(path))
        self.path = path
        self.refit_every, self.finetune_every = refit_every, finetune_every
        self.uncertainty_every, self.dtype = uncertainty_every, dtype
        self.initial_labels, self.initial_calibration = initial_labels, initial_calibration
        self.initial_rattle, self.seed = float(initial_rattle), seed
        #: what a resumed run must share with the stored one
        self._identity = {"kind": KIND, "reference": self.oracle.name, "reference_settings": self.oracle.settings_hash,
                          "backbone": str(backbone), "members": members, "seed": seed, "score": score}
        state = read_checkpoint(path) if path.is_dir() else {}
        if state:
            _check_resumable(state, self._identity, path)

        # ---- the model: the saved one, or heads on the backbone not fitted yet
        from almd.uncertainty import Ensemble

        if "ensemble" in state:
            self.ensemble = Ensemble.load(path / state["ensemble"])
        else:
            self.ensemble = Ensemble(backbone, k=members, seed=seed, score=score)
        self.backbone = moved_backbone(state.get("backbone", str(backbone)), path)  # a model file after a fine-tune
        self.steps: int = state.get("steps", 0)
        self.calls: int = state.get("calls", 0)
        self.refits: int = state.get("refits", 0)
        self.model_version: int = state.get("model_version", 0)
        self.finetunes: list[dict[str, Any]] = state.get("finetunes", [])
        self._since_finetune: int = state.get("labels_since_finetune", 0)
        saved = state.get("triggers", {}).get("0")
        # a resumed trigger keeps its history and counters, under the settings given now
        self.trigger = Trigger.from_state_dict({**saved, "settings": asdict(settings)}) if saved else Trigger(settings)

        # ---- files: from here on
        from almd.labels.database import LabelDatabase
        from almd.labels.labeller import Labeller

        path.mkdir(parents=True, exist_ok=True)
        self._lock = RunLock(path)
        self._lock.acquire()  # before anything is written: a second process is refused here
        self._release = weakref.finalize(self, self._lock.release)
        self.database = LabelDatabase(path / "labels.db", validation_fraction)
        self.labeller = Labeller(self.oracle, self.database)
        self._model = self._model_calculator()
        # labels stored after the last checkpoint (a killed run) are learnt now, not lost
        learnt = self._learnt_keys()
        self._pending: list[Atoms] = [a for a in self.database.training_set() + self.database.validation_set()
                                      if a.info.get("content_hash") not in learnt]
        if self._pending and (not self.trusted or len(self._pending) >= refit_every):
            self.refit()

    # ------------------------------------------------------------ what a user reads
    @property
    def labels(self) -> int:
        """Successful reference calculations stored in ``labels.db``."""
        return self.database.count(status="ok")

    @property
    def failures(self) -> int:
        """Failed reference calculations stored in ``labels.db`` (``LabelDatabase.failures()`` has their errors)."""
        return self.database.count(status="failed")

    @property
    def trusted(self) -> bool:
        """True once the heads are fitted on ``initial_labels`` training labels: the model answers from then on."""
        return len(self.ensemble.trained_keys) >= self.initial_labels

    @property
    def converged(self) -> bool:
        """The trigger's verdict: ``converge_windows`` call-free windows under ``target`` (then only brakes and audits call)."""
        return self.trigger.converged

    @property
    def pending(self) -> int:
        """Labels stored but not yet learnt from (the next refit takes them)."""
        return len(self._pending)

    def held_out_force_rmse(self, frames: list[Atoms] | None = None) -> float:
        """Force RMSE (eV/Å) of the ensemble mean on labelled ``frames`` (default: the held-out labels)."""
        from almd.campaign.outcome import force_rmse

        return force_rmse(self.ensemble.predict, frames if frames is not None else self.database.validation_set())

    # ------------------------------------------------------------ the ASE protocol
    def calculate(self, atoms: Atoms | None = None, properties: Any = ("energy",),
                  system_changes: Any = all_changes) -> None:
        """One step: the model's results, or the reference's when the trigger calls (see module docstring)."""
        if not system_changes and self.results:  # the same geometry asked for a property this step lacks
            from ase.calculators.calculator import PropertyNotImplementedError

            missing = ", ".join(p for p in properties if p not in self.results)
            raise PropertyNotImplementedError(f"{missing} not given at this step (from the {self.results.get('source')})")
        super().calculate(atoms, properties, system_changes)
        frame = bare(self.atoms, magmoms=True)  # what the reference sees
        step = self.steps
        self.steps += 1
        if not self.trusted:
            self.results = self._untrained_step(frame, step)
            return
        predicted = self._predict(frame)
        score = float(predicted.get("uncertainty", math.nan))
        if predicted.get("uncertainty_age") != 0:  # no spread evaluated at this step: nothing to judge
            self.results = _from_model(predicted, score)
            return
        decision = self.trigger.update(step, score if math.isfinite(score) else math.inf)
        if not decision.call:
            self.results = _from_model(predicted, score)
            return
        reason = "audit" if decision.audit else "brake" if decision.stop else ",".join(decision.reasons)
        labelled, (result,) = self._label([frame], step, reason, [score],
                                          ["validation"] if decision.audit else [None])  # an audit is held out
        if decision.audit and labelled:
            self.trigger.record_audit(step, self._frame_error(labelled[0], predicted["forces"]), score)
        self._learn(labelled, now=decision.stop)  # a brake: the model is far off, learn at once
        self.results = _from_reference(result, score, reason) if result.ok else self._failed(result, predicted, score)

    def _untrained_step(self, frame: Atoms, step: int) -> dict[str, Any]:
        """No trusted model yet: the reference answers (the very first step also labels rattled copies)."""
        self.ensemble.check_species(frame.numbers)  # an element the model does not know: before any calculation
        if self.labels == 0:
            reason, (frames, splits) = "initial", self._initial_frames(frame)
        else:
            reason, frames, splits = "untrained", [frame], [None]
        labelled, results = self._label(frames, step, reason, None, splits)
        self._learn(labelled, now=True)
        if results[0].ok:
            return _from_reference(results[0], math.nan, reason)
        if self.trusted:  # this geometry failed, its rattled copies trained a model
            predicted = self._predict(frame)
            return self._failed(results[0], predicted, float(predicted.get("uncertainty", math.nan)))
        raise RuntimeError(f"the reference failed at step {step} and no model is trained yet, so there are no "
                           f"forces to give; the failure is recorded in {self.database.path} "
                           f"(LabelDatabase.failures()): {_last_line(results[0].error)}")

    def _initial_frames(self, frame: Atoms) -> tuple[list[Atoms], list[str]]:
        """The first geometry and its rattled copies, as a campaign's bootstrap labels them."""
        rng = np.random.default_rng(self.seed)
        frames = [frame]
        for _ in range(self.initial_labels + self.initial_calibration - 1):
            copy = frame.copy()
            copy.positions += rng.normal(0.0, self.initial_rattle, copy.positions.shape)
            frames.append(copy)
        return frames, ["train"] * self.initial_labels + ["validation"] * self.initial_calibration

    def _predict(self, frame: Atoms) -> dict[str, Any]:
        self._model.calculate(frame, ["energy", "forces"], all_changes)
        return dict(self._model.results)

    def _failed(self, result: LabelResult, predicted: dict[str, Any], score: float) -> dict[str, Any]:
        """A reference call failed (stored as such): this step keeps the model's results, and says so."""
        warnings.warn(f"reference calculation failed at step {self.steps - 1} ({result.error_kind}); the model's "
                      f"forces are used for this step; recorded in {self.database.path}", RuntimeWarning, stacklevel=3)
        return {**_from_model(predicted, score), "reference_failed": result.error_kind}

    # ------------------------------------------------------------ labels and learning
    def _label(self, frames: list[Atoms], step: int, reason: str, scores: list[float] | None,
               splits: list[str | None]) -> tuple[list[Atoms], list[LabelResult]]:
        """Reference calculations of one step, every outcome stored with its provenance.

        Returns the successful frames as stored (labels, ``info['split']``) and every result in order;
        a frame already in the database is read back, not recomputed.
        """
        provenance = [{"step": step, "source": reason, "model_version": self.model_version,
                       **({} if s is None or not math.isfinite(s) else {"uncertainty": float(s)}),
                       **({} if sp is None else {"split": sp})}
                      for s, sp in zip(scores or [None] * len(frames), splits)]
        results = self.labeller.label_many(frames, provenance=provenance)
        self.calls += 1
        return self.labeller.stored(results), results

    def _learnt_keys(self) -> set[str]:
        return set(self.ensemble.trained_keys) | set(self.ensemble.calibrated_keys)

    def _learn(self, labelled: list[Atoms], now: bool = False) -> None:
        """Queue new labels; refit when ``refit_every`` are in (or ``now``, or while untrusted); checkpoint."""
        learnt = self._learnt_keys() | {a.info.get("content_hash") for a in self._pending}
        self._pending += [a for a in labelled if a.info.get("content_hash") not in learnt]
        if self._pending and (now or not self.trusted or len(self._pending) >= self.refit_every):
            if self.refit():
                return  # refit() wrote the checkpoint
        self.save()

    def refit(self) -> bool:
        """Fit the heads on the pending training labels and calibrate on the pending held-out ones.

        Then fine-tunes the backbone if ``finetune_every`` new training labels are in, and writes
        a checkpoint. Returns False when there was nothing to learn (held-out labels wait for a
        first fit: a spread of unfitted heads says nothing).
        """
        train = [a for a in self._pending if a.info.get("split") == "train"]
        held = [a for a in self._pending if a.info.get("split") != "train"]
        if not self._pending or (not train and not self.ensemble.designs):
            return False
        if train:
            counts = self.trusted  # as in a campaign, the initial labels do not count towards a fine-tune
            self.ensemble.fit(train, append=True)
            self._since_finetune += len(train) if counts else 0
        if held:
            self.ensemble.calibrate(held)
        self._pending = []
        self.refits += 1
        self.model_version += 1
        if self.finetune_every > 0 and self._since_finetune >= self.finetune_every:
            self._finetune()
        self._model.align_schedule(self.steps)  # new heads: no cached results; the spread on schedule
        self.save()
        return True

    def _frame_error(self, labelled: Atoms, forces: np.ndarray) -> float:
        """The model's true force error on a labelled frame, in the score's measure (eV/Å)."""
        from almd.uncertainty.calibration import reduce_atoms

        error = np.asarray(labelled.get_forces()) - forces
        return reduce_atoms(np.sqrt((error**2).mean(axis=1)), self.ensemble.score)

    def _finetune(self) -> None:
        """A fine-tune round: the backbone trained on the learnt labels, the ensemble rebuilt on it."""
        from almd.campaign.finetune_round import finetune_round

        self.model_version += 1
        path, ensemble, record = finetune_round(self._finetune_config, self.database, self.ensemble, self.backbone,
                                                self.model_version, self.path)
        self.backbone, self._since_finetune = str(path), 0
        self.finetunes.append(record)
        self.ensemble = ensemble
        self._model = self._model_calculator()

    def _model_calculator(self) -> Any:
        from almd.uncertainty import EnsembleCalculator

        calc = EnsembleCalculator(self.ensemble, uncertainty_every=self.uncertainty_every, dtype=self.dtype)
        calc.align_schedule(self.steps)
        return calc

    # ------------------------------------------------------------ files
    def save(self) -> Path:
        """Write the checkpoint (model, trigger, counters) as one unit; returns ``campaign.json``.

        Called after every reference call and refit; call it yourself to keep the trigger's
        history of the steps since.
        """
        state = {"config": self._identity, "steps": self.steps, "calls": self.calls, "refits": self.refits,
                 "model_version": self.model_version, "backbone": self.backbone,
                 "labels_since_finetune": self._since_finetune, "finetunes": self.finetunes}
        write_checkpoint(self.path, self.ensemble, state, {}, {0: self.trigger.to_json()})
        return self.path / "campaign.json"

    def close(self) -> None:
        """Write a checkpoint and release the directory."""
        if self._release.alive:
            self.save()
            self._release()

    def __enter__(self) -> "OnTheFlyCalculator":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


# ---------------------------------------------------------------- results
def _from_model(predicted: dict[str, Any], score: float) -> dict[str, Any]:
    out = {k: v for k, v in predicted.items() if k != "member_forces"}
    out.update(source="model", uncertainty=score)
    return out


def _from_reference(result: LabelResult, score: float, reason: str) -> dict[str, Any]:
    out = {"energy": float(result.energy), "free_energy": float(result.energy),
           "forces": np.array(result.forces, dtype=float), "source": "reference", "reason": reason,
           "uncertainty": score}
    if result.stress is not None:
        out["stress"] = np.array(result.stress, dtype=float)
    return out


def _last_line(text: str | None) -> str:
    lines = [ln for ln in (text or "").splitlines() if ln.strip()]
    return lines[-1].strip() if lines else "no error text"


# ---------------------------------------------------------------- the reference
class _InProcessOracle(Oracle):
    """An :class:`Oracle` whose calculations run here, on the user's calculator instance.

    Everything else is the oracle's: content hashes, retries, results (``LabelResult``),
    non-finite results as failures. No timeout: there is no worker to kill.
    """

    def __init__(self, calculator: Any, retries: int) -> None:
        params = dict(getattr(calculator, "parameters", None) or {})
        super().__init__(type(calculator), retries=retries, name=type(calculator).__name__, **params)
        self.calculator = calculator

    def _attempt(self, atoms: Atoms, key: str) -> dict[str, Any]:
        frame = bare(atoms, magmoms=True)
        frame.calc = self.calculator
        try:
            out = {"energy": float(frame.get_potential_energy()),
                   "forces": np.array(frame.get_forces(), dtype=np.float64), "stress": None}
            if frame.cell.rank == 3 and frame.pbc.all():
                try:  # NotImplementedError includes ASE's PropertyNotImplementedError
                    out["stress"] = np.array(frame.get_stress(voigt=True), dtype=np.float64)
                except NotImplementedError:
                    pass
        except Exception as exc:  # noqa: BLE001 - a failed calculation is a result, stored as one
            return {"error": "".join(traceback.format_exception(exc)).strip(), "kind": "exception"}
        nonfinite = [k for k, v in out.items() if v is not None and not np.all(np.isfinite(v))]
        if nonfinite:
            return {"error": f"non-finite {', '.join(nonfinite)} returned by {self.name}", "kind": "nonfinite"}
        return out

    def _threads(self, max_workers: int) -> Any:
        """Here, one after the other, in the calling thread (the user's calculator may not be thread-safe)."""
        def spread(jobs: list[tuple[Atoms, str]]) -> Iterator[tuple[int, LabelResult]]:
            for j, job in enumerate(jobs):
                yield j, self.compute(job)

        return spread


def _oracle(reference: Any, options: Mapping[str, Any] | None, path: Path, timeout: float, retries: int,
            threads: int) -> Oracle:
    if options is not None and not isinstance(options, Mapping):
        raise bad("reference_options", options, "give a mapping of the reference's keyword arguments, or None")
    instance = not isinstance(reference, (str, Mapping, type)) and hasattr(reference, "get_potential_energy")
    if instance:
        if options:
            raise bad("reference_options", dict(options), "an ASE calculator instance takes none; set them on it")
        return _InProcessOracle(reference, retries)
    try:
        return Oracle(reference, timeout=timeout, retries=retries, threads=threads, workdir=path / "oracle-runs",
                      **dict(options or {}))
    except OracleConfigError as exc:
        raise ConfigError(f"reference = {reference!r}: {exc}") from None


# ---------------------------------------------------------------- argument checks
def _positive(value: Any) -> bool:
    return (isinstance(value, (int, float, np.number)) and not isinstance(value, bool)
            and math.isfinite(value) and value > 0)


def _check_int(key: str, value: Any, low: int) -> None:
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < low:
        raise bad(key, value, f"must be an integer >= {low}")


def _check_directory(directory: Any) -> Path:
    if not isinstance(directory, (str, os.PathLike)) or not str(directory):
        raise bad("directory", directory, "give a folder path (created if missing)")
    path = Path(directory)
    if path.exists() and not path.is_dir():
        raise bad("directory", str(directory), "it is a file; give a folder (created if missing)")
    return path


def _check_backbone(backbone: Any) -> None:
    if not isinstance(backbone, (str, os.PathLike)):
        raise bad("backbone", backbone, "give a pretrained name or a model file")
    if Path(backbone).is_file():
        return
    from almd.potentials.sevennet import PRETRAINED

    if str(backbone).lower() not in PRETRAINED:
        raise bad("backbone", str(backbone), f"a model file, or a pretrained name: {', '.join(PRETRAINED)}")


def _trigger_settings(trigger: Any, target: float | None) -> TriggerSettings:
    if trigger is None:
        trigger = {}
    if isinstance(trigger, TriggerSettings):
        trigger = {k: v for k, v in asdict(trigger).items()}
    elif not isinstance(trigger, Mapping):
        raise bad("trigger", trigger, "give a mapping of TriggerSettings fields, a TriggerSettings, or None")
    elif "target" in trigger:
        raise bad("trigger['target']", trigger["target"], "give it as target=... instead")
    try:
        return TriggerSettings.from_dict({**_TRIGGER_DEFAULTS, **dict(trigger), "target": target})
    except ValueError as exc:
        raise ConfigError(f"trigger: {exc}") from None


def _finetune_config(finetune: Any, every: int, backbone: Any, members: int, score: str, dtype: str,
                     seed: int) -> Any:
    """The campaign settings :func:`~almd.campaign.finetune_round.finetune_round` reads, checked."""
    from almd.campaign.config import CampaignConfig
    from almd.campaign.walker import WalkerSettings

    if finetune is None:
        finetune = {}
    if isinstance(finetune, FinetuneSettings):  # its interval is finetune_every's, as documented
        finetune = {key: value for key, value in asdict(finetune).items() if key != "every"}
    if not isinstance(finetune, Mapping):
        raise bad("finetune", finetune, "give a mapping of FinetuneSettings fields, a FinetuneSettings, or None")
    allowed = [f.name for f in fields(FinetuneSettings) if f.name != "every"]
    unknown = sorted(set(finetune) - set(allowed))
    if unknown:
        raise bad(f"finetune[{unknown[0]!r}]", finetune[unknown[0]],
                  f"unknown key; allowed: {', '.join(allowed)} (the interval is finetune_every)")
    settings = read_section("finetune", FinetuneSettings, {**finetune, "every": every})  # e.g. "finetune.steps = '5'"
    config = CampaignConfig(model=ModelConfig(backbone=str(backbone), members=members, score=score, dtype=dtype),
                            md=WalkerSettings(seed=seed), learning=LearningConfig(phonons=False), finetune=settings)
    config._validate_finetune()  # the campaign's own checks; they name "finetune.<key>"
    return config


def _check_resumable(state: dict[str, Any], identity: dict[str, Any], path: Path) -> None:
    """A directory resumes only the run it holds: same reference, backbone, members, seed and score."""
    stored = state.get("config", {})
    if stored.get("kind") != KIND:
        raise bad("directory", str(path), "it holds a campaign (almd run), not an on-the-fly run; give another folder")
    for key in ("reference_settings", "backbone", "members", "seed", "score"):
        if stored.get(key) != identity[key]:
            name = "reference" if key == "reference_settings" else key
            now = identity["reference"] if key == "reference_settings" else identity[key]
            was = stored.get("reference") if key == "reference_settings" else stored.get(key)
            raise bad(name, now, f"{path} holds a run with {name} = {was!r} (other settings); "
                                 "resume with the same one or give another directory")
