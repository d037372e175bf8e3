"""Open every model a recipe names: resolve references, read headers, report all failures.

``open_models(recipe)`` gives one ``Model`` per distinct reference, in recipe order (base
first). Problems from every model are collected and raised together, each prefixed with the
recipe line that names the model. The whole call is one ``merge.hub.hub_run``: the Hub is
probed at most once, and once it is unreachable every Hub model comes from the cache only.

A ``base+adapter`` reference opens the base's checkpoint wrapped in a ``LoraCheckpoint``
(``merge.lora``), which reads the adapter and checks it against the base's headers now; the
model's ``directory`` is the base's folder (config, tokenizer and generation config come from
it) and ``adapter`` the adapter's.

``open_models(recipe, headers_only=True)`` (the plan phase) opens a Hub model whose weights are
not in the cache as a ``merge.hub.RemoteCheckpoint``: small files in its cache snapshot (the
model's ``directory``), headers read from the Hub, ``remote`` set. ``with_weights`` downloads
those weights and gives the models again, opened from the files and checked against the
headers that were planned.

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
from merge.hub import (
    RemoteCheckpoint,
    RemoteModel,
    check_downloaded,
    download_weights,
    hub_run,
)
from merge.lora import LoraCheckpoint
from merge.recipe import Recipe

if TYPE_CHECKING:  # pragma: no cover
    from merge.moe.recipe import MoeRecipe
from merge.sources import ModelRef, locate_pair


@dataclass
class Model:
    """One resolved input model."""

    ref: str
    directory: Path
    checkpoint: Checkpoint | LoraCheckpoint
    adapter: Path | None = None
    remote: RemoteModel | None = None  # weights still on the Hub (``headers_only``)


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


def open_models(recipe: Recipe | MoeRecipe, *, headers_only: bool = False) -> dict[str, Model]:
    """Resolve and open every model of the recipe (headers only). With ``headers_only`` the
    weights of Hub models that are not in the cache are not downloaded: their headers are
    read from the Hub, and their tensors cannot be read (``with_weights`` first)."""
    paths = recipe.ref_paths()
    models: dict[str, Model] = {}
    problems: list[str] = []
    with hub_run():
        for ref in paths:
            try:
                models[ref] = _open(ref, recipe.file.parent, headers_only)
            except MergeError as e:
                where = recipe.loc.where(paths[ref])
                problems.extend(f"{where}: {p}" for p in e.problems)
    if problems:
        for m in models.values():
            m.checkpoint.close()
        raise SourceError(problems)
    return models


def _open(text: str, recipe_dir: Path, headers_only: bool) -> Model:
    ref = ModelRef.parse(text)
    located, adapter = locate_pair(ref, search_dirs=[recipe_dir], headers_only=headers_only)
    remote = located if isinstance(located, RemoteModel) else None
    base: Checkpoint
    if isinstance(located, RemoteModel):
        directory, base = located.folder, RemoteCheckpoint.open_remote(located, label=text)
    else:
        directory = located
        opener = _PLANNED.get().get(directory)
        base = opener(text) if opener is not None else Checkpoint.open(directory, label=text)
    if adapter is None or ref.lora is None:
        return Model(text, directory, base, remote=remote)
    try:
        ckpt = LoraCheckpoint.open(
            base, adapter, label=text, base_label=str(ref.base), adapter_label=str(ref.lora)
        )
    except BaseException:
        base.close()
        raise
    return Model(text, directory, ckpt, adapter, remote)


def remote_models(models: dict[str, Model]) -> list[RemoteModel]:
    """The models whose weights are still on the Hub, in recipe order."""
    return [m.remote for m in models.values() if m.remote is not None]


def with_weights(models: dict[str, Model], *, progress: bool = True) -> dict[str, Model]:
    """Download the weights of the models that have ``remote`` set, and give every model again:
    those opened from the downloaded files (checked against the planned headers), the others
    as they are. The caller closes both sets."""
    download_weights(remote_models(models), progress=progress)
    opened: dict[str, Model] = {}
    try:
        for ref, m in models.items():
            opened[ref] = m if m.remote is None else _reopen(m)
    except BaseException:
        close_models({r: m for r, m in opened.items() if m.remote is not None})
        raise
    return opened


def _reopen(m: Model) -> Model:
    """A downloaded model from its files; a LoRA adapter read once is applied again."""
    planned = m.checkpoint.base if isinstance(m.checkpoint, LoraCheckpoint) else m.checkpoint
    assert isinstance(planned, RemoteCheckpoint)
    base = Checkpoint.open(m.directory, label=planned.label)
    try:
        check_downloaded(planned, base)
    except BaseException:
        base.close()
        raise
    if isinstance(m.checkpoint, LoraCheckpoint):
        ckpt: Checkpoint | LoraCheckpoint = LoraCheckpoint(base, m.checkpoint.adapter, m.ref)
    else:
        ckpt = base
    return Model(m.ref, m.directory, ckpt, m.adapter)


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
