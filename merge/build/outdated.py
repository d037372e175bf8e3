"""``merge outdated``: what moved upstream since the lock was written.

Design
------
``outdated(recipe_file)`` reads the recipe's lock and, for each entry, asks what it is now:

- a Hub entry: the commit its revision (the default branch when the recipe names none) points
  to now (``merge.hub.remote_snapshot``, metadata only). When it moved, the new commit's used
  files are compared with the locked ones: LFS files by the sha256 the Hub keeps, the small
  git files fetched into the Hugging Face cache and hashed;
- a local entry: the directory the reference names (as a run resolves it: the current
  directory, then the recipe's folder), every used file hashed through the cache (by path,
  size and mtime: unchanged files are not read again).

The result lists, per entry, the old and new commit and the changed, added and removed files;
``moved`` is true when any entry moved. It renders as text (``lines``) and as JSON
(``as_json``); the CLI exits 0 when nothing moved, 1 when something did, 2 on an error (no lock,
a bad lock, offline with a Hub entry, an unknown repo or revision, a missing directory).

What this module does not do: change the lock (``merge lock --update`` does).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from merge.build.inputs import InputId, identify
from merge.build.lock import check_recipe_file, hub_input
from merge.build.lockfile import (
    FileChanges,
    file_changes,
    lock_path,
    read_lock,
    recipe_sha256,
)
from merge.errors import BuildError, MergeError
from merge.sources import ModelRef, local_folder


@dataclass(frozen=True)
class Movement:
    """One lock entry against upstream now."""

    entry: InputId
    new_commit: str | None
    changes: FileChanges

    @property
    def moved(self) -> bool:
        return self.entry.commit != self.new_commit or bool(self.changes)

    def as_json(self) -> dict[str, Any]:
        e = self.entry
        return {
            "ref": e.ref,
            "source": e.source,
            "repo": e.repo,
            "revision": e.revision,
            "old_commit": e.commit,
            "new_commit": self.new_commit,
            "moved": self.moved,
            "changed": list(self.changes.changed),
            "added": list(self.changes.added),
            "removed": list(self.changes.removed),
        }

    def line(self) -> str:
        e, files = self.entry, self.changes.text() or "no file the merge uses changed"
        if e.commit is None:
            if not self.moved:
                return f"{e.ref}: as locked (local)"
            return f"{e.ref}: the local directory changed ({files})"
        if not self.moved:
            return f"{e.ref}: as locked (commit {e.commit[:12]})"
        new = self.new_commit or ""
        what = f"{e.revision} moved" if e.revision else "the default branch moved"
        return f"{e.ref}: {what} from {e.commit[:12]} to {new[:12]} ({files})"


@dataclass(frozen=True)
class Outdated:
    """Every entry of a lock against upstream now."""

    lock: Path
    recipe_file: Path
    models: tuple[Movement, ...]
    warnings: list[str] = field(default_factory=list)

    @property
    def moved(self) -> bool:
        return any(m.moved for m in self.models)

    def as_json(self) -> dict[str, Any]:
        return {
            "lock": str(self.lock),
            "recipe": str(self.recipe_file),
            "moved": self.moved,
            "models": [m.as_json() for m in self.models],
        }

    def lines(self) -> list[str]:
        moved = sum(m.moved for m in self.models)
        if not moved:
            summary = f"all {len(self.models)} models are as locked"
        else:
            summary = (
                f"{moved} of {len(self.models)} models moved; lock them as they are now with "
                f"`merge lock --update {self.recipe_file}` (all, or name the models)"
            )
        return [m.line() for m in self.models] + [summary]


def outdated(recipe_file: str | Path) -> Outdated:
    """Compare the lock of ``recipe_file`` with upstream now (see the module docstring)."""
    from merge.hub import hub_run

    recipe_file = Path(recipe_file)
    path = lock_path(recipe_file)
    if not recipe_file.is_file():
        raise BuildError(f"{recipe_file}: recipe not found")
    if not path.is_file():
        raise BuildError(f"{path}: no lock file for {recipe_file}; run `merge lock {recipe_file}`")
    lock = read_lock(path, recipe_file)
    check_recipe_file(lock, recipe_file)
    warnings = []
    if lock.recipe_sha256 != recipe_sha256(recipe_file):
        warnings.append(
            f"{lock.where(('recipe', 'sha256'))}: {recipe_file} changed since it was locked; "
            f"`merge lock {recipe_file}` locks its new models"
        )
    movements: list[Movement] = []
    problems: list[str] = []
    with hub_run():
        for entry in lock.models:
            try:
                movements.append(_movement(entry, recipe_file))
            except MergeError as e:
                problems.extend(f"{lock.at(entry.ref)}: {_strip(p, entry)}" for p in e.problems)
    if problems:
        raise BuildError(problems)
    return Outdated(path, recipe_file, tuple(movements), warnings)


def _strip(problem: str, entry: InputId) -> str:
    """A Hub error without its ``model 'org/name': `` prefix (the entry is named already)."""
    return problem.removeprefix(f"model '{entry.ref}': ")


def _movement(entry: InputId, recipe_file: Path) -> Movement:
    ref = ModelRef.parse(entry.ref)
    if entry.source == "local":
        folder = local_folder(ref, [recipe_file.parent])
        if folder is None:
            raise BuildError(f"local directory '{entry.ref}' not found")
        now = identify(ref, folder, entry.ref)
        return Movement(entry, None, file_changes(entry.files, now.files))
    from merge.hub import offline_reason, remote_snapshot

    offline = offline_reason()
    if offline:
        raise BuildError(
            f"{offline}, but `merge outdated` asks the Hub what each revision is now; unset it"
        )
    assert entry.repo is not None
    snap = remote_snapshot(entry.repo, entry.revision)
    if snap.commit == entry.commit:
        return Movement(entry, snap.commit, FileChanges())
    now = hub_input(entry.ref, ref, snap)
    return Movement(entry, snap.commit, file_changes(entry.files, now.files))
