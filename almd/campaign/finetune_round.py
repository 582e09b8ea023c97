"""The campaign's fine-tune round: labels → :class:`~almd.finetune.Finetuner` → new backbone → new ensemble.

A round starts when ``finetune.every`` new training labels have arrived
since the last one; under MPI every rank trains (data-parallel), rank 0 writes (``[finetune]`` in
the campaign file). The backbone the walkers use (the last round's: a warm start) is fine-tuned
on every training label the campaign has learnt from (energies, forces, stress; Hessian columns
for labels that carry a Hessian, the campaign's own phonon labels and the phonon sets of
``finetune.config``), validated on its newest ``recent_labels`` held-out labels every
``eval_every`` steps (``patience`` and ``budget`` may end it early), and written to
``OUTPUT/models/backbone-vN.pt`` (N: the model version it starts; atomic; the trainer's
log.csv / log.json in ``OUTPUT/finetune/vN/``). The ensemble is then rebuilt on that file:
heads fitted on the newest ``recent_labels`` training labels, calibration redone on the same
held-out ones, so the rebuild costs the same at 200 labels as at 50. Every rank loads the same
file. The trainer keeps the best of its validations, the start included, so a round that
would make the held-out loss worse leaves the weights as they were.

"The labels the campaign has learnt from" are those its ensemble was fitted
(and calibrated) on, not whatever the database holds: after a kill, the
database already has labels that the resumed run asks for again only later,
and a resumed run must fine-tune on exactly what the uninterrupted one did.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ase import Atoms

from almd.campaign.config import CampaignConfig
from almd.campaign.phonon_labels import PHONON_FILE

__all__ = ["finetune_config", "finetune_round", "heads_subset", "learnt_labels", "train_backbone"]


def finetune_config(config: CampaignConfig, backbone: str, workdir: Path, seed: int):
    """The :class:`~almd.finetune.FinetuneConfig` of one round: ``finetune.config``'s settings (or the
    defaults) with the campaign's backbone, steps, strategy, lr, validation, budget and seed; its data
    files for labels are dropped (the campaign gives its own), its phonon / third-order / replay sets
    kept (``finetune.replay = "self"`` adds self-distilled replay).
    """
    from almd.finetune.config import FinetuneConfig

    ft = config.finetune
    base = FinetuneConfig.from_toml(ft.config) if ft.config else FinetuneConfig()
    model = dataclasses.replace(base.model, name=str(backbone), strategy=ft.strategy,
                                freeze=list(ft.freeze or base.model.freeze))
    data = dataclasses.replace(base.data, efs=[], validation=[], replay=ft.replay or base.data.replay)
    optim = dataclasses.replace(base.optim, lr=ft.lr)
    # checkpoints only at the end: a killed round is simply run again from the campaign's checkpoint
    run = dataclasses.replace(base.run, steps=ft.steps, checkpoint_every=ft.steps, seed=seed,
                              eval_every=min(ft.eval_every, ft.steps), patience=ft.patience, budget=ft.budget,
                              output=str(workdir), progress=False)
    cfg = dataclasses.replace(base, model=model, data=data, optim=optim, run=run)
    cfg.validate()
    return cfg


def learnt_labels(database, ensemble, recent: int = 0) -> tuple[list[Atoms], list[Atoms]]:
    """(training, held-out) labels of ``database`` the ensemble's model was made from, each in
    the order they were learnt (the bootstrap draws depend on it; under MPI the database's rows
    are in the order the reference finished them, which a rerun need not repeat).
    ``recent`` > 0 keeps only the newest that many held-out labels.
    """
    order = {key: i for i, key in enumerate(ensemble.trained_keys)}
    seen = {key: i for i, key in enumerate(ensemble.calibrated_order)}
    train = {a.info["content_hash"]: a for a in database.training_set() if a.info.get("content_hash") in order}
    held = {a.info["content_hash"]: a for a in database.validation_set()
            if a.info.get("content_hash") in ensemble.calibrated_keys}
    learnt = sorted(train.values(), key=lambda a: order[a.info["content_hash"]])
    held_out = sorted(held.values(), key=lambda a: (seen.get(a.info["content_hash"], len(seen)),
                                                    a.info["content_hash"]))
    return learnt, held_out[-recent:] if recent else held_out


def heads_subset(train: list[Atoms], recent: int) -> list[Atoms]:
    """The newest ``recent`` training labels (all for 0), plus the newest label of each element
    they lack: the rebuilt heads must keep every species the ensemble has learnt.
    """
    if not recent or len(train) <= recent:
        return list(train)
    chosen = train[-recent:]
    missing = {int(z) for a in train for z in a.numbers} - {int(z) for a in chosen for z in a.numbers}
    extra = []
    for a in reversed(train[:-recent]):
        if missing & {int(z) for z in a.numbers}:
            extra.append(a)
            missing -= {int(z) for z in a.numbers}
    return extra[::-1] + chosen


def train_backbone(config: CampaignConfig, backbone: str, version: int, output: Path, train: list[Atoms],
                   held: list[Atoms], comm: Any = None) -> tuple[Any, Any]:
    """The round's :class:`~almd.finetune.Finetuner`, fitted; returns (trainer, result).

    Under MPI every rank calls this with the same labels and ``comm``: the batches are
    shared out (:mod:`almd.finetune.parallel`) and every rank ends with the same weights.
    """
    from almd.finetune import Finetuner
    from almd.finetune.data import load_phonon

    workdir = output / "finetune" / f"v{version}"
    cfg = finetune_config(config, backbone, workdir, seed=config.md.seed + version)
    fold = cfg.data.phonon_fold or None
    phonon = [a for a in train if "hessian" in a.info] + [s for p in cfg.data.phonon for s in load_phonon(p, fold)]
    own = output / PHONON_FILE  # the campaign's own phonon labels (bootstrap displacements)
    if config.learning.phonons and own.is_file():
        phonon += load_phonon(own)
    efs = [a for a in train if "hessian" not in a.info]
    # no held-out labels (validation_fraction 0, no initial calibration): validate on the training ones;
    # the trainer then only refuses a round that makes the training loss worse
    trainer = Finetuner(cfg, potential=backbone, phonon=phonon, efs=efs, validation=held or train[-config.finetune.recent_labels:], comm=comm)
    return trainer, trainer.fit(save_model=False)


def finetune_round(config: CampaignConfig, database, ensemble, backbone: str, version: int, output: Path,
                   train_on: Callable[[tuple], tuple[Any, Any]] | None = None) -> tuple[Path, Any, dict[str, Any]]:
    """Fine-tune ``backbone`` on the campaign's labels; returns the model file, the ensemble rebuilt on it
    (fitted and calibrated) and a record of the round (for ``campaign.json``).

    ``train_on(args)`` runs :func:`train_backbone` on ``args`` (default: here; the campaign
    passes one that runs it on every MPI rank) and returns rank 0's (trainer, result).
    """
    from almd.uncertainty import Ensemble
    from almd.uncertainty.calibration import Calibration

    t0 = time.perf_counter()
    recent = config.finetune.recent_labels
    train, held = learnt_labels(database, ensemble, recent)
    args = (config, backbone, version, output, train, held)
    trainer, result = train_on(args) if train_on is not None else train_backbone(*args)
    workdir = output / "finetune" / f"v{version}"
    (workdir / "checkpoint.pt").unlink(missing_ok=True)  # a finished round is never resumed; it is large
    path = trainer.export(output / "models" / f"backbone-v{version}.pt")
    t1 = time.perf_counter()

    calibration = Calibration.from_state_dict(ensemble.calibration.state_dict())  # same settings, data reset
    new = Ensemble(path, k=ensemble.k, seed=ensemble.seed, rank=ensemble.rank, score=ensemble.score,
                   calibration=calibration)
    new.fit(heads_subset(train, recent), append=False)
    new.trained_keys = list(ensemble.trained_keys)  # the backbone learnt them all; the heads the newest
    if held:
        new.calibrate(held, reset=True)
    # older held-out labels stay learnt (never labelled again), in their order
    new.calibrated_keys |= ensemble.calibrated_keys
    new.calibrated_order = list(ensemble.calibrated_order)
    new.version = ensemble.version + 1
    record = {"model_version": version, "backbone": str(path), "from": str(backbone), "train": len(train),
              "held_out": len(held), "heads_on": len(new.designs), "steps": result.steps_done,
              "best_step": result.best_step, "stopped": result.stop_reason,
              "initial_validation": result.initial_validation, "best_validation": result.best_validation,
              "finetune_seconds": round(t1 - t0, 2), "refit_seconds": round(time.perf_counter() - t1, 2)}
    return path, new, record
