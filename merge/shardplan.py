"""The output's layout, fixed before any tensor is computed: tensors into shards, and sizes.

Design. The shard plan is a pure function of the output tensors' names, shapes and dtypes
(:func:`plan_shards` -> :class:`ShardPlan`): tensors keep their order and a new shard starts
when the next tensor would take the current one past the size limit, so every shard can be
written once, under its final name, by ``merge.writer.ShardWriter``. ``parse_size`` reads the
byte sizes of options and recipes (mergekit's ``5B`` included).

What it does not do: write anything (``merge.writer``).
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"

DTYPE_NAMES: dict[torch.dtype, str] = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
    torch.uint16: "U16",
    torch.uint32: "U32",
    torch.uint64: "U64",
    torch.float8_e4m3fn: "F8_E4M3",
    torch.float8_e5m2: "F8_E5M2",
}


# --------------------------------------------------------------------------- planning


@dataclass(frozen=True)
class TensorSpec:
    """One output tensor: its name, shape and output (storage) dtype."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    def __post_init__(self) -> None:
        object.__setattr__(self, "shape", tuple(int(d) for d in self.shape))
        if any(d < 0 for d in self.shape):
            raise ValueError(f"tensor '{self.name}': negative dimension in shape {self.shape}")
        if self.dtype not in DTYPE_NAMES:
            raise ValueError(f"tensor '{self.name}': dtype {self.dtype} cannot be stored")

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


@dataclass(frozen=True)
class Shard:
    """One output file and the tensors it holds, in writing order."""

    filename: str
    tensors: tuple[TensorSpec, ...]
    nbytes: int  # tensor data only, without the header


@dataclass(frozen=True)
class ShardPlan:
    """All output shards, in writing order."""

    shards: tuple[Shard, ...]
    total_bytes: int
    _by_name: dict[str, Shard] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        by_name = {spec.name: shard for shard in self.shards for spec in shard.tensors}
        object.__setattr__(self, "_by_name", by_name)

    def shard_of(self, name: str) -> Shard:
        try:
            return self._by_name[name]
        except KeyError:
            raise KeyError(f"tensor '{name}' is not in the shard plan") from None

    @property
    def weight_map(self) -> dict[str, str]:
        """Tensor name -> shard file name, as in ``model.safetensors.index.json``."""
        return {name: shard.filename for name, shard in self._by_name.items()}

    @property
    def specs(self) -> tuple[TensorSpec, ...]:
        """Every tensor, in writing order."""
        return tuple(spec for shard in self.shards for spec in shard.tensors)


def plan_shards(specs: Sequence[TensorSpec], max_shard_bytes: int) -> ShardPlan:
    """Split tensors into shards greedily, keeping the given order.

    A new shard starts when adding a tensor would take the current one past
    ``max_shard_bytes``; a tensor larger than that gets a shard of its own.
    """
    if max_shard_bytes <= 0:
        raise ValueError(f"max shard size must be positive, got {max_shard_bytes}")
    if not specs:
        raise ValueError("no tensors to write")
    seen: set[str] = set()
    groups: list[list[TensorSpec]] = [[]]
    size = 0
    for spec in specs:
        if spec.name in seen:
            raise ValueError(f"tensor '{spec.name}' appears twice in the output")
        seen.add(spec.name)
        if groups[-1] and size + spec.nbytes > max_shard_bytes:
            groups.append([])
            size = 0
        groups[-1].append(spec)
        size += spec.nbytes
    count = len(groups)
    shards = tuple(
        Shard(
            filename=shard_filename(i, count),
            tensors=tuple(group),
            nbytes=sum(s.nbytes for s in group),
        )
        for i, group in enumerate(groups)
    )
    return ShardPlan(shards=shards, total_bytes=sum(s.nbytes for s in shards))


def shard_filename(index: int, count: int) -> str:
    """File name of shard ``index`` (0-based) of ``count``, as transformers names them."""
    if count == 1:
        return SINGLE_NAME
    return f"model-{index + 1:05d}-of-{count:05d}.safetensors"


_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*([a-z]*)\s*$", re.IGNORECASE)
# mergekit's sizes: K, M, B (billion: its default shard size is 5B) and T, decimal; G too.
_UNITS = {"": 1, "b": 10**9}
for _i, _p in enumerate("kmgt", start=1):
    _UNITS.update({f"{_p}": 10 ** (3 * _i), f"{_p}b": 10 ** (3 * _i), f"{_p}ib": 2 ** (10 * _i)})
UNITS_HELP = (
    "units (any case): K or KB = 10^3 bytes, M or MB = 10^6, B, G or GB = 10^9 (mergekit's 5B), "
    "T or TB = 10^12; KiB, MiB, GiB, TiB = 2^10, 2^20, 2^30, 2^40; no unit = bytes"
)
MIN_SHARD_BYTES = 10**6


def parse_size(text: str | int, what: str = "size", minimum: int = 1) -> int:
    """A byte size, case-insensitive: ``5B`` or ``5GB`` (5 * 10**9, as mergekit's ``5B``),
    ``500M``/``500MB``, ``2GiB`` (2 * 2**30), ``1.5GB``, ``123`` (bytes). ValueError (one
    line, starting with ``what``) for anything else or a size under ``minimum`` bytes."""
    if isinstance(text, int) and not isinstance(text, bool):
        value = text
    else:
        match = _SIZE_RE.match(str(text))
        unit = match.group(2).lower() if match else None
        value = round(float(match.group(1)) * _UNITS[unit]) if match and unit in _UNITS else 0
    if value <= 0:
        raise ValueError(
            f"{what} must be a size like 5GB or 500MB, got {str(text)!r}; {UNITS_HELP}"
        )
    if value < minimum:
        raise ValueError(
            f"{what} {str(text).strip()} means {value:,} bytes; it must be at least {minimum:,} "
            f"bytes; {UNITS_HELP}"
        )
    return value
