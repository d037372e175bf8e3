"""Lazy checkpoint reading: tensor headers up front, tensor data only when asked.

Design
------
``Checkpoint.open`` finds the weight files of a Hugging Face model folder and reads only their
headers: for safetensors the 8-byte length + JSON header is parsed here directly (no data is
touched, so a 70B model opens in milliseconds); for torch ``.bin`` files ``torch.load`` runs with
``mmap=True`` so the pickle metadata is read and the data stays mapped until used. Everything
the planner needs (names, shapes, dtypes, sizes, which file) is in ``Checkpoint.tensors``.
``Checkpoint.read`` then returns one tensor at a time in its stored dtype on the CPU, and
``Checkpoint.read_range`` a flat range of its elements (the executor streams tensors chunk by
chunk through it); for safetensors both read with ``os.preadv`` on a descriptor kept per file
into a fresh buffer, so a file truncated under the run is a short read, never a SIGBUS from a
mapped page past its end. ``Checkpoint.view`` still gives the zero-copy private memory map of
a tensor for callers that want one (the executor does not).

``Checkpoint.open`` records every weight file's size, mtime and inode (``merge.inputstate``)
before it reads a header; each read checks the file against that stamp before and after, and a
change is a ``CheckpointError`` naming the model, the file and what changed.

``Checkpoint.open`` can also be given weight files that are not on disk yet and a reader of
their headers: ``merge.hub.remote`` plans Hub models so, from headers read over the network.

Safetensors headers are parsed and checked in ``merge.headers``.

Every problem found while opening (missing folder, no weights, corrupt or truncated header,
missing shard, index inconsistent with the shards, bad ``config.json``) is a ``CheckpointError``
whose lines name the model label and the file.

What this module does not do: download (see ``merge.sources``/``merge.hub``), LoRA adapters
(``merge.lora``), GGUF or other formats, dtype conversion, or any writing: inputs are opened
read-only.
"""

from __future__ import annotations

import json
import mmap
import os
import threading
import zipfile
from collections.abc import Collection
from pathlib import Path
from types import TracebackType
from typing import Any, Literal, TypeVar

import torch

from merge import architecture as arch
from merge.errors import CheckpointError
from merge.headers import HeaderReader, TensorInfo, file_label, read_headers
from merge.inputstate import Stamp, changed_error, check, stamp
from merge.links import check_folder, inside

Format = Literal["safetensors", "bin"]

SAFE_SINGLE = "model.safetensors"
SAFE_INDEX = "model.safetensors.index.json"
BIN_SINGLE = "pytorch_model.bin"
BIN_INDEX = "pytorch_model.bin.index.json"

# --- torch .bin ------------------------------------------------------------------------------


def load_bin(path: Path, label: str) -> dict[str, torch.Tensor]:
    """``torch.load`` a .bin file memory-mapped (zip format) or plainly (legacy format)."""
    where = file_label(label, path)
    try:
        if zipfile.is_zipfile(path):
            obj = torch.load(path, mmap=True, weights_only=True, map_location="cpu")
        else:  # legacy pre-1.6 format: cannot be memory-mapped
            obj = torch.load(path, weights_only=True, map_location="cpu")
    except Exception as e:  # unpickling raises many types; all mean "unreadable file"
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise CheckpointError(f"{where}: cannot read: {first}") from e
    if not isinstance(obj, dict):
        raise CheckpointError(f"{where}: expected a state dict, found {type(obj).__name__}")
    return {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}


def _bin_info(name: str, t: torch.Tensor, path: Path) -> TensorInfo:
    return TensorInfo(name, tuple(t.shape), t.dtype, path, t.numel() * t.element_size())


# --- folder layout ---------------------------------------------------------------------------


