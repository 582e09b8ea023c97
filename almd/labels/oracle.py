"""Reference calculations ("the oracle"): ASE Atoms -> energy, forces, stress.

The oracle is any ASE calculator: a preset (``PRESETS``) or ``"module:Class"``
plus keyword arguments. ``Oracle.label`` runs each calculation in its own worker
process (forked from a warm forkserver) with a timeout and retries; every
outcome comes back as a ``LabelResult`` (a :class:`~almd.labels.labeller.Labeller`
stores it).
Mistakes a user can fix raise ``OracleConfigError`` before any work starts.
No torch here: the oracle must run where the ML stack is not installed.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import multiprocessing
import os
import re
import signal
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from ase import Atoms
from ase.calculators.singlepoint import SinglePointCalculator

from almd.references import (
    PRESETS,
    PSEUDO_DIR,
    OracleConfigError,
    available_pseudopotentials,
    build_calculator,
    check_pw_x,
    resolve_spec,
)
from almd.structures import bare, content_hash, settings_hash

# The reference presets are re-exported: a user configures the oracle in one place.
__all__ = ["PRESETS", "PSEUDO_DIR", "LabelResult", "Oracle", "OracleConfigError",
           "available_pseudopotentials", "build_calculator", "resolve_spec"]


# --------------------------------------------------------------------------- results

@dataclass
class LabelResult:
    """Outcome of one labelling request. ``status`` is 'ok' or 'failed'; a failed
    result carries ``error`` (text) and ``error_kind`` (exception, scf, timeout,
    nonfinite, crashed). Energies eV, forces eV/Å, stress Voigt eV/Å³.
    """

    status: str
    energy: float | None = None
    forces: np.ndarray | None = None
    stress: np.ndarray | None = None
    error: str | None = None
    error_kind: str | None = None
    wall_time: float = 0.0
    attempts: int = 0
    settings_hash: str = ""
    content_hash: str = ""
    oracle: str = ""
    cached: bool = False
    settings: dict[str, Any] = field(default_factory=dict, repr=False)

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    def attach(self, atoms: Atoms) -> Atoms:
        """Copy of ``atoms`` with the labels in a SinglePointCalculator."""
        if not self.ok:
            raise ValueError(f"cannot attach a failed label: {self.error}")
        out = atoms.copy()
        results = {"energy": self.energy, "forces": self.forces, "stress": self.stress}
        out.calc = SinglePointCalculator(out, **{k: v for k, v in results.items() if v is not None})
        return out


# --------------------------------------------------------------------------- worker side

# Imported once in the forkserver so each forked worker starts warm (matscipy pulls
# in scipy.stats: ~1-2 s per cold start). Not gpaw: forking after its MPI set-up is unsafe.
_PRELOAD = ["almd.labels.oracle", "ase.io", "ase.db", "ase.calculators.emt", "scipy.stats",
            "matscipy.calculators.manybody"]


_SCF_FAILED = re.compile(r"convergence not achieved|not converged|did not converge|ConvergenceError", re.I)


def _diagnose(exc: BaseException, workdir: str) -> tuple[str, str]:
    """(kind, text) of a failure, with the why from pw.x-style output files in the run dir."""
    text = "".join(traceback.format_exception(exc)).strip()
    for f in sorted(Path(workdir).glob("*")):
        if f.is_file() and (f.suffix in (".pwo", ".out", ".txt", ".log") or f.name == "CRASH"):
            lines = f.read_text(errors="ignore").splitlines()
            hits = [ln.strip() for ln in lines if _SCF_FAILED.search(ln)][:1]
            text += f"\n--- {f.name}: ---\n" + "\n".join(hits + ["..."] + lines[-12:])
    return ("scf" if _SCF_FAILED.search(text) else "exception"), text


def _limit_threads(threads: int) -> None:
    # Cores are shared (other workers, MD, training): oversubscribed OpenMP made a
    # GPAW run 10x slower here. Env for codes loaded from now on (gpaw, pw.x),
    # threadpoolctl for the BLAS the forkserver already loaded.
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = str(threads)
    if importlib.util.find_spec("threadpoolctl") is not None:
        importlib.import_module("threadpoolctl").threadpool_limits(threads)


def _worker(conn: Any, spec: tuple[str, dict], atoms: Atoms, workdir: str, sys_path: list[str],
            threads: int) -> None:
    """Runs in the child: one calculation, the outcome sent back as a plain dict."""
    os.setsid()  # own process group: a timeout kill also reaches pw.x / mpirun children
    _limit_threads(threads)
    for p in reversed(sys_path):  # make the parent's test/user modules importable
        if p not in sys.path:
            sys.path.insert(0, p)
    try:
        Path(workdir).mkdir(parents=True, exist_ok=True)
        os.chdir(workdir)  # file-based codes write here; safe, we are a private process
        name, kwargs = spec
        atoms.calc = build_calculator(name, atoms=atoms, **kwargs)
        energy = float(atoms.get_potential_energy())
        forces = np.array(atoms.get_forces(), dtype=np.float64)
        stress = None
        try:  # NotImplementedError includes ASE's PropertyNotImplementedError
            if atoms.cell.rank == 3 and all(atoms.pbc):
                stress = np.array(atoms.get_stress(voigt=True), dtype=np.float64)
        except NotImplementedError:
            pass
        out = {"energy": energy, "forces": forces, "stress": stress}
        bad = [k for k in ("energy", "forces", "stress")
               if out[k] is not None and not np.all(np.isfinite(out[k]))]
        if bad:
            out = {"error": f"non-finite {', '.join(bad)} returned by {name}", "kind": "nonfinite"}
    except BaseException as exc:  # noqa: BLE001 - everything must come back as a result
        kind, text = _diagnose(exc, workdir)
        out = {"error": text, "kind": kind}
    conn.send(out)
    conn.close()


# --------------------------------------------------------------------------- the oracle

#: computes ``(atoms, content_hash)`` jobs, yielding ``(job index, result)`` as each is done
Spread = Callable[[list[tuple[Atoms, str]]], Iterable[tuple[int, "LabelResult"]]]

_ENV_LOCK = threading.Lock()
_MPI_LAUNCHER_VARS = ("PMI_", "PMIX_", "OMPI_", "HYDRA_", "MPI_LOCALRANKID", "MPI_LOCALNRANKS", "I_MPI_")


@contextlib.contextmanager
def _outside_mpi() -> Iterator[None]:
    """Start workers without the MPI launcher's environment. Under ``mpiexec`` a worker
    that inherits it sees itself as an MPI rank: anything that initialises MPI there
    (ASE's parallel helpers, a DFT code) would talk to the launcher on the rank's behalf.
    """
    _ENV_LOCK.acquire()  # os.environ is process-wide; label_many starts workers from threads
    saved = {k: v for k, v in os.environ.items() if k.startswith(_MPI_LAUNCHER_VARS)}
    for k in saved:
        del os.environ[k]
    try:
        yield
    finally:
        os.environ.update(saved)
        _ENV_LOCK.release()


def _context(main: bool = False) -> Any:
    """Forkserver where available (fast, no inherited state), else spawn. Spawn
    also when the calculator lives in the user's script: it re-imports __main__.
    """
    if main or "forkserver" not in multiprocessing.get_all_start_methods():
        return multiprocessing.get_context("spawn")
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(_PRELOAD)  # only takes effect before the server starts
    return ctx


class Oracle:
    """Labels structures with a reference calculator, isolated, timed out, retried.

    ``spec``/``overrides`` as for ``build_calculator``. ``timeout`` (s) bounds
    each attempt; ``retries`` extra attempts follow any failure (a hung or
    crashed DFT run often succeeds the second time; deterministic errors just
    cost one more try). The oracle computes and never stores: joined with a
    :class:`~almd.labels.database.LabelDatabase` it is a
    :class:`~almd.labels.labeller.Labeller`. ``threads``:
    OpenMP/BLAS threads of the worker (MPI-parallel DFT: put mpirun in the
    calculator's command instead).
    """

    def __init__(self, spec: Any, *, timeout: float = 3600.0, retries: int = 1,
                 workdir: str | Path | None = None, name: str | None = None, threads: int = 1, **overrides: Any) -> None:
        if timeout <= 0 or retries < 0:
            raise OracleConfigError(f"need timeout > 0 and retries >= 0, got {timeout}, {retries}")
        self.spec_name, self.kwargs = resolve_spec(spec, **overrides)
        if self.spec_name == "espresso-pw":
            check_pw_x(self.kwargs["command"])  # fail now, not inside every worker
        self.settings = {"calculator": self.spec_name, **self.kwargs}
        self.settings_hash = settings_hash(self.settings)
        self.name = name or self.spec_name
        self.timeout = float(timeout)
        self.retries = int(retries)
        self.threads = int(threads)
        self.workdir = Path(workdir) if workdir is not None else Path.cwd() / "oracle-runs"
        self._cache: dict[str, LabelResult] = {}
        self.calls = 0  # calculations actually started (cache hits excluded)
        self._lock = threading.Lock()

    def _preflight(self, atoms: Atoms) -> None:
        if self.spec_name == "espresso-pw":  # missing pseudopotential -> clear error now
            kw = {k: v for k, v in self.kwargs.items()
                  if k in ("pseudo_dir", "pseudopotentials", "xc", "command")}
            build_calculator("espresso-pw", atoms=atoms, **kw)

    def _cached(self, key: str, known: Callable[[str], LabelResult | None] | None) -> LabelResult | None:
        if key in self._cache:
            return self._cache[key]
        return known(key) if known is not None else None

    def _attempt(self, atoms: Atoms, key: str) -> dict[str, Any]:
        ctx = _context(main=self.spec_name.startswith("__main__:"))
        parent, child = ctx.Pipe(duplex=False)
        workdir = str((self.workdir / key).resolve())
        clean = bare(atoms, magmoms=True)
        args = (child, (self.spec_name, self.kwargs), clean, workdir, list(sys.path), self.threads)
        proc = ctx.Process(target=_worker, args=args, daemon=True)
        with _outside_mpi():
            proc.start()
        child.close()  # so that a dead worker shows up as EOF instead of a hang
        try:
            if not parent.poll(self.timeout):
                return {"error": f"timed out after {self.timeout:g} s (worker killed)", "kind": "timeout"}
            try:
                return parent.recv()
            except EOFError:
                proc.join(5)
                return {"error": f"worker died without a result (exit code {proc.exitcode})",
                        "kind": "crashed"}
        finally:
            parent.close()
            _kill_group(proc)
            try:  # keep run directories only when the code wrote something (DFT outputs)
                os.rmdir(workdir)
            except OSError:
                pass

    def _compute(self, atoms: Atoms, key: str) -> LabelResult:
        """Attempts with retries; no cache, no database (safe to run from threads)."""
        t0 = time.perf_counter()
        errors: list[str] = []
        out: dict[str, Any] = {}
        attempts = 0
        for attempts in range(1, self.retries + 2):
            with self._lock:
                self.calls += 1
            out = self._attempt(atoms, key)
            if "error" not in out:
                break
            errors.append(f"attempt {attempts} [{out['kind']}]: {out['error']}")
        common = dict(wall_time=time.perf_counter() - t0, attempts=attempts,
                      settings_hash=self.settings_hash, content_hash=key, oracle=self.name,
                      settings=self.settings)
        if "error" in out:
            return LabelResult(status="failed", error="\n".join(errors), error_kind=out["kind"], **common)
        return LabelResult(status="ok", energy=out["energy"], forces=out["forces"],
                           stress=out["stress"], **common)

    def label(self, atoms: Atoms) -> LabelResult:
        """Label one structure. Never raises for a failed calculation: the result says 'failed'."""
        return self.label_many([atoms])[0]

    def compute(self, job: tuple[Atoms, str]) -> LabelResult:
        """One calculation of ``job = (atoms, content_hash)``, with retries; no cache, no store.

        The unit of work that :meth:`label_many` hands to a ``spread`` (any process may run it).
        """
        return self._compute(*job)

    def label_many(self, frames: list[Atoms], *, max_workers: int = 1,
                   known: Callable[[str], LabelResult | None] | None = None,
                   on_result: Callable[[int, LabelResult], None] | None = None,
                   spread: Spread | None = None) -> list[LabelResult]:
        """Label several structures, up to ``max_workers`` worker processes at once.

        Results come back in input order. ``known(content_hash)`` may answer from
        a store before anything is computed; ``on_result(i, result)`` is called for
        each computed result as soon as it finishes (from this thread only: one
        writer), so a store that writes there loses only the calculations still
        running. Duplicates within ``frames`` run once. ``spread(jobs)``, if given,
        computes the ``(atoms, content_hash)`` jobs elsewhere (e.g. one per MPI rank,
        each through :meth:`compute`) and yields ``(job index, result)`` as each is
        done; ``max_workers`` is then unused.
        """
        results: list[LabelResult | None] = [None] * len(frames)
        todo: dict[str, list[int]] = {}
        for i, key in enumerate(content_hash(a, self.settings_hash) for a in frames):
            hit = self._cached(key, known)
            if hit is not None:
                results[i] = LabelResult(**{**hit.__dict__, "cached": True})
            else:
                todo.setdefault(key, []).append(i)
        for idx in todo.values():
            self._preflight(frames[idx[0]])
        jobs = [(frames[idx[0]], key) for key, idx in todo.items()]
        where = list(todo.values())
        # nothing to compute (every frame known): no spread started, which under MPI would wake the other ranks
        for j, result in (spread or self._threads(max_workers))(jobs) if jobs else ():
            idx = where[j]
            if result.ok:
                self._cache[result.content_hash] = result
            if on_result is not None:
                on_result(idx[0], result)
            for n, i in enumerate(idx):
                results[i] = result if n == 0 else LabelResult(**{**result.__dict__, "cached": result.ok})
        return [r for r in results if r is not None]

    def _threads(self, max_workers: int) -> Spread:
        """The default spread: threads of this process, each waiting on its worker process."""
        def spread(jobs: list[tuple[Atoms, str]]) -> Iterator[tuple[int, LabelResult]]:
            with ThreadPoolExecutor(max_workers=max(1, max_workers)) as pool:
                futures = {pool.submit(self.compute, job): j for j, job in enumerate(jobs)}
                for future in as_completed(futures):
                    yield futures[future], future.result()

        return spread


def _kill_group(proc: Any) -> None:
    """Stop a worker and everything it started (it leads its own process group)."""
    if proc.is_alive():
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            proc.kill()
    proc.join(10)
    if proc.exitcode is not None:
        proc.close()
