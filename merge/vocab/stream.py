"""A vocabulary tensor's aligned inputs, chunk by chunk: what a streamed vocabulary job reads.

A flat chunk ``[start, stop)`` of the output covers output rows ``[start // width,
ceil(stop / width))``; ``AlignedChunks.read`` makes those rows of every model's aligned tensor
(``merge.vocab.align_rows``), reading each model's source rows by ranges, one read per run of
consecutive rows (a union vocabulary keeps most rows in order, so a block costs a few reads),
and returns the chunk's elements. The same bits as the slices of ``align``'s whole tensors; no
statistics pass (default rows are sums of given rows times a scale), so a method's own passes
simply read the chunks again.

What it does not do: open files (``read_range``-able sources are given) or run methods.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Protocol

import torch
from torch import Tensor

from merge.vocab.align import Alignment, align_rows


class Ranges(Protocol):
    """A flattened tensor read by slices (``merge.execute.Flat``)."""

    def __getitem__(self, span: slice) -> Tensor: ...


class AlignedChunks:
    """Flat chunks of each model's aligned tensor (``read``), from ``flats`` (model -> its
    tensor, flattened, read by slices) and the output ``shape``."""

    def __init__(self, al: Alignment, flats: Mapping[str, Ranges], shape: tuple[int, ...]) -> None:
        self.al, self.flats = al, flats
        self.rest = tuple(shape[1:])
        self.width = 1
        for d in self.rest:
            self.width *= d

    def rows(self, model: str, rows: Tensor) -> Tensor:
        """Rows ``rows`` (int64) of ``model``'s tensor as float32, a read per run."""
        n, width = rows.numel(), self.width
        out = torch.empty((n, *self.rest), dtype=torch.float32)
        flat, idx, i = out.view(n, width), rows.tolist(), 0
        while i < n:
            j = i + 1
            while j < n and idx[j] == idx[j - 1] + 1:
                j += 1
            part = self.flats[model][idx[i] * width : (idx[j - 1] + 1) * width]
            flat[i:j].copy_(part.view(j - i, width))
            i = j
        return out

    def read(self, start: int, stop: int) -> dict[str, Tensor]:
        """Elements ``[start, stop)`` of each model's aligned tensor (flat float32)."""
        w = max(self.width, 1)
        r0, r1 = start // w, -(-stop // w)
        block = align_rows(self.al, self.rows, r0, r1)
        lo, hi = start - r0 * w, stop - r0 * w
        return {m: t.view(-1)[lo:hi] for m, t in block.items()}
