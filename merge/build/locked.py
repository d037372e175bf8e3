"""Runs from a lock: Hub models at their locked commits, and with ``--locked`` proof of it.

Design
------
``use_lock(recipes, recipe_file, locked=...)`` reads ``<stem>.lock`` beside the recipe when
there is one, before anything is resolved:

- a lock that is malformed or for another recipe is an error in any case;
- a recipe changed since it was locked, or a model the lock lacks, is a warning (the lock's
  entries are used for the models it has, the others resolve as usual), and with ``locked``
  an error naming the next command;
- with ``locked`` and no lock at all: an error suggesting ``merge lock RECIPE``;
- a lock written by another version of the tool: a warning (same inputs, but the output is
  only promised to be byte-identical for the same version).

The returned ``LockUse`` gives the pins for ``merge.sources.pinned`` (each Hub entry's
``(repo, revision)`` -> commit) and, with ``locked``, ``check(models)``: after the models are
resolved and opened (downloads included) and before the plan or any output, each model's
identity now (``merge.build.inputs.identify_model``: local files hashed through the cache, Hub
weight files by their blob names) must equal its entry: same source, commit and files (paths,
sizes, sha256). Every difference is one line naming the entry and its files. ``sha256`` is the
lock file's own, for the output manifest.

What this module does not do: write locks (``merge.build.lock``), download (``merge.sources``
does, inside ``pinned``), or decide what a run writes.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from merge.build.inputs import InputId, identify_model
from merge.build.lock import Side, check_recipe_file, lock_sides
from merge.build.lockfile import (
    TOOL,
    LockFile,
    file_changes,
    lock_path,
    read_lock,
    recipe_sha256,
)
from merge.errors import BuildError
from merge.sources import Pin

if TYPE_CHECKING:  # pragma: no cover
    from merge.build.lock import AnyRecipe
    from merge.sourceset import Model


@dataclass
class LockUse:
    """A lock a run resolves its models from (see the module docstring)."""

    lock: LockFile
    recipe_file: Path
    sides: dict[str, Side]
    strict: bool
    warnings: list[str] = field(default_factory=list)

    @property
    def sha256(self) -> str:
        return self.lock.sha256

    def pins(self) -> dict[tuple[str, str | None], Pin]:
        """(repo, revision as written) -> the locked commit, for each Hub side."""
        pins = {}
        for text, side in self.sides.items():
            entry = self.lock.entry(text)
            if entry is not None and entry.source == "hub" and entry.commit is not None:
                pins[(side.ref.path, side.ref.revision)] = Pin(entry.commit, self.lock.line(text))
        return pins

    def check(self, models: Mapping[str, Model]) -> None:
        """With ``strict``: every resolved model is what its entry says (BuildError)."""
        if not self.strict:
            return
        problems = []
        for model in models.values():
            for now in identify_model(model):
                entry = self.lock.entry(now.ref)
                why = None if entry is None else difference(entry, now)
                if why is not None:
                    problems.append(
                        f"{self.lock.at(now.ref)}: {why}; run `merge lock --update "
                        f"{self.recipe_file} {now.ref}` to lock it as it is now"
                    )
        if problems:
            raise BuildError(problems)


def difference(entry: InputId, now: InputId) -> str | None:
    """How a resolved input differs from its lock entry, in a few words; None if it does not."""
    if entry.source != now.source:
        return f"locked as a {entry.source} model, now resolved as a {now.source} one"
    if entry.commit != now.commit:
        return f"locked at commit {entry.commit}, resolved to {now.commit}"
    changes = file_changes(entry.files, now.files)
    return None if not changes else f"content differs from the lock ({changes.text()})"


def use_lock(
    recipes: Sequence[AnyRecipe],
    recipe_file: Path,
    *,
    locked: bool = False,
    internal: Collection[str] = (),
) -> LockUse | None:
    """The lock beside ``recipe_file`` for a run of ``recipes`` (its documents), or None when
    there is none (BuildError with ``locked``); see the module docstring."""
    path = lock_path(recipe_file)
    if not path.is_file():
        if locked:
            raise BuildError(
                f"{path}: no lock file for {recipe_file} (--locked needs one); "
                f"run `merge lock {recipe_file}` first"
            )
        return None
    lock = read_lock(path, recipe_file)
    check_recipe_file(lock, recipe_file)
    sides = lock_sides(recipes, internal)
    found: list[str] = []
    step = f"run `merge lock {recipe_file}` to lock it as it is now"
    if lock.recipe_sha256 != recipe_sha256(recipe_file):
        found.append(
            f"{lock.where(('recipe', 'sha256'))}: {recipe_file} changed since it was locked; "
            + step
        )
    if not (found and locked):
        found += [
            f"{path}: model '{text}' is not in the lock; run `merge lock {recipe_file}` to add it"
            for text in sides
            if lock.entry(text) is None
        ]
    if found and locked:
        raise BuildError(found)
    if lock.tool != TOOL:
        found.append(
            f"{lock.where(('tool',))}: written by {lock.tool}, this is {TOOL}; the output may "
            "differ from that version's"
        )
    return LockUse(lock, recipe_file, sides, locked, found)
