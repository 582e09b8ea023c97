"""When to call the reference (DFT): a trigger over a stream of uncertainty scores.

Pure logic over numbers: no torch, no ASE dynamics, no MD. The walker feeds one
score per MD step (``Trigger.update(step, score)``) and acts on the returned
:class:`Decision`. Every threshold is a force in eV/Å, because the scores are
force uncertainties (max per-component posterior std of the Bayesian model, or
the max per-atom force spread of an ensemble).

Criteria (Callsen et al. 2026, methods.md §3; VASP ML_CTIFOR / ML_ICRITERIA):

* relative: score > ``rel_factor`` × trajectory-averaged error (rolling mean of
  the previous ``window`` scores);
* absolute: score > the absolute threshold (``abs_cap``, or the adaptive one);
* average: the trajectory-averaged error itself above ``target``;
* emergency brake: score > ``hard_cap`` (or not finite) → stop the step, roll
  the walker back to the last trusted frame, label the offending frame at once.

Convergence: ``converge_windows`` consecutive call-free windows with the
trajectory-averaged error below ``target``; with ``subblock_target`` set (the
lattice-dynamics model), also the sub-block Bayesian error of a larger supercell
(:func:`almd.uncertainty.bayes_convergence.subblock_convergence`), recorded with
:meth:`Trigger.record_subblock_error` after the last call, below that target.

Calls are never closer than ``min_spacing`` steps, except for the brake.
The full state serialises to JSON for exact, bit-for-bit restarts.
"""

from __future__ import annotations

import json
import math
from collections import deque
from dataclasses import asdict, dataclass, fields
from enum import Enum
from typing import Any

import numpy as np

__all__ = [
    "Action",
    "Decision",
    "Trigger",
    "TriggerSettings",
]

_STATE_VERSION = 2  # 2: sub-block error; version-1 states still load


@dataclass(frozen=True)
class TriggerSettings:
    """Typed, validated settings of :class:`Trigger`. Forces in eV/Å, times in MD steps.

    Attributes
    ----------
        window: length of the rolling window (steps) that defines the
            trajectory-averaged error and the blocks of the convergence test.
        rel_factor: c in "score > c × rolling mean" (dimensionless, > 1).
        abs_cap: absolute threshold on a single score (eV/Å); ``None`` disables it.
            Also the starting value of the adaptive threshold.
        hard_cap: emergency-brake level (eV/Å); ``None`` disables the brake
            (non-finite scores still brake).
        target: target for the trajectory-averaged error (eV/Å); above it a call
            is made, below it for ``converge_windows`` call-free windows the run
            is converged. ``None`` disables both.
        min_spacing: minimum number of steps between two calls.
        min_history: scores needed in the window before the relative and the
            average criteria are trusted (a mean of 3 numbers is noise).
        target_spacing: minimum steps between two calls fired by the average
            criterion alone; ``None`` means ``window`` (let a refit show its effect
            on a fresh window before asking again).
        converge_windows: M, the number of consecutive call-free windows with
            the trajectory-averaged error below ``target`` that mean convergence.
        adaptive: update the absolute threshold as in VASP's ML_ICRITERIA=1.
        adaptive_cx: c_x in "threshold = history mean × (1 + c_x)".
        adaptive_history: number of scores in the adaptive history.
        adaptive_max_spread: update only if std/mean of the history is below this.
        adaptive_max_slope: update only if |fitted slope| × history length / mean
            (the relative drift across the history) is below this.
        subblock_target: if set (eV/Å), convergence also needs a sub-block Bayesian
            error below it, recorded for the current model (after the last call)
            with :meth:`Trigger.record_subblock_error`. Needs ``target``.
    """

    window: int = 1000
    rel_factor: float = 3.0
    abs_cap: float | None = 0.02
    hard_cap: float | None = 1.0
    target: float | None = None
    min_spacing: int = 10
    min_history: int = 20
    target_spacing: int | None = None
    converge_windows: int = 3
    adaptive: bool = False
    adaptive_cx: float = 0.2
    adaptive_history: int = 400
    adaptive_max_spread: float = 0.4
    adaptive_max_slope: float = 0.2
    subblock_target: float | None = None

    def __post_init__(self) -> None:
        def bad(name: str, allowed: str) -> None:
            raise ValueError(
                f"TriggerSettings.{name} = {getattr(self, name)!r}: must be {allowed}"
            )

        def is_int(v: Any) -> bool:
            return isinstance(v, (int, np.integer)) and not isinstance(v, bool)

        def is_pos(v: Any) -> bool:
            return (
                isinstance(v, (int, float, np.number))
                and not isinstance(v, bool)
                and math.isfinite(v)
                and v > 0
            )

        for name in ("window", "min_spacing", "adaptive_history", "converge_windows"):
            if not is_int(getattr(self, name)) or getattr(self, name) < 1:
                bad(name, "an integer >= 1")
        if not is_int(self.min_history) or not 1 <= self.min_history <= self.window:
            bad("min_history", f"an integer in [1, window={self.window}]")
        if self.target_spacing is not None and (
            not is_int(self.target_spacing) or self.target_spacing < 1
        ):
            bad("target_spacing", "None or an integer >= 1")
        if not is_pos(self.rel_factor) or self.rel_factor <= 1:
            bad("rel_factor", "a finite number > 1")
        for name in ("abs_cap", "hard_cap", "target", "subblock_target"):
            v = getattr(self, name)
            if v is not None and not is_pos(v):
                bad(name, "None or a finite force > 0 in eV/Å")
        if self.hard_cap is not None and self.abs_cap is not None and self.hard_cap <= self.abs_cap:
            bad("hard_cap", f"greater than abs_cap = {self.abs_cap} eV/Å")
        if self.subblock_target is not None and self.target is None:
            bad("subblock_target", "None when target is None (it adds to that convergence test)")
        if not isinstance(self.adaptive, bool):
            bad("adaptive", "True or False")
        if self.adaptive and self.abs_cap is None:
            bad("adaptive", "False when abs_cap is None (abs_cap is its starting value)")
        if not is_pos(self.adaptive_cx) and self.adaptive_cx != 0:
            bad("adaptive_cx", "a finite number >= 0")
        for name in ("adaptive_max_spread", "adaptive_max_slope"):
            if not is_pos(getattr(self, name)):
                bad(name, "a finite number > 0")
        if self.adaptive_history < 2:
            bad("adaptive_history", "an integer >= 2")

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TriggerSettings":
        """Build from a mapping; unknown keys are errors that name the key."""
        known = {f.name for f in fields(cls)}
        for key in d:
            if key not in known:
                raise ValueError(
                    f"TriggerSettings: unknown key {key!r}; allowed: {sorted(known)}"
                )
        return cls(**d)


