"""When to call the reference (DFT): a trigger over a stream of uncertainty scores.

Pure logic over numbers: no torch, no ASE dynamics, no MD. The walker feeds one
score per scored MD step (``Trigger.update(step, score)``) and acts on the
returned :class:`Decision`. Every threshold is a force in eV/Å, because the
scores are calibrated force errors (the campaign's default: the RMS over atoms
of the calibrated per-component force uncertainty, the same quantity as a
held-out force RMSE).

The user states one number, ``target``: the force error they accept. It decides
(Callsen et al. 2026, methods.md §3; VASP ML_CTIFOR / ML_ICRITERIA; aims-PAX):

* a frame whose score is under the target is never sent to the reference;
* relative: score > ``rel_factor`` × trajectory-averaged error (the rolling
  mean over the last ``window`` MD steps);
* absolute: score > the history threshold, mean × (1 + ``adaptive_cx``) of
  the last ``adaptive_history`` scores, updated only while that history is
  stable (VASP ML_ICRITERIA = 1; ``abs_cap``, if given, is its starting value,
  and the fixed threshold with ``adaptive = False``);
* average: the trajectory-averaged error itself above ``target``;
* emergency brake: score > ``hard_cap`` (or not finite) → stop the step, roll
  the walker back to the last trusted frame, label the offending frame at once.

Convergence: ``converge_windows`` consecutive call-free windows with the
trajectory-averaged error below ``target``. Learning then stops (production):
no criterion calls any more, except the brake. An audit every ``audit_every``
quiet steps (:attr:`Action.AUDIT`, converged or not) labels one frame to check
the calibrated score against the true error (:meth:`Trigger.record_audit`);
a failed audit ends production and learning resumes. With ``subblock_target``
set (the lattice-dynamics model), convergence also needs the sub-block Bayesian
error of a larger supercell, recorded with :meth:`Trigger.record_subblock_error`
after the last call, below that target.

Scores of steps that were not scored are not fed. Calls are never closer than
``min_spacing`` steps, except the brake. The full state serialises to JSON for
exact, bit-for-bit restarts, and is checked field by field when read back
(:class:`TriggerState`).
"""

from __future__ import annotations

import json
import math
from collections import deque
from dataclasses import asdict, dataclass, field
from enum import Enum
from typing import Annotated, Any

import numpy as np
from pydantic import BeforeValidator

from almd.campaign.trigger_settings import DEFAULT_WINDOW, TriggerSettings
from almd.settings import ConfigError, read_state, settings

__all__ = [
    "DEFAULT_WINDOW",
    "Action",
    "Decision",
    "Trigger",
    "TriggerSettings",
    "TriggerState",
]

_STATE_VERSION = 3  # 3: windows in MD steps, audits, production; versions 1 and 2 still load

class Action(str, Enum):
    """What the walker must do after a step."""

    NONE = "none"  #: carry on
    LABEL = "label"  #: label a frame (this one or the best candidates), refit, carry on
    BRAKE = "brake"  #: stop the step, roll back to ``rollback_to``, label this frame now
    AUDIT = "audit"  #: label this frame to check the score; report with Trigger.record_audit


@dataclass(frozen=True)
class Decision:
    """The trigger's verdict on one step. Forces in eV/Å.

    ``reasons`` lists the criteria the score met ("hard_cap", "non_finite",
    "relative", "absolute", "average"), even when ``min_spacing`` or production
    suppressed the call (``suppressed``); such frames are still good candidates
    for :func:`select_frames` at the next call.
    """

    step: int
    score: float
    action: Action
    reasons: tuple[str, ...]
    rolling_mean: float  #: trajectory-averaged error before this step (nan if empty)
    threshold: float  #: the absolute threshold in force at this step (nan if none)
    suppressed: bool = False
    rollback_to: int | None = None  #: last trusted step (brake only)

    @property
    def call(self) -> bool:
        """True when a reference calculation must be made (audits included)."""
        return self.action is not Action.NONE

    @property
    def stop(self) -> bool:
        """True when the step must be discarded and the walker rolled back."""
        return self.action is Action.BRAKE

    @property
    def audit(self) -> bool:
        return self.action is Action.AUDIT

    @property
    def candidate(self) -> bool:
        """True when some criterion was met (called or not)."""
        return bool(self.reasons)

    def as_dict(self) -> dict[str, Any]:
        """Plain-JSON record for the label's provenance (threshold in eV/Å etc.)."""
        d = asdict(self)
        d["action"] = self.action.value
        d["reasons"] = list(self.reasons)
        for key in ("score", "rolling_mean", "threshold"):
            if not math.isfinite(d[key]):
                d[key] = None  # JSON has no nan
        return d


