"""``merge lock``: resolve every model of a recipe and record it in ``<stem>.lock``.

Design
------
``lock_sides(recipes, internal)`` lists what a lock holds: each side of each model reference
of one or more recipe documents (a multi-stage file is several; a stage's name used as a model
is ``internal`` and skipped), ``base+adapter`` as two sides, each side once, keyed by its text.

``current_input(side)`` is what a side is now, as an ``InputId``:

- a local directory: every used file hashed (``merge.build.hashing``: read once, streamed,
  cached by path, size and mtime);
- a Hub id, online: the revision's commit and that commit's file metadata
  (``merge.hub.remote_snapshot``): LFS files' size and sha256 without downloading them, the
  small git files (config, tokenizer) fetched into the Hugging Face cache and hashed;
- a Hub id with ``HF_HUB_OFFLINE``: the cached snapshot of the revision (no network). A Hub
  that cannot be reached without it is an error: the cache may hold an old commit of a
  branch, and a lock must not record that silently.

``lock_recipes`` writes the lock: with no lock yet, or ``--update`` without models, every side
is resolved now (an old lock, even a bad one or another recipe's, is replaced); otherwise the
entries of the old lock are kept as they are (a plain ``merge lock`` after editing the recipe
only adds the new models and drops the gone ones) and only the named models are resolved
again. The lock is written atomically, only when every
side resolved; the result lists what happened to each entry.

What this module does not do: use a lock in a run (``merge.build.locked``) or compare it
with upstream (``merge.build.outdated``).
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, TypeAlias

from merge.build.hashing import sha256_file
from merge.build.inputs import FileId, InputId, identify
from merge.build.lockfile import LockFile, lock_path, read_lock, recipe_sha256, write_lock
from merge.errors import BuildError, MergeError, SourceError
from merge.recipe.yamlsrc import PathKey
from merge.sources import ModelRef, local_folder

OFFLINE_STEP = "connect, or set HF_HUB_OFFLINE=1 to lock what the Hugging Face cache holds"

if TYPE_CHECKING:  # pragma: no cover
    from merge.hub import RemoteSnapshot
    from merge.moe.recipe import MoeRecipe
    from merge.recipe import Recipe

    AnyRecipe: TypeAlias = Recipe | MoeRecipe


@dataclass(frozen=True)
class Side:
    """One side of a model reference: what a lock entry is about."""

    text: str  # the side as text (``org/name@v1``): the entry's ref
    ref: ModelRef  # without adapter
    written: str  # the whole reference as the recipe writes it
    what: str  # "model" or "adapter"
    recipe: AnyRecipe
    path: PathKey  # where the recipe writes it

    def where(self) -> str:
        return self.recipe.loc.where(self.path)


def lock_sides(recipes: Sequence[AnyRecipe], internal: Collection[str] = ()) -> dict[str, Side]:
    """Every side of every model reference of ``recipes``, each once, in recipe order."""
    sides: dict[str, Side] = {}
    for recipe in recipes:
        for text, path in recipe.ref_paths().items():
            if text in internal:
                continue
            ref = ModelRef.parse(text)
            for side, what in ((ref.base, "model"), (ref.lora, "adapter")):
                if side is not None:
                    sides.setdefault(str(side), Side(str(side), side, text, what, recipe, path))
    return sides


def current_input(side: Side) -> InputId:
    """What ``side`` is now (see the module docstring); SourceError when it cannot be found."""
    folder = local_folder(side.ref, [side.recipe.file.parent], side.what)
    if folder is not None:
        return identify(side.ref, folder, side.text)
    from merge.hub import download_model, offline_reason, remote_snapshot

    if offline_reason():
        return identify(side.ref, download_model(side.ref.path, side.ref.revision), side.text)
    snap = remote_snapshot(side.ref.path, side.ref.revision, OFFLINE_STEP)
    return hub_input(side.text, side.ref, snap)


def hub_input(text: str, ref: ModelRef, snap: RemoteSnapshot) -> InputId:
    """An ``InputId`` from a Hub commit's metadata; git files fetched and hashed."""
    from merge.hub import fetch_files

    small = [f.path for f in snap.files if f.sha256 is None]
    hashed: dict[str, str] = {}
    if small:
        folder = fetch_files(snap.repo, snap.commit, small, f"{snap.repo}@{snap.commit}")
        hashed = {name: sha256_file(folder / name) for name in small}
    files = tuple(FileId(f.path, f.size, f.sha256 or hashed[f.path]) for f in snap.files)
    return InputId(
        text, "hub", repo=snap.repo, revision=ref.revision, commit=snap.commit, files=files
    )


@dataclass(frozen=True)
class Change:
    """What ``merge lock`` did to one entry: added, updated, unchanged, kept or removed."""

    ref: str
    kind: str
    old: InputId | None
    new: InputId | None

    def line(self) -> str:
        """``org/name: updated (commit 1a2b3c4d5e6f -> 9f8e7d6c5b4a, 6 files)``."""
        entry = self.new or self.old
        assert entry is not None
        if self.new is None:
            return f"{self.ref}: removed"
        what = "local" if entry.commit is None else f"commit {entry.commit[:12]}"
        old = self.old.commit if self.old is not None else None
        if old is not None and entry.commit is not None and old != entry.commit:
            what = f"commit {old[:12]} -> {entry.commit[:12]}"
        return f"{self.ref}: {self.kind} ({what}, {len(entry.files)} files)"


