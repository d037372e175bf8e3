"""Merging one tensor chunk by chunk: the shared engine of the executor and the methods.

A streamed method describes one tensor's merge as a ``Streamed`` object: zero or more
statistics passes over the tensor's chunks (``observe``, then ``end_pass``), then ``apply``,
which makes each output chunk. ``merge_chunks`` drives it over any chunk reader, and

- the executor reads chunks of the inputs (``preadv`` into buffers) and writes each output
  chunk straight into its place in the output shard, so a tensor of any size costs a few
  chunk-sized float32 buffers (reused by the allocator: no page faults per tensor);
- the method's plain function (``whole``) drives the same object over tensors already in
  memory, so the two agree bit for bit by construction.

Chunks are fixed slices of the flattened tensor: ``CHUNK_ELEMENTS`` elements, or whole rows
(the last dim) when the method asks for rows (``Streamed.row``). Their bounds depend on the
shape only, never on threads or the memory budget, which keeps outputs bit-identical; random
methods draw each model's numbers from its own generator chunk after chunk, which yields the
same draws as one draw over the whole tensor.

``Cut`` finds an exact k-th largest magnitude over chunks (the radix select of
``merge.methods.radix``: a 65,536-bin histogram pass, then a 32,768-bin pass inside the boundary
bin) and then masks chunk after chunk, keeping exactly ``k`` entries: those above the threshold
and the first entries equal to it, in flattened order.

What it does not do: read files or write shards (``merge.execute``), or split a tensor across
threads (a tensor is one job; jobs run in parallel).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import Tensor

from merge.methods.radix import high_bin, high_histogram, low_histogram, threshold_of

__all__ = [
    "CHUNK_ELEMENTS",
    "Cut",
    "Elementwise",
    "Reader",
    "StreamFactory",
    "Streamed",
    "chunk_bounds",
    "float64_sum",
    "merge_chunks",
    "model_generators",
    "whole",
]

CHUNK_ELEMENTS = 1 << 20  # 4 MiB of float32 per buffer: cache-friendly, few Python steps

Reader = Callable[[int, int], tuple[list[Tensor], "Tensor | None"]]
"""``read(start, stop)``: the inputs' and the base's flat elements ``[start, stop)``, float32."""


class Streamed:
    """One tensor's merge over chunks (see the module notes). Subclasses set ``passes`` and
    ``row`` (1: any slice; ``shape[-1]``: chunks hold whole rows, passed as 1-D slices), and
    ``stored_inputs`` when the only use of an input chunk is ``x - base`` with the float32
    base: the executor then hands the inputs in their stored floating dtype, and the
    subtraction converts them (exactly) without a pass of its own."""

    passes: int = 0
    row: int = 1
    stored_inputs: bool = False

    def observe(self, step: int, xs: list[Tensor], base: Tensor | None) -> None:
        """Statistics pass ``step`` sees the next chunk (chunks come in order)."""

    def end_pass(self, step: int) -> None:
        """Statistics pass ``step`` has seen every chunk."""

    def apply(self, xs: list[Tensor], base: Tensor | None) -> Tensor:  # pragma: no cover
        """The output chunk (float32, flat) of the next chunk; chunks come in order."""
        raise NotImplementedError


StreamFactory = Callable[[dict[str, Any], tuple[int, ...], "torch.Generator | None"], Streamed]
"""``factory(params, shape, rng)``: the ``Streamed`` of one tensor (the method's arguments)."""


def chunk_bounds(numel: int, row: int = 1, size: int | None = None) -> list[tuple[int, int]]:
    """Fixed ``(start, stop)`` chunks of ``numel`` elements: ``size`` (default
    ``CHUNK_ELEMENTS``) rounded down to whole rows of ``row`` elements, at least one row."""
    size = CHUNK_ELEMENTS if size is None else size
    step = max(1, size // max(row, 1)) * max(row, 1)
    return [(start, min(start + step, numel)) for start in range(0, numel, step)]


def merge_chunks(
    streamed: Streamed, numel: int, read: Reader, emit: Callable[[int, Tensor], None]
) -> None:
    """Run ``streamed`` over the chunks that ``read`` gives; ``emit(start, chunk)`` each
    output chunk in order."""
    bounds = chunk_bounds(numel, streamed.row)
    for step in range(streamed.passes):
        for start, stop in bounds:
            xs, base = read(start, stop)
            streamed.observe(step, xs, base)
        streamed.end_pass(step)
    for start, stop in bounds:
        xs, base = read(start, stop)
        emit(start, streamed.apply(xs, base))


def whole(factory: StreamFactory, name: str, doc: str | None) -> Callable[..., Tensor]:
    """The method function of a streamed method: ``factory``'s merge over in-memory tensors,
    chunk by chunk like the executor, into one float32 output."""

    def fn(
        tensors: list[Tensor], base: Tensor | None, params: dict[str, Any], rng: Any = None
    ) -> Tensor:
        shape = tuple(tensors[0].shape)
        flats = [t.reshape(-1) for t in tensors]
        flat_base = None if base is None else base.reshape(-1)
        out = torch.empty(shape, dtype=torch.float32, device=tensors[0].device)
        flat_out = out.view(-1)

        def read(start: int, stop: int) -> tuple[list[Tensor], Tensor | None]:
            xs = [f[start:stop] for f in flats]
            return xs, None if flat_base is None else flat_base[start:stop]

        def emit(start: int, chunk: Tensor) -> None:
            flat_out[start : start + chunk.numel()].copy_(chunk.reshape(-1))

        merge_chunks(factory(params, shape, rng), out.numel(), read, emit)
        return out

    fn.__name__ = fn.__qualname__ = name
    fn.__doc__ = doc
    return fn


class Elementwise(Streamed):
    """A method whose function works entry by entry: each chunk is the function of the
    inputs' chunks (``linear``), so no statistics are needed."""

    def __init__(self, fn: Callable[..., Tensor], params: dict[str, Any], rng: Any) -> None:
        self.fn = fn
        self.params = params
        self.rng = rng

    def apply(self, xs: list[Tensor], base: Tensor | None) -> Tensor:
        return self.fn(xs, base, self.params, self.rng)

    @classmethod
    def of(cls, fn: Callable[..., Tensor]) -> StreamFactory:
        """The factory streaming the elementwise function ``fn``."""
        return lambda params, shape, rng: cls(fn, params, rng)


def float64_sum(t: Tensor) -> float:
    """The sum of a float32 tensor, accumulated in float64. On the CPU: numpy's pairwise sum,
    whose order is fixed in its C code (the same bits on every machine) and about four times
    faster than torch's float64 reduction of float32; torch's on other devices."""
    if t.device.type != "cpu":
        return float(t.sum(dtype=torch.float64))
    if t.dtype not in (torch.float32, torch.float64):  # numpy has no bfloat16
        t = t.to(torch.float32)
    return float(np.sum(t.detach().numpy(), dtype=np.float64))


def model_generators(rng: torch.Generator | None, n: int) -> list[torch.Generator]:
    """One generator per model, seeded from ``rng`` in model order: each model's draws then
    continue chunk after chunk, independent of the other models'."""
    if rng is None:
        raise ValueError("random sparsification needs a seeded torch.Generator, got None")
    seeds = torch.randint(0, 2**62, (n,), generator=rng, dtype=torch.int64).tolist()
    return [torch.Generator(device=rng.device).manual_seed(int(s)) for s in seeds]


class Cut:
    """The ``k`` largest magnitudes of one tensor, found over chunks and then masked chunk by
    chunk: ``observe`` the magnitude bits (``merge.methods.radix.magnitude_bits``) in pass 0
    and pass 1 (``end_pass`` after each); ``mask`` then keeps exactly ``k`` entries.

    ``Cut.given(threshold, equal)`` skips the passes: keep ``> threshold`` plus the first
    ``equal`` entries equal to it (a whole-model cut's share, ``merge.globaltrim``).
    ``k=None`` defers ``k`` to a ``decide(k)`` call before ``end_pass(0)`` (a ``k`` that
    depends on what pass 0 saw, e.g. a count of nonzero entries)."""

    def __init__(self, k: int | None, numel: int) -> None:
        self.numel = numel
        self.threshold = 0.0
        self.equal = 0  # entries equal to the threshold to keep
        self._left = 0  # of those, not yet met by ``mask``
        self.all_equal = False  # every entry equal to the threshold is kept: no counting
        self._hist: Tensor | None = None
        self._bin = 0
        self._need = 0
        self._low: Tensor | None = None
        self.k, self.trivial = 0, False
        if k is not None:
            self.decide(k)

    def decide(self, k: int) -> None:
        """Set ``k`` (before ``end_pass(0)``)."""
        self.k = min(max(k, 0), self.numel)
        self.trivial = self.k in (0, self.numel)
        if self.k == self.numel:  # keep everything
            self.threshold, self.all_equal = -1.0, True
        elif self.k == 0:
            self.threshold = float("inf")

    @classmethod
    def given(cls, threshold: float, equal: int, numel: int) -> Cut:
        cut = cls(0, numel)
        cut.threshold, cut.equal, cut.trivial = float(threshold), int(equal), True
        cut.all_equal = cut.equal >= numel
        cut.rewind()
        return cut

    def rewind(self) -> None:
        """Start masking from the first chunk again (the tie quota is full)."""
        self._left = self.equal

    def observe(self, step: int, bits: Tensor) -> None:
        if self.trivial:
            return
        if step == 0:
            h = high_histogram(bits)
            self._hist = h if self._hist is None else self._hist.add_(h)
        else:
            h = low_histogram(bits, self._bin)
            self._low = h if self._low is None else self._low.add_(h)

    def end_pass(self, step: int) -> None:
        if self.trivial:
            return
        if step == 0:
            assert self._hist is not None
            self._bin, above = high_bin(self._hist, self.k)
            self._need = self.k - above
            self._hist = None
            return
        assert self._low is not None
        low, above = high_bin(self._low, self._need)
        self.threshold = threshold_of(self._bin, low)
        self.equal = self._need - above
        self.all_equal = self.equal == int(self._low[low].item())
        self._low = None
        self.rewind()

    def mask(self, mags: Tensor) -> Tensor:
        """The kept entries of the next chunk as float32 1.0 / 0.0 (``mags``: its ``|d|``, flat
        float32; float comparisons are several times faster than boolean ones)."""
        keep = torch.empty_like(mags)
        if self.all_equal:
            return torch.ge(mags, self.threshold, out=keep)
        torch.gt(mags, self.threshold, out=keep)
        if self._left > 0:
            ties = torch.eq(mags, self.threshold, out=torch.empty_like(mags))
            exact = torch.float32 if mags.numel() < 2**24 else torch.float64  # integer sums
            count = int(ties.sum(dtype=exact).item())
            if count > self._left:
                ties.mul_(torch.cumsum(ties, 0, dtype=exact).le_(self._left))
                count = self._left
            keep.add_(ties)  # ties are not above the threshold: 0 + 1
            self._left -= count
        return keep
