"""Progress of a campaign as lines a batch log can hold (beside tqdm's bar on a terminal)."""

from __future__ import annotations

import time
from typing import Any, Callable

__all__ = ["ProgressLines"]


class ProgressLines:
    """One line per walker every ``every`` MD steps: step, temperature, score, calls, time per step."""

    def __init__(self, every: int, steps: int):
        self.every, self.steps = every, steps
        self.since: dict[int, tuple[float, int]] = {}  # walker -> (time, step) of its last line

    def show(self, rows: list[dict[str, Any]], write: Callable[[str], None]) -> None:
        if self.every <= 0:
            return
        now = time.perf_counter()
        for r in rows:
            k, step = r["walker"], r["step"]
            then, before = self.since.setdefault(k, (now, step))
            if step % self.every or step == before:
                continue
            score = "-" if r["score"] is None else f"{r['score']:.3g}"
            write(f"walker {k}  step {step}/{self.steps}  T {r['temperature']:.0f} K  score {score} eV/Å  "
                  f"calls {r['calls']}  {(now - then) / (step - before):.3f} s/step")
            self.since[k] = (now, step)
