"""The sha256 of each output shard, hashed in the background while the merge writes it.

Design. The manifest (``merge.build.manifest``) lists every output file's sha256. Hashing the
shards after the merge was a serial pass over the whole output at the end of every run (at the
``1b`` preset, a sixth of the wall time). Instead the shard writer tells a :class:`ShardHasher`
each byte range it has written (in any order); per shard it keeps the length of the written
prefix, and one thread reads and hashes each prefix as it grows, from the file itself (its own
read-only descriptor, so it hashes the bytes as they are in the file, not the buffers handed to
the writer). Tensors of a shard are mostly written in order, so the hashing keeps pace with
the merge and what is left at the end is the last few chunks.

What it does not do: hash anything but the shards (``merge.build.manifest`` hashes the other
files), or decide which bytes a range holds (``merge.writer.ShardWriter``).
"""

from __future__ import annotations

import hashlib
import os
import threading
from pathlib import Path

BLOCK = 8 * 2**20  # bytes read and hashed at a time


class ShardHasher:
    """sha256 of the files ``paths`` (of final sizes ``sizes``), from ranges ``add``ed as
    written; ``result`` waits for the rest and gives path name -> sha256; ``stop`` abandons it.
    """

    def __init__(self, paths: list[Path], sizes: list[int]) -> None:
        self._paths = list(paths)
        self._sizes = list(sizes)
        self._prefix = [0] * len(paths)  # bytes written from the start, without a gap
        self._later: list[dict[int, int]] = [{} for _ in paths]  # start -> stop beyond a gap
        self._hashed = [0] * len(paths)
        self._sha = [hashlib.sha256() for _ in paths]
        self._fds: list[int] = []
        self._cond = threading.Condition()
        self._closing = self._stopped = False
        self._error: OSError | None = None
        try:
            for path in self._paths:
                self._fds.append(os.open(path, os.O_RDONLY))
        except BaseException:
            self._close_fds()
            raise
        self._thread = threading.Thread(target=self._loop, name="merge-shard-hash", daemon=True)
        self._thread.start()

    def add(self, index: int, start: int, stop: int) -> None:
        """Bytes ``start..stop`` of file ``index`` are written (each byte once)."""
        if stop <= start:  # nothing (an empty tensor): it must not stand for the range after
            return
        with self._cond:
            if start != self._prefix[index]:
                self._later[index][start] = stop
                return
            later = self._later[index]
            while stop in later:
                stop = later.pop(stop)
            self._prefix[index] = stop
            self._cond.notify()

    def _next(self) -> tuple[int, int, int] | None:
        """(file, start, stop) to hash next, waiting for one; None when done or stopped."""
        with self._cond:
            while True:
                if self._stopped:
                    return None
                for i, hashed in enumerate(self._hashed):
                    if self._prefix[i] > hashed:
                        return i, hashed, min(self._prefix[i], hashed + BLOCK)
                if self._closing:
                    return None
                self._cond.wait()

    def _loop(self) -> None:
        buf = memoryview(bytearray(BLOCK))
        try:
            while (job := self._next()) is not None:
                i, start, stop = job
                got = os.preadv(self._fds[i], [buf[: stop - start]], start)
                if got != stop - start:
                    raise OSError(f"{self._paths[i]}: short read at byte {start + got}")
                self._sha[i].update(buf[:got])  # releases the GIL
                with self._cond:
                    self._hashed[i] = stop
        except OSError as e:
            self._error = e

    def result(self) -> dict[str, str]:
        """Wait until every file is hashed: file name -> sha256. RuntimeError when a file was
        not written whole; the OSError of a failed read."""
        with self._cond:
            self._closing = True
            self._cond.notify()
        self._thread.join()
        self._close_fds()
        if self._error is not None:
            raise self._error
        sizes = zip(self._paths, self._hashed, self._sizes, strict=True)
        short = [p.name for p, n, size in sizes if n != size]
        if short:
            raise RuntimeError(f"shards not written whole, cannot hash them: {short}")
        return {p.name: sha.hexdigest() for p, sha in zip(self._paths, self._sha, strict=True)}

    def stop(self) -> None:
        """Stop hashing now (a failed or interrupted run)."""
        with self._cond:
            self._stopped = True
            self._cond.notify()
        self._thread.join()
        self._close_fds()

    def _close_fds(self) -> None:
        fds, self._fds = self._fds, []
        for fd in fds:
            os.close(fd)
