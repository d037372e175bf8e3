"""Open every model a recipe names: resolve references, read headers, report all failures.

``open_models(recipe)`` gives one ``Model`` per distinct reference, in recipe order (base
first). Problems from every model are collected and raised together, each prefixed with the
recipe line that names the model. The whole call is one ``merge.hub.hub_run``: the Hub is
probed at most once, and once it is unreachable every Hub model comes from the cache only.

A ``base+adapter`` reference opens the base's checkpoint wrapped in a ``LoraCheckpoint``
(``merge.lora``), which reads the adapter and checks it against the base's headers now; the
model's ``directory`` is the base's folder (config, tokenizer and generation config come from
it) and ``adapter`` the adapter's.

Inside ``planned_checkpoints`` a folder that is a key is opened by its function instead of
read from disk: a multi-stage recipe's planned stage output (``merge.build.multistage``), whose
headers come from its plan because its tensors do not exist yet.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING

from merge.checkpoint import Checkpoint
from merge.errors import MergeError, SourceError
from merge.hub import hub_run
from merge.lora import LoraCheckpoint
from merge.recipe import Recipe

if TYPE_CHECKING:  # pragma: no cover
    from merge.moe.recipe import MoeRecipe
from merge.sources import ModelRef, resolve_pair


@dataclass
class Model:
    """One resolved input model."""

    ref: str
    directory: Path
    checkpoint: Checkpoint | LoraCheckpoint
    adapter: Path | None = None


_PLANNED: ContextVar[Mapping[Path, Callable[[str], Checkpoint]]] = ContextVar(
    "merge_planned_checkpoints", default=MappingProxyType({})
)


@contextmanager
def planned_checkpoints(openers: Mapping[Path, Callable[[str], Checkpoint]]) -> Iterator[None]:
    """Inside the block a model whose folder is a key is opened as ``openers[folder](label)``."""
    token = _PLANNED.set(dict(openers))
    try:
        yield
    finally:
        _PLANNED.reset(token)


def open_models(recipe: Recipe | MoeRecipe) -> dict[str, Model]:
    """Resolve and open every model of the recipe (headers only)."""
    paths = recipe.ref_paths()
    models: dict[str, Model] = {}
    problems: list[str] = []
    with hub_run():
        for ref in paths:
            try:
                models[ref] = _open(ref, recipe.file.parent)
            except MergeError as e:
                where = recipe.loc.where(paths[ref])
                problems.extend(f"{where}: {p}" for p in e.problems)
    if problems:
        for m in models.values():
            m.checkpoint.close()
        raise SourceError(problems)
    return models


def _open(text: str, recipe_dir: Path) -> Model:
    ref = ModelRef.parse(text)
    directory, adapter = resolve_pair(ref, search_dirs=[recipe_dir])
    opener = _PLANNED.get().get(directory)
    base = opener(text) if opener is not None else Checkpoint.open(directory, label=text)
    if adapter is None or ref.lora is None:
        return Model(text, directory, base)
    try:
        ckpt = LoraCheckpoint.open(
            base, adapter, label=text, base_label=str(ref.base), adapter_label=str(ref.lora)
        )
    except BaseException:
        base.close()
        raise
    return Model(text, directory, ckpt, adapter)


def close_models(models: dict[str, Model]) -> None:
    for m in models.values():
        m.checkpoint.close()


def iter_unique_dirs(models: dict[str, Model]) -> Iterator[Path]:
    """Every input folder once: each model's, then its adapter's."""
    seen: set[Path] = set()
    for m in models.values():
        for folder in (m.directory, m.adapter):
            d = folder.resolve() if folder is not None else None
            if d is not None and d not in seen:
                seen.add(d)
                yield d