def _pair(value: Any) -> Any:
    """JSON writes the sub-block record (error, n_calls) as a list."""
    return tuple(value) if isinstance(value, list) else value


@settings
class TriggerState:
    """A trigger's saved state (:meth:`Trigger.state_dict`), checked when read back; the fields
    with defaults are absent from the states of older versions.
    """

    version: int
    settings: dict[str, Any]  #: TriggerSettings fields (checked as those)
    window: list[float]
    window_steps: list[int]
    adapt: list[float]
    adapt_steps: list[int]
    last_step: int | None
    last_call: int | None
    last_avg_call: int | None
    last_trusted: int | None
    threshold: float | None
    block_start: int | None
    block_ok: bool
    good_blocks: int
    n_calls: int
    n_brakes: int
    stationary_from: int = 0
    last_audit: int | None = None
    first_step: int | None = None  #: absent (version 1, 2): the first step in the window
    converged_at: int | None = None
    n_audits: int = 0
    n_audit_failures: int = 0
    audits: list[dict[str, Any]] = field(default_factory=list)
    subblock: Annotated[tuple[float, int], BeforeValidator(_pair)] | None = None

    @classmethod
    def read(cls, state: Any) -> "TriggerState":
        """The saved ``state``, every field checked; a missing or corrupt one is a one-line ConfigError."""
        return read_state(cls, state, "trigger state")


