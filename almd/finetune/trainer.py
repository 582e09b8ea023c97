"""The fine-tuning loop: PFT steps, co-training, EMA, validation, early stopping, checkpoints.

One *step* is one fine-tuning batch (phonon structures with one random Hessian
column each, plus EFS structures) followed by ``replay_ratio`` co-training
batches, all with the same AdamW optimiser; the EMA is updated once per step,
after its replay batches, so runs with and without co-training average over the
same number of steps. Strategy "delta" adds λ_Δ·‖Δω‖² (``optim.delta_l2``) to the
fine-tuning batch's loss. Validation uses the EMA weights and fixed Hessian
columns and never includes the Δω penalty. A checkpoint holds everything that
changes (weights, optimiser, EMA, RNG, step, history), so a resumed run repeats
an uninterrupted one bit for bit.
"""

from __future__ import annotations

import contextlib
import csv
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

from almd import potentials
from almd.finetune import losses
from almd.finetune.config import FinetuneConfig
from almd.finetune.data import (
    DataError,
    Sample,
    apply_energy_shifts,
    as_samples,
    check_samples,
    fit_energy_shifts,
    load_efs,
    load_phonon,
    load_third_order,
    self_distilled,
    split_validation,
)
from almd.finetune.parallel import DataParallel
from almd.potentials import Potential, adapters, atomic_torch_save
from almd.potentials.files import read_payload

__all__ = ["DTYPES", "EMA", "Finetuner", "FinetuneResult", "LOG_FIELDS", "shift_energies"]

DTYPES = {"float32": torch.float32, "float64": torch.float64}
LOG_FIELDS = ("step", "loss", "energy", "forces", "stress", "hessian", "third_order", "delta_l2", "replay",
              "grad_norm", "val_loss", "val_hessian_mae", "val_third_order_mae", "val_forces_mae", "val_seconds",
              "seconds")


@dataclass
class FinetuneResult:
    model_path: Path | None
    best_step: int
    best_val_loss: float
    steps_done: int
    stopped_early: bool  #: before run.steps: by early stopping or by the budget (see stop_reason)
    initial_validation: dict[str, float]
    best_validation: dict[str, float]
    energy_shifts: dict[int, float] = field(default_factory=dict)
    history: list[dict[str, Any]] = field(default_factory=list)
    stop_reason: str = "steps"  #: "steps", "patience" (early stopping) or "budget" (wall time)


class EMA:
    """Exponential moving average of the trainable parameters.

    The decay warms up as min(d, (1+t)/(10+t)): with d = 0.999 from the first
    step, a run of a few hundred steps would hand back mostly the base model.
    t counts fine-tuning steps: the trainer calls :meth:`update` once per step,
    after the step's replay (co-training) updates, not after every optimiser update.
    """

    def __init__(self, params: dict[str, torch.nn.Parameter], decay: float):
        self.params, self.decay, self.updates = params, decay, 0
        self.shadow = {k: p.detach().clone() for k, p in params.items()}

    @torch.no_grad()
    def update(self) -> None:
        self.updates += 1
        d = min(self.decay, (1 + self.updates) / (10 + self.updates))
        for k, p in self.params.items():
            self.shadow[k].mul_(d).add_(p.detach(), alpha=1 - d)

    @contextlib.contextmanager
    def applied(self) -> Iterator[None]:
        if self.decay <= 0:
            yield
            return
        saved = {k: p.detach().clone() for k, p in self.params.items()}
        with torch.no_grad():
            for k, p in self.params.items():
                p.copy_(self.shadow[k])
        try:
            yield
        finally:
            with torch.no_grad():
                for k, p in self.params.items():
                    p.copy_(saved[k])

    def weights(self) -> dict[str, torch.Tensor]:
        src = self.shadow if self.decay > 0 else {k: p.detach() for k, p in self.params.items()}
        return {k: v.clone() for k, v in src.items()}

    def state_dict(self) -> dict[str, Any]:
        return {"shadow": self.shadow, "updates": self.updates}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.updates = state["updates"]
        for k, v in state["shadow"].items():
            self.shadow[k].copy_(v)


def _atomic_save(obj: Any, path: Path) -> None:
    atomic_torch_save(obj, path)


