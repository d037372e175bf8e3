"""``LoraCheckpoint``: a base checkpoint read through an adapter, tensor by tensor.

Same interface as ``merge.checkpoint.Checkpoint`` (``tensors``, ``config``, ``read``,
``layer_count``, ``close``); the planner sees the base's names, shapes and dtypes unchanged.
It holds the adapter's small tensors and reads at most one base tensor per ``read``.
"""

from __future__ import annotations

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

    def read_range(self, name: str, start: int, stop: int) -> torch.Tensor:
        """Elements of the base's tensor, where the adapter leaves it alone."""
        if not self.can_view(name):  # pragma: no cover - callers check can_view
            raise RuntimeError(f"tensor '{name}' is changed by the adapter: read it whole")
        return self.base.read_range(name, start, stop)

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
