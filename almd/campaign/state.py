"""A campaign's state on disk: the run-directory lock, stop requests, checkpoints as one unit.

A checkpoint is one file, ``campaign.json``: the campaign's counters, every
walker's and trigger's state, and the name of the ensemble file of that moment
(``ensemble-G.pt``, G the checkpoint's generation, written before it and never
overwritten). Replacing ``campaign.json`` by one atomic rename makes the whole
checkpoint current at once; a kill at any point leaves the previous one whole,
since the previous generation's ensemble is deleted only after the new
``campaign.json`` is in place. ``walker-K.json`` and ``trigger-K.json`` are
copies for reading, written after the commit; a resume never reads them.
"""

from __future__ import annotations

import csv
import io
import json
import os
import signal
import socket
import time
from pathlib import Path
from typing import Any

from almd.io import atomic_write
from almd.settings import ConfigError

__all__ = ["RunLocked", "RunLock", "StopRequest", "STOP_SIGNALS", "moved_backbone", "read_checkpoint", "resumable",
           "truncate_log", "update_checkpoint", "write_checkpoint"]

#: the signals a scheduler sends before it ends a job (SIGUSR1: Slurm's ``--signal``)
STOP_SIGNALS = ("SIGTERM", "SIGINT", "SIGUSR1")


class RunLocked(ConfigError):
    """Another live process runs a campaign in this directory."""


class RunLock:
    """``OUTPUT/almd.lock``: who runs here (pid, host, start time); a dead holder's lock is taken over."""

    def __init__(self, output: Path) -> None:
        self.path = Path(output) / "almd.lock"
        self.held = False

    def acquire(self) -> None:
        me = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S")}
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = self._holder()
                if holder is not None and not self._stale(holder):
                    raise RunLocked(
                        f"{self.path.parent} is in use by pid {holder.get('pid')} on {holder.get('host')} "
                        f"since {holder.get('started')} (lock {self.path}); wait for it, or delete the "
                        "lock if that process is gone") from None
                self.path.unlink(missing_ok=True)  # stale: its process is dead
                continue
            with os.fdopen(fd, "w") as fh:
                json.dump(me, fh)
            self.held = True
            return
        raise RunLocked(f"could not take the lock {self.path}")

    def release(self) -> None:
        if self.held:
            self.path.unlink(missing_ok=True)
            self.held = False

    def _holder(self) -> dict[str, Any] | None:
        try:
            return json.loads(self.path.read_text())
        except (OSError, ValueError):
            return None  # torn or vanished: treat as stale

    @staticmethod
    def _stale(holder: dict[str, Any]) -> bool:
        if holder.get("host") != socket.gethostname():
            return False  # another node's process cannot be checked from here
        if holder.get("pid") == os.getpid():
            return True  # this process's own earlier campaign on the directory
        try:
            os.kill(int(holder["pid"]), 0)
        except ProcessLookupError:
            return True
        except (PermissionError, KeyError, ValueError, TypeError):
            return False
        return False

    def __enter__(self) -> "RunLock":
        self.acquire()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release()


class StopRequest:
    """Catches SIGTERM, SIGINT and SIGUSR1 while a campaign runs: the loop then finishes its step,
    writes a checkpoint and returns, instead of dying with its progress lost.
    """

    def __init__(self) -> None:
        self.signal: str | None = None
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: Any) -> None:
        self.signal = signal.Signals(signum).name

    def __enter__(self) -> "StopRequest":
        try:
            for name in STOP_SIGNALS:
                number = getattr(signal, name)
                self._previous[number] = signal.signal(number, self._handle)
        except ValueError:  # not the main thread: signals stay as they were
            self._previous.clear()
        return self

    def __exit__(self, *exc: Any) -> None:
        for number, handler in self._previous.items():
            signal.signal(number, handler)


def write_checkpoint(output: Path, model: Any, state: dict[str, Any], walkers: dict[int, str],
                     triggers: dict[int, str]) -> int:
    """Write one checkpoint (see the module docstring); returns its generation.

    ``model``: the ensemble or the lattice-dynamics model (its class names the file:
    ``FILE_NAME``, a stem and a suffix; the checkpoint's key ``ensemble`` holds it).
    ``state``: the campaign's own counters (JSON-able); ``walkers`` / ``triggers``:
    the JSON states by walker index.
    """
    previous = read_checkpoint(output)
    generation = int(previous.get("generation", 0)) + 1
    stem, suffix = model.FILE_NAME
    name = f"{stem}-{generation}{suffix}"
    model.save(output / name)
    unit = {**state, "generation": generation, "ensemble": name,
            "walkers": {str(k): json.loads(v) for k, v in walkers.items()},
            "triggers": {str(k): json.loads(v) for k, v in triggers.items()}}
    atomic_write(output / "campaign.json", json.dumps(unit, indent=1))  # the commit
    for k, text in walkers.items():
        atomic_write(output / f"walker-{k}.json", text)
    for k, text in triggers.items():
        atomic_write(output / f"trigger-{k}.json", text)
    for old in output.glob(f"{stem}-*{suffix}"):  # keep this generation and the one before
        if old.name not in (name, previous.get("ensemble")):
            old.unlink(missing_ok=True)
    return generation


def update_checkpoint(output: Path, **fields: Any) -> None:
    """Add ``fields`` (JSON-able) to the current checkpoint, atomically (the outcome of a finished run)."""
    state = read_checkpoint(output)
    state.update(fields)
    atomic_write(Path(output) / "campaign.json", json.dumps(state, indent=1))


def read_checkpoint(output: Path) -> dict[str, Any]:
    """The current checkpoint of ``output`` (empty before the first)."""
    path = Path(output) / "campaign.json"
    return json.loads(path.read_text()) if path.exists() else {}


def truncate_log(path: Path, fields: tuple[str, ...], steps: dict[str, int]) -> None:
    """Keep the rows of ``steps.csv`` up to each walker's checkpointed step.

    A last line without its line end was cut short by a kill, and goes too.
    """
    with open(path, newline="") as fh:
        text = fh.read()
    if text and not text.endswith("\n"):
        text = text[: text.rfind("\n") + 1]
    rows = []
    for row in csv.DictReader(io.StringIO(text, newline="")):
        try:
            if int(row["step"]) <= int(steps.get(row["walker"], 0)):
                rows.append(row)
        except (TypeError, ValueError, KeyError):
            continue  # a malformed row
    buffer = io.StringIO()
    log = csv.DictWriter(buffer, fields)  # csv's own \r\n line ends, as the campaign writes them
    log.writeheader()
    log.writerows(rows)
    atomic_write(path, buffer.getvalue())


def resumable(config: dict[str, Any]) -> dict[str, Any]:
    """The settings a resumed campaign must share with the stored one."""
    # it may run longer or quieter, its folder may have been moved or copied, and its
    # reference calculations may use the threads of another node
    run = {k: v for k, v in config.get("run", {}).items() if k not in ("steps", "progress", "progress_every", "output")}
    reference = {k: v for k, v in config.get("reference", {}).items() if k != "threads"}
    return {**config, "run": run, "reference": reference}


def moved_backbone(backbone: str, output: Path) -> str:
    """A fine-tuned backbone of this campaign (``models/``), found again in a run folder moved elsewhere."""
    here = output / "models" / Path(backbone).name
    if not Path(backbone).is_file() and Path(backbone).parent.name == "models" and here.is_file():
        return str(here)
    return backbone
