"""Memory estimates of a plan, from headers only (shown by ``merge plan``).

``peak_memory`` is the expected peak of tensor data while the largest job runs: what a run
needs beyond the interpreter and libraries. The executor runs one job at a time, so the peak is
a maximum over jobs, not a sum.

What it does not do: enforce a budget (the executor has no ``--max-memory`` yet).
"""

from __future__ import annotations

from collections.abc import Sequence

from merge.jobs import TensorJob
from merge.methods import Method
from merge.sourceset import Model


def peak_memory(jobs: Sequence[TensorJob], models: dict[str, Model], method: Method) -> int:
    """Expected peak bytes of tensor data while one job runs: the inputs as stored and as
    float32, the method's measured working space (``Method.workspace``) and the output."""
    per_model, fixed = method.workspace
    peak = 0
    for job in jobs:
        reads = [*job.inputs, *([job.base] if job.base else [])]
        reads += job.vocab.extra if job.vocab else ()
        stored = sum(models[r.model].checkpoint.tensors[r.name].nbytes for r in reads)
        buffers = 0.0 if job.copy else len(reads) + per_model * len(job.inputs) + fixed
        buffers += len(reads) + 1 if job.vocab else 0  # aligned copies and the default rows
        peak = max(peak, stored + int(4 * job.numel * buffers) + job.numel * job.dtype.itemsize)
    return peak