class Action(str, Enum):
    """What the walker must do after a step."""

    NONE = "none"  #: carry on
    LABEL = "label"  #: label a frame (this one or the best candidates), refit, carry on
    BRAKE = "brake"  #: stop the step, roll back to ``rollback_to``, label this frame now


@dataclass(frozen=True)
class Decision:
    """The trigger's verdict on one step. Forces in eV/Å.

    ``reasons`` lists the criteria the score met ("hard_cap", "non_finite",
    "relative", "absolute", "average"), even when ``min_spacing`` suppressed the
    call (``suppressed``); such frames are still good candidates for
    :func:`select_frames` at the next call.
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
        """True when a reference calculation must be made."""
        return self.action is not Action.NONE

    @property
    def stop(self) -> bool:
        """True when the step must be discarded and the walker rolled back."""
        return self.action is Action.BRAKE

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


class Trigger:
    """Stateful trigger over a stream of per-step uncertainty scores (eV/Å)."""

    def __init__(self, settings: TriggerSettings | None = None) -> None:
        self.settings = settings or TriggerSettings()
        s = self.settings
        # Twice the window is kept so that a rollback (brake) can restore the
        # entries the abandoned branch pushed out; only the last `window` count.
        self._window: deque[float] = deque(maxlen=2 * s.window)
        self._wsteps: deque[int] = deque(maxlen=2 * s.window)  # step of each entry
        self._last_step: int | None = None
        self._last_call: int | None = None
        self._last_avg_call: int | None = None
        self._last_trusted: int | None = None
        self._threshold: float | None = s.abs_cap
        self._adapt: deque[float] = deque(maxlen=2 * s.adaptive_history)
        self._asteps: deque[int] = deque(maxlen=2 * s.adaptive_history)
        # Convergence: consecutive call-free blocks of `window` steps whose
        # trajectory-averaged error stayed below target.
        self._block_start: int | None = None
        self._block_ok = True
        self._good_blocks = 0
        # Latest sub-block error and n_calls when it was recorded: a later call
        # refits the model, so the value no longer describes it.
        self._subblock: tuple[float, int] | None = None
        self.n_calls = 0
        self.n_brakes = 0

    # ------------------------------------------------------------------ queries
    @property
    def rolling_mean(self) -> float:
        """Trajectory-averaged error (eV/Å) over the window; nan when empty."""
        # fsum: order-independent exact sum, so restored state gives identical means.
        recent = _last(self._window, self.settings.window)
        return math.fsum(recent) / len(recent) if recent else math.nan

    @property
    def threshold(self) -> float | None:
        """Current absolute threshold (eV/Å): ``abs_cap`` or its adapted value."""
        return self._threshold

    @property
    def converged(self) -> bool:
        """True after ``converge_windows`` call-free windows below ``target`` and,
        with ``subblock_target`` set, a sub-block error below it recorded since the
        last call.
        """
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

    def record_subblock_error(self, error: float) -> bool:
        """Record the sub-block Bayesian error (eV/Å) of the current model on
        larger-supercell MD frames, e.g. ``subblock_convergence(...).value``.
        Returns whether it is below ``subblock_target`` (False if that is None).
        A later call (label or brake) makes the record stale.
        """
        error = float(error)
        if not error >= 0:  # also rejects nan
            raise ValueError(f"sub-block error {error!r}: must be a force >= 0 in eV/Å")
        self._subblock = (error, self.n_calls)
        t = self.settings.subblock_target
        return t is not None and error < t

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
            self._block_start = step
        mean = self.rolling_mean
        thr = self._threshold
        thr_out = math.nan if thr is None else thr

        # Emergency brake first: an unphysical frame must never enter the history.
        if not math.isfinite(score) or (s.hard_cap is not None and score > s.hard_cap):
            reason = "non_finite" if not math.isfinite(score) else "hard_cap"
            self.n_brakes += 1
            self._register_call(step)
            self._rollback(self._last_trusted)
            return Decision(step, score, Action.BRAKE, (reason,), mean, thr_out,
                            rollback_to=self._last_trusted)

        reasons: list[str] = []
        enough = min(len(self._window), s.window) >= s.min_history
        if enough and score > s.rel_factor * mean:
            reasons.append("relative")
        if thr is not None and score > thr:
            reasons.append("absolute")
        # The average criterion looks at the window including this step.
        self._window.append(score)
        self._wsteps.append(step)
        new_mean = self.rolling_mean
        avg_hit = s.target is not None and enough and new_mean > s.target
        if avg_hit:
            reasons.append("average")
            self._block_ok = False
        self._adapt_threshold(step, score)

        spaced = self._last_call is None or step - self._last_call >= s.min_spacing
        fire = bool(reasons) and spaced
        if fire and reasons == ["average"]:
            gap = s.window if s.target_spacing is None else s.target_spacing
            ref = self._last_avg_call
            fire = ref is None or step - ref >= gap
            if fire:
                self._last_avg_call = step
        if not reasons:
            self._last_trusted = step
        if fire:
            self._register_call(step)
        else:
            self._close_block(step)
        return Decision(step, score, Action.LABEL if fire else Action.NONE,
                        tuple(reasons), mean, thr_out, suppressed=bool(reasons) and not fire)

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
        if step - self._block_start >= s.window:
            full = len(self._window) >= s.min_history
            ok = self._block_ok and full and self.rolling_mean < s.target
            self._good_blocks = self._good_blocks + 1 if ok else 0
            self._block_start = step
            self._block_ok = True

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
            "window": list(self._window),
            "window_steps": list(self._wsteps),
            "adapt": list(self._adapt),
            "adapt_steps": list(self._asteps),
            "last_step": self._last_step,
            "last_call": self._last_call,
            "last_avg_call": self._last_avg_call,
            "last_trusted": self._last_trusted,
            "threshold": self._threshold,
            "block_start": self._block_start,
            "block_ok": self._block_ok,
            "good_blocks": self._good_blocks,
            "n_calls": self.n_calls,
            "n_brakes": self.n_brakes,
            "subblock": None if self._subblock is None else list(self._subblock),
        }

    @classmethod
    def from_state_dict(cls, state: dict[str, Any]) -> "Trigger":
        if state.get("version") not in (1, _STATE_VERSION):
            raise ValueError(f"Trigger state version {state.get('version')!r} != {_STATE_VERSION}")
        trig = cls(TriggerSettings.from_dict(state["settings"]))
        trig._window.extend(float(v) for v in state["window"])
        trig._adapt.extend(float(v) for v in state["adapt"])
        trig._wsteps.extend(int(v) for v in state["window_steps"])
        trig._asteps.extend(int(v) for v in state["adapt_steps"])
        trig._last_step = state["last_step"]
        trig._last_call = state["last_call"]
        trig._last_avg_call = state["last_avg_call"]
        trig._last_trusted = state["last_trusted"]
        trig._threshold = state["threshold"]
        trig._block_start = state["block_start"]
        trig._block_ok = bool(state["block_ok"])
        trig._good_blocks = int(state["good_blocks"])
        trig.n_calls = int(state["n_calls"])
        trig.n_brakes = int(state["n_brakes"])
        sub = state.get("subblock")  # absent from version-1 states
        trig._subblock = None if sub is None else (float(sub[0]), int(sub[1]))
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
