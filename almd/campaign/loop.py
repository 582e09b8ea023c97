"""The active-learning loop: walkers → uncertainty → trigger → oracle → dataset → ensemble → walkers.

A :class:`Campaign` runs MD walkers on the ensemble's member mean; each step's
per-frame uncertainty goes to that walker's :class:`~almd.campaign.trigger.Trigger`.
When the trigger calls, the walker's recent frames are ranked and
de-duplicated (:func:`~almd.campaign.selection.select_frames`), labelled by the
:class:`~almd.labels.oracle.Oracle` into the campaign's
:class:`~almd.labels.database.LabelDatabase`, and the model is refitted on
the training split and recalibrated on the held-out split; MD then goes on
with the new model. The model is an ensemble of heads on a backbone, or the
Bayesian lattice-dynamics expansion (``[model] kind``, :mod:`almd.campaign.bootstrap`),
whose convergence also needs the sub-block test (:mod:`almd.campaign.subblock`). An emergency brake rolls the walker back to its last
trusted frame and labels the offending frame at once. Every ``finetune.every``
new training labels the backbone itself is fine-tuned on them and the ensemble
rebuilt on it (:mod:`almd.campaign.finetune_round`).

Everything lives in ``run.output``: ``labels.db`` (every reference
calculation, as soon as it finishes), ``campaign.json`` (the checkpoint, one
unit: see :mod:`almd.campaign.state`) with its ``ensemble-G.pt`` (or ``lattice-dynamics-G.npz``),
``models/backbone-vN.pt`` (fine-tuned backbones), ``walker-K.json`` and
``trigger-K.json`` (copies for reading), ``steps.csv`` (flushed every round),
``trajectory-K.extxyz`` (every ``run.trajectory_every`` steps, :mod:`almd.campaign.trajectory`) and
``almd.lock`` while a process runs there. A killed campaign started again
resumes from the last checkpoint; steps after it are re-run, and any
reference calculation they call again is read back from the database, never
recomputed or lost. SIGTERM, SIGINT or SIGUSR1 end the current step, write a
checkpoint and return (``CampaignResult.stopped`` names the signal).
"""

from __future__ import annotations

import contextlib
import csv
import json
import math
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from ase import Atoms

from almd.campaign.config import CampaignConfig, starting_structure
from almd.campaign.progress import ProgressLines
from almd.campaign.selection import select_frames
from almd.campaign.state import (
    RunLock,
    StopRequest,
    moved_backbone,
    read_checkpoint,
    resumable,
    truncate_log,
    write_checkpoint,
)
from almd.campaign.trajectory import TrajectoryWriter, trim
from almd.campaign.trigger import Action, Decision, Trigger
from almd.campaign.walker import Frame, StepRecord, Walker, WalkerState
from almd.structures import bare

__all__ = ["Campaign", "CampaignResult", "LabelRequest", "run", "STEP_FIELDS"]

STEP_FIELDS = ("walker", "step", "energy", "temperature", "max_force", "score", "action", "reasons",
               "rolling_mean", "threshold", "labels", "model_version")


@dataclass
class CampaignResult:
    steps: dict[int, int]  #: MD steps done per walker
    labels: int  #: reference calculations stored (ok)
    failures: int  #: reference calculations that failed (recorded, not used)
    calls: int  #: trigger calls, brakes included
    brakes: int
    converged: bool
    model_version: int
    seconds: float
    output: Path
    held_out_force_rmse: float  #: eV/Å, the final ensemble mean vs the held-out reference labels
    trajectory_averaged_uncertainty: dict[int, float]  #: eV/Å, each walker's rolling mean at the end
    backbone: str = ""  #: the backbone the walkers ended on (a model file after a fine-tune)
    finetunes: int = 0  #: fine-tune rounds
    stopped: str | None = None  #: the signal that stopped the run before its end (resume by running again)

    def summary(self) -> dict[str, Any]:
        d = dict(self.__dict__)
        d["output"] = str(self.output)
        return d