def _find_weights(directory: Path, label: str, listed: Collection[str]) -> tuple[Format, Path]:
    """Pick the weight entry point: single or indexed safetensors first, then .bin. A name in
    ``listed`` counts as a file of ``directory`` (one not downloaded yet)."""
    for fmt, name in (
        ("safetensors", SAFE_SINGLE),
        ("safetensors", SAFE_INDEX),
        ("bin", BIN_SINGLE),
        ("bin", BIN_INDEX),
    ):
        if name in listed or (directory / name).is_file():
            return fmt, directory / name  # type: ignore[return-value]
    found = {p for p in directory.glob("*.safetensors") if p.is_file()}
    found |= {directory / n for n in listed if n.endswith(".safetensors") and "/" not in n}
    loose = sorted(p for p in found if not p.name.startswith("adapter_"))
    if len(loose) == 1:
        return "safetensors", loose[0]
    hint = ""
    if (directory / "adapter_config.json").is_file():
        hint = "; it holds a LoRA adapter: name it as 'base_model+adapter'"
    raise CheckpointError(
        f"{file_label(label, directory)}: no model weights found: expected {SAFE_SINGLE}, "
        f"{SAFE_INDEX}, {BIN_SINGLE} or {BIN_INDEX}{hint}"
    )


def _read_index(index: Path, label: str, listed: Collection[str]) -> dict[str, Path]:
    """Read an index json's weight_map; every listed shard must exist (or be in ``listed``)."""
    where = file_label(label, index)
    weight_map = _read_json(index, label).get("weight_map")
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise CheckpointError(f"{where}: 'weight_map' is missing or not a name -> file mapping")
    missing = sorted(
        {f for f in weight_map.values() if f not in listed and not (index.parent / f).is_file()}
    )
    if missing:
        raise CheckpointError(
            [f"{where}: missing shard '{f}' listed in the index" for f in missing]
        )
    return {name: index.parent / f for name, f in weight_map.items()}


def _check_index(weight_map: dict[str, Path], found: dict[str, TensorInfo], where: str) -> None:
    """Every tensor the index lists must be in the shard it names."""
    problems = [
        f"{where}: the index puts tensor '{name}' in '{file.name}' but that shard lacks it"
        for name, file in weight_map.items()
        if name not in found or found[name].file != file
    ]
    if problems:
        raise CheckpointError(problems)


