"""Crash safety: the journal of finished tensors that lets ``merge run --resume`` continue.

Every run builds its output in a fixed sibling ``.OUT.partial/`` (``partial_dir``), which holds
the shards being written and ``merge-journal.jsonl``: a header line with the plan's identity
(``plan_identity``: a sha256 of the shard plan, the recipe text, the seed and the tool version)
and then one line per finished tensor, its name and the CRC-32 of its bytes as written. A line
is written only after the tensor's bytes were written to its shard, so after a crash or
``kill -9`` the journal never names a tensor that is not in the shard: written bytes live in the
page cache, which outlives the process. Neither is synced per tensor (at the ``1b`` preset the
syncs were most of the wall time, since they wait for the disk): after a crash of the machine
itself (power loss), a journaled tensor whose bytes never reached the disk fails its check
below and is computed again, and a journal line that never did is a tensor computed again.
The check is a CRC-32, not a sha256: it is there to catch bytes a crash lost (zeros, old
blocks), which it does but with odds of 2**-32 per lost tensor, and it costs a quarter of a
sha256 (each shard's sha256 for the manifest is hashed once, by ``merge.shardhash``).

``--resume`` checks the identity, re-reads and re-checks every journaled tensor from its shard
(a file is never trusted by its name or size: ``merge.writer.ShardWriter`` does this) and
recomputes the rest; the result is bit-identical to an uninterrupted run. While a run writes,
it holds an exclusive ``flock`` on the journal, so a second run into the same OUT is told that
one is running instead of taking its leftovers.

The header also records the inputs (``merge.inputstate.journal_inputs``: each weight file's
resolved path, size and mtime); ``journal_header`` reads it back, and a resume after an input
changed is refused naming the file (``merge.inputstate.resume_problems``), so an output never
mixes tensors of old and new inputs.

What it does not do: notice an input whose bytes changed while its size and mtime stayed (the
identity is the files' stamps, not their content).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import FrameType

from merge import __version__
from merge.jobs import Plan

JOURNAL_NAME = "merge-journal.jsonl"
_VERSION = 2  # 2: CRC-32 per tensor (1: sha256)
TEST_HOOK = "MERGE_TEST_SIGNAL_AFTER"  # "N:SIGNAME": the run signals itself after N tensors


def partial_dir(final: Path) -> Path:
    """Where a run into ``final`` is built: ``.NAME.partial`` beside it."""
    final = Path(final).absolute()
    return final.parent / f".{final.name}.partial"


def plan_identity(plan: Plan) -> str:
    """The sha256 of what fixes every output tensor's bytes: the shard plan (names, shapes,
    dtypes, order), the recipe text, the seed and the tool version."""
    shards = [
        [s.filename, [[t.name, list(t.shape), str(t.dtype)] for t in s.tensors]]
        for s in plan.shards.shards
    ]
    text = json.dumps(
        {"shards": shards, "recipe": plan.recipe.text, "seed": plan.seed, "tool": __version__},
        sort_keys=True,
    )
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def read_journal(directory: Path) -> tuple[str | None, dict[str, str]]:
    """A journal's plan identity and finished tensors (name -> CRC-32); a torn last line (a
    crash while it was written) is ignored. ``(None, {})`` when there is none."""
    path = Path(directory) / JOURNAL_NAME
    try:
        lines = path.read_bytes().split(b"\n")
    except FileNotFoundError:
        return None, {}
    identity: str | None = None
    done: dict[str, str] = {}
    for raw in lines:
        try:
            entry = json.loads(raw)
        except ValueError:
            continue
        if not isinstance(entry, dict):
            continue
        if identity is None:
            if entry.get("journal") == _VERSION and isinstance(entry.get("plan"), str):
                identity = entry["plan"]
                continue
            return None, {}
        name, digest = entry.get("tensor"), entry.get("crc32")
        if isinstance(name, str) and isinstance(digest, str):
            done[name] = digest
    return identity, done


def journal_header(directory: Path) -> dict[str, object] | None:
    """The journal's header line (``journal``, ``plan``, ``inputs``), or None without one."""
    try:
        with open(Path(directory) / JOURNAL_NAME, "rb") as f:
            entry = json.loads(f.readline())
    except (OSError, ValueError):
        return None
    if not isinstance(entry, dict) or entry.get("journal") != _VERSION:
        return None
    return entry