class Trigger:
    """Stateful trigger over a stream of per-step uncertainty scores (eV/Å)."""

    def __init__(self, settings: TriggerSettings | None = None, stationary_from: int = 0) -> None:
        self.settings = settings or TriggerSettings()
        s = self.settings
        # windows count towards convergence only from this step on: while the walker's conditions
        # still change (a temperature ramp), a quiet window says nothing about what comes next
        self.stationary_from = int(stationary_from)
        self.window = s.window_steps
        # Scores of the last 2 windows (in steps) are kept so that a rollback (brake) can
        # restore the entries the abandoned branch pushed out; only the last window counts.
        self._window: deque[float] = deque()
        self._wsteps: deque[int] = deque()  # step of each entry
        self._last_step: int | None = None
        self._last_call: int | None = None
        self._last_avg_call: int | None = None
        self._last_trusted: int | None = None
        self._last_audit: int | None = None
        self._first_step: int | None = None
        self._threshold: float | None = s.abs_cap
        self._adapt: deque[float] = deque(maxlen=2 * s.adaptive_history)
        self._asteps: deque[int] = deque(maxlen=2 * s.adaptive_history)
        # Convergence: consecutive call-free blocks of `window` steps whose
        # trajectory-averaged error stayed below target.
        self._block_start: int | None = None
        self._block_ok = True
        self._good_blocks = 0
        self._converged_at: int | None = None  # step learning stopped (production since)
        # Latest sub-block error and n_calls when it was recorded: a later call
        # refits the model, so the value no longer describes it.
        self._subblock: tuple[float, int] | None = None
        self.n_calls = 0
        self.n_brakes = 0
        self.n_audits = 0
        self.n_audit_failures = 0
        self.audits: list[dict[str, Any]] = []  # step, true error, score, passed

    # ------------------------------------------------------------------ queries
    def _recent(self) -> list[float]:
        """Scores of the last ``window`` MD steps, oldest first."""
        if self._last_step is None:
            return []
        since = self._last_step - self.window
        return [v for v, t in zip(self._window, self._wsteps) if t > since]

    @property
    def rolling_mean(self) -> float:
        """Trajectory-averaged error (eV/Å) over the window; nan when empty."""
        # fsum: order-independent exact sum, so restored state gives identical means.
        recent = self._recent()
        return math.fsum(recent) / len(recent) if recent else math.nan

    @property
    def threshold(self) -> float | None:
        """Current absolute threshold (eV/Å): ``abs_cap`` or the history's."""
        return self._threshold

    @property
    def converged(self) -> bool:
        """True in production: after ``converge_windows`` call-free windows below
        ``target`` (and, with ``subblock_target`` set, a sub-block error below it
        recorded since the last call), until a failed audit or a brake.
        """
        return self._converged_at is not None

    @property
    def converged_at(self) -> int | None:
        """The step learning stopped; None while learning."""
        return self._converged_at

    def _convergence_met(self) -> bool:
        s = self.settings
        if s.target is None or self._good_blocks < s.converge_windows:
            return False
        return s.subblock_target is None or self.subblock_error < s.subblock_target

    @property
    def subblock_error(self) -> float:
        """The sub-block error (eV/Å) recorded for the current model; nan if none
        was recorded since the last call.
        """
        if self._subblock is None or self._subblock[1] != self.n_calls:
            return math.nan
        return self._subblock[0]

    @property
    def wants_subblock_test(self) -> bool:
        """True when only the sub-block test stands between the model and convergence: the
        windows are below ``target`` and no sub-block error was recorded since the last call.
        """
        s = self.settings
        return (s.subblock_target is not None and not self.converged and s.target is not None
                and self._good_blocks >= s.converge_windows and math.isnan(self.subblock_error))

    def _subblock_failed(self) -> bool:
        # the model's sub-block error, recorded after the last call, is above its target: label more
        t = self.settings.subblock_target
        return t is not None and not self.converged and self.subblock_error >= t

    def record_subblock_error(self, error: float) -> bool:
        """Record the sub-block Bayesian error (eV/Å) of the current model on
        larger-supercell MD frames, e.g. ``subblock_convergence(...).value``.
        Returns whether it is below ``subblock_target`` (False if that is None).
        Above it, the next spaced step calls (reason ``subblock``): the test found
        environments the model is unsure of. A later call (label or brake) makes the
        record stale.
        """
        error = float(error)
        if not error >= 0:  # also rejects nan
            raise ValueError(f"sub-block error {error!r}: must be a force >= 0 in eV/Å")
        self._subblock = (error, self.n_calls)
        if self._convergence_met() and self._last_step is not None:
            self._converged_at = self._last_step
        t = self.settings.subblock_target
        return t is not None and error < t

    def record_audit(self, step: int, true_error: float, score: float) -> bool:
        """The outcome of the audit of ``step``: the true force error (eV/Å, the same
        measure as the score) against the calibrated ``score``. Returns whether it
        passed; a failed audit ends production and starts the convergence test afresh.
        """
        s = self.settings
        allowed = max(s.audit_tolerance * float(score), s.target or 0.0)
        passed = bool(float(true_error) <= allowed)
        self.audits.append({"step": int(step), "true_error": float(true_error), "score": float(score),
                            "passed": passed})
        if not passed:
            self.n_audit_failures += 1
            self._converged_at = None
            self._good_blocks = 0
            self._block_start = self._last_step
            self._block_ok = True
        return passed

    @property
    def last_call(self) -> int | None:
        return self._last_call

    # ------------------------------------------------------------------ update
    def update(self, step: int, score: float) -> Decision:
        """Feed the score (eV/Å) of MD step ``step``; return what to do.

        Steps must increase strictly: a repeated step after a restart would
        otherwise count a frame twice. After a brake, steps after ``rollback_to``
        are accepted again (the walker re-runs them).
        """
        s = self.settings
        step = int(step)
        if self._last_step is not None and step <= self._last_step:
            raise ValueError(
                f"Trigger.update: step {step} is not after the last step {self._last_step}"
            )
        score = float(score)
        self._last_step = step
        if self._block_start is None:
            self._block_start = self._first_step = step
        mean = self.rolling_mean
        thr = self._threshold
        thr_out = math.nan if thr is None else thr

        # Emergency brake first: an unphysical frame must never enter the history.
        if not math.isfinite(score) or (s.hard_cap is not None and score > s.hard_cap):
            reason = "non_finite" if not math.isfinite(score) else "hard_cap"
            self.n_brakes += 1
            self._converged_at = None  # a model that blows up has not converged
            self._register_call(step)
            self._rollback(self._last_trusted)
            return Decision(step, score, Action.BRAKE, (reason,), mean, thr_out,
                            rollback_to=self._last_trusted)

        reasons = self._criteria(step, score, mean)
        if self._subblock_failed():
            reasons.append("subblock")
        if "average" in reasons:
            self._block_ok = False
        self._adapt_threshold(step, score)

        spaced = self._last_call is None or step - self._last_call >= s.min_spacing
        fire = bool(reasons) and spaced and not self.converged
        if fire and reasons == ["average"]:
            gap = self.window if s.target_spacing is None else s.target_spacing
            ref = self._last_avg_call
            fire = ref is None or step - ref >= gap
            if fire:
                self._last_avg_call = step
        if not reasons:
            self._last_trusted = step
        if fire:
            self._register_call(step)
            action = Action.LABEL
        else:
            self._close_block(step)
            action = Action.AUDIT if self._audit_due(step) else Action.NONE
            if action is Action.AUDIT:
                self._last_audit = step
                self.n_audits += 1
        return Decision(step, score, action, tuple(reasons), mean, thr_out,
                        suppressed=bool(reasons) and not fire)

    def _criteria(self, step: int, score: float, mean: float) -> list[str]:
        """The criteria ``score`` meets; appends it to the window."""
        s = self.settings
        reasons: list[str] = []
        enough = len(self._recent()) >= s.min_history
        under_target = s.target is not None and score <= s.target  # what the user accepts
        if enough and score > s.rel_factor * mean and not under_target:
            reasons.append("relative")
        thr = self._threshold
        if thr is not None and score > thr and not under_target:
            reasons.append("absolute")
        # The average criterion looks at the window including this step.
        self._window.append(score)
        self._wsteps.append(step)
        while self._wsteps and self._wsteps[0] <= step - 2 * self.window:
            self._wsteps.popleft()
            self._window.popleft()
        if s.target is not None and enough and self.rolling_mean > s.target:
            reasons.append("average")
        return reasons

    def _audit_due(self, step: int) -> bool:
        every = self.settings.audit_steps
        if every <= 0:
            return False
        since = max(t for t in (self._last_call, self._last_audit, self._first_step) if t is not None)
        return step - since >= every

    def _rollback(self, to: int | None) -> None:
        """Forget the abandoned branch: the walker re-runs the steps after ``to``
        (with the refitted model), so their old scores must not stay in the
        history, and their step numbers must be accepted again.
        """
        for scores, steps in ((self._window, self._wsteps), (self._adapt, self._asteps)):
            while steps and (to is None or steps[-1] > to):
                steps.pop()
                scores.pop()
        self._last_step = to

    def _register_call(self, step: int) -> None:
        self._last_call = step
        self.n_calls += 1
        # A call breaks convergence; a fresh block starts after it.
        self._good_blocks = 0
        self._block_start = step
        self._block_ok = True

    def _close_block(self, step: int) -> None:
        s = self.settings
        if s.target is None or self._block_start is None:
            return
        if step - self._block_start >= self.window:
            full = len(self._recent()) >= s.min_history
            ok = self._block_ok and full and self.rolling_mean < s.target and self._block_start >= self.stationary_from
            self._good_blocks = self._good_blocks + 1 if ok else 0
            self._block_start = step
            self._block_ok = True
            if not self.converged and self._convergence_met():
                self._converged_at = step

    def _adapt_threshold(self, step: int, score: float) -> None:
        """VASP ML_ICRITERIA=1-like update: only when the history is stable."""
        s = self.settings
        if not s.adaptive:
            return
        self._adapt.append(score)
        self._asteps.append(step)
        if len(self._adapt) < s.adaptive_history:  # (cleared after each update)
            return
        h = np.array(_last(self._adapt, s.adaptive_history), dtype=float)
        mean = float(h.mean())
        if mean <= 0:
            return
        spread = float(h.std()) / mean
        # Least-squares slope in closed form (polyfit is 10x slower per step).
        x = np.arange(h.size, dtype=float) - (h.size - 1) / 2
        slope = float(x @ (h - mean) / (x @ x))
        drift = abs(slope) * h.size / mean
        if spread < s.adaptive_max_spread and drift < s.adaptive_max_slope:
            self._threshold = mean * (1.0 + s.adaptive_cx)
            # A fresh history must build up before the next update (as VASP does).
            self._adapt.clear()
            self._asteps.clear()

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        """Everything needed for an exact restart (JSON-serialisable)."""
        return {
            "version": _STATE_VERSION,
            "settings": asdict(self.settings),
            "stationary_from": self.stationary_from,
            "window": list(self._window),
            "window_steps": list(self._wsteps),
            "adapt": list(self._adapt),
            "adapt_steps": list(self._asteps),
            "last_step": self._last_step,
            "last_call": self._last_call,
            "last_avg_call": self._last_avg_call,
            "last_trusted": self._last_trusted,
            "last_audit": self._last_audit,
            "first_step": self._first_step,
            "threshold": self._threshold,
            "block_start": self._block_start,
            "block_ok": self._block_ok,
            "good_blocks": self._good_blocks,
            "converged_at": self._converged_at,
            "n_calls": self.n_calls,
            "n_brakes": self.n_brakes,
            "n_audits": self.n_audits,
            "n_audit_failures": self.n_audit_failures,
            "audits": self.audits,
            "subblock": None if self._subblock is None else list(self._subblock),
        }

    @classmethod
    def from_state_dict(cls, state: dict[str, Any]) -> "Trigger":
        """The trigger :meth:`state_dict` saved (versions 1 to 3); a corrupt state is a one-line error."""
        version = state.get("version") if isinstance(state, dict) else None
        if version not in (1, 2, _STATE_VERSION):
            raise ValueError(f"Trigger state version {version!r} != {_STATE_VERSION}")
        saved = TriggerState.read(state)
        settings = dict(saved.settings)
        if version < 3:  # the old defaults, spelt out: a resumed old run keeps its behaviour
            settings = {"target": None, "abs_cap": 0.02, "adaptive": False, "adaptive_history": 400,
                        "window": 1000, "audit_every": 0, **settings}
        try:
            trig = cls(TriggerSettings.from_dict(settings), saved.stationary_from)
        except ValueError as exc:  # the settings' own checks raise plain ValueErrors
            raise ConfigError(f"trigger state: {exc}") from None
        trig._window.extend(saved.window)
        trig._adapt.extend(saved.adapt)
        trig._wsteps.extend(saved.window_steps)
        trig._asteps.extend(saved.adapt_steps)
        trig._last_step = saved.last_step
        trig._last_call = saved.last_call
        trig._last_avg_call = saved.last_avg_call
        trig._last_trusted = saved.last_trusted
        trig._last_audit = saved.last_audit
        trig._first_step = saved.first_step if "first_step" in state else (
            trig._wsteps[0] if trig._wsteps else None)
        trig._threshold = saved.threshold
        trig._block_start = saved.block_start
        trig._block_ok = saved.block_ok
        trig._good_blocks = saved.good_blocks
        trig._converged_at = saved.converged_at
        if version < 3 and trig._convergence_met():
            trig._converged_at = trig._last_step
        trig.n_calls = saved.n_calls
        trig.n_brakes = saved.n_brakes
        trig.n_audits = saved.n_audits
        trig.n_audit_failures = saved.n_audit_failures
        trig.audits = saved.audits
        trig._subblock = saved.subblock  # absent from version-1 states
        return trig

    def to_json(self) -> str:
        # json writes floats with repr(), which round-trips exactly.
        return json.dumps(self.state_dict())

    @classmethod
    def from_json(cls, text: str) -> "Trigger":
        return cls.from_state_dict(json.loads(text))


def _last(d: deque, n: int) -> list:
    """The last ``n`` entries of a deque, oldest first."""
    return list(d)[-n:] if len(d) > n else list(d)
