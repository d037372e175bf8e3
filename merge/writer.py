"""Streamed shard writing and the index json.

Design. Because every shape and dtype is known up front (``merge.shardplan``), the
:class:`ShardWriter` creates every shard with its safetensors header and final size at once,
and then writes each tensor's raw bytes (or a chunk of its rows) straight to its offset as the
executor's workers hand them over, in any order: nothing is buffered beyond the chunk being
written. Each shard's sha256 (for the manifest) is hashed in the background as its written
prefix grows (``merge.shardhash``), so no pass over the output is left for after the merge.
The output directory itself (atomic rename, location and disk checks) is ``merge.outdir``.

What it does not do: compute or cast tensors (the executor hands them over in the planned
dtype), deduplicate shared storage, write config or tokenizer files,
or fsync (``merge.resume``: the journal records each finished tensor's CRC-32 after its
bytes are written, and a resume checks them again, so a sync per tensor would buy nothing). Like
safetensors, it assumes a little-endian host.
"""

from __future__ import annotations

import json
import os
import struct
import sys
import threading
import zlib
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any

import torch

from merge.shardhash import ShardHasher
from merge.shardplan import DTYPE_NAMES, INDEX_NAME, Shard, ShardPlan, TensorSpec
from merge.sink import check_part, check_whole

if TYPE_CHECKING:
    from merge.resume import Journal


def crc_text(crc: int) -> str:
    """A CRC-32 as the journal writes it: 8 hex digits."""
    return f"{crc:08x}"


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
            "dtype": DTYPE_NAMES[spec.dtype],
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

    With a ``journal`` (``merge.resume``), ``finish(name)`` records a finished tensor's
    CRC-32, computed from its bytes as they were written. With ``resume`` (the journaled
    tensors of an interrupted run, name -> CRC-32), existing shards whose header and size are
    the planned ones are kept, and each journaled tensor whose bytes check as recorded is done
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
        self._index: dict[int, int] = {}  # fd -> shard number
        self._closed = False
        self.journal = journal
        self.done: dict[str, str] = {}  # name -> CRC-32 of the tensors finished and verified
        # With a journal: each tensor's CRC-32, from the bytes as they are written when
        # its parts come in order (name -> (CRC-32, next element)); else re-read at finish.
        self._digests: dict[str, tuple[int, int] | None] = {}
        self._hasher: ShardHasher | None = None
        self.shard_sha256: dict[str, str] = {}  # file name -> sha256, once closed
        present: list[tuple[int, int, int]] = []
        try:
            for shard in plan.shards:
                present += self._open_shard(shard, resume)
            self._hasher = ShardHasher(
                [self._paths[fd] for fd in self._fds], [os.fstat(fd).st_size for fd in self._fds]
            )
            for index, start, stop in present:
                self._hasher.add(index, start, stop)
        except BaseException:
            self.abort()
            raise

    def _open_shard(
        self, shard: Shard, resume: dict[str, str] | None
    ) -> list[tuple[int, int, int]]:
        """Create (or, resuming, reopen) one shard; its byte ranges already in place (the
        header, kept tensors) as (shard, start, stop)."""
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
        index = len(self._fds)
        self._fds.append(fd)
        self._paths[fd] = path
        self._index[fd] = index
        self._turns[fd] = threading.Lock()
        offset = len(header)
        present = [(index, 0, offset)]
        for spec in shard.tensors:
            self._where[spec.name] = (fd, offset, spec)
            self._left[spec.name] = spec.nbytes
            if resume is not None and resume.get(spec.name) == self._checksum(spec.name):
                self._left[spec.name] = 0
                self.written_bytes += spec.nbytes
                self.done[spec.name] = resume[spec.name]
                present.append((index, offset, offset + spec.nbytes))
            offset += spec.nbytes
        return present

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

    def _checksum(self, name: str) -> str:
        """The CRC-32 of tensor ``name``'s bytes as they are in its shard now."""
        fd, offset, spec = self._where[name]
        crc = 0
        end = offset + spec.nbytes
        while offset < end:
            block = os.pread(fd, min(end - offset, 16 * 2**20), offset)
            if not block:
                break
            crc = zlib.crc32(block, crc)
            offset += len(block)
        return crc_text(crc)

    def finish(self, name: str) -> None:
        """Tensor ``name`` is written: with a journal, record its CRC-32 (a no-op without
        one). Nothing is synced: the bytes are in the page cache, which outlives a killed
        process, and what a machine crash loses fails its check on resume and is recomputed."""
        if self.journal is None:
            return
        with self._lock:
            running = self._digests.pop(name, None)
        whole = running is not None and running[1] * self._where[name][2].dtype.itemsize == (
            self._where[name][2].nbytes
        )
        digest = crc_text(running[0]) if whole and running is not None else self._checksum(name)
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
            self._check_part(name, start, tensor.numel(), data)
        with self._turns[fd]:  # one writer a file: see __init__
            _pwrite_all(fd, data.data, offset + begin, self._paths[fd])  # no copy: its buffer
        assert self._hasher is not None
        self._hasher.add(self._index[fd], offset + begin, offset + begin + nbytes)
        with self._lock:
            self._left[name] -= nbytes
            self.written_bytes += nbytes

    def _check_part(self, name: str, start: int, count: int, data: Any) -> None:
        """Fold a part's bytes into its tensor's running CRC-32 when it continues the parts
        before it (a tensor's parts come from one job, in order); any other order drops
        the running value, and ``finish`` re-reads the tensor instead."""
        with self._lock:
            running = self._digests.get(name, (0, 0) if start == 0 else None)
            if running is None or running[1] != start:
                self._digests[name] = None
                return
        crc = zlib.crc32(data, running[0])  # the GIL is released: jobs check in parallel
        with self._lock:
            self._digests[name] = (crc, start + count)

    def _spec(self, name: str) -> TensorSpec:
        if self._closed:
            raise ValueError(f"cannot write tensor '{name}': the writer is closed")
        where = self._where.get(name)
        if where is None:
            raise ValueError(f"tensor '{name}' is not in the shard plan")
        return where[2]

    def close(self) -> None:
        """Check that everything was written, close the shards, write the index json; the
        shards' sha256 are then in ``shard_sha256``."""
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
        assert self._hasher is not None
        self.shard_sha256 = self._hasher.result()
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
        if self._hasher is not None:
            self._hasher.stop()
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
