"""MPI through mpi4py, with a serial stand-in of the same shape.

Under ``mpiexec -n N`` the campaign spreads its walkers over the ranks; rank 0
owns the label database, the reference calculations and every file. Outside
MPI (or with one rank) :class:`SerialComm` answers the same few calls, so the
campaign has one code path.
"""

from __future__ import annotations

import os
import sys
import traceback
from typing import Any

__all__ = ["abort", "owned", "SerialComm", "world"]


class SerialComm:
    """The subset of an mpi4py communicator the campaign uses, for one process."""

    rank = 0
    size = 1

    def bcast(self, obj: Any, root: int = 0) -> Any:
        return obj

    def gather(self, obj: Any, root: int = 0) -> list[Any]:
        return [obj]

    def allreduce(self, value: Any, op: Any = None) -> Any:
        return value

    def barrier(self) -> None:
        pass


def world() -> Any:
    """mpi4py's COMM_WORLD when started by an MPI launcher with several ranks, else a SerialComm.

    mpi4py is imported only under a launcher: importing it initialises MPI, which
    a plain serial run does not need.
    """
    launched = any(k in os.environ for k in ("PMI_RANK", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "PMIX_RANK"))
    if not launched:
        return SerialComm()
    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    if comm.Get_size() == 1:
        return SerialComm()
    sys.excepthook = _abort_on_exception(comm)
    return comm


def abort(comm: Any, message: str, status: int = 1) -> None:
    """Print ``message`` (with the rank) and end every rank of the job now.

    An error seen by one rank would otherwise leave the others waiting in a
    collective call for ever; a serial run just returns.
    """
    if getattr(comm, "size", 1) > 1:
        print(f"almd (rank {comm.rank} of {comm.size}): {message}", file=sys.stderr, flush=True)
        comm.Abort(status)


def _abort_on_exception(comm: Any) -> Any:
    """An excepthook that prints the failing rank's traceback, then aborts the whole MPI job."""
    def hook(kind: type[BaseException], exc: BaseException, tb: Any) -> None:
        text = "".join(traceback.format_exception(kind, exc, tb))
        abort(comm, f"uncaught exception, ending the job:\n{text}")

    return hook


def owned(n_items: int, comm: Any) -> list[int]:
    """The items (walkers) rank ``comm.rank`` runs: round robin over ranks."""
    return [k for k in range(n_items) if k % comm.size == comm.rank]
