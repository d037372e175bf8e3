"""``LoraCheckpoint``: a base checkpoint read through an adapter, tensor by tensor.

Same interface as ``merge.checkpoint.Checkpoint`` (``tensors``, ``config``, ``read``,
``layer_count``, ``close``); the planner sees the base's names, shapes and dtypes unchanged.
It holds the adapter's small tensors and reads at most one base tensor per ``read``;
``read_range`` computes a LoRA-updated tensor on the rows a range covers, so such tensors
stream like any other (``merge.execute``), with the bits of the whole ``read``.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from merge.checkpoint import Checkpoint, TensorSource
from merge.errors import CheckpointError
from merge.inputstate import Stamp
from merge.links import check_folder
from merge.lora.adapter import Adapter, read_adapter


class LoraCheckpoint(TensorSource):
    """A base ``Checkpoint`` read through an adapter; same interface as ``Checkpoint``."""

    def __init__(self, base: Checkpoint, adapter: Adapter, label: str) -> None:
        self.base = base
        self.adapter = adapter
        self.label = label
        self.directory = base.directory
        self.config = base.config
        self.tensors = base.tensors
        self.format = base.format

    @classmethod
    def open(
        cls, base: Checkpoint, adapter_dir: Path, *, label: str, base_label: str, adapter_label: str
    ) -> LoraCheckpoint:
        """Wrap the open ``base`` with the adapter in ``adapter_dir`` (checked against it)."""
        if not Path(adapter_dir).is_dir():
            raise CheckpointError(
                f"model '{label}': adapter '{adapter_label}' ({adapter_dir}): directory not found"
            )
        check_folder(Path(adapter_dir), adapter_label)
        adapter = read_adapter(
            Path(adapter_dir),
            base,
            label=label,
            base_label=base_label,
            adapter_label=adapter_label,
        )
        return cls(base, adapter, label)

    def read(self, name: str) -> torch.Tensor:
        """One tensor: the base's (stored dtype), or, where the adapter touches it, the replaced
        and/or LoRA-updated tensor in float32. Reads at most one base tensor; never mutates."""
        replacement = self.adapter.replacements.get(name)
        pair = self.adapter.pairs.get(name)
        if replacement is None and pair is None:
            return self.base.read(name)
        if replacement is None:
            weight = self.base.read(name).to(torch.float32)
        else:  # a copy: callers may own what read() returns, as with the base's reads
            weight = replacement.to(torch.float32, copy=True)
        return weight if pair is None else weight + pair.delta()

    def view(self, name: str) -> torch.Tensor | None:
        """The base's tensor without a copy where the adapter leaves it alone, else None."""
        return self.base.view(name) if self.can_view(name) else None

    def can_view(self, name: str) -> bool:
        touched = name in self.adapter.replacements or name in self.adapter.pairs
        return not touched and self.base.can_view(name)

    def can_range(self, name: str) -> bool:
        """Every tensor reads by ranges where the base's does (or the adapter replaces it)."""
        return name in self.adapter.replacements or self.base.can_view(name)

    def range_bytes(self, name: str, size: int) -> int:
        """A LoRA-updated range: the rows' weights in float32, the delta's blocks and their
        sum, each at most the range plus two rows or blocks."""
        if name not in self.adapter.pairs and name not in self.adapter.replacements:
            return 0
        shape = self.tensors[name].shape
        cols = int(shape[-1]) if len(shape) > 1 else 1
        pair = self.adapter.pairs.get(name)
        block = pair.block * cols if pair is not None else cols
        return 4 * 3 * min(math.prod(shape), size + 2 * max(block, cols))

    def read_range(self, name: str, start: int, stop: int) -> torch.Tensor:
        """Elements ``[start, stop)`` of the flattened tensor: the base's (stored dtype) where
        the adapter leaves it alone, else float32 computed on the rows they cover only, with
        the same float operations per element as ``read`` (``LoraPair.rows``)."""
        replacement = self.adapter.replacements.get(name)
        pair = self.adapter.pairs.get(name)
        if replacement is None and pair is None:
            return self.base.read_range(name, start, stop)
        shape = self.tensors[name].shape
        cols = int(shape[-1]) if len(shape) > 1 else 1
        stop = max(start, min(stop, math.prod(shape)))
        r0, r1 = start // cols, -(-stop // cols)
        lo, hi = r0 * cols, r1 * cols
        if replacement is None:
            weight = self.base.read_range(name, lo, hi).to(torch.float32)
        else:
            weight = replacement.reshape(-1)[lo:hi].to(torch.float32, copy=True)
        if pair is not None:
            weight = weight + pair.rows(r0, r1).reshape(-1)
        return weight[start - lo : stop - lo]

    def stamps(self) -> dict[Path, Stamp]:
        return self.base.stamps()

    def check_inputs(self) -> None:
        self.base.check_inputs()

    def close(self) -> None:
        self.base.close()

    def __repr__(self) -> str:
        return (
            f"LoraCheckpoint({self.label!r}, {len(self.adapter.pairs)} LoRA modules, "
            f"{len(self.adapter.replacements)} replaced tensors)"
        )