@dataclass(frozen=True)
class LockResult:
    lock: LockFile
    changes: tuple[Change, ...]


def select(sides: dict[str, Side], models: Sequence[str], recipe_file: Path) -> set[str]:
    """The sides ``merge lock --update RECIPE MODEL...`` refreshes: a side's text, a whole
    reference as the recipe writes it, or a repo id / path (all its revisions)."""
    chosen: set[str] = set()
    for name in models:
        found = {t for t, s in sides.items() if name in (t, s.written, s.ref.path)}
        if not found:
            known = ", ".join(sides) or "none"
            raise BuildError(
                f"{recipe_file}: '{name}' is not a model of the recipe (its models: {known})"
            )
        chosen |= found
    return chosen


def lock_recipes(
    recipes: Sequence[AnyRecipe],
    recipe_file: Path,
    *,
    models: Sequence[str] = (),
    update: bool = False,
    internal: Collection[str] = (),
) -> LockResult:
    """Write (or refresh) ``recipe_file``'s lock from its recipe documents ``recipes``."""
    if models and not update:
        names = " ".join(models)
        raise BuildError(
            f"naming models ({names}) refreshes them: run `merge lock --update {recipe_file} "
            f"{names}`"
        )
    path = lock_path(recipe_file)
    sides = lock_sides(recipes, internal)
    fresh = select(sides, models, recipe_file) if models else set(sides)
    old = _old_lock(path, recipe_file, strict=bool(models) or not update)
    if old is not None and (models or not update):
        fresh = {t for t in sides if t in fresh and (models or old.entry(t) is None)}
    entries, changes = _resolve(sides, fresh, old)
    entries.sort(key=lambda e: e.ref)
    lock = LockFile(path, recipe_file.name, recipe_sha256(recipe_file), tuple(entries))
    return LockResult(write_lock(lock), tuple(changes))


def _old_lock(path: Path, recipe_file: Path, strict: bool) -> LockFile | None:
    """The lock being refreshed. ``--update`` of every model replaces it whatever it holds
    (its entries only tell what changed); otherwise it must be good and this recipe's."""
    if not path.exists():
        return None
    try:
        old = read_lock(path, recipe_file)
        check_recipe_file(old, recipe_file)
    except BuildError:
        if strict:
            raise
        return None
    return old


def _resolve(
    sides: dict[str, Side], fresh: set[str], old: LockFile | None
) -> tuple[list[InputId], list[Change]]:
    """The new entries (the ``fresh`` sides resolved now, the others kept from ``old``) and
    the change of each; every side's failure reported together."""
    from merge.hub import hub_run

    entries: list[InputId] = []
    changes: list[Change] = []
    problems: list[str] = []
    with hub_run():
        for text, side in sides.items():
            before = old.entry(text) if old is not None else None
            if text not in fresh and before is not None:
                entries.append(before)
                changes.append(Change(text, "kept", before, before))
                continue
            try:
                now = current_input(side)
            except MergeError as e:
                problems.extend(f"{side.where()}: {p}" for p in e.problems)
                continue
            entries.append(now)
            kind = "added" if before is None else "unchanged" if before == now else "updated"
            changes.append(Change(text, kind, before, now))
    if problems:
        raise SourceError(problems)
    gone = [m for m in (old.models if old else ()) if m.ref not in sides]
    changes += [Change(m.ref, "removed", m, None) for m in gone]
    return entries, sorted(changes, key=lambda c: c.ref)


def check_recipe_file(lock: LockFile, recipe_file: Path) -> None:
    """A lock found beside ``recipe_file`` must be that recipe's: the same file name, or the
    same content under another name (an output's ``merge-recipe.yaml`` beside its copy of the
    lock of ``ties.yaml``)."""
    if lock.recipe_file != recipe_file.name and lock.recipe_sha256 != recipe_sha256(recipe_file):
        raise BuildError(
            f"{lock.where(('recipe', 'file'))}: this lock is for {lock.recipe_file!r}, not "
            f"{recipe_file.name!r}; run `merge lock --update {recipe_file}` to replace it"
        )


def lock_recipe(
    recipe_file: str | Path, models: Sequence[str] = (), *, update: bool = False
) -> LockResult:
    """``merge lock [--update] RECIPE [MODEL ...]``: every document of the file (each stage of
    a multi-stage recipe; a stage's name used as a model is not locked)."""
    from merge.build.stages import Stages, load

    loaded = load(Path(recipe_file))
    if isinstance(loaded, Stages):
        return lock_recipes(
            loaded.recipes(), loaded.file, models=models, update=update, internal=loaded.names
        )
    return lock_recipes([loaded], loaded.file, models=models, update=update)
