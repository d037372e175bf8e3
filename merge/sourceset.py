"""Open every model a recipe names: resolve references, read headers, report all failures.

``open_models(recipe)`` gives one ``Model`` per distinct reference, in recipe order (base
first). Problems from every model are collected and raised together, each prefixed with the
recipe line that names the model.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from merge.checkpoint import Checkpoint
from merge.errors import MergeError, SourceError
from merge.recipe import Recipe
from merge.sources import ModelRef, resolve


@dataclass
class Model:
    """One resolved input model."""

    ref: str
    directory: Path
    checkpoint: Checkpoint


def open_models(recipe: Recipe) -> dict[str, Model]:
    """Resolve and open every model of the recipe (headers only)."""
    paths = recipe.ref_paths()
    models: dict[str, Model] = {}
    problems: list[str] = []
    for ref in paths:
        try:
            directory = resolve(ModelRef.parse(ref), search_dirs=[recipe.file.parent])
            models[ref] = Model(ref, directory, Checkpoint.open(directory, label=ref))
        except MergeError as e:
            where = recipe.loc.where(paths[ref])
            problems.extend(f"{where}: {p}" for p in e.problems)
    if problems:
        for m in models.values():
            m.checkpoint.close()
        raise SourceError(problems)
    return models


def close_models(models: dict[str, Model]) -> None:
    for m in models.values():
        m.checkpoint.close()


def iter_unique_dirs(models: dict[str, Model]) -> Iterator[Path]:
    seen: set[Path] = set()
    for m in models.values():
        d = m.directory.resolve()
        if d not in seen:
            seen.add(d)
            yield d
