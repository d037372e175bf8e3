"""Parallel tensor jobs: the scheduling half of the executor.

``run_jobs`` runs ``work(i)`` for the given jobs on a pool of ``threads`` workers, starting
them in the given order (``merge.memory.job_order``: the most work first). Job ``i`` starts only
when fewer than ``threads`` jobs are running and the estimated bytes of the running jobs plus
job ``i``'s fit the budget, or nothing else is running (a job larger than the budget runs
alone, never a deadlock). Workers read their inputs and write their output chunks themselves
(``merge.writer.ShardWriter`` writes at planned offsets in any order), so reading (``preadv`` of
input chunks), computing and writing overlap across workers with nothing held between
jobs.

Determinism: torch's CPU reductions (``sum``, ``dot``) split work by the number of intra-op
threads, so their float results depend on it. ``single_intra_op`` fixes it to 1 while jobs run,
whatever ``--threads`` is: parallelism comes from jobs, and outputs are bit-identical for any
thread count or budget.

``keep_freed_memory`` asks glibc's allocator to reuse freed chunk buffers instead of returning
them to the kernel and faulting fresh zeroed pages in for the next chunk (page faults were
most of a merge's system time).

With ``--device cuda`` a second budget, device bytes (``--max-vram``), admits jobs the same
way.

``Mover`` carries a job's tensors to a device (pinned memory, non-blocking copies on a CUDA
stream per worker) and the result back.

What it does not do: know what a job is (``merge.execute`` does) or split one tensor across
workers.
"""

from __future__ import annotations

import ctypes
import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from contextlib import contextmanager, nullcontext
from typing import Any

import torch

from merge.memory import fits


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


_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_tuned = False


def keep_freed_memory() -> None:
    """Raise glibc's mmap and trim thresholds (32 MiB: allocations up to that size come from
    the heap; 1 GiB kept before trimming) once per process; a no-op elsewhere."""
    global _tuned
    if _tuned:
        return
    _tuned = True
    try:
        libc = ctypes.CDLL(None)
        libc.mallopt(_M_MMAP_THRESHOLD, 32 * 2**20)
        libc.mallopt(_M_TRIM_THRESHOLD, 2**30)
    except (OSError, AttributeError):  # pragma: no cover - not glibc
        pass


@contextmanager
def single_intra_op() -> Iterator[None]:
    """One intra-op thread for torch while inside (restored after): see the module notes."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def run_jobs(
    work: Callable[[int], Any],
    order: Sequence[int],
    *,
    peaks: Sequence[int],
    budget: int,
    threads: int,
    device_peaks: Sequence[int] | None = None,
    device_budget: int = 0,
) -> None:
    """Run ``work(i)`` for every ``i`` of ``order`` on ``threads`` workers within ``budget``
    (``peaks[i]``: job ``i``'s estimated bytes while it runs) and, with ``device_peaks``
    (device bytes, ``merge.device.vram``), within ``device_budget`` too (a job needing no
    device memory is never held back by it). The first exception (a
    worker's, a KeyboardInterrupt) cancels the jobs not started, waits for the running ones
    and propagates."""
    running: dict[int, Future[Any]] = {}
    dev = device_peaks or [0] * len(peaks)

    def admit(i: int) -> bool:
        host = fits(sum(peaks[j] for j in running), peaks[i], budget)
        charged = sum(dev[j] for j in running)
        return host and (dev[i] == 0 or fits(charged, dev[i], device_budget))

    def reap() -> None:
        done, _ = wait(list(running.values()), return_when=FIRST_COMPLETED)
        for i in [i for i, f in running.items() if f in done]:
            running.pop(i).result()  # raises the worker's exception

    with ThreadPoolExecutor(max_workers=threads, thread_name_prefix="merge-job") as pool:
        try:
            for i in order:
                while running and (len(running) >= threads or not admit(i)):
                    reap()
                running[i] = pool.submit(work, i)
            while running:
                reap()
        except BaseException:
            for f in running.values():
                f.cancel()
            raise
