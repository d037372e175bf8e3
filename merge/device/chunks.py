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


class _Pipeline:
    """One tensor's schedule on a device (see the module notes): buffers, events, the
    output waiting to be handed over."""

    def __init__(
        self,
        streamed: Streamed,
        numel: int,
        read: HostRead,
        dtypes: Sequence[torch.dtype],
        has_base: bool,
        out_dtype: torch.dtype,
        backend: Backend,
        slots: int,
    ) -> None:
        self.streamed, self.read, self.has_base = streamed, read, has_base
        self.b, self.slots = backend, slots
        self.bounds = chunk_bounds(numel, streamed.row)
        self.steps = [(p, a, z) for p in range(streamed.passes) for a, z in self.bounds]
        self.steps += [(-1, a, z) for a, z in self.bounds]
        size = max((z - a for a, z in self.bounds), default=0)
        self.host = [[backend.pinned(size, d) for d in dtypes] for _ in range(slots)]
        self.dev = [[backend.empty(size, d) for d in dtypes] for _ in range(slots)]
        self.outs = [backend.pinned(size, out_dtype) for _ in range(slots)]
        self.copied: list[Any] = []  # event per step: its host-to-device copy is done
        self.computed: list[Any] = []  # event per step: its compute is done
        self.pending: tuple[int, int, Tensor, Any] | None = None  # step, start, output, event

    def stage(self, i: int) -> None:
        """Read step ``i``'s chunk into its staging slot and copy it to its device slot."""
        b, s, (_, a, z) = self.b, i % self.slots, self.steps[i]
        if i >= self.slots:
            b.host_wait(self.copied[i - self.slots])  # staging slot s is free
        for host, part in zip(self.host[s], self.read(a, z), strict=True):
            host[: z - a].copy_(part)
        if i >= self.slots:
            b.wait(b.copy, self.computed[i - self.slots])  # device slot s is free
        for k, (dev, host) in enumerate(zip(self.dev[s], self.host[s], strict=True)):
            b.copy_async(b.copy, dev[: z - a], host[: z - a], f"h2d {i} slot {s} in {k}")
        self.copied.append(b.record(b.copy, f"copied {i}"))

    def inputs(self, i: int) -> tuple[list[Tensor], Tensor | None]:
        """Step ``i``'s chunk on the device, as the stream takes it."""
        s, (_, a, z) = i % self.slots, self.steps[i]
        parts = [d[: z - a] for d in self.dev[s]]
        n, stored = len(parts) - self.has_base, self.streamed.stored_inputs
        xs = [p if stored and p.dtype.is_floating_point else p.float() for p in parts[:n]]
        return xs, parts[n].float() if self.has_base else None

    def deliver(self, emit: Callable[[int, Tensor], None]) -> None:
        """Hand the output chunk waiting to come back to ``emit``, once it is back."""
        if self.pending is None:
            return
        i, a, out, event = self.pending
        self.b.host_wait(event)
        self.b.note(f"emit {i}")
        emit(a, self.outs[i % self.slots][: out.numel()])
        self.pending = None

    def give_back(self, i: int, a: int, out: Tensor) -> None:
        """Copy step ``i``'s output chunk into its pinned slot after its compute."""
        b, s = self.b, i % self.slots
        b.wait(b.copy, self.computed[i])
        b.copy_async(b.copy, self.outs[s][: out.numel()], out, f"d2h {i} slot {s}")
        self.pending = (i, a, out, b.record(b.copy, f"returned {i}"))

    def run(self, cast: Callable[[Tensor], Tensor], emit: Callable[[int, Tensor], None]) -> None:
        b, last = self.b, self.bounds[-1][1] if self.bounds else 0
        if self.steps:
            self.stage(0)
        with b.on(b.compute):
            for i, (p, a, z) in enumerate(self.steps):
                if i + 1 < len(self.steps):
                    self.stage(i + 1)  # overlaps this step's compute
                b.wait(b.compute, self.copied[i])
                b.note(f"compute {i}")
                xs, base = self.inputs(i)
                if p >= 0:
                    self.streamed.observe(p, xs, base)
                    if z == last:
                        self.streamed.end_pass(p)
                    self.computed.append(b.record(b.compute, f"computed {i}"))
                    continue
                out = cast(self.streamed.apply(xs, base)).reshape(-1)
                self.computed.append(b.record(b.compute, f"computed {i}"))
                self.deliver(emit)  # the previous output, while this one computes
                self.give_back(i, a, out)
            self.deliver(emit)

    def drain(self) -> None:
        """Wait for both streams: no copy or kernel still uses the buffers."""
        self.b.host_wait(self.b.record(self.b.compute, "drained compute"))
        self.b.host_wait(self.b.record(self.b.copy, "drained copy"))


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
    pipe = _Pipeline(streamed, numel, read, dtypes, has_base, out_dtype, backend, slots)
    try:
        pipe.run(cast, emit)
    except BaseException:  # no copy may still write into buffers about to be freed
        pipe.drain()
        raise
