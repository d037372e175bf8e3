"""A streamed job on a device: its stored chunks through ``merge.device.chunks``.

``device_stream_job`` is the device form of the executor's streamed job: the same reads
(``merge.reads.Flat``), input check and output check (``merge.finite``), the output chunks
cast on the device and written where the CPU path writes them. ``Backends`` gives each
worker thread its own CUDA streams (or a fresh simulated device for ``torch.device("cpu")``,
the tests' device).

What it does not do: decide which jobs run here (``merge.device.vram.placement``).
"""

from __future__ import annotations

import threading
from typing import Any

import torch

from merge.device.backend import Backend, CudaBackend, SimBackend
from merge.device.chunks import device_merge_chunks
from merge.finite import FiniteCheck
from merge.jobs import Plan, TensorJob
from merge.reads import flat_views, input_chunks, job_models
from merge.sink import TensorSink


def device_stream_job(
    plan: Plan,
    job: TensorJob,
    params: dict[str, Any],
    writer: TensorSink,
    finite: FiniteCheck,
    backend: Backend,
    rng: torch.Generator | None,
) -> None:
    """A streamed job on ``backend``'s device (``merge.device.chunks``): the stored bytes of
    each chunk go to the device, the cast output chunks come back to their shard."""
    models, inputs = job_models(job), input_chunks(plan, job)
    tally = finite.tally(job.name, inputs)
    xs, base = flat_views(plan, job)
    views = [*xs, *([base] if base is not None else [])]

    def read(start: int, stop: int) -> list[torch.Tensor]:
        parts = [v[start:stop] for v in views]
        if tally is not None:
            tally(start, list(zip(models, parts, strict=True)))
        return parts

    def cast(chunk: torch.Tensor) -> torch.Tensor:
        out = chunk.to(job.dtype)
        finite.chunk(job.name, chunk, out, models, inputs)
        return out

    def emit(start: int, chunk: torch.Tensor) -> None:
        writer.write_part(job.name, start, chunk)

    stream = plan.method.stream
    assert stream is not None
    state = stream(params, job.shape, rng)
    dtypes = [v.dtype for v in views]
    device_merge_chunks(
        state, job.numel, read, dtypes, base is not None, job.dtype, cast, emit, backend
    )
    if tally is not None:
        tally.done()


class Backends:
    """A ``Backend`` for the calling worker: its own CUDA streams (kept per thread), or a
    fresh simulated device for the ``cpu`` device of tests."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._local = threading.local()

    def get(self) -> Backend:
        if self.device.type != "cuda":
            return SimBackend()
        if not hasattr(self._local, "backend"):
            self._local.backend = CudaBackend(self.device)
        backend: Backend = self._local.backend
        return backend
