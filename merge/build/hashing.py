"""sha256 of files, read once, streamed, and remembered by (path, size, mtime).

Design
------
``sha256_file(path)`` reads the file in 8 MiB blocks (hashlib releases the GIL, so callers may
hash several files on threads) and stores the digest in a small JSON cache keyed by the
file's absolute path, size and modification time in nanoseconds: a second lock, outdated or
verify on unchanged 100 GB inputs reads nothing. A file changed in place gets a new mtime
(and usually size) and is hashed again. The cache lives in ``$MERGE_CACHE_DIR`` (default
``$XDG_CACHE_HOME/mergesmith``, else ``~/.cache/mergesmith``) as ``hashes.json``; it is
written atomically, and a missing, unreadable or corrupt cache only costs a rehash.

Files in the Hugging Face cache are symlinks to ``blobs/<etag>``; for weight (LFS) files the
etag is the sha256 the Hub reported, so ``hub_blob_sha256`` gives it without reading.

What this module does not do: decide which files matter (``merge.build.inputs``).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
import threading
from pathlib import Path

BLOCK = 8 * 2**20
SHA256_RE = re.compile(r"[0-9a-f]{64}")
CACHE_VAR = "MERGE_CACHE_DIR"
CACHE_NAME = "hashes.json"

_lock = threading.Lock()
_memory: dict[str, dict[str, object]] = {}  # this process's view of the cache, by cache file


def cache_dir() -> Path:
    """Where the tool keeps its caches, from the environment as it is now."""
    if os.environ.get(CACHE_VAR):
        return Path(os.environ[CACHE_VAR]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME") or "~/.cache"
    return Path(xdg).expanduser() / "mergesmith"


def _key(path: Path) -> tuple[str, str]:
    st = path.stat()
    return str(path.absolute()), f"{st.st_size}:{st.st_mtime_ns}"


def _load(file: Path) -> dict[str, object]:
    cached = _memory.get(str(file))
    if cached is not None:
        return cached
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
        entries = data.get("entries", {}) if isinstance(data, dict) else {}
    except (OSError, ValueError):
        entries = {}
    entries = entries if isinstance(entries, dict) else {}
    _memory[str(file)] = entries
    return entries


def _save(file: Path, entries: dict[str, object]) -> None:
    """Write the cache atomically; a read-only or full cache folder only loses the cache."""
    try:
        file.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".hashes-", dir=file.parent)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump({"version": 1, "entries": entries}, f, sort_keys=True)
        os.replace(tmp, file)
    except OSError:
        pass


def digest(path: Path) -> str:
    """sha256 of a file's bytes, reading it in blocks; no cache."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(BLOCK):
            h.update(block)
    return h.hexdigest()


def sha256_file(path: Path) -> str:
    """sha256 of ``path`` (symlinks followed), from the cache when (path, size, mtime) match."""
    path = Path(path)
    name, stamp = _key(path)
    file = cache_dir() / CACHE_NAME
    with _lock:
        entry = _load(file).get(name)
    if isinstance(entry, dict) and entry.get("stamp") == stamp:
        return str(entry["sha256"])
    value = digest(path)
    if _key(path)[1] != stamp:  # changed while read: do not remember a mixed digest
        return value
    with _lock:
        entries = _load(file)
        # another process may have added entries meanwhile: merge them before writing
        _memory.pop(str(file), None)
        entries = {**_load(file), **entries, name: {"stamp": stamp, "sha256": value}}
        _memory[str(file)] = entries
        _save(file, entries)
    return value


def hub_blob_sha256(path: Path) -> str | None:
    """The sha256 of a Hugging Face cache file, from its blob's name, when that is a sha256
    (LFS files); None for other files (their blob is named by a git sha1)."""
    if not path.is_symlink():
        return None
    target = Path(os.readlink(path))
    if target.parent.name != "blobs" or not SHA256_RE.fullmatch(target.name):
        return None
    return target.name
