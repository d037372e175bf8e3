"""Device memory: the ``--max-vram`` budget, each job's estimate, and where each job runs.

Streamed jobs hold ``SLOTS`` chunks of each input as stored, the float32 temporaries of
one chunk, and what the method keeps between passes (the task family's keep masks: packed
bits on the CPU, one bool a mask entry on a device).

``placement`` says where a job runs with ``--device cuda``: ``"stream"`` (a streamed method
job: chunk by chunk through ``merge.device.chunks``), ``"whole"`` (a job that cannot stream on
the device, e.g. a vocabulary tensor, aligned on the host first, whose whole inputs fit the
budget), or ``"cpu"`` (copies, computed
MoE gates, and whole jobs larger than the budget: they run on the CPU, with a warning from
``VramPlan``). ``vram_bytes`` is a job's device estimate there (0 on the CPU); the executor
admits jobs only while the running ones' estimates fit the budget (``merge.pipeline``), and
``VramPlan`` replays that rule for ``merge plan``.

The default budget is ``DEFAULT_VRAM_FRACTION`` of the device's free memory when the run
starts (``torch.cuda.mem_get_info``), leaving room for the CUDA context and the allocator's
rounding.

What it does not do: measure (estimates from shapes and dtypes; the caching allocator may
hold more), or move anything.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from merge.jobs import TensorJob
from merge.memory import fits, job_order, scheduled_peak, streamed
from merge.methods import Method
from merge.methods.stream import CHUNK_ELEMENTS
from merge.report import human_bytes as human
from merge.sourceset import Model

if TYPE_CHECKING:
    from merge.resources import Resources

DEFAULT_VRAM_FRACTION = 0.8  # of the free device memory, when no --max-vram is given
SLOTS = 2  # buffer sets of the chunk pipeline (double buffering)


def free_vram(device: torch.device) -> int:
    """Free bytes on ``device`` now (``torch.cuda.mem_get_info``)."""
    free, _total = torch.cuda.mem_get_info(device)
    return int(free)


def _reads(job: TensorJob) -> list:
    reads = [*job.inputs, *([job.base] if job.base else [])]
    return reads + list(job.vocab.extra if job.vocab else ())


def stream_vram_bytes(job: TensorJob, models: dict[str, Model], method: Method) -> int:
    """A streamed job on the device: ``SLOTS`` chunks of every input as stored, the float32
    working buffers of the CPU estimate (``merge.memory``), the output chunk and its cast."""
    chunk = min(job.numel, CHUNK_ELEMENTS)
    reads = _reads(job)
    stored = sum(models[r.model].checkpoint.tensors[r.name].dtype.itemsize for r in reads)
    per_model, fixed = method.workspace
    work = len(reads) + per_model * len(job.inputs) + fixed
    bits = method.kept_bits(job.params) if method.kept_bits else 0
    kept = job.numel * bits * len(job.inputs)  # on a device: a byte a bit (bool masks)
    return SLOTS * chunk * stored + int(4 * chunk * (work + 1)) + chunk * job.dtype.itemsize + kept


def whole_vram_bytes(job: TensorJob, models: dict[str, Model], method: Method) -> int:
    """A whole-tensor job on the device: inputs as stored and as float32, the method's
    working space, the output and its cast."""
    reads = _reads(job)
    stored = sum(models[r.model].checkpoint.tensors[r.name].nbytes for r in reads)
    per_model, fixed = method.workspace
    work = len(reads) + per_model * len(job.inputs) + fixed
    return stored + int(4 * job.numel * (work + 1)) + job.numel * job.dtype.itemsize


def placement(job: TensorJob, models: dict[str, Model], method: Method, budget: int) -> str:
    """``"stream"``, ``"whole"`` or ``"cpu"``: where ``job`` runs (module notes)."""
    if job.copy or job.computed is not None:
        return "cpu"
    if streamed(job, models, method) and job.vocab is None:  # aligned rows: on the CPU
        return "stream"
    return "whole" if whole_vram_bytes(job, models, method) <= budget else "cpu"


def vram_bytes(job: TensorJob, models: dict[str, Model], method: Method, budget: int) -> int:
    """``job``'s device estimate where it runs (0 on the CPU)."""
    where = placement(job, models, method, budget)
    if where == "stream":
        return stream_vram_bytes(job, models, method)
    return whole_vram_bytes(job, models, method) if where == "whole" else 0


def placements(
    jobs: Sequence[TensorJob], models: dict[str, Model], method: Method, res: Resources
) -> tuple[list[str], list[int]]:
    """Each job's ``placement`` and device estimate under ``res`` (all ``"cpu"`` and 0
    without a device)."""
    if res.device is None:
        return ["cpu"] * len(jobs), [0] * len(jobs)
    where = [placement(j, models, method, res.vram) for j in jobs]
    return where, [vram_bytes(j, models, method, res.vram) for j in jobs]


@dataclass(frozen=True)
class VramPlan:
    """The device side of a run: the budget, the worst case under it, how many jobs run on
    the device, and the non-copy jobs left on the CPU because they exceed the budget."""

    device: str
    budget: int
    peak: int
    on_device: int
    too_large: tuple[tuple[str, int], ...]

    def warnings(self) -> list[str]:
        if not self.too_large:
            return []
        name, need = max(self.too_large, key=lambda o: o[1])
        n = len(self.too_large) - 1
        more = f" (and {n} more tensor{'s' if n > 1 else ''})" if n else ""
        return [
            f"tensor '{name}' needs about {human(need)} of device memory, more than the "
            f"--max-vram budget of {human(self.budget)}: it runs on the CPU{more}"
        ]

    def line(self) -> str:
        return (
            f"VRAM budget: {human(self.budget)} on {self.device}: expected peak "
            f"{human(self.peak)} ({self.on_device} tensor{'s' if self.on_device != 1 else ''} "
            "on the device)"
        )

    def as_json(self) -> dict[str, object]:
        return {
            "device": self.device,
            "budget_bytes": self.budget,
            "expected_peak_bytes": self.peak,
            "tensors_on_device": self.on_device,
            "too_large": [{"tensor": n, "bytes": b} for n, b in self.too_large],
        }


def vram_plan(
    jobs: Sequence[TensorJob],
    models: dict[str, Model],
    method: Method,
    device: str,
    budget: int,
    threads: int,
) -> VramPlan:
    """The device schedule's worst case: jobs in start order, at most ``threads`` at once,
    admitted while their device estimates fit ``budget`` (``merge.memory.fits``)."""
    need = [vram_bytes(j, models, method, budget) for j in jobs]
    ordered = [need[i] for i in job_order(jobs) if need[i] > 0]
    too_large = tuple(
        (j.name, whole_vram_bytes(j, models, method))
        for j, n in zip(jobs, need, strict=True)
        if n == 0 and not j.copy and j.computed is None
    )
    assert all(fits(0, n, budget) for n in ordered)
    peak = scheduled_peak(ordered, budget, threads)
    return VramPlan(device, budget, peak, len(ordered), too_large)


def device_peak_line(resources: Resources) -> str:
    """After a run on a device: the allocator's peak (``torch.cuda.max_memory_allocated``;
    its counters are process-wide) against the budget."""
    dev = resources.device
    assert dev is not None
    peak = torch.cuda.max_memory_allocated(dev) if dev.type == "cuda" else 0
    budget = human(resources.vram)
    return f"device memory peak: {human(peak)} on {dev}, --max-vram {budget} ({peak} bytes)"
