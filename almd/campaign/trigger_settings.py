"""The trigger's settings: typed, validated, every force in eV/Å and every time in MD steps.

One frozen settings class (:func:`almd.settings.settings`, a pydantic dataclass), read
from the campaign file's ``[trigger]`` table; each bad value is an error naming the
field, the value and what is allowed.
"""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Any

from almd.settings import settings

__all__ = ["DEFAULT_WINDOW", "TriggerSettings"]

#: window (MD steps) when the settings give none and no run length is known
DEFAULT_WINDOW = 1000


@settings(frozen=True, owner="TriggerSettings")
class TriggerSettings:
    """Typed, validated settings of :class:`Trigger`. Forces in eV/Å, times in MD steps.

    Attributes
    ----------
        target: the force error the user accepts (eV/Å), compared with the
            calibrated score. Frames under it are never called; the trajectory
            average above it calls; under it for ``converge_windows`` call-free
            windows the run is converged. ``None``: no target, no convergence.
        window: the rolling window in MD steps that defines the
            trajectory-averaged error and the blocks of the convergence test;
            ``None``: fitted to the run (:meth:`for_run`: a twentieth of it, in
            [20, 1000]).
        rel_factor: c in "score > c × rolling mean" (dimensionless, > 1).
        abs_cap: a fixed absolute threshold on a single score (eV/Å); ``None``
            disables it. Also the starting value of the history threshold.
        hard_cap: emergency-brake level (eV/Å); ``None`` disables the brake
            (non-finite scores still brake).
        min_spacing: minimum number of steps between two calls.
        min_history: scores needed in the window before the relative and the
            average criteria are trusted (a mean of 3 numbers is noise).
        target_spacing: minimum steps between two calls fired by the average
            criterion alone; ``None`` means ``window`` (let a refit show its effect
            on a fresh window before asking again).
        converge_windows: M, the number of consecutive call-free windows with
            the trajectory-averaged error below ``target`` that mean convergence.
        adaptive: the history threshold, VASP's ML_ICRITERIA = 1.
        adaptive_cx: c_x in "threshold = history mean × (1 + c_x)".
        adaptive_history: number of scores in the history.
        adaptive_max_spread: update only if std/mean of the history is below this.
        adaptive_max_slope: update only if |fitted slope| × history length / mean
            (the relative drift across the history) is below this.
        audit_every: an audit after this many steps without a call or an audit;
            ``None``: ``converge_windows`` × ``window``; 0: never.
        audit_tolerance: an audit fails when the true error of its frame exceeds
            both this × its calibrated score and ``target``.
        subblock_target: if set (eV/Å), convergence also needs a sub-block Bayesian
            error below it, recorded for the current model (after the last call)
            with :meth:`Trigger.record_subblock_error`; a recorded error above it
            makes the next spaced step call (reason ``subblock``). Needs ``target``.
            A lattice-dynamics campaign runs the test itself (:mod:`almd.campaign.subblock`).
    """

    target: float | None = 0.05
    window: int | None = None
    rel_factor: float = 3.0
    abs_cap: float | None = None
    hard_cap: float | None = 1.0
    min_spacing: int = 10
    min_history: int = 20
    target_spacing: int | None = None
    converge_windows: int = 3
    adaptive: bool = True
    adaptive_cx: float = 0.2
    adaptive_history: int = 50
    adaptive_max_spread: float = 0.4
    adaptive_max_slope: float = 0.2
    audit_every: int | None = None
    audit_tolerance: float = 1.5
    subblock_target: float | None = None

    def __post_init__(self) -> None:
        """The ranges (each value's kind is checked already: an int is an int, a float a float)."""
        def bad(name: str, allowed: str) -> None:
            raise ValueError(
                f"TriggerSettings.{name} = {getattr(self, name)!r}: must be {allowed}"
            )

        def is_pos(v: float) -> bool:
            return math.isfinite(v) and v > 0

        for name in ("min_spacing", "adaptive_history", "converge_windows"):
            if getattr(self, name) < 1:
                bad(name, "an integer >= 1")
        for name in ("window", "target_spacing"):
            v = getattr(self, name)
            if v is not None and v < 1:
                bad(name, "None or an integer >= 1 (MD steps)")
        if self.audit_every is not None and self.audit_every < 0:
            bad("audit_every", "None, 0 (no audits) or an integer >= 1 (MD steps)")
        window = DEFAULT_WINDOW if self.window is None else self.window
        if not 1 <= self.min_history <= window:
            bad("min_history", f"an integer in [1, window={window}]")
        if not is_pos(self.rel_factor) or self.rel_factor <= 1:
            bad("rel_factor", "a finite number > 1")
        if not is_pos(self.audit_tolerance) or self.audit_tolerance < 1:
            bad("audit_tolerance", "a finite number >= 1")
        for name in ("abs_cap", "hard_cap", "target", "subblock_target"):
            v = getattr(self, name)
            if v is not None and not is_pos(v):
                bad(name, "None or a finite force > 0 in eV/Å")
        for name in ("abs_cap", "target"):
            v = getattr(self, name)
            if self.hard_cap is not None and v is not None and self.hard_cap <= v:
                bad("hard_cap", f"greater than {name} = {v} eV/Å")
        if self.subblock_target is not None and self.target is None:
            bad("subblock_target", "None when target is None (it adds to that convergence test)")
        if not is_pos(self.adaptive_cx) and self.adaptive_cx != 0:
            bad("adaptive_cx", "a finite number >= 0")
        for name in ("adaptive_max_spread", "adaptive_max_slope"):
            if not is_pos(getattr(self, name)):
                bad(name, "a finite number > 0")
        if self.adaptive_history < 2:
            bad("adaptive_history", "an integer >= 2")

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TriggerSettings":
        """Build from a mapping; an unknown key or a value of the wrong kind is an error that names it."""
        return cls(**d)

    def for_run(self, steps: int, scored_every: int = 1) -> "TriggerSettings":
        """These settings with the window fitted to a run of ``steps`` MD steps, if none was given,
        and ``min_history`` no more than the earlier scores such a window holds at a step (one every
        ``scored_every`` steps, the step itself not counted).
        """
        window = self.window if self.window is not None else int(min(DEFAULT_WINDOW, max(20, steps // 20)))
        held = window // scored_every - 1
        return replace(self, window=window, min_history=max(1, min(self.min_history, held)))

    @property
    def window_steps(self) -> int:
        return DEFAULT_WINDOW if self.window is None else self.window

    @property
    def audit_steps(self) -> int:
        """MD steps between audits (0: none)."""
        if self.audit_every is not None:
            return self.audit_every
        return self.converge_windows * self.window_steps if self.target is not None else 0