def _read_json(path: Path, label: str) -> dict[str, Any]:
    where = file_label(label, path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{where}: invalid JSON at line {e.lineno}: {e.msg}") from e
    except (OSError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{where}: cannot read: {e}") from e
    except RecursionError:
        raise CheckpointError(f"{where}: invalid JSON: nested too deeply") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{where}: expected a JSON object")
    return data


# --- the checkpoint --------------------------------------------------------------------------


_S = TypeVar("_S", bound="TensorSource")


class TensorSource:
    """What the planner and executor need of an input model: ``config``, ``tensors`` (headers)
    and ``read``; layer counts and the context manager are derived here once for every kind
    (a plain ``Checkpoint``, a ``merge.lora.LoraCheckpoint``)."""

    config: dict[str, Any]
    tensors: dict[str, TensorInfo]

    def read(self, name: str) -> torch.Tensor:  # pragma: no cover - interface
        raise NotImplementedError

    def view(self, name: str) -> torch.Tensor | None:
        """The stored tensor without a copy (read-only by contract), or ``None`` where this
        source can only ``read`` it."""
        return None

    def can_view(self, name: str) -> bool:
        """Whether ``view(name)`` and ``read_range(name, ...)`` work (known from headers)."""
        return False

    def can_range(self, name: str) -> bool:
        """Whether ``read_range(name, ...)`` works (known from headers): where ``can_view``
        unless a source computes ranges of its own (``merge.lora.LoraCheckpoint``)."""
        return self.can_view(name)

    def range_bytes(self, name: str, size: int) -> int:
        """Bytes a ``read_range`` of ``size`` elements holds besides its result (0: it reads
        into the result)."""
        return 0

    def read_range(self, name: str, start: int, stop: int) -> torch.Tensor:
        """Elements ``[start, stop)`` of the flattened stored tensor (stored dtype); where
        ``can_range(name)``. By default a slice of ``view``."""
        whole = self.view(name)
        if whole is None:  # pragma: no cover - callers check can_view
            raise RuntimeError(f"tensor '{name}' cannot be read by ranges")
        return whole.reshape(-1)[start:stop]

    def stamps(self) -> dict[Path, Stamp]:
        """The weight files read from disk and their stamps at open (``merge.inputstate``)."""
        return {}

    def check_inputs(self) -> None:
        """Raise ``CheckpointError`` if a weight file changed since open."""

    def close(self) -> None:  # pragma: no cover - interface
        raise NotImplementedError

    @property
    def num_layers(self) -> int | None:
        """Layer count from the config (also a nested ``text_config``), or None."""
        return arch.num_layers(self.config)

    @property
    def layer_count(self) -> int:
        """Layer count from the config, else from the tensor names."""
        return arch.num_layers(self.config) or arch.count_layers(self.tensors)

    def __enter__(self: _S) -> _S:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


class Checkpoint(TensorSource):
    """One model folder: config, tensor headers, and lazy per-tensor reads."""

    def __init__(
        self,
        directory: Path,
        label: str,
        config: dict[str, Any],
        tensors: dict[str, TensorInfo],
        format: Format,
        bin_tensors: dict[str, torch.Tensor] | None = None,
    ) -> None:
        self.directory = directory
        self.label = label
        self.config = config
        self.tensors = tensors
        self.format: Format = format
        self._bin = bin_tensors or {}
        self._stamps: dict[Path, Stamp] = {}
        self._fds: dict[Path, int] = {}
        self._maps: dict[Path, mmap.mmap] = {}
        self._lock = threading.Lock()

    @classmethod
    def open(
        cls,
        directory: Path,
        label: str,
        *,
        listed: Collection[str] = (),
        headers: HeaderReader = read_headers,
    ) -> Checkpoint:
        """Read config and headers of the model in ``directory``; no tensor data is read.

        ``listed`` names weight files (relative to ``directory``) that exist elsewhere and
        ``headers`` reads safetensors headers: ``merge.hub.remote`` passes a Hub repo's
        weight files and a reader of their headers over the network."""
        directory = Path(directory)
        if not directory.is_dir():
            raise CheckpointError(f"{file_label(label, directory)}: directory not found")
        config_path = directory / "config.json"
        config = (
            _read_json(inside(config_path, directory, label), label)
            if config_path.is_file()
            else {}
        )
        fmt, entry = _find_weights(directory, label, listed)
        index = entry.name.endswith(".index.json")
        weight_map = _read_index(entry, label, listed) if index else None
        files = sorted(set(weight_map.values())) if weight_map is not None else [entry]
        check_folder(directory, label, files)
        stamps = {f: st for f in files if (st := stamp(f)) is not None}
        tensors = headers(files, label) if fmt == "safetensors" else {}
        bin_tensors: dict[str, torch.Tensor] = {}
        for file in files if fmt == "bin" else []:
            loaded = load_bin(file, label)
            bin_tensors.update(loaded)
            tensors.update({k: _bin_info(k, t, file) for k, t in loaded.items()})
        if weight_map is not None:
            _check_index(weight_map, tensors, file_label(label, entry))
        ckpt = cls(directory, label, config, tensors, fmt, bin_tensors)
        ckpt._stamps = stamps
        return ckpt

    def read(self, name: str) -> torch.Tensor:
        """Load one tensor (stored dtype, CPU).

        safetensors reads return a fresh tensor; .bin reads return the tensor zero-copy from a
        private (copy-on-write) mapping: the file is safe, but do not mutate it in place.
        """
        info = self._info(name)
        if self.format == "bin":
            self._check(info.file)
            return self._bin[name]
        return self._pread(info, 0, info.nbytes).view(info.dtype).reshape(info.shape)

    def read_range(self, name: str, start: int, stop: int) -> torch.Tensor:
        """Elements ``[start, stop)`` of the flattened tensor, read into a fresh buffer
        (safetensors), or sliced from the mapped .bin tensor."""
        info = self._info(name)
        if self.format == "bin":
            self._check(info.file)
            return self._bin[name].reshape(-1)[start:stop]
        size = info.dtype.itemsize
        stop = max(start, min(stop, info.nbytes // size))
        data = self._pread(info, start * size, (stop - start) * size)
        return data.view(info.dtype)

    def _info(self, name: str) -> TensorInfo:
        info = self.tensors.get(name)
        if info is None:
            raise KeyError(f"model '{self.label}' has no tensor '{name}'")
        return info

    def _check(self, file: Path) -> None:
        before = self._stamps.get(file)
        if before is not None:
            check(self.label, file, before)

    def _pread(self, info: TensorInfo, begin: int, count: int) -> torch.Tensor:
        """``count`` bytes from ``begin`` of ``info``'s data, checked against the file's stamp
        before and after (a short read is a truncated file)."""
        out = torch.empty(count, dtype=torch.uint8)
        if count == 0:
            return out
        self._check(info.file)
        buf = memoryview(out.numpy())  # type: ignore[arg-type]
        fd, pos = self._fd(info.file), info.offset + begin
        got = 0
        try:
            while got < count:
                n = os.preadv(fd, [buf[got:]], pos + got)
                if n == 0:
                    break
                got += n
        except OSError as e:
            raise CheckpointError(f"{file_label(self.label, info.file)}: cannot read: {e}") from e
        self._check(info.file)
        if got < count:  # truncated, though the stamp did not say so (no stamp: not opened)
            raise changed_error(self.label, info.file, f"it ends {count - got} bytes early")
        return out

    def _fd(self, file: Path) -> int:
        with self._lock:
            fd = self._fds.get(file)
            if fd is None:
                try:
                    fd = self._fds[file] = os.open(file, os.O_RDONLY | os.O_CLOEXEC)
                except OSError as e:
                    raise CheckpointError(
                        f"{file_label(self.label, file)}: cannot read: {e.strerror or e}"
                    ) from e
            return fd

    def stamps(self) -> dict[Path, Stamp]:
        return dict(self._stamps)

    def check_inputs(self) -> None:
        for file in self._stamps:
            self._check(file)

    def view(self, name: str) -> torch.Tensor:
        """The stored tensor, zero-copy: from a private (copy-on-write) map of its safetensors
        file, or the mapped .bin tensor. Never write to it (a write would only change this
        process's copy, never the file)."""
        info = self.tensors.get(name)
        if info is None:
            raise KeyError(f"model '{self.label}' has no tensor '{name}'")
        self._check(info.file)
        if self.format == "bin":
            return self._bin[name]
        if info.nbytes == 0:
            return torch.empty(info.shape, dtype=info.dtype)
        data = torch.frombuffer(
            self._map(info.file), dtype=torch.uint8, count=info.nbytes, offset=info.offset
        )
        return data.view(info.dtype).reshape(info.shape)

    def can_view(self, name: str) -> bool:
        return name in self.tensors

    def _map(self, file: Path) -> mmap.mmap:
        with self._lock:
            mapped = self._maps.get(file)
            if mapped is None:
                try:
                    with open(file, "rb") as f:
                        mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
                except (OSError, ValueError) as e:
                    raise CheckpointError(f"{file_label(self.label, file)}: cannot map: {e}") from e
                self._maps[file] = mapped
            return mapped

    def close(self) -> None:
        """Close file descriptors; drop maps and mapped .bin tensors."""
        with self._lock:
            fds, self._fds = self._fds, {}
            for fd in fds.values():
                os.close(fd)
            self._maps.clear()  # a map closes once no view holds it
        self._bin = {}

    def __repr__(self) -> str:
        return f"Checkpoint({self.label!r}, {self.format}, {len(self.tensors)} tensors)"
