"""``merge_chunks`` on a device, with transfers overlapped with compute.

``device_merge_chunks`` runs a ``Streamed`` (``merge.methods.stream``) over the same chunk
bounds, passes and order as the CPU executor, so everything but the device's arithmetic is
the same. Each chunk is one step of a schedule (every statistics pass, then the apply pass),
and ``slots`` (2: double buffering) sets of buffers take turns:

1. the host reads chunk ``i + 1`` (``read``: the stored bytes) into pinned staging slot
   ``(i + 1) % slots``, after waiting for the host-to-device copy that last used it;
2. the copy stream waits until the compute that last read device slot ``(i + 1) % slots`` is
   done, then copies the staging slot into it: this copy runs while chunk ``i`` computes;
3. the compute stream waits for chunk ``i``'s copy, converts (float32 unless the stream takes
   stored inputs), runs the method and casts the output chunk (``cast``);
4. the copy stream waits for that compute and copies the cast chunk into a pinned output
   slot; the host waits for it one step later (after issuing the next compute) and hands it
   to ``emit``, which must consume it before returning (a shard writer writes it).

Device memory per pipeline: ``slots`` device copies of one chunk of every input as stored,
plus the compute's own float32 temporaries (``merge.device.vram`` estimates both).

What it does not do: read files (``read``) or write shards (``emit``), or run several jobs
(each worker thread runs its own pipeline with its own streams).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from merge.device.backend import Backend
from merge.methods.stream import Streamed, chunk_bounds

HostRead = Callable[[int, int], list[Tensor]]
"""``read(start, stop)``: the stored elements ``[start, stop)`` of every input, then the base."""


class _Slots:
    """Pinned staging and device buffers, one per input and slot, of one chunk each."""

    def __init__(self, backend: Backend, dtypes: Sequence[torch.dtype], size: int, n: int):
        self.host = [[backend.pinned(size, d) for d in dtypes] for _ in range(n)]
        self.dev = [[backend.empty(size, d) for d in dtypes] for _ in range(n)]


def device_merge_chunks(
    streamed: Streamed,
    numel: int,
    read: HostRead,
    dtypes: Sequence[torch.dtype],
    has_base: bool,
    out_dtype: torch.dtype,
    cast: Callable[[Tensor], Tensor],
    emit: Callable[[int, Tensor], None],
    backend: Backend,
    slots: int = 2,
) -> None:
    """Run ``streamed`` on ``backend``'s device over ``read``'s chunks (``dtypes``: the
    stored dtype of each input, then the base's; ``cast``: the output chunk's cast to
    ``out_dtype``, run on the device); ``emit(start, host_chunk)`` each cast output chunk in
    order."""
    bounds = chunk_bounds(numel, streamed.row)
    steps = [(p, a, b) for p in range(streamed.passes) for a, b in bounds]
    steps += [(-1, a, b) for a, b in bounds]
    size = max(b - a for a, b in bounds) if bounds else 0
    buf = _Slots(backend, dtypes, size, slots)
    outs = [backend.pinned(size, out_dtype) for _ in range(slots)]
    copied: list[Any] = []  # event per step: its host-to-device copy is done
    computed: list[Any] = []  # event per step: its compute is done
    stored = streamed.stored_inputs

    def stage(i: int) -> None:
        s, (_, a, b) = i % slots, steps[i]
        if i >= slots:
            backend.host_wait(copied[i - slots])  # staging slot s is free
        for host, part in zip(buf.host[s], read(a, b), strict=True):
            host[: b - a].copy_(part)
        if i >= slots:
            backend.wait(backend.copy, computed[i - slots])  # device slot s is free
        for k, (dev, host) in enumerate(zip(buf.dev[s], buf.host[s], strict=True)):
            backend.copy_async(
                backend.copy, dev[: b - a], host[: b - a], f"h2d {i} slot {s} in {k}"
            )
        copied.append(backend.record(backend.copy, f"copied {i}"))

    def inputs(i: int) -> tuple[list[Tensor], Tensor | None]:
        s, (_, a, b) = i % slots, steps[i]
        parts = [d[: b - a] for d in buf.dev[s]]
        n = len(parts) - has_base
        xs = [p if stored and p.dtype.is_floating_point else p.float() for p in parts[:n]]
        return xs, parts[n].float() if has_base else None

    pending: tuple[int, int, Tensor, Any] | None = None  # (step, start, output, event)

    def deliver() -> None:
        nonlocal pending
        if pending is None:
            return
        i, a, out, event = pending
        backend.host_wait(event)
        backend.note(f"emit {i}")
        emit(a, outs[i % slots][: out.numel()])
        pending = None

    if steps:
        stage(0)
    with backend.on(backend.compute):
        for i, (p, a, b) in enumerate(steps):
            if i + 1 < len(steps):
                stage(i + 1)  # overlaps this step's compute
            backend.wait(backend.compute, copied[i])
            backend.note(f"compute {i}")
            xs, base = inputs(i)
            if p >= 0:
                streamed.observe(p, xs, base)
                if b == bounds[-1][1]:
                    streamed.end_pass(p)
                computed.append(backend.record(backend.compute, f"computed {i}"))
                continue
            out = cast(streamed.apply(xs, base)).reshape(-1)
            computed.append(backend.record(backend.compute, f"computed {i}"))
            deliver()  # the previous output slot, while this one computes
            backend.wait(backend.copy, computed[i])
            host = outs[i % slots][: out.numel()]
            backend.copy_async(backend.copy, host, out, f"d2h {i} slot {i % slots}")
            pending = (i, a, out, backend.record(backend.copy, f"returned {i}"))
        deliver()
