"""Memory estimates of a plan, from headers only, and the budget a run keeps to.

``job_peak_bytes`` is the expected peak of tensor data while one job runs: its inputs as
stored and as float32, the method's measured working space (``Method.workspace``) and the
output. ``peak_memory`` is the largest of these (``Plan.peak_bytes``: what one job alone needs).

The executor runs several jobs at once but admits a job only while the estimates of the jobs in
flight (running, queued or waiting to be written) fit in the budget (``--max-memory``, by
default half of the available RAM); a job larger than the whole budget runs alone.
``MemoryPlan`` is that schedule's worst case, computed by replaying the admission rule, plus
a warning for every tensor that cannot fit (``merge plan`` and ``merge run`` show both).
``hoisted`` picks the few very large jobs started first so they do not end a run alone on one
core; their finished outputs wait within the budget.

What it does not do: measure anything (the numbers are estimates from shapes and dtypes), count
the interpreter, libraries and page cache, or split one huge tensor into chunks.
"""

from __future__ import annotations

import os
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass

from merge.globaltrim import trims_globally
from merge.jobs import TensorJob
from merge.methods import Method
from merge.report import human_bytes as human
from merge.sourceset import Model

DEFAULT_FRACTION = 0.5  # of MemAvailable, when no --max-memory is given
FALLBACK_AVAILABLE = 8 * 2**30  # where the available memory cannot be read


def job_peak_bytes(job: TensorJob, models: dict[str, Model], method: Method) -> int:
    """Expected peak bytes of tensor data while ``job`` runs: the inputs as stored and as
    float32, the method's working space and the output."""
    per_model, fixed = method.workspace
    reads = [*job.inputs, *([job.base] if job.base else [])]
    reads += job.vocab.extra if job.vocab else ()
    stored = sum(models[r.model].checkpoint.tensors[r.name].nbytes for r in reads)
    buffers = 0.0 if job.copy else len(reads) + per_model * len(job.inputs) + fixed
    buffers += len(reads) + 1 if job.vocab else 0  # aligned copies and the default rows
    return stored + int(4 * job.numel * buffers) + job.numel * job.dtype.itemsize


def peak_memory(jobs: Sequence[TensorJob], models: dict[str, Model], method: Method) -> int:
    """The largest ``job_peak_bytes`` of ``jobs`` (0 for none)."""
    return max((job_peak_bytes(j, models, method) for j in jobs), default=0)


def available_memory() -> int:
    """``MemAvailable`` from /proc/meminfo, else free physical pages, else 8 GiB."""
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return FALLBACK_AVAILABLE


def default_threads() -> int:
    """The cores this process may run on."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - not Linux
        return max(1, os.cpu_count() or 1)


def window(threads: int) -> int:
    """Jobs running or queued at most: one per thread plus as many read ahead."""
    return 2 * threads


def hoisted(
    numels: Sequence[int],
    peaks: Sequence[int],
    out_bytes: Sequence[int],
    budget: int,
    threads: int,
    pinned: Sequence[bool],
) -> list[int]:
    """Jobs to start first (their outputs then wait for their turn to be written): each over
    a ``1 / (4 * threads)`` share of all elements, which in plan order could end the run alone
    on one core (a large lm_head). Largest first, while their waiting outputs plus the largest
    job fit the budget, so the next job to write always fits. ``pinned`` jobs keep their
    place (global trim takes turns in plan order)."""
    if threads < 2 or not numels:
        return []
    share = sum(numels) / (4 * threads)
    room = budget - max(peaks)
    chosen: list[int] = []
    for i in sorted(range(len(numels)), key=lambda i: -numels[i]):
        if numels[i] <= share:
            break
        if not pinned[i] and out_bytes[i] <= room:
            chosen.append(i)
            room -= out_bytes[i]
    return chosen


def fits(charged: int, need: int, budget: int) -> bool:
    """The admission rule: within the budget, or alone (``charged == 0``)."""
    return charged == 0 or charged + need <= budget


def scheduled_peak(peaks: Sequence[int], budget: int, threads: int, held: int = 0) -> int:
    """The largest sum of estimates in flight when jobs are admitted in order by ``fits``
    within ``window(threads)`` and each leaves only when it is the oldest (the worst case),
    plus ``held`` bytes of hoisted outputs waiting, within ``max(budget, largest job)``."""
    flight: deque[int] = deque()
    charged = worst = 0
    for need in peaks:
        while flight and (len(flight) >= window(threads) or not fits(charged, need, budget)):
            charged -= flight.popleft()
        flight.append(need)
        charged += need
        worst = max(worst, charged)
    return min(worst + held, max(budget, worst)) if held else worst


@dataclass(frozen=True)
class MemoryPlan:
    """A run's resources: the budget, the threads, the worst case under them, and the
    tensors too large for the budget (name, estimated bytes)."""

    budget: int
    threads: int
    peak: int
    over: tuple[tuple[str, int], ...]

    def warnings(self) -> list[str]:
        """One warning naming the largest tensor over the budget (and how many more)."""
        if not self.over:
            return []
        name, need = max(self.over, key=lambda o: o[1])
        n = len(self.over) - 1
        more = f" (and {n} more tensor{'s' if n > 1 else ''})" if n else ""
        return [
            f"tensor '{name}' needs about {human(need)} while it is merged, more than the "
            f"memory budget of {human(self.budget)} (--max-memory): it runs alone{more}"
        ]

    def as_json(self) -> dict[str, object]:
        return {
            "budget_bytes": self.budget,
            "threads": self.threads,
            "expected_peak_bytes": self.peak,
            "over_budget": [{"tensor": n, "bytes": b} for n, b in self.over],
        }

    def line(self) -> str:
        return (
            f"memory budget: {human(self.budget)} with {self.threads} thread"
            f"{'s' if self.threads != 1 else ''}: expected peak {human(self.peak)} of tensor data"
        )


def memory_plan(
    jobs: Sequence[TensorJob], models: dict[str, Model], method: Method, budget: int, threads: int
) -> MemoryPlan:
    peaks = [job_peak_bytes(j, models, method) for j in jobs]
    over = tuple((j.name, p) for j, p in zip(jobs, peaks, strict=True) if p > budget)
    out = [j.numel * j.dtype.itemsize for j in jobs]
    pinned = [trims_globally(j) for j in jobs]
    held = sum(
        out[i] for i in hoisted([j.numel for j in jobs], peaks, out, budget, threads, pinned)
    )
    return MemoryPlan(budget, threads, scheduled_peak(peaks, budget, threads, held), over)
