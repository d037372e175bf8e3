"""Where the executor hands finished output tensors: the ``TensorSink`` protocol.

The executor (``merge.execute``) computes each output tensor, casts it to its planned dtype
and gives it, whole or chunk by chunk, to a sink. ``merge.writer.ShardWriter`` is the sink of
``merge run`` (safetensors shards at planned offsets); ``merge.evolve.inmemory`` has one that
copies into a live model's parameters. Both see the same cast bytes in the same places, so
what they hold is the same. ``check_whole`` and ``check_part`` are the checks every sink makes
of what it is given (planned shape; planned dtype and elements in range).

What it does not do: cast, check finiteness or know about shards; a sink only places bytes.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Protocol

import torch


class TensorSink(Protocol):
    """Takes output tensors from any worker thread, in any order.

    ``write(name, tensor)``: a whole tensor of the planned shape and dtype.
    ``write_part(name, start, tensor)``: elements ``start..`` of the flattened tensor.
    ``finish(name)``: every element of ``name`` was written.
    ``done``: tensors already present before the run (resumed), skipped by the executor.
    ``written_bytes``: bytes present so far (progress)."""

    @property
    def done(self) -> Mapping[str, str]: ...

    @property
    def written_bytes(self) -> int: ...

    def write(self, name: str, tensor: torch.Tensor) -> None: ...

    def write_part(self, name: str, start: int, tensor: torch.Tensor) -> None: ...

    def finish(self, name: str) -> None: ...


def check_whole(name: str, shape: tuple[int, ...], tensor: torch.Tensor) -> None:
    """A whole tensor must have its planned shape (``ValueError`` naming both)."""
    if tuple(tensor.shape) != shape:
        raise ValueError(f"tensor '{name}' has shape {tuple(tensor.shape)}, planned {shape}")


def check_part(name: str, dtype: torch.dtype, numel: int, start: int, tensor: torch.Tensor) -> None:
    """A part must have the planned dtype and lie within the tensor's ``numel`` elements."""
    if tensor.dtype != dtype:
        raise ValueError(f"tensor '{name}' has dtype {tensor.dtype}, planned {dtype}")
    if start < 0 or start + tensor.numel() > numel:
        raise ValueError(
            f"tensor '{name}': elements {start}..{start + tensor.numel()} are outside its "
            f"{numel} elements"
        )