class Finetuner:
    """Fine-tune a potential on Hessian (phonon) and EFS labels.

    ``phonon``, ``efs``, ``validation`` and ``replay`` take Atoms (labels in their
    calculator, Hessians in ``info['hessian']``) or :class:`Sample` objects and
    override the files named in ``config.data``. All input is checked here,
    before any training. Given replay labels (a file or ``replay``) are taken to
    be the base model's: their energies get the fitted per-element shifts too
    (``data.shift_replay``).
    """

    def __init__(self, config: FinetuneConfig | None = None, potential: Potential | str | None = None,
                 phonon: list | None = None, efs: list | None = None, validation: list | None = None,
                 replay: list | None = None, comm: Any = None):
        self.config = cfg = config or FinetuneConfig()
        # data-parallel over comm's ranks (every rank builds the same trainer); rank 0 alone writes files
        self.parallel = DataParallel(comm) if comm is not None and comm.size > 1 else None
        self.writes = comm is None or comm.rank == 0
        cfg.validate()
        if cfg.run.threads > 0:
            torch.set_num_threads(cfg.run.threads)
        self.dtype = DTYPES[cfg.model.dtype]
        self.output = Path(cfg.run.output)
        torch.manual_seed(cfg.run.seed)
        pot = potentials.load(potential if potential is not None else cfg.model.name)
        self.potential = pot.to(dtype=self.dtype).train()

        d = cfg.data
        ph = as_samples(phonon, "phonon") if phonon is not None else \
            [s for p in d.phonon for s in load_phonon(p, d.phonon_fold or None)]
        ef = as_samples(efs, "efs") if efs is not None else [s for p in d.efs for s in load_efs(p)]
        if not ph and not ef:
            raise DataError("no training data: give phonon and/or EFS structures (data.phonon, data.efs)")
        check_samples(ph, pot, "phonon")
        check_samples(ef, pot, "efs")
        if any(s.hessian is None for s in ph):
            raise DataError("phonon structures need a Hessian label (info['hessian'])")
        if validation is not None or d.validation:
            val = as_samples(validation, "validation") if validation is not None else \
                [s for p in d.validation for s in (load_phonon(p) if _looks_phonon(p) else load_efs(p))]
            val_ph = [s for s in val if s.hessian is not None]
            val_efs = [s for s in val if s.hessian is None]
        else:
            ef, val_efs = split_validation(ef, d.validation_fraction) if d.validation_fraction > 0 else (ef, [])
            if len(ph) > 1 and d.validation_fraction > 0:
                ph, val_ph = split_validation(ph, d.validation_fraction)
            else:  # a single phonon structure: validated on fixed columns, trained on random ones
                val_ph = list(ph)
        third = [s for p in d.third_order for s in load_third_order(p)]
        check_samples(third, pot, "third-order")
        if third and validation is None and not d.validation and d.validation_fraction > 0:
            third, val_third = split_validation(third, d.validation_fraction)
            val_ph = val_ph + (val_third[:d.max_validation] if d.max_validation > 0 else val_third)
        self.third_order = third
        if d.max_validation > 0:
            val_efs = val_efs[:d.max_validation]
        check_samples(val_ph + val_efs, pot, "validation")
        if not ph and not ef:
            raise DataError("the training split is empty after taking out validation structures")
        if not val_ph and not val_efs:
            raise DataError("the validation split is empty: add structures, give data.validation, "
                            "or raise data.validation_fraction")
        self.phonon, self.efs, self.val_phonon, self.val_efs = ph, ef, val_ph, val_efs
        self.val_columns = [list(range(min(d.validation_columns, 3 * len(s.atoms)))) if s.columns is None
                            else list(s.columns[:d.validation_columns]) for s in val_ph]

        # Before any adapter: shifts fitted on the fine-tuning labels, then replay labels
        # from the (shifted) frozen base, so both are consistent with the new data.
        self.energy_shifts = (fit_energy_shifts(pot, ph + ef, self.dtype) if d.fit_energy_shifts else {})
        apply_energy_shifts(pot, self.energy_shifts)
        if replay is not None:
            self.replay = as_samples(replay, "replay")
        elif d.replay == "self":
            self.replay = self_distilled(pot, ph + ef, d.replay_count, d.replay_rattle, d.replay_strain,
                                         cfg.run.seed, self.dtype)
        elif d.replay:
            self.replay = load_efs(d.replay)
        else:
            self.replay = []
        check_samples(self.replay, pot, "replay")
        distilled = replay is None and d.replay == "self"
        if not distilled and d.shift_replay and self.energy_shifts:
            # given replay labels are assumed to come from the unshifted base (PFT's co-training
            # data): move their energies to the reference the model now has
            self.replay = shift_energies(self.replay, self.energy_shifts)

        m = cfg.model
        adapters.apply_strategy(pot, m.strategy, rank=m.lora_rank, alpha=m.lora_alpha or None,
                                radial=m.lora_radial, frozen_groups=m.freeze, seed=cfg.run.seed)
        self.named_trainable = {k: p for k, p in pot.named_parameters() if p.requires_grad}
        self.delta_l2 = cfg.delta_l2_weight  # > 0 only for strategy "delta" (config.validate)
        self.optimizer = torch.optim.AdamW(list(self.named_trainable.values()), lr=cfg.optim.lr,
                                           weight_decay=cfg.optim.weight_decay)
        self.ema = EMA(self.named_trainable, cfg.optim.ema)
        self.stop_reason = "steps"  #: why fit() stopped: "steps", "patience" or "budget" (kept in the checkpoint)
        self.rng = np.random.default_rng(cfg.run.seed)
        # replay draws from its own stream, so runs with and without co-training see the
        # same fine-tuning batches (a fair comparison of the two)
        self.replay_rng = np.random.default_rng([cfg.run.seed, 1])
        self.step = 0
        self.history: list[dict[str, Any]] = []
        self.best = {"loss": float("inf"), "step": 0, "weights": self.ema.weights(), "metrics": {}}
        self.bad_evals = 0
        self.initial_validation: dict[str, float] = {}

    # ------------------------------------------------------------ losses
    def weights(self) -> dict[str, float]:
        lo = self.config.loss
        return {"energy": self.config.energy_weight, "forces": lo.forces, "stress": lo.stress, "hessian": lo.hessian,
                "third_order": self.config.third_order_weight}

    def finetune_loss(self, phonon: list[Sample], efs: list[Sample], columns: list[int],
                      create_graph: bool = True) -> tuple[torch.Tensor, dict[str, float]]:
        """PFT loss of one batch: λ_E·E/N + λ_F·‖ΔF‖ + λ_σ·σ + λ_Φ·MAE(Hv − Φ_col) (+ λ_3·MAE of the odd part)."""
        w = self.weights()
        if phonon and (w["hessian"] > 0 or w["third_order"] > 0):  # one forward for EFS and the Hessian columns
            terms = losses.pft_terms(self.potential, phonon + efs, list(columns) + [None] * len(efs), self.dtype,
                                     create_graph)
        else:
            terms = losses.efs_terms(self.potential, phonon + efs, self.dtype, None, create_graph) if phonon + efs else {}
        total = sum(w[k] * v for k, v in terms.items() if w[k] > 0)
        return total, {k: float(v.detach()) for k, v in terms.items()}

    def _batch_loss(self, phonon: list[Sample], efs: list[Sample],
                    columns: list[int]) -> tuple[torch.Tensor, dict[str, float]]:
        """The loss of a global batch to differentiate on this rank, and the batch's terms (global values)."""
        if self.parallel is None:
            return self.finetune_loss(phonon, efs, columns)
        items = self.parallel.mine([(s, j) for s, j in zip(phonon, columns)] + [(s, None) for s in efs])
        w = self.weights()
        samples = [s for s, _ in items]
        stress = losses.wants_stress(phonon + efs)  # the whole batch decides, as in one process
        if any(j is not None for _, j in items) and (w["hessian"] > 0 or w["third_order"] > 0):
            terms, counts = losses.counted_pft_terms(self.potential, samples, [j for _, j in items], self.dtype,
                                                     want_stress=stress)
        else:
            terms, counts = losses.counted_efs_terms(self.potential, samples, self.dtype, want_stress=stress)
        weighted, values = self.parallel.combine(terms, counts)
        return self._weighted_sum(weighted, w), values

    def _weighted_sum(self, terms: dict[str, torch.Tensor], w: dict[str, float]) -> torch.Tensor:
        parts = [w[k] * v for k, v in terms.items() if w[k] > 0]
        return sum(parts[1:], parts[0]) if parts else torch.zeros((), dtype=self.dtype)

    def delta_penalty(self) -> torch.Tensor:
        """‖Δω‖² over the delta adapters' trainable Δω (0 for the other strategies)."""
        return adapters.delta_sq_norm(self.potential).to(self.dtype)

    def replay_loss(self, batch: list[Sample]) -> torch.Tensor:
        """The co-training loss of a global replay batch (this rank's weighted share when data-parallel)."""
        lo = self.config.loss
        w = {"energy": lo.replay_energy, "forces": lo.replay_forces, "stress": lo.replay_stress}
        if self.parallel is None:
            terms = losses.efs_terms(self.potential, batch, self.dtype, huber=lo.huber_delta)
            return sum(w[k] * v for k, v in terms.items())
        terms, counts = losses.counted_efs_terms(self.potential, self.parallel.mine(batch), self.dtype,
                                                 huber=lo.huber_delta, want_stress=losses.wants_stress(batch))
        return self._weighted_sum(self.parallel.combine(terms, counts)[0], {**w, "hessian": 0.0})

    def _total(self, loss: torch.Tensor) -> float:
        """A loss's value over the whole batch (summed over the ranks' shares)."""
        value = float(loss.detach())
        return value if self.parallel is None else self.parallel.total(value)

    def _optimise(self, loss: torch.Tensor) -> float:
        self.optimizer.zero_grad(set_to_none=True)
        if loss.requires_grad:  # a rank whose share of the batch is empty has nothing to differentiate
            loss.backward()
        if self.parallel is not None:
            self.parallel.sum_gradients(list(self.named_trainable.values()))
        norm = torch.nn.utils.clip_grad_norm_(list(self.named_trainable.values()), self.config.optim.clip)
        self.optimizer.step()
        return float(norm)

    def train_step(self) -> dict[str, float]:
        """One fine-tuning batch and its co-training batches."""
        run, rng = self.config.run, self.rng
        pool = self.phonon
        if self.third_order and (self.step % 2 == 1 or not self.phonon):  # every other step: third order
            pool = self.third_order
        phonon = [pool[i] for i in rng.integers(len(pool), size=run.batch_size)] if pool else []
        columns = [int(rng.integers(3 * len(s.atoms))) if s.columns is None else int(rng.choice(s.columns))
                   for s in phonon]
        efs = [self.efs[i] for i in rng.integers(len(self.efs), size=run.efs_batch)] if self.efs and run.efs_batch else []
        loss, terms = self._batch_loss(phonon, efs, columns)
        if self.delta_l2 > 0:
            penalty = self.delta_penalty()
            if self.writes:  # a function of the weights alone: counted once in the sum over ranks
                loss = loss + self.delta_l2 * penalty
            terms["delta_l2"] = float(penalty.detach())  # ‖Δω‖² before this step's update
        record = {"loss": self._total(loss), **terms, "grad_norm": self._optimise(loss),
                  "drawn": [s.name for s in phonon + efs]}  # which structures this step learnt from
        if self.config.co_training and self.replay:
            replay = []
            for _ in range(self.config.loss.replay_ratio):
                batch = [self.replay[i] for i in self.replay_rng.integers(len(self.replay), size=run.replay_batch)]
                r = self.replay_loss(batch)
                value = self._total(r)
                self._optimise(r)
                replay.append(value)
            record["replay"] = float(np.mean(replay))
        self.ema.update()  # once per step: the EMA's t counts steps, not optimiser updates
        self.step += 1
        return record

    def validate(self) -> dict[str, float]:
        """Validation loss (EMA weights, fixed Hessian columns) and physical error metrics."""
        jobs = [(s, j) for s, cols in zip(self.val_phonon, self.val_columns) for j in cols]
        jobs += [(s, None) for s in self.val_efs]
        with self.ema.applied():
            if self.parallel is None:
                results = [self._validation_term(s, j) for s, j in jobs]
            else:  # each rank its share of the structures and columns; every rank gets all results
                mine = {i: self._validation_term(*jobs[i]) for i in range(self.parallel.rank, len(jobs), self.parallel.size)}
                results = self.parallel.gather(mine, len(jobs))
        total, maes = 0.0, {"hessian": [], "third_order": [], "forces": []}
        for loss, kind, mae in results:
            total += loss
            maes[kind].append(mae)
        out = {f"val_{k}_mae": float(np.mean(v)) for k, v in maes.items() if v}
        out["val_loss"] = total / max(len(results), 1)
        return out

    def _validation_term(self, s: Sample, column: int | None) -> tuple[float, str, float]:
        """(weighted loss, kind, MAE) of one validation structure, on one Hessian column or on its EFS labels."""
        w = self.weights()
        if column is None:  # the loss of finetune_loss's EFS terms and the force MAE, from one model call
            terms, forces = losses.efs_validation(self.potential, s, self.dtype)
            loss = sum(w[k] * float(v.detach()) for k, v in terms.items() if w[k] > 0)
            return loss, "forces", float(np.abs(forces - s.forces).mean()) if s.forces is not None else float("nan")
        # the column error is reported even when λ_Φ = 0 (EFS-only fine-tuning)
        terms = losses.pft_terms(self.potential, [s], [column], self.dtype, create_graph=False)
        kind = "hessian" if "hessian" in terms else "third_order"
        return sum(w[k] * float(v.detach()) for k, v in terms.items() if w[k] > 0), kind, float(terms[kind].detach())

    # ------------------------------------------------------------ checkpoints
    @property
    def checkpoint_path(self) -> Path:
        return self.output / "checkpoint.pt"

    def save_checkpoint(self, path: Path | None = None) -> Path:
        path = path or self.checkpoint_path
        if not self.writes:  # data-parallel: rank 0 writes for every rank
            return path
        _atomic_save({
            "step": self.step, "model": self.potential.state_dict(), "optimizer": self.optimizer.state_dict(),
            "ema": self.ema.state_dict(), "rng": self.rng.bit_generator.state,
            "replay_rng": self.replay_rng.bit_generator.state, "torch_rng": torch.get_rng_state(),
            "history": self.history, "best": self.best, "bad_evals": self.bad_evals,
            "initial_validation": self.initial_validation, "config": self.config.to_dict(),
            "stop_reason": self.stop_reason,
        }, path)
        return path

    def load_checkpoint(self, path: Path | None = None) -> None:
        state = read_payload(path or self.checkpoint_path)
        self.potential.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.ema.load_state_dict(state["ema"])
        self.rng.bit_generator.state = state["rng"]
        self.replay_rng.bit_generator.state = state["replay_rng"]
        torch.set_rng_state(state["torch_rng"])
        self.step, self.history, self.best = state["step"], state["history"], state["best"]
        self.bad_evals, self.initial_validation = state["bad_evals"], state["initial_validation"]
        self.stop_reason = state.get("stop_reason", "steps")  # older checkpoints: not stopped by a budget

    def _write_logs(self) -> None:
        if not self.writes:
            return
        self.output.mkdir(parents=True, exist_ok=True)
        with open(self.output / "log.csv", "w", newline="") as fh:
            writer = csv.DictWriter(fh, LOG_FIELDS, extrasaction="ignore")
            writer.writeheader()
            writer.writerows(self.history)
        (self.output / "log.json").write_text(json.dumps(
            {"config": self.config.to_dict(), "energy_shifts": self.energy_shifts, "history": self.history,
             "best_step": self.best["step"], "best_val_loss": self.best["loss"]}, indent=1))

    # ------------------------------------------------------------ the loop
    def fit(self, resume: bool = False, save_model: bool = True,
            on_step: Callable[[dict[str, Any]], None] | None = None) -> FinetuneResult:
        """Train until ``run.steps``, early stopping or ``run.budget``; the best EMA weights end in the model.

        ``resume`` continues from ``<output>/checkpoint.pt`` when it exists. ``on_step(record)``
        sees each step's history record (losses, drawn structures, validation metrics, seconds).
        """
        from tqdm import tqdm

        run = self.config.run
        if resume and self.checkpoint_path.exists():
            self.load_checkpoint()
        if self.step == 0 and not self.initial_validation:
            self.initial_validation = self.validate()
            self._consider(self.initial_validation)
        # a run that already stopped early (patience or budget) stays stopped when resumed
        if 0 < run.patience <= self.bad_evals:
            self.stop_reason = "patience"
        stopped = self.stop_reason != "steps"
        start = time.perf_counter()
        bar = tqdm(total=run.steps, initial=self.step, disable=not run.progress, desc="finetune", unit="step")
        try:
            while self.step < run.steps and not stopped:
                t0 = time.perf_counter()
                record = {"step": self.step + 1, **self.train_step()}
                over = self._over_budget(start)
                if self.step % run.eval_every == 0 or self.step == run.steps or over:
                    t_val = time.perf_counter()
                    metrics = self.validate()
                    record.update(metrics, val_seconds=time.perf_counter() - t_val)
                    stopped = self._consider(metrics)
                    self.stop_reason = "patience" if stopped else self.stop_reason
                if over and not stopped:
                    stopped, self.stop_reason = True, "budget"
                record["seconds"] = time.perf_counter() - t0
                self.history.append(record)
                if on_step is not None:
                    on_step(record)
                bar.update(1)
                shown = ("loss", "hessian", "third_order", "forces", "replay", "val_loss")
                bar.set_postfix({k: f"{record[k]:.3g}" for k in shown if k in record})
                if self.step % run.checkpoint_every == 0 or stopped or self.step == run.steps:
                    self.save_checkpoint()
                    self._write_logs()
                if stopped:
                    break
        finally:
            bar.close()
        self._write_logs()
        # the best EMA weights become the model
        with torch.no_grad():
            for k, p in self.named_trainable.items():
                p.copy_(self.best["weights"][k])
        model_path = self.export(self.output / "model.pt") if save_model and self.writes else None
        return FinetuneResult(model_path, self.best["step"], self.best["loss"], self.step, stopped,
                              self.initial_validation, self.best["metrics"], self.energy_shifts, self.history,
                              self.stop_reason)

    def _over_budget(self, start: float) -> bool:
        """Whether ``run.budget`` seconds have passed since ``start``; under MPI rank 0's clock decides for all."""
        budget = self.config.run.budget
        if budget <= 0:
            return False
        over = float(time.perf_counter() - start >= budget)
        if self.parallel is not None:
            over = self.parallel.comm.bcast(over, root=0)
        return bool(over)

    def _consider(self, metrics: dict[str, float]) -> bool:
        """Track the best validation loss; True when patience has run out."""
        if metrics["val_loss"] < self.best["loss"]:
            self.best = {"loss": metrics["val_loss"], "step": self.step, "weights": self.ema.weights(),
                         "metrics": dict(metrics)}
            self.bad_evals = 0
            return False
        self.bad_evals += 1
        return 0 < self.config.run.patience <= self.bad_evals

    def export(self, path: str | Path) -> Path:
        """Merge adapters into (a copy of) the weights and save a file ``almd.Calculator(model=path)`` loads.

        The trainer's own model keeps its adapters and dtype, so training can go on.
        """
        import copy

        model = copy.deepcopy(self.potential)
        adapters.merge(model)
        return potentials.save(model.float(), path, finetune=self.config.to_dict(),
                               best_step=self.best["step"], energy_shifts=self.energy_shifts)


def shift_energies(samples: list[Sample], shifts: dict[int, float]) -> list[Sample]:
    """Copies of ``samples`` with Σ_Z N_Z·s_Z added to their energies (forces and stress unchanged)."""
    import dataclasses

    out = []
    for s in samples:
        if s.energy is None:
            out.append(s)
            continue
        offset = sum(shifts.get(int(z), 0.0) for z in s.atoms.numbers)
        out.append(dataclasses.replace(s, energy=s.energy + offset))
    return out


def _looks_phonon(path: str) -> bool:
    p = Path(path)
    return p.is_dir() or ".yaml" in p.name
