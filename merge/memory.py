"""Memory estimates of a plan, from headers only, and the budget a run keeps to.

``job_peak_bytes`` is the expected peak of tensor data while one job runs. A streamed job
(``streamed``: the method has a chunked form and every input can be read by ranges) holds a few
chunk-sized float32 buffers whatever the tensor's size (plus ``Method.kept_bits`` an entry and
model: the task family's packed keep masks; plus what a source computes per range,
``TensorSource.range_bytes``: a LoRA update's rows; an MoE expert's noise block; a
vocabulary tensor's row blocks); the inputs stay in the page cache and the output goes to its
shard chunk by chunk. Any other job (a method without a chunked form, ``--device cuda``, an
input that cannot be read by ranges) holds its inputs as stored and as float32, the method's
measured working space (``Method.workspace``) and the output. ``peak_memory`` is the largest
of these (``Plan.peak_bytes``: what one job alone needs).

The executor runs up to ``threads`` jobs at once, the most work first (``job_order``),
admitting a job only while the estimates of the jobs running fit in the budget
(``--max-memory``, by default half of the available RAM); a job larger than the whole budget
runs alone. ``MemoryPlan`` is that schedule's worst case, computed by replaying the admission
rule, plus a warning for every tensor that cannot fit (``merge plan`` and ``merge run`` show
both).

What it does not do: measure anything (the numbers are estimates from shapes and dtypes), or
count the interpreter, libraries and page cache.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass

from merge import noise
from merge.jobs import TensorJob
from merge.methods import Method
from merge.methods.stream import CHUNK_ELEMENTS
from merge.report import human_bytes as human
from merge.sourceset import Model

DEFAULT_FRACTION = 0.5  # of MemAvailable, when no --max-memory is given
FALLBACK_AVAILABLE = 8 * 2**30  # where the available memory cannot be read


def streamed(job: TensorJob, models: dict[str, Model], method: Method) -> bool:
    """Whether ``job`` runs chunk by chunk from memory-mapped inputs (``merge.execute``)."""
    if job.computed is not None:
        return False
    chunked = job.copy or method.stream is not None
    reads = [*job.inputs, *([job.base] if job.base else []), *job.agree]
    reads += job.vocab.extra if job.vocab else ()
    return chunked and all(models[r.model].checkpoint.can_range(r.name) for r in reads)


def job_peak_bytes(job: TensorJob, models: dict[str, Model], method: Method) -> int:
    """Expected peak bytes of tensor data while ``job`` runs (module notes)."""
    per_model, fixed = method.workspace
    reads = [*job.inputs, *([job.base] if job.base else [])]
    reads += job.vocab.extra if job.vocab else ()
    buffers = 0.0 if job.copy else len(reads) + per_model * len(job.inputs) + fixed
    if job.copy and (job.noise or job.scale != 1.0):
        buffers = 3.0  # the float32 values, the noise and the sum (and one noise block)
    if streamed(job, models, method):
        chunk = min(job.numel, CHUNK_ELEMENTS)
        bits = method.kept_bits(job.params) if method.kept_bits else 0
        kept = -(-job.numel * bits // 8) * len(job.inputs)
        extra = sum(models[r.model].checkpoint.range_bytes(r.name, chunk) for r in reads)
        if job.copy and job.noise:
            extra += 4 * min(job.numel, noise.NOISE_BLOCK)
        if job.vocab is not None:  # each model's rows, the default rows, each aligned block
            width = job.numel // max(job.shape[0], 1)
            rows = min(job.numel, chunk + 2 * width)
            extra += 4 * rows * (2 * len(reads) + 1)
        tensors = int(4 * chunk * (buffers + 1)) + chunk * job.dtype.itemsize
        return tensors + kept + extra
    stored = sum(models[r.model].checkpoint.tensors[r.name].nbytes for r in reads)
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


def job_order(jobs: Sequence[TensorJob]) -> list[int]:
    """The order jobs start in: most work first (elements times tensors read), so the large
    ones do not end the run alone on one core; plan order among equals."""
    work = [j.numel * (len(j.inputs) + (j.base is not None)) for j in jobs]
    return sorted(range(len(jobs)), key=lambda i: -work[i])


def fits(charged: int, need: int, budget: int) -> bool:
    """The admission rule: within the budget, or alone (``charged == 0``)."""
    return charged == 0 or charged + need <= budget


def scheduled_peak(peaks: Sequence[int], budget: int, threads: int) -> int:
    """The largest sum of estimates running when jobs (in start order) are admitted by
    ``fits``, at most ``threads`` at once, each leaving only when it is the oldest running
    (the worst case)."""
    running: list[int] = []
    charged = worst = 0
    for need in peaks:
        while running and (len(running) >= threads or not fits(charged, need, budget)):
            charged -= running.pop(0)
        running.append(need)
        charged += need
        worst = max(worst, charged)
    return worst


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
    ordered = [peaks[i] for i in job_order(jobs)]
    return MemoryPlan(budget, threads, scheduled_peak(ordered, budget, threads), over)
