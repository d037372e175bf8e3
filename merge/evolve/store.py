"""The storage directory of an evolve run: what survives a kill, and how a rerun continues.

Files in ``DIR``:
- ``evolve.json``: the run's key (a hash of the genome text and the options that shape the
  trajectory: seed, popsize, sigma0, batch size, limit) and the genome file; a rerun with
  another key is refused.
- ``state.pkl``: after each generation, the pickled optimizer, numpy's global RNG state (the
  ``cma`` package draws from it) and counters; written atomically (temporary file, fsync,
  rename), so it is always a whole generation's state.
- ``history.jsonl``: one line per evaluated candidate (generation, index, vector, score,
  per-task metrics), appended and fsynced before the state that counts it. On
  resume, lines of a generation the state does not count (a kill between the two writes) are
  dropped, so the history then continues exactly as an uninterrupted run's.

What it does not do: lock the directory against two concurrent runs, or keep models.
"""

from __future__ import annotations

import json
import os
import pickle
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from merge.errors import OutputError

META = "evolve.json"
STATE = "state.pkl"
HISTORY = "history.jsonl"


def atomic_write(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` whole or not at all (tmp file, fsync, rename, dir fsync)."""
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@dataclass
class State:
    """What a rerun needs: the optimizer, numpy's RNG state and the counters."""

    optimizer: Any
    rng: Any
    generation: int = 0  # generations finished
    evals: int = 0
    best: dict[str, Any] | None = None  # the best history record so far
    done: str | None = None  # why the search stopped, once it has
    extra: dict[str, Any] = field(default_factory=dict)


class Store:
    """``DIR`` of one run (see the module docstring)."""

    def __init__(self, directory: str | Path, key: str, genome_file: Path) -> None:
        self.dir = Path(directory)
        self.key = key
        self.genome_file = genome_file

    @property
    def history_path(self) -> Path:
        return self.dir / HISTORY

    def open(self) -> State | None:
        """Create ``DIR`` or check it is this run's; the saved state, if any (the history
        cut back to it)."""
        meta = self.dir / META
        if self.dir.exists() and not self.dir.is_dir():
            raise OutputError(f"{self.dir}: --storage-path exists and is not a directory")
        self.dir.mkdir(parents=True, exist_ok=True)
        if meta.exists():
            try:
                saved = json.loads(meta.read_text())
            except (OSError, ValueError) as e:
                raise OutputError(f"{meta}: unreadable ({e}); use another --storage-path") from e
            if saved.get("key") != self.key:
                raise OutputError(
                    f"{self.dir}: holds a run of another genome or other options "
                    f"({saved.get('genome')}); use another --storage-path or the same ones"
                )
        else:
            if any(p.name != ".gitkeep" for p in self.dir.iterdir()):
                raise OutputError(
                    f"{self.dir}: --storage-path is not empty and is not an evolve run's"
                )
            body = {"key": self.key, "genome": str(self.genome_file)}
            atomic_write(meta, json.dumps(body, indent=2).encode())
        state = self._load_state()
        self._cut_history(state.generation if state else 0)
        return state

    def _load_state(self) -> State | None:
        path = self.dir / STATE
        if not path.exists():
            return None
        try:
            with open(path, "rb") as f:
                state = pickle.load(f)
        except Exception as e:  # noqa: BLE001 - any unpickling failure is a corrupt file
            raise OutputError(f"{path}: unreadable state ({e}); use another --storage-path") from e
        if not isinstance(state, State):
            raise OutputError(f"{path}: not an evolve state; use another --storage-path")
        return state

    def _cut_history(self, generations: int) -> None:
        """Keep only whole lines of the first ``generations`` generations."""
        path = self.history_path
        if not path.exists():
            return
        kept = [r for r in self.history() if r["generation"] < generations]
        text = "".join(json.dumps(r) + "\n" for r in kept)
        if text.encode() != path.read_bytes():
            atomic_write(path, text.encode())

    def history(self) -> list[dict[str, Any]]:
        """Every whole, parseable record of ``history.jsonl``."""
        path = self.history_path
        if not path.exists():
            return []
        out = []
        for line in path.read_text().splitlines():
            try:
                out.append(json.loads(line))
            except ValueError:
                break  # a line cut by a kill: it and anything after are not whole
        return out

    def append(self, records: list[dict[str, Any]]) -> None:
        with open(self.history_path, "a") as f:
            for r in records:
                f.write(json.dumps(r) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def save(self, state: State) -> None:
        atomic_write(self.dir / STATE, pickle.dumps(state))
