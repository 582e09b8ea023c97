"""MPI through mpi4py, with a serial stand-in of the same shape.

Under ``mpiexec -n N`` the campaign spreads its walkers over the ranks; rank 0
owns the label database and every file. While rank 0 learns (labels a round's
frames, fine-tunes), the other ranks wait in :meth:`Helpers.wait` and take their
share of the work: one reference calculation per rank at a time, a slice of each
fine-tuning batch. Outside MPI (or with one rank) :class:`SerialComm` answers
the same few calls, so the campaign has one code path.
"""

from __future__ import annotations

import os
import sys
import traceback
from collections.abc import Callable, Iterator, Sequence
from typing import Any

__all__ = ["abort", "abort_on_exception", "Helpers", "owned", "SerialComm", "world"]


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

    def allgather(self, obj: Any) -> list[Any]:
        return [obj]

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
    sys.excepthook = abort_on_exception(comm)
    return comm


def abort(comm: Any, message: str, status: int = 1) -> None:
    """Print ``message`` (with the rank) and end every rank of the job now.

    An error seen by one rank would otherwise leave the others waiting in a
    collective call for ever; a serial run just returns.
    """
    if getattr(comm, "size", 1) > 1:
        print(f"almd (rank {comm.rank} of {comm.size}): {message}", file=sys.stderr, flush=True)
        comm.Abort(status)


def abort_on_exception(comm: Any) -> Any:
    """An excepthook that prints the failing rank's traceback, then aborts the whole MPI job."""
    def hook(kind: type[BaseException], exc: BaseException, tb: Any) -> None:
        text = "".join(traceback.format_exception(kind, exc, tb))
        abort(comm, f"uncaught exception, ending the job:\n{text}")

    return hook


def owned(n_items: int, comm: Any) -> list[int]:
    """The items (walkers) rank ``comm.rank`` runs: round robin over ranks."""
    return [k for k in range(n_items) if k % comm.size == comm.rank]


class Helpers:
    """The other ranks, lent to rank 0 while they wait for its answer.

    Rank 0 calls :meth:`map` (items computed one per rank at a time) or :meth:`run`
    (a task every rank takes part in, e.g. data-parallel fine-tuning), then
    :meth:`release` with the answer the others wait for; every other rank sits in
    :meth:`wait` meanwhile and does its share. ``tasks`` maps a task name to the
    function each rank runs; every rank must hold the same names.

    Parameters
    ----------
    comm
        An mpi4py communicator or a :class:`SerialComm`.
    tasks
        Name → function of one argument (an item for :meth:`map`, the payload for :meth:`run`).
    """

    def __init__(self, comm: Any, tasks: dict[str, Callable[[Any], Any]]) -> None:
        self.comm = comm
        self.tasks = tasks

    def map(self, name: str, items: Sequence[Any]) -> Iterator[tuple[int, Any]]:
        """Rank 0: ``(i, tasks[name](items[i]))`` for every item, one wave of one item per rank at a time.

        Results arrive wave by wave, in item order within a wave, so a caller that
        stores each as it arrives loses at most one wave to a kill.
        """
        if self.comm.size > 1:
            self.comm.bcast(("map", name, list(items)))
        yield from self._waves(name, items)

    def run(self, name: str, payload: Any) -> Any:
        """Rank 0: every rank runs ``tasks[name](payload)`` (which may use the communicator); rank 0's value."""
        if self.comm.size > 1:
            self.comm.bcast(("run", name, payload))
        return self.tasks[name](payload)

    def release(self, answer: Any = None) -> Any:
        """Rank 0: end the other ranks' :meth:`wait`, handing them ``answer``; returns it."""
        if self.comm.size > 1:
            self.comm.bcast(("done", answer))
        return answer

    def wait(self) -> Any:
        """Other ranks: do rank 0's tasks as they come, until it releases us with its answer."""
        while True:
            message = self.comm.bcast(None)
            if message[0] == "done":
                return message[1]
            kind, name, payload = message
            if kind == "map":
                for _ in self._waves(name, payload):
                    pass
            else:
                self.tasks[name](payload)

    def _waves(self, name: str, items: Sequence[Any]) -> Iterator[tuple[int, Any]]:
        size, rank = self.comm.size, self.comm.rank
        for first in range(0, len(items), size):
            i = first + rank
            mine = (i, self.tasks[name](items[i])) if i < len(items) else None
            parts = self.comm.gather(mine)
            if rank == 0:
                yield from (part for part in parts if part is not None)
