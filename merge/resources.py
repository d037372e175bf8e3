"""How a run may use the machine: worker threads, the memory budget, the device of the math.

``Resources.resolve`` turns the CLI options (``--threads``, ``--max-memory``, ``--device``)
into checked values with their defaults (every available core, half the available RAM).

What it does not do: schedule jobs (``merge.pipeline``) or move tensors (``pipeline.Mover``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from merge.errors import MergeError
from merge.memory import DEFAULT_FRACTION, available_memory, default_threads
from merge.writer import parse_size


@dataclass(frozen=True)
class Resources:
    """How a run may use the machine: worker ``threads``, the memory ``budget`` in bytes
    (estimated tensor data in flight) and the ``device`` of the method math (``None``: the
    CPU, with no transfers; ``torch.device("cpu")`` takes the transfer path, for tests)."""

    threads: int
    budget: int
    device: torch.device | None = None

    @classmethod
    def resolve(
        cls, threads: int | None = None, max_memory: str | int | None = None, device: str = "cpu"
    ) -> Resources:
        """From the CLI options; defaults: every available core, half the available RAM."""
        if threads is not None and threads < 1:
            raise MergeError(f"--threads must be at least 1, got {threads}")
        if max_memory is None:
            budget = int(DEFAULT_FRACTION * available_memory())
        else:
            try:
                budget = parse_size(max_memory, "--max-memory")
            except ValueError as e:
                raise MergeError(str(e)) from None
        return cls(threads or default_threads(), budget, _device(device))


def _device(name: str) -> torch.device | None:
    if name == "cpu":
        return None
    try:
        dev = torch.device(name)
    except (RuntimeError, ValueError):
        dev = None
    if dev is None or dev.type != "cuda":
        raise MergeError(f"--device must be cpu or cuda (or cuda:N), got {name!r}")
    if not torch.cuda.is_available():
        raise MergeError(f"--device {name}: CUDA is not available here; use --device cpu")
    if dev.index is not None and dev.index >= torch.cuda.device_count():
        raise MergeError(f"--device {name}: only {torch.cuda.device_count()} GPU(s) visible")
    return dev