@dataclass
class LabelRequest:
    """Frames a walker wants labelled after one step (made on the walker's rank, served on rank 0)."""

    walker: int
    step: int
    reason: str
    frames: list[Atoms]
    scores: list[float | None]
    brake: bool
    audit: bool = False  #: one frame labelled to check the score (held out, never trained on)


class Campaign:
    """An on-the-fly learning MD campaign (see module docstring).

    ``comm``: an MPI communicator (default: :func:`almd.campaign.parallel.world`). Walkers
    are spread over the ranks and advance in lockstep, one step each per round;
    rank 0 then serves the rounds's label requests in walker order, refits, and
    sends the new heads to every rank. A serial run takes the same path with
    one rank, so it gives the same trajectories as an MPI run.
    """

    def __init__(self, config: CampaignConfig, comm: Any = None):
        import torch

        from almd.campaign.parallel import Helpers, abort_on_exception, owned, world
        from almd.labels.oracle import Oracle

        # With several threads torch's CPU scatter-adds sum in a varying order (last-bit
        # noise); deterministic kernels cost nothing measurable here and make restarts exact.
        torch.use_deterministic_algorithms(True, warn_only=True)
        self.config = cfg = config
        self.comm = comm if comm is not None else world()
        if self.comm.size > 1:  # an uncaught error on one rank ends the job (the others may wait on it)
            sys.excepthook = abort_on_exception(self.comm)
        self.root = self.comm.rank == 0
        self.output = Path(cfg.run.output)
        self._check_same_campaign()
        self.start = starting_structure(cfg)
        state = None
        ref = cfg.reference
        # every rank computes reference labels (its share of each round); rank 0 alone stores them
        self.oracle = Oracle(ref.calculator, timeout=ref.timeout, retries=ref.retries, threads=ref.threads,
                             workdir=self.output / "oracle-runs", **ref.options)
        self.helpers = Helpers(self.comm, {"compute": self.oracle.compute, "finetune": self._finetune_share})
        if self.root:
            from almd.labels.database import LabelDatabase
            from almd.labels.labeller import Labeller

            self.output.mkdir(parents=True, exist_ok=True)
            self.lock = RunLock(self.output)
            self.lock.acquire()  # before anything is written: a second process is refused here
            self.database = LabelDatabase(self.output / "labels.db", cfg.learning.validation_fraction)
            self.labeller = Labeller(self.oracle, self.database)
            state = self._read_state()
        state = self.comm.bcast(state if self.root else None)
        self.state = state  # the checkpoint resumed from ({} for a new run)
        self.model_version = state.get("model_version", 0)
        self.rounds = state.get("rounds", 0)  # lockstep rounds: checkpoints fall on multiples of checkpoint_every
        # frames at or before a walker's last call were ranked then; later calls look only after it
        self.last_call = {int(k): v for k, v in state.get("last_call", {}).items()}
        self.backbone = moved_backbone(state.get("backbone", cfg.model.backbone), self.output)  # a model file after a round
        self.since_finetune = state.get("labels_since_finetune", 0)  # new training labels since then
        self.finetunes: list[dict[str, Any]] = state.get("finetunes", [])
        self.timings: dict[str, float] = dict(state.get("timings", {}))  # s per stage (report.STAGES), on rank 0
        self.phonons: dict[str, Any] = dict(state.get("phonons", {}))  # the phonon set and the base model's errors
        #: the model's error on each frame the trigger sent to the reference, before it learnt from it (rank 0)
        self.learning_curve: list[dict[str, Any]] = list(state.get("learning_curve", []))
        self.model = self._model()
        self.local = owned(cfg.run.walkers, self.comm)
        self.walkers = {k: self._walker(k) for k in self.local}
        self.triggers = {k: self._trigger(k) for k in self.local}
        self.trajectories = {k: self._trajectory(k) for k in self.local}
        for w in self.walkers.values():
            _restart_uncertainty(w)

    @contextlib.contextmanager
    def _timed(self, stage: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.timings[stage] = self.timings.get(stage, 0.0) + time.perf_counter() - start

    # ------------------------------------------------------------ set-up / resume
    def _check_same_campaign(self) -> None:
        """Every rank must run the same settings (before anything is written): a job whose ranks
        read different campaign files would mix two campaigns in one directory.
        """
        from almd.settings import ConfigError
        from almd.structures import settings_hash

        digests = self.comm.allgather(settings_hash(self.config.to_dict()))
        if len(set(digests)) > 1:
            differ = [r for r, d in enumerate(digests) if d != digests[0]]
            raise ConfigError(f"ranks {differ} run other campaign settings than rank 0; start every rank "
                              "with the same campaign file")

    def _read_state(self) -> dict[str, Any]:
        state = read_checkpoint(self.output)
        if not state:
            return {}
        if resumable(_with_defaults(state.get("config", {}))) != resumable(self.config.to_dict()):
            from almd.settings import ConfigError

            raise ConfigError(f"{self.output} holds a campaign with other settings; "
                              "use a new run.output or the same campaign file to resume")
        return state

    def _model(self):
        """Rank 0 loads or builds (initial labels, first fit) the model; the others get its heads
        (the ensemble's readout heads, or the lattice-dynamics posterior).
        """
        from almd.campaign.bootstrap import bootstrap, load_model

        if not self.root:  # helping with the bootstrap labels until rank 0 sends the fitted heads
            model = self._unfitted_model()
            model.load_head_state(self.helpers.wait())
            return model
        if "ensemble" in self.state:
            model = load_model(self.config, self.output / self.state["ensemble"])
        else:
            model = self._unfitted_model()
            bootstrap(self, model)
        self.helpers.release(model.head_state())
        return model

    def _unfitted_model(self):
        from almd.campaign.bootstrap import unfitted_model

        return unfitted_model(self.config, self.backbone)

    def _calculator(self):
        from almd.campaign.bootstrap import walker_calculator

        return walker_calculator(self.config, self.model)

    def mean_calculator(self):
        """The final model's mean as a plain ASE calculator (phonons, parity)."""
        from almd.campaign.bootstrap import mean_calculator

        return mean_calculator(self.config, self.model)

    def _walker(self, k: int) -> Walker:
        saved = self.state.get("walkers", {}).get(str(k))
        state = WalkerState.from_json(json.dumps(saved)) if saved is not None else None
        start = starting_structure(self.config, k) if self.config.walker else self.start
        return Walker(start, self._calculator(), self.config.walker_settings(k), name=f"walker-{k}", state=state)

    def _trajectory(self, k: int) -> TrajectoryWriter:
        path = self.output / f"trajectory-{k}.extxyz"
        trim(path, int(self.state.get("steps", {}).get(str(k), 0)))  # steps after the checkpoint are re-run
        return TrajectoryWriter(path, self.config.run.trajectory_every)

    def _trigger(self, k: int) -> Trigger:
        saved = self.state.get("triggers", {}).get(str(k))
        if saved is not None:
            return Trigger.from_json(json.dumps(saved))
        cfg = self.config
        settings = cfg.trigger.for_run(cfg.run.steps, scored_every=cfg.model.scored_every)
        return Trigger(settings, stationary_from=cfg.walker_settings(k).schedule_steps)

    # ------------------------------------------------------------ learning (rank 0)
    def _label(self, frames: list[Atoms], walker: int, step: int, reason: str,
               scores: list[float | None] | None = None, splits: list[str] | None = None) -> list[Atoms]:
        """Reference calculations for ``frames``, every outcome stored; returns the successful ones as
        stored (labels, ``info['split']``). A label already in the database is read back, not recomputed.
        """
        return self._label_rows(frames, self._provenance(len(frames), walker, step, reason, scores, splits))

    def _provenance(self, n: int, walker: int, step: int, reason: str, scores: list[float | None] | None = None,
                    splits: list[str] | None = None) -> list[dict[str, Any]]:
        """The database row fields of ``n`` frames labelled for one reason."""
        return [{"walker": walker, "step": step, "source": reason, "model_version": self.model_version,
                 **({} if s is None else {"uncertainty": float(s)}), **({} if sp is None else {"split": sp})}
                for s, sp in zip(scores or [None] * n, splits or [None] * n)]

    def _label_rows(self, frames: list[Atoms], provenance: list[dict[str, Any]]) -> list[Atoms]:
        """:meth:`_label` with one provenance per frame; under MPI one calculation per rank at a time."""
        return self.labeller.stored(self._label_results(frames, provenance))

    def _label_results(self, frames: list[Atoms], provenance: list[dict[str, Any]]) -> list:
        """Every frame's :class:`~almd.labels.oracle.LabelResult`, in order, each outcome stored."""
        spread = None if self.comm.size == 1 else (lambda jobs: self.helpers.map("compute", jobs))
        with self._timed("reference"):
            return self.labeller.label_many(frames, provenance=provenance, spread=spread)

    def _refit(self, model, labelled: list[Atoms]) -> None:
        """The model refitted with the new training labels; calibration updated with the held-out ones.

        Only the labels of this call are added (not whatever else the database
        holds), so a resumed run refits exactly as the uninterrupted one did.
        """
        train = [a for a in labelled if a.info["split"] == "train"]
        held_out = [a for a in labelled if a.info["split"] != "train"]
        with self._timed("refit"):
            if train:
                model.fit(train, append=True)
                self.since_finetune += len(train)
            if held_out:
                model.calibrate(held_out)
        self.model_version += 1

    def _serve(self, requests: list[LabelRequest]) -> tuple[bool, list[tuple[int, int, float, float]]]:
        """Label each request in walker order and refit after each, then fine-tune if it is time.

        Returns whether the model changed, and the audits as (walker, step, true error, score).
        """
        changed, audits = False, []
        requests = sorted(requests, key=lambda r: r.walker)
        # every frame of the round computed at once (in parallel under MPI), then learnt from in turn
        provenance = [p for r in requests for p in self._provenance(
            len(r.frames), r.walker, r.step, r.reason, r.scores, ["validation"] if r.audit else None)]  # audit: held out
        results = self._label_results([a for r in requests for a in r.frames], provenance)
        start = 0
        for req in requests:
            labelled = self.labeller.stored(results[start:start + len(req.frames)])
            start += len(req.frames)
            errors = [self._frame_error(atoms) for atoms in labelled]  # on frames the model has not learnt from
            self.learning_curve += [{"labels": int(atoms.info.get("row_id", len(self.database))),  # kept on resume
                                     "walker": req.walker, "step": req.step,
                                     "error": e, "score": atoms.info.get("uncertainty"), "reason": req.reason}
                                    for e, atoms in zip(errors, labelled)]
            if req.audit and labelled:
                audits.append((req.walker, req.step, errors[0], float(req.scores[0])))
            if labelled:
                self._refit(self.model, labelled)
                changed = True
        every = self.config.finetune.every
        if changed and every > 0 and self.since_finetune >= every:
            self._finetune()
        return changed, audits

    def _frame_error(self, labelled: Atoms) -> float:
        """The true force error of the model on a labelled frame, in the score's measure (eV/Å)."""
        from almd.uncertainty.calibration import reduce_atoms

        error = np.asarray(labelled.get_forces()) - self.model.predict(labelled)["forces"]
        return reduce_atoms(np.sqrt((error**2).mean(axis=1)), self.model.score)

    def _finetune(self) -> None:
        """A fine-tune round (trained on every rank, the rest on rank 0): new backbone file, ensemble
        rebuilt on it, walkers switched to it.
        """
        from almd.campaign.finetune_round import finetune_round

        self.model_version += 1
        with self._timed("finetune"):
            path, ensemble, record = finetune_round(self.config, self.database, self.model, self.backbone,
                                                    self.model_version, self.output,
                                                    train_on=lambda args: self.helpers.run("finetune", args))
        self.backbone, self.since_finetune = str(path), 0
        self.finetunes.append(record)
        self._use(ensemble)

    def _finetune_share(self, args: tuple) -> tuple[Any, Any]:
        """Every rank's part of a fine-tune round: the same trainer, data-parallel over the ranks."""
        from almd.campaign.finetune_round import train_backbone

        return train_backbone(*args, comm=self.comm if self.comm.size > 1 else None)

    def _use(self, model) -> None:
        """Walkers compute with ``model`` from here on (fresh calculators, as after a restart)."""
        self.model = model
        for w in self.walkers.values():
            w.calculator = self._calculator()

    # ------------------------------------------------------------ the loop
    def _request(self, k: int, decision: Decision, brake_frame: Frame | None) -> LabelRequest:
        walker = self.walkers[k]
        after = self.last_call.get(k, -1)
        if not decision.audit:  # an audit is not a call: later calls still rank the frames it saw
            self.last_call[k] = decision.step
        if brake_frame is not None:
            frames, scores, reason = [brake_frame.atoms], [brake_frame.score], "brake"
        elif decision.audit:
            frames, scores, reason = [walker.frames[-1].atoms], [walker.frames[-1].score], "audit"
        else:
            recent = [f for f in walker.frames if f.score is not None and f.step > after]
            picked = select_frames([f.score for f in recent], [f.atoms for f in recent],
                                   self.config.learning.frames_per_call, self.config.learning.min_distance)
            frames, scores = [recent[i].atoms for i in picked], [recent[i].score for i in picked]
            reason = ",".join(decision.reasons)
        frames = [bare(a) for a in frames]
        return LabelRequest(k, decision.step, reason, frames, scores, brake_frame is not None, decision.audit)

    def step(self, k: int) -> tuple[StepRecord, Decision, LabelRequest | None]:
        """One MD step of local walker ``k``: trigger, rollback on a brake, and what to label."""
        walker, trigger = self.walkers[k], self.triggers[k]
        record = walker.advance()
        if record.score is None and not record.blown_up:  # no spread at this step: nothing to judge
            decision = Decision(record.step, math.nan, Action.NONE, (), trigger.rolling_mean, math.nan)
        else:
            decision = trigger.update(record.step, math.inf if record.blown_up else record.score)
        request = None
        if decision.stop:
            offending = walker.frames[-1]
            walker.rollback()
            trim(self.trajectories[k].path, walker.step)  # the steps after the trusted state are re-run
            _restart_uncertainty(walker)
            request = self._request(k, decision, offending)
        elif decision.call:
            request = self._request(k, decision, None)
        if not decision.reasons and not decision.stop:  # an audited frame met no criterion: trusted too
            walker.trust()
        return record, decision, request

    def _round(self) -> tuple[list[dict[str, Any]], bool]:
        """Every active walker on every rank one step; label requests served on rank 0; new heads sent."""
        cfg = self.config.run
        rows, requests = [], []
        for k, w in self.walkers.items():
            if w.step >= cfg.steps:
                continue
            with self._timed("md_and_uncertainty"):
                record, decision, request = self.step(k)
            if not decision.stop:  # a brake rolled the walker back: its step is re-run
                self.trajectories[k].write(w.atoms, record.step, record.score, record.temperature, self.model_version)
            rows.append({"walker": k, "step": record.step, "energy": record.energy, "calls": self.triggers[k].n_calls,
                         "temperature": record.temperature, "max_force": record.max_force, "score": record.score,
                         "action": decision.action.value, "reasons": "+".join(decision.reasons),
                         "rolling_mean": decision.rolling_mean, "threshold": decision.threshold})
            if request is not None:
                requests.append(request)
        gathered = self.comm.gather((rows, requests))
        if self.root:
            rows = [r for part, _ in gathered for r in part]
            requests = [q for _, part in gathered for q in part]
            changed, audits = self._serve(requests)
            update = (self.model.head_state(), self.model_version, self.backbone) if changed else None
            self.helpers.release((update, audits))
        else:  # lending a hand with the round's labels and fine-tune until rank 0 is done
            update, audits = self.helpers.wait()
        for k, step, true_error, score in audits:
            if k in self.triggers:
                self.triggers[k].record_audit(step, true_error, score)  # a failed one resumes learning
        if update is not None:
            if not self.root:
                if update[2] != self.backbone:  # fine-tuned on rank 0: the same file for every rank
                    self.backbone = update[2]
                    self._use(self._unfitted_model())
                self.model.load_head_state(update[0])
                self.model_version = update[1]
            for w in self.walkers.values():  # forces from the new model from here on
                _restart_uncertainty(w)
        busy = any(w.step < cfg.steps for w in self.walkers.values())
        return rows, bool(self.comm.allreduce(int(busy)))

    def _subblock_tests(self) -> None:
        """The lattice-dynamics convergence test for each local walker whose windows went quiet."""
        from almd.campaign.subblock import subblock_test

        for k, trigger in self.triggers.items():
            if trigger.wants_subblock_test:
                with self._timed("subblock_test"):
                    test = subblock_test(self.model, self.config, self.config.walker_settings(k), self.walkers[k].step)
                trigger.record_subblock_error(test.value)

    def checkpoint(self) -> None:
        """Everything needed to resume, written by rank 0 as one unit (:func:`~almd.campaign.state.write_checkpoint`).

        Every walker then recomputes its forces and spread at the checkpoint and forgets its
        recent frames, as a resumed run must, so interrupted and uninterrupted runs stay identical.
        """
        local = {k: (w.state().to_json(), self.triggers[k].to_json(), self.last_call.get(k)) for k, w in self.walkers.items()}
        parts = self.comm.gather(local)
        if self.root:
            walkers, triggers, last_call, steps = {}, {}, {}, {}
            for part in parts:
                for k, (walker, trigger, call) in part.items():
                    walkers[k], triggers[k] = walker, trigger
                    steps[k] = json.loads(walker)["step"]
                    if call is not None:
                        last_call[k] = call
            write_checkpoint(self.output, self.model, {
                "config": self.config.to_dict(), "model_version": self.model_version, "rounds": self.rounds, "last_call": last_call, "steps": steps,
                "backbone": self.backbone, "labels_since_finetune": self.since_finetune,
                "finetunes": self.finetunes, "timings": self.timings, "phonons": self.phonons,
                "learning_curve": self.learning_curve},
                walkers, triggers)
        for w in self.walkers.values():
            _restart_uncertainty(w)
            # a resumed walker starts with no recent frames and trusts its checkpoint: a call or a brake
            # after a checkpoint looks back no further than it, in an interrupted and an uninterrupted run alike
            w.frames.clear()
            w.trust()

    def run(self) -> CampaignResult | None:
        """Run every walker to ``run.steps`` (or until its trigger reports convergence).

        Returns the result on rank 0 (None on the other ranks).
        """
        from tqdm import tqdm

        cfg = self.config.run
        t0 = time.perf_counter()
        log_path = self.output / "steps.csv"
        fh = bar = log = None
        if self.root:
            if log_path.exists():  # resumed: steps after the checkpoint are re-run, so their old rows go
                truncate_log(log_path, STEP_FIELDS, read_checkpoint(self.output).get("steps", {}))
            new_log = not log_path.exists()
            fh = open(log_path, "a", newline="")
            log = csv.DictWriter(fh, STEP_FIELDS, extrasaction="ignore")  # "calls" is for the progress lines
            if new_log:
                log.writeheader()
            done = sum(min(int(v), cfg.steps) for v in self._read_state().get("steps", {}).values())
            bar = tqdm(total=cfg.steps * cfg.walkers, initial=done, disable=not cfg.progress, desc="almd run", unit="step")
            progress = ProgressLines(cfg.progress_every if cfg.progress else 0, cfg.steps)
        busy, stopped = True, None
        try:
            with StopRequest() as stop:
                while busy and stopped is None:
                    rows, busy = self._round()
                    self.rounds += 1
                    self._subblock_tests()
                    if self.root:
                        for r in rows:
                            log.writerow({**r, "labels": len(self.database), "model_version": self.model_version})
                        fh.flush()  # a kill loses no row of a finished step
                        bar.update(sum(r["action"] != "brake" for r in rows))
                        bar.set_postfix(labels=len(self.database))
                        progress.show(rows, bar.write)
                    # every rank learns of a signal that reached any of them, in the same round
                    if self.comm.allreduce(int(stop.signal is not None)):
                        stopped = self.comm.bcast(stop.signal or "a signal on another rank")
                    if self.rounds % cfg.checkpoint_every == 0 or not busy or stopped is not None:
                        self.checkpoint()
        finally:
            if self.root:
                bar.close()
                fh.close()
                self.lock.release()
        from almd.campaign.outcome import label_test_frames, record_outcome

        test = label_test_frames(self) if stopped is None else []
        rmse = self.held_out_force_rmse(test) if self.root else None
        rolling = self.comm.gather({k: t.rolling_mean for k, t in self.triggers.items()})
        steps = self.comm.gather({k: w.step for k, w in self.walkers.items()})
        converged_at = self.comm.gather({k: t.converged_at for k, t in self.triggers.items()})
        # the triggers own the counts of calls and brakes; the campaign only adds them up
        calls = self.comm.allreduce(sum(t.n_calls for t in self.triggers.values()))
        brakes = self.comm.allreduce(sum(t.n_brakes for t in self.triggers.values()))
        if not self.root:
            return None
        failures = len(self.database.failures())
        at = {k: v for part in converged_at for k, v in part.items()}
        converged = all(v is not None for v in at.values())
        if stopped is None:
            record_outcome(self, rmse, test, converged, max(at.values()) if converged else None)
        return CampaignResult({k: v for part in steps for k, v in part.items()}, len(self.database) - failures,
                              failures, calls, brakes, converged,
                              self.model_version, time.perf_counter() - t0, self.output, rmse,
                              {k: v for part in rolling for k, v in part.items()}, self.backbone,
                              len(self.finetunes), stopped)

    def held_out_force_rmse(self, frames: list[Atoms] | None = None) -> float:
        """Force RMSE (eV/Å) of the ensemble mean on ``frames`` (default: the labels it was not fitted on; rank 0)."""
        from almd.campaign.outcome import force_rmse

        return force_rmse(self.model.predict, frames or self.database.validation_set())


def _with_defaults(stored: dict[str, Any]) -> dict[str, Any]:
    """A stored config with the settings added since it was written at their defaults (older run folders)."""
    fresh = CampaignConfig().to_dict()
    full = {name: ({**fresh[name], **section} if isinstance(section, dict) and isinstance(fresh.get(name), dict)
                   else section) for name, section in stored.items()}
    return {**{name: value for name, value in fresh.items() if name not in full}, **full}


def _restart_uncertainty(walker: Walker) -> None:
    """Forget cached results and align the calculator's uncertainty schedule with the walker's step,
    so the spread is evaluated at the same steps whether or not the run was interrupted.
    """
    from almd.uncertainty.calculator import UncertaintyCalculator

    calc = walker.calculator
    if isinstance(calc, UncertaintyCalculator):
        calc.align_schedule(walker.step)
    else:
        calc.reset()


def run(config: CampaignConfig | str | Path) -> CampaignResult:
    """Run (or resume) the campaign of a config or a TOML file."""
    if not isinstance(config, CampaignConfig):
        config = CampaignConfig.from_toml(config)
    return Campaign(config).run()
