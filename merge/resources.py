"""How a run may use the machine: worker threads, the memory budget, the device of the math.

``Resources.resolve`` turns the CLI options (``--threads``, ``--max-memory``, ``--device``,
``--max-vram``) into checked values with their defaults (every available core, half the
available RAM, 80% of the device's free memory).

What it does not do: schedule jobs (``merge.pipeline``) or move tensors (``pipeline.Mover``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from merge.device.vram import DEFAULT_VRAM_FRACTION, free_vram
from merge.errors import MergeError
from merge.memory import DEFAULT_FRACTION, available_memory, default_threads
from merge.shardplan import parse_size


@dataclass(frozen=True)
class Resources:
    """How a run may use the machine: worker ``threads``, the memory ``budget`` in bytes
    (estimated tensor data in flight) and the ``device`` of the method math (``None``: the
    CPU, with no transfers; ``torch.device("cpu")`` takes the transfer path, for tests)."""

    threads: int
    budget: int
    device: torch.device | None = None
    vram: int = 0  # the --max-vram budget in bytes (with a device)

    @classmethod
    def resolve(
        cls,
        threads: int | None = None,
        max_memory: str | int | None = None,
        device: str = "cpu",
        max_vram: str | int | None = None,
        *,
        planning: bool = False,
    ) -> Resources:
        """From the CLI options; defaults: every available core, half the available RAM,
        ``DEFAULT_VRAM_FRACTION`` of the device's free memory. ``planning`` (``merge plan``)
        accepts ``cuda`` without a GPU here when ``max_vram`` is given."""
        if threads is not None and threads < 1:
            raise MergeError(f"--threads must be at least 1, got {threads}")
        if max_memory is None:
            budget = int(DEFAULT_FRACTION * available_memory())
        else:
            budget = _size(max_memory, "--max-memory")
        vram = None if max_vram is None else _size(max_vram, "--max-vram")
        if planning and vram is not None and device != "cpu" and not torch.cuda.is_available():
            _device_name(device)
            return cls(threads or default_threads(), budget, torch.device(device), vram)
        dev = _device(device)
        if dev is None:
            return cls(threads or default_threads(), budget)
        if vram is None:
            vram = int(DEFAULT_VRAM_FRACTION * free_vram(dev))
        return cls(threads or default_threads(), budget, dev, vram)


def _size(value: str | int, option: str) -> int:
    try:
        return parse_size(value, option)
    except ValueError as e:
        raise MergeError(str(e)) from None


def _device_name(name: str) -> torch.device:
    try:
        dev = torch.device(name)
    except (RuntimeError, ValueError):
        dev = None
    if dev is None or dev.type != "cuda":
        raise MergeError(f"--device must be cpu or cuda (or cuda:N), got {name!r}")
    return dev


def _device(name: str) -> torch.device | None:
    if name == "cpu":
        return None
    dev = _device_name(name)
    if not torch.cuda.is_available():
        raise MergeError(f"--device {name}: CUDA is not available here; use --device cpu")
    if dev.index is not None and dev.index >= torch.cuda.device_count():
        raise MergeError(f"--device {name}: only {torch.cuda.device_count()} GPU(s) visible")
    return dev
