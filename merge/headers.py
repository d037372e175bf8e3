"""Safetensors headers: the 8-byte length and the JSON header of a file, parsed and checked.

``read_safetensors_header`` reads one file's header without touching its data and checks it
at least as strictly as the safetensors library: a sane length, JSON without duplicate keys,
known dtype names, integral shapes and offsets, offsets in bounds, non-overlapping and covering
every data byte (``check_layout``), and a ``__metadata__`` of str to str. ``header_entry``
checks one entry (also for headers read over the network, ``merge.hub.remote``);
``read_headers`` merges the headers of a model's shards. Each problem is a ``CheckpointError``
naming the model label and the file (``file_label``).

What it does not do: read tensor data, or torch ``.bin`` files (``merge.checkpoint``).
"""

from __future__ import annotations

import json
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from merge.errors import CheckpointError

MAX_HEADER_BYTES = 100 * 1024 * 1024  # the safetensors library's own limit

SAFETENSORS_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}


@dataclass(frozen=True)
class TensorInfo:
    """What the header says about one tensor; no data."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    file: Path
    nbytes: int
    offset: int = 0  # where the data starts in ``file`` (safetensors)


def file_label(label: str, path: Path) -> str:
    return f"model '{label}' ({path})"


# --- safetensors headers ---------------------------------------------------------------------


class _DuplicateKey(ValueError):
    pass


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """A JSON object whose keys are all different: a tensor named twice in a header would
    otherwise be the last of its entries, and the first one's bytes nobody's."""
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise _DuplicateKey(key)
        out[key] = value
    return out


def read_safetensors_header(path: Path, label: str) -> dict[str, TensorInfo]:
    """Parse one safetensors file's header (and nothing else) into ``TensorInfo`` entries."""
    where = file_label(label, path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            prefix = f.read(8)
            if len(prefix) < 8:
                raise CheckpointError(f"{where}: truncated: the file has {size} bytes")
            (header_len,) = struct.unpack("<Q", prefix)
            if header_len > min(size - 8, MAX_HEADER_BYTES):
                raise CheckpointError(
                    f"{where}: corrupt header: declares {header_len} header bytes "
                    f"but the file has {size}"
                )
            raw = f.read(header_len)
    except OSError as e:
        raise CheckpointError(f"{where}: cannot read: {e.strerror or e}") from e
    try:
        header = json.loads(raw, object_pairs_hook=_unique_keys)
    except _DuplicateKey as e:
        raise CheckpointError(f"{where}: corrupt header: {e.args[0]!r} is given twice") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{where}: corrupt header: not valid JSON ({e})") from e
    except RecursionError:
        raise CheckpointError(f"{where}: corrupt header: JSON nested too deeply") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{where}: corrupt header: expected a JSON object")
    metadata = header.pop("__metadata__", {})
    if not isinstance(metadata, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
    ):
        raise CheckpointError(
            f"{where}: corrupt header: '__metadata__' must map strings to strings"
        )
    data_size = size - 8 - header_len
    infos = {
        name: header_entry(name, entry, path, where, data_size, size)
        for name, entry in header.items()
    }
    check_layout(infos, where, 8 + header_len, data_size)
    return infos


def check_layout(infos: dict[str, TensorInfo], where: str, data_start: int, data_size: int) -> None:
    """As safetensors requires: the tensors' bytes do not overlap and cover the data (the
    ``data_size`` bytes from ``data_start``, where the header ends) without a gap."""
    spans = sorted(
        (i.offset - data_start, i.offset - data_start + i.nbytes, n) for n, i in infos.items()
    )
    pos, last = 0, ""
    for begin, end, name in spans:
        if begin < pos:
            raise CheckpointError(
                f"{where}: corrupt header: tensors '{last}' and '{name}' overlap at bytes "
                f"[{begin}, {min(end, pos)}] of the data"
            )
        if begin > pos:
            raise CheckpointError(
                f"{where}: corrupt header: data bytes [{pos}, {begin}] belong to no tensor"
            )
        pos, last = end, name
    if pos < data_size:
        raise CheckpointError(
            f"{where}: corrupt header: data bytes [{pos}, {data_size}] belong to no tensor"
        )


def read_headers(files: list[Path], label: str) -> dict[str, TensorInfo]:
    """The headers of safetensors files on disk, one after the other."""
    tensors: dict[str, TensorInfo] = {}
    for file in files:
        tensors.update(read_safetensors_header(file, label))
    return tensors


HeaderReader = Callable[[list[Path], str], dict[str, TensorInfo]]


def _integer(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def header_entry(
    name: str, entry: Any, path: Path, where: str, data_size: int, file_size: int
) -> TensorInfo:
    """Validate one header entry: dtype, shape, offsets inside the file, size matching shape.
    ``data_size`` is the byte count after the header, ``file_size`` the file's."""
    try:
        dtype_name = entry["dtype"]
        shape = tuple(entry["shape"])
        begin, end = entry["data_offsets"]
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{where}: corrupt header: bad entry for tensor '{name}'") from e
    if not all(_integer(v) for v in (*shape, begin, end)):
        raise CheckpointError(
            f"{where}: corrupt header: tensor '{name}' has shape {list(shape)} and offsets "
            f"[{begin}, {end}]: they must be integers"
        )
    dtype = SAFETENSORS_DTYPES.get(dtype_name) if isinstance(dtype_name, str) else None
    if dtype is None:
        raise CheckpointError(f"{where}: tensor '{name}' has unsupported dtype {dtype_name!r}")
    if end > data_size:
        raise CheckpointError(
            f"{where}: truncated: tensor '{name}' needs bytes up to {file_size - data_size + end}"
            f" but the file has {file_size} bytes"
        )
    numel = 1
    for d in shape:
        numel *= d
    nbytes = numel * dtype.itemsize
    if begin < 0 or min(shape, default=0) < 0 or end - begin != nbytes:
        raise CheckpointError(
            f"{where}: corrupt header: tensor '{name}' has shape {list(shape)} ({nbytes} bytes)"
            f" but offsets [{begin}, {end}]"
        )
    return TensorInfo(name, shape, dtype, path, nbytes, file_size - data_size + begin)