def is_locked(directory: Path) -> bool:
    """Whether a running merge holds ``directory``'s journal."""
    try:
        fd = os.open(Path(directory) / JOURNAL_NAME, os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return True
    finally:
        os.close(fd)
    return False


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Journal:
    """The journal of one run in ``directory``: ``start`` (a fresh one, or the existing one on
    resume), then ``record`` each finished tensor from any thread; ``close`` releases it."""

    def __init__(
        self, directory: Path, identity: str, inputs: dict[str, list[int]] | None = None
    ) -> None:
        self.directory = Path(directory)
        self.identity = identity
        self.inputs = inputs or {}
        self.path = self.directory / JOURNAL_NAME
        self._fd: int | None = None
        self._lock = threading.Lock()
        self._count = 0
        hook = os.environ.get(TEST_HOOK, "")
        after, _, sig = hook.partition(":")
        self._hook = (int(after), getattr(signal, sig or "SIGKILL")) if after else None

    def start(self, kept: dict[str, str]) -> None:
        """Rewrite the journal with ``kept`` (the verified tensors of a resumed run, else
        nothing), fsynced, and lock it."""
        fresh = self.path.with_name(JOURNAL_NAME + ".new")
        lines: list[dict[str, object]] = [
            {"journal": _VERSION, "plan": self.identity, "inputs": self.inputs}
        ]
        lines += [{"tensor": n, "crc32": d} for n, d in kept.items()]
        with open(fresh, "w", encoding="utf-8") as f:
            f.writelines(json.dumps(x) + "\n" for x in lines)
            f.flush()
            os.fsync(f.fileno())
        fd = os.open(fresh, os.O_WRONLY | os.O_APPEND)
        fcntl.flock(fd, fcntl.LOCK_EX)
        os.replace(fresh, self.path)
        _fsync_dir(self.directory)
        self._fd = fd

    def record(self, name: str, digest: str) -> None:
        """Append one finished tensor (its bytes already written), unsynced: see the module."""
        assert self._fd is not None, "Journal.record before start"
        line = (json.dumps({"tensor": name, "crc32": digest}) + "\n").encode("utf-8")
        with self._lock:
            os.write(self._fd, line)
            self._count += 1
            if self._hook is not None and self._count == self._hook[0]:
                os.kill(os.getpid(), self._hook[1])

    def remove(self) -> None:
        """Delete the journal file once every tensor is written (the lock stays held until
        ``close``): it is no part of the output."""
        self.path.unlink(missing_ok=True)

    def close(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)  # releases the flock

    def __enter__(self) -> Journal:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


@contextmanager
def stop_on_signals() -> Iterator[None]:
    """SIGTERM and SIGHUP raise KeyboardInterrupt in the main thread while inside, as Ctrl-C
    does, so they stop a run the same clean way (previous handlers restored after)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    before = {s: signal.signal(s, _interrupt) for s in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for s, handler in before.items():
            signal.signal(s, handler)


class Interrupted(KeyboardInterrupt):
    """An interrupted run whose finished tensors were kept: the message says how to resume."""


def interrupted(final: Path, total: int) -> Interrupted:
    """The interrupt of a run into ``final`` (``total`` tensors planned), naming what it kept."""
    part = partial_dir(final)
    _, done = read_journal(part)
    return Interrupted(
        f"interrupted; {len(done)} of {total} tensors are kept in '{part}': rerun the same "
        "command with --resume to continue, or delete it to start over"
    )


def leftover_problems(final: Path, identity: str, total: int, resume: bool) -> list[str]:
    """What an earlier run into ``final`` left that stops this one: a merge still writing it,
    an interrupted run's ``.NAME.partial`` without ``resume``, or one of another plan with it."""
    part = partial_dir(final)
    if not os.path.lexists(part):
        return []
    if not part.is_dir() or part.is_symlink():
        return [f"'{part}' is in the way of output '{final}' and is not a directory; delete it"]
    if is_locked(part):
        return [f"another merge is writing output '{final}' now (in '{part}'); wait for it"]
    found, done = read_journal(part)
    if not resume:
        return [
            f"an interrupted run into '{final}' left '{part}' ({len(done)} of {total} tensors "
            "done): rerun with --resume to continue it, or delete it to start over"
        ]
    if found is not None and found != identity:
        return [
            f"cannot resume: '{part}' was left by a run of another recipe, seed, shard size or "
            "tool version; rerun with the same ones, or delete it to start over"
        ]
    return []


def stale_siblings(final: Path) -> list[str]:
    """Warnings for the random temporary siblings (``.NAME.tmp-*``, ``.NAME.old-*``) that
    crashed runs left beside ``final``; they are never used, and never deleted silently."""
    final = Path(final).absolute()
    try:
        found = sorted(
            p
            for pattern in (f".{final.name}.tmp-*", f".{final.name}.old-*")
            for p in final.parent.glob(pattern)
        )
    except OSError:
        return []
    return [
        f"'{p}' is left over from an earlier run that did not finish; it is not used: delete it"
        for p in found
    ]


def clear_for_resume(directory: Path, shard_names: set[str]) -> None:
    """Remove everything from a kept ``.NAME.partial`` but the planned shards and the journal
    (the resumed run writes the other files again, and only those it writes may remain)."""
    import shutil

    for entry in Path(directory).iterdir():
        if entry.name in shard_names or entry.name == JOURNAL_NAME:
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink()
