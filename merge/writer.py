"""Streamed shard writing and the index json.

Design. The shard plan is a pure function of the output tensors' names, shapes and dtypes
(:func:`plan_shards` -> :class:`ShardPlan`), fixed before any tensor is computed, so every shard
is written once, under its final name. Because every shape and dtype is known up front, the
:class:`ShardWriter` creates every shard with its safetensors header and final size at once,
and then writes each tensor's raw bytes (or a chunk of its rows) straight to its offset as the
executor's workers hand them over, in any order: nothing is buffered beyond the chunk being
written. The output directory itself (atomic rename, location and disk
checks) is ``merge.outdir``.

What it does not do: compute or cast tensors (the executor hands them over in the planned
dtype), deduplicate shared storage, write config or tokenizer files,
or fsync without a journal (``merge.resume``: with one, each finished tensor's bytes are
fdatasynced before the journal records them). Like safetensors, it assumes a little-endian host.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import struct
import sys
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any

import torch

from merge.sink import check_part, check_whole

if TYPE_CHECKING:
    from merge.resume import Journal

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"

_DTYPE_NAMES: dict[torch.dtype, str] = {
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
        if self.dtype not in _DTYPE_NAMES:
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


# --------------------------------------------------------------------------- writing


def _pwrite_all(fd: int, data: bytes | memoryview, offset: int, path: Path) -> None:
    view = memoryview(data).cast("B")
    try:
        while view:
            done = os.pwrite(fd, view, offset)
            view, offset = view[done:], offset + done
    except OSError as e:  # name the file: a full disk says which file system
        if e.filename is None:
            e.filename = str(path)
        raise


def _header_bytes(shard: Shard, metadata: dict[str, str]) -> bytes:
    """The safetensors header: 8-byte little-endian length + JSON padded to 8 bytes."""
    header: dict[str, object] = {"__metadata__": metadata}
    offset = 0
    for spec in shard.tensors:
        end = offset + spec.nbytes
        header[spec.name] = {
            "dtype": _DTYPE_NAMES[spec.dtype],
            "shape": list(spec.shape),
            "data_offsets": [offset, end],
        }
        offset = end
    text = json.dumps(header, separators=(",", ":")).encode("utf-8")
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text


class ShardWriter:
    """Writes the tensors of a :class:`ShardPlan` into ``directory``, in any order and from any
    thread: every shard file is created with its header and its final size up front, and each
    tensor (or row chunk of one, ``write_part``) goes to its planned offset with ``os.pwrite``.

    ``write``/``write_part`` raise ``ValueError`` for a tensor not in the plan, of the wrong
    shape or dtype, or written past its end; ``close`` raises ``RuntimeError`` if any planned
    byte was not written.

    With a ``journal`` (``merge.resume``), ``finish(name)`` syncs a finished tensor's bytes,
    hashes them as written and records them. With ``resume`` (the journaled tensors of an
    interrupted run, name -> sha256), existing shards whose header and size are the planned
    ones are kept, and each journaled tensor whose bytes hash as recorded is done
    (``self.done``); anything else is written again.
    """

    def __init__(
        self,
        directory: Path,
        plan: ShardPlan,
        metadata: dict[str, str] | None = None,
        *,
        journal: Journal | None = None,
        resume: dict[str, str] | None = None,
    ) -> None:
        if sys.byteorder != "little":  # pragma: no cover
            raise RuntimeError("safetensors shards can only be written on a little-endian host")
        metadata = dict(metadata or {})
        bad = [k for k, v in metadata.items() if not (isinstance(k, str) and isinstance(v, str))]
        if bad:
            raise ValueError(f"safetensors metadata must map str to str; bad entries: {bad}")
        self.directory = Path(directory)
        self.plan = plan
        self.metadata = {**metadata, "format": "pt"}
        self.written_bytes = 0
        self._where: dict[str, tuple[int, int, TensorSpec]] = {}  # name -> (fd, offset, spec)
        self._left: dict[str, int] = {}  # name -> bytes not yet written
        self._fds: list[int] = []
        self._lock = threading.Lock()
        # Buffered writes to one file are serialized by the kernel on the file's inode lock,
        # and a thread waiting there spins on its core (measured: most of the system time of
        # a copy-heavy merge). Threads take turns per file here instead, sleeping meanwhile.
        self._turns: dict[int, threading.Lock] = {}
        self._paths: dict[int, Path] = {}
        self._closed = False
        self.journal = journal
        self.done: dict[str, str] = {}  # name -> sha256 of the tensors finished and verified
        # With a journal: each tensor's sha256, hashed from the bytes as they are written when
        # its parts come in order (name -> (hash, next element)); else re-read at finish.
        self._digests: dict[str, tuple[Any, int] | None] = {}
        try:
            for shard in plan.shards:
                self._open_shard(shard, resume)
        except BaseException:
            self.abort()
            raise

    def _open_shard(self, shard: Shard, resume: dict[str, str] | None) -> None:
        header = _header_bytes(shard, self.metadata)
        path = self.directory / shard.filename
        fd = self._reopen(path, header, len(header) + shard.nbytes) if resume else None
        if fd is None:
            if resume is not None and os.path.lexists(path):
                os.unlink(path)
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
            resume = None
            _pwrite_all(fd, header, 0, path)
            try:
                os.ftruncate(fd, len(header) + shard.nbytes)
            except OSError as e:
                e.filename = e.filename or str(path)
                raise
        self._fds.append(fd)
        self._paths[fd] = path
        self._turns[fd] = threading.Lock()
        offset = len(header)
        for spec in shard.tensors:
            self._where[spec.name] = (fd, offset, spec)
            self._left[spec.name] = spec.nbytes
            if resume is not None and resume.get(spec.name) == self._hash(spec.name):
                self._left[spec.name] = 0
                self.written_bytes += spec.nbytes
                self.done[spec.name] = resume[spec.name]
            offset += spec.nbytes

    @staticmethod
    def _reopen(path: Path, header: bytes, size: int) -> int | None:
        """An interrupted run's shard, when its header and size are the planned ones."""
        try:
            fd = os.open(path, os.O_RDWR | os.O_NOFOLLOW)
        except OSError:
            return None
        if os.fstat(fd).st_size == size and os.pread(fd, len(header), 0) == header:
            return fd
        os.close(fd)
        return None

    def _hash(self, name: str) -> str:
        """The sha256 of tensor ``name``'s bytes as they are in its shard now."""
        fd, offset, spec = self._where[name]
        digest = hashlib.sha256()
        end = offset + spec.nbytes
        while offset < end:
            block = os.pread(fd, min(end - offset, 16 * 2**20), offset)
            if not block:
                break
            digest.update(block)
            offset += len(block)
        return digest.hexdigest()

    def finish(self, name: str) -> None:
        """Tensor ``name`` is written: with a journal, sync its bytes, then record their
        sha256 (a no-op without one)."""
        if self.journal is None:
            return
        fd = self._where[name][0]
        os.fdatasync(fd)
        with self._lock:
            running = self._digests.pop(name, None)
        whole = running is not None and running[1] * self._where[name][2].dtype.itemsize == (
            self._where[name][2].nbytes
        )
        digest = running[0].hexdigest() if whole and running is not None else self._hash(name)
        self.journal.record(name, digest)
        with self._lock:
            self.done[name] = digest

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """Write one whole tensor to its place in its shard."""
        check_whole(name, self._spec(name).shape, tensor)
        self.write_part(name, 0, tensor)

    def write_part(self, name: str, start: int, tensor: torch.Tensor) -> None:
        """Write ``tensor``'s elements as elements ``start..`` of the flattened tensor
        ``name`` (a chunk of rows)."""
        spec = self._spec(name)
        size = spec.dtype.itemsize
        check_part(name, spec.dtype, spec.nbytes // size, start, tensor)
        begin, nbytes = start * size, tensor.numel() * size
        fd, offset, _ = self._where[name]
        data = tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy()
        if self.journal is not None:
            self._hash_part(name, start, tensor.numel(), data)
        with self._turns[fd]:  # one writer a file: see __init__
            _pwrite_all(fd, data.data, offset + begin, self._paths[fd])  # no copy: its buffer
        with self._lock:
            self._left[name] -= nbytes
            self.written_bytes += nbytes

    def _hash_part(self, name: str, start: int, count: int, data: Any) -> None:
        """Fold a part's bytes into its tensor's running sha256 when it continues the parts
        before it (a tensor's parts come from one job, in order); any other order drops
        the running hash, and ``finish`` re-reads the tensor instead."""
        with self._lock:
            running = self._digests.get(name, (hashlib.sha256(), 0) if start == 0 else None)
            if running is None or running[1] != start:
                self._digests[name] = None
                return
            self._digests[name] = (running[0], start + count)
        running[0].update(data)  # the GIL is released: jobs hash in parallel

    def _spec(self, name: str) -> TensorSpec:
        if self._closed:
            raise ValueError(f"cannot write tensor '{name}': the writer is closed")
        where = self._where.get(name)
        if where is None:
            raise ValueError(f"tensor '{name}' is not in the shard plan")
        return where[2]

    def close(self) -> None:
        """Check that everything was written, close the shards, write the index json."""
        if self._closed:
            return
        missing = [name for name, left in self._left.items() if left > 0]
        if missing:
            self.abort()
            shown = ", ".join(f"'{n}'" for n in missing[:3])
            more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
            raise RuntimeError(
                f"output incomplete: {len(missing)} tensors not written: {shown}{more}"
            )
        self.abort()
        if len(self.plan.shards) > 1:
            index = {
                "metadata": {"total_size": self.plan.total_bytes},
                "weight_map": dict(sorted(self.plan.weight_map.items())),
            }
            text = json.dumps(index, indent=2) + "\n"
            (self.directory / INDEX_NAME).write_text(text, encoding="utf-8")

    def abort(self) -> None:
        """Close open handles without any checks (the atomic output removes the files)."""
        self._closed = True
        fds, self._fds = self._fds, []
        for fd in fds:
            os.close(fd)

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()
