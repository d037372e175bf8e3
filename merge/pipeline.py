"""Parallel tensor jobs with an ordered hand-over: the scheduling half of the executor.

``run_ordered`` runs ``work(i)`` for jobs ``0..n-1`` on a pool of ``threads`` workers and hands
each result to ``write(i, result)`` strictly in order, on the calling thread. Job ``i`` is
submitted only when (a) fewer than ``window(threads)`` jobs are running or queued and (b) the
estimated bytes in flight (done jobs waiting in the reorder buffer count their output's bytes)
plus job ``i``'s fit the budget, or nothing else is in flight (a job larger than the budget
runs alone, never a deadlock). Jobs are submitted in plan order, except a few very large ones
started first (``merge.memory.hoisted``) so that a large lm_head does not end the run alone on
one core; their outputs wait for their turn within the budget.
Workers read their inputs themselves, so reading (page faults on the safetensors memory maps,
with the GIL released) overlaps the other workers' compute and the writer.

Determinism: torch's CPU reductions (``sum``, ``dot``) split work by the number of intra-op
threads, so their float results depend on it. ``single_intra_op`` fixes it to 1 while jobs run,
whatever ``--threads`` is: parallelism comes from jobs, and outputs are bit-identical for any
thread count or budget.

``Sequencer`` lets a step of each job run in plan order (global TIES trim consumes a per-model
quota in that order) while the rest of the jobs run in parallel. ``Mover`` carries a job's
tensors to a device (pinned memory, non-blocking copies on a CUDA stream per worker) and the
result back.

What it does not do: know what a job is (``merge.execute`` does), split one tensor into chunks,
or run the writer in parallel (it stays sequential, in plan order).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from contextlib import contextmanager, nullcontext
from typing import Any, TypeVar

import torch

from merge.memory import fits, window

R = TypeVar("R")


class Cancelled(Exception):
    """Raised in a worker waiting for its turn after the run was aborted."""


class Sequencer:
    """Turns ``0..n-1`` taken in order: ``turn(k)`` waits until every earlier turn is
    ``done``; ``done(k)`` may come early (a job that failed before its turn) or twice."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._next = 0
        self._finished: set[int] = set()
        self._aborted = False

    @contextmanager
    def turn(self, k: int) -> Iterator[None]:
        with self._cond:
            self._cond.wait_for(lambda: self._aborted or self._next == k)
            if self._aborted:
                raise Cancelled("run aborted")
        try:
            yield
        finally:
            self.done(k)

    def done(self, k: int) -> None:
        with self._cond:
            self._finished.add(k)
            while self._next in self._finished:
                self._next += 1
            self._cond.notify_all()

    def abort(self) -> None:
        with self._cond:
            self._aborted = True
            self._cond.notify_all()


class Mover:
    """Moves tensors to ``device`` and back. On CUDA: host copies are pinned, copies are
    non-blocking on one stream per worker thread, and ``back`` waits for that stream. On
    other devices (``cpu`` in tests) the same calls are plain ``.to`` copies."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._cuda = device.type == "cuda"
        self._local = threading.local()

    def stream(self) -> Any:
        """The calling worker's stream context (a no-op off CUDA)."""
        if not self._cuda:
            return nullcontext()
        if not hasattr(self._local, "stream"):
            self._local.stream = torch.cuda.Stream(device=self.device)
        return torch.cuda.stream(self._local.stream)

    def put(self, tensor: torch.Tensor) -> torch.Tensor:
        if self._cuda:
            return tensor.pin_memory().to(self.device, non_blocking=True)
        return tensor.to(self.device, copy=True)

    def back(self, tensor: torch.Tensor) -> torch.Tensor:
        out = tensor.to("cpu")
        if self._cuda:
            torch.cuda.current_stream(self.device).synchronize()
        return out


@contextmanager
def single_intra_op() -> Iterator[None]:
    """One intra-op thread for torch while inside (restored after): see the module notes."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def run_ordered(
    work: Callable[[int], R],
    write: Callable[[int, R], None],
    *,
    peaks: Sequence[int],
    out_bytes: Sequence[int],
    budget: int,
    threads: int,
    first: Sequence[int] = (),
    on_abort: Callable[[], None] = lambda: None,
) -> None:
    """Run ``work(i)`` for every job on ``threads`` workers within ``budget`` (estimated
    bytes: ``peaks[i]`` while running, ``out_bytes[i]`` once done) and ``write`` the results
    in order; jobs ``first`` go before the others (``merge.memory.hoisted``). The first
    exception (a worker's, the writer's, a KeyboardInterrupt) cancels the jobs not started,
    calls ``on_abort``, waits for the running ones and propagates."""
    flight: dict[int, Future[R]] = {}
    written = 0

    def charged() -> int:
        return sum(out_bytes[j] if f.done() else peaks[j] for j, f in flight.items())

    def make_room() -> None:
        """Write the next result in order, or wait for any job to finish."""
        nonlocal written
        if written in flight:
            write(written, flight[written].result())
            del flight[written]
            written += 1
        else:
            wait([f for f in flight.values() if not f.done()], return_when=FIRST_COMPLETED)

    hoisted = set(first)
    order = [*first, *(i for i in range(len(peaks)) if i not in hoisted)]
    with ThreadPoolExecutor(max_workers=threads, thread_name_prefix="merge-job") as pool:
        try:
            for i in order:
                while flight and (
                    sum(not f.done() for f in flight.values()) >= window(threads)
                    or not fits(charged(), peaks[i], budget)
                ):
                    make_room()
                flight[i] = pool.submit(work, i)
            while written < len(peaks):
                make_room()
        except BaseException:
            for f in flight.values():
                f.cancel()
            on_abort()
            raise
