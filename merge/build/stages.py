"""Multi-stage recipes (mergekit-multi's syntax): several recipes in one file, later ones
using earlier ones' outputs as models.

Design
------
A file of several YAML documents (``---`` between them) holds one recipe per document: a
*stage*, a merge or an MoE recipe exactly as it would stand alone, plus a ``name:``. Each stage
is checked by the recipe builder (``merge.recipe.validate.build_recipe``) with a Locator that
holds the file's line numbers, so every message names the line of the file. A stage's
``recipe.text`` is its own document (what its output's ``merge-recipe.yaml`` holds and what its
content key covers).

- Names are folder names (letters, digits, ``.``, ``_``, ``-``): a stage's output is
  ``<intermediate dir>/<name>``. Two stages may not share one.
- The final output (``merge run``'s OUT) is the one stage without a name; at most one stage may
  leave it out. When every stage is named, the final is the last document, which no stage may
  use (nothing could be built after it).
- A model reference whose text (either side of ``base+adapter``) equals a stage name is that
  stage's output, whatever folder or Hub repo the same text could mean. A revision on it, a
  stage using itself and a cycle are errors; so is a bare name that is not a stage, a local
  folder or a Hub id (with a did-you-mean among the stage names).
- ``Stages.stages`` is the order they are built in: dependencies first, otherwise the order of
  the file.

Every problem of every stage (recipe errors included) is raised together as one
``RecipeError``, one ``file:line: path: message`` line each.

What this module does not do: open models, plan or build (``merge.build.multistage``), or
decide whether a stage is up to date.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from merge.errors import RecipeError
from merge.recipe.checks import closest
from merge.recipe.model import Recipe
from merge.recipe.validate import build_recipe
from merge.recipe.yamlsrc import Document, Locator, PathKey, parse_documents, read_text
from merge.sources import ModelRef, find_local, must_be_local

if TYPE_CHECKING:  # pragma: no cover
    from merge.moe.recipe import MoeRecipe

NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


@dataclass
class Stage:
    """One stage: its name (None for the unnamed final stage), its checked recipe, the line
    of its first key, and the stages it uses (name -> recipe path of the first reference)."""

    name: str | None
    recipe: Recipe | MoeRecipe
    line: int
    uses: dict[str, PathKey] = field(default_factory=dict)
    final: bool = False

    @property
    def label(self) -> str:
        """``stage NAME``, ``stage NAME (final)`` or ``final stage``, for messages."""
        if self.name is None:
            return "final stage"
        return f"stage {self.name}" + (" (final)" if self.final else "")


@dataclass
class Stages:
    """A checked multi-stage recipe: ``stages`` in build order, the last built need not be
    the final one (``final``)."""

    file: Path
    text: str
    stages: list[Stage]

    @property
    def names(self) -> frozenset[str]:
        """Every stage name: the references that mean a stage, not a model."""
        return frozenset(s.name for s in self.stages if s.name is not None)

    @property
    def final(self) -> Stage:
        return next(s for s in self.stages if s.final)

    def stage(self, name: str) -> Stage:
        return next(s for s in self.stages if s.name == name)

    def recipes(self) -> list[Recipe | MoeRecipe]:
        """Every stage's recipe, in build order."""
        return [s.recipe for s in self.stages]


def load(path: str | Path) -> Recipe | MoeRecipe | Stages:
    """A recipe file: one recipe (as ``merge.recipe.load_recipe``), or ``Stages`` when it
    holds several documents."""
    path = Path(path)
    text = read_text(path)
    docs = parse_documents(text, str(path))
    if len(docs) > 1:
        return _stages(docs, text, path)
    data, loc = (docs[0].data, docs[0].loc) if docs else (None, Locator(str(path)))
    return build_recipe(data, loc, text, path)


def load_stages(path: str | Path) -> Stages:
    """Read and check a multi-stage recipe (a file of one document is one final stage)."""
    path = Path(path)
    return parse_stages(read_text(path), path)


def parse_stages(text: str, file: str | Path) -> Stages:
    """Check multi-stage recipe text (``file`` is used in messages and to resolve paths)."""
    path = Path(file)
    return _stages(parse_documents(text, str(path)), text, path)


def _stages(docs: list[Document], text: str, path: Path) -> Stages:
    problems: list[str] = []
    names = [_name(doc, problems) for doc in docs]
    _duplicates(docs, names, problems)
    built: list[Stage | None] = []
    for doc, name in zip(docs, names, strict=True):
        if not isinstance(doc.data, dict):
            kind = type(doc.data).__name__
            problems.append(doc.loc.error((), f"a stage must be a recipe (keys), got a {kind}"))
            built.append(None)
            continue
        try:
            recipe = build_recipe(_without_name(doc.data), doc.loc, doc.text, path)
        except RecipeError as e:
            problems.extend(e.problems)
            built.append(None)
            continue
        built.append(Stage(name, recipe, doc.line))
    known = [n for n in names if n is not None]
    stages = [s for s in built if s is not None]
    for stage in stages:
        stage.uses = _uses(stage, known, path.parent, problems)
    _mark_final(docs, names, built, problems)
    order = _order(stages, problems)
    if problems:
        raise RecipeError(list(dict.fromkeys(problems)))
    return Stages(path, text, order)


def _without_name(data: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in data.items() if k != "name"}


def _name(doc: Document, problems: list[str]) -> str | None:
    """The stage's name, checked (None when it has none or it is unusable)."""
    if not isinstance(doc.data, dict) or "name" not in doc.data:
        return None
    name = doc.data["name"]
    if not isinstance(name, str) or not NAME_RE.fullmatch(name):
        problems.append(
            doc.loc.error(
                ("name",),
                "a stage name is a folder name (letters, digits, '.', '_' and '-', starting "
                f"with a letter or digit), got {name!r}",
            )
        )
        return None
    return name


def _duplicates(docs: list[Document], names: list[str | None], problems: list[str]) -> None:
    first: dict[str, int] = {}
    for doc, name in zip(docs, names, strict=True):
        if name is None:
            continue
        line = doc.loc.line(("name",)) or doc.line
        if name in first:
            problems.append(
                doc.loc.error(
                    ("name",),
                    f"stage name '{name}' is given twice (first on line {first[name]}); "
                    "each stage needs a name of its own",
                )
            )
        else:
            first[name] = line


def _uses(
    stage: Stage, known: list[str], recipe_dir: Path, problems: list[str]
) -> dict[str, PathKey]:
    """The stages ``stage`` uses; problems with references that name (or nearly name) one."""
    uses: dict[str, PathKey] = {}
    for text, rpath in stage.recipe.ref_paths().items():
        try:
            ref = ModelRef.parse(text)
        except ValueError:
            continue  # the recipe builder reported it
        for side in (ref.base, ref.lora):
            problem = None if side is None else _side_problem(stage, side, known, recipe_dir)
            if problem is not None:
                problems.append(stage.recipe.loc.error(rpath, problem))
            elif side is not None and side.path in known:
                uses.setdefault(side.path, rpath)
    return uses


def _side_problem(stage: Stage, side: ModelRef, known: list[str], recipe_dir: Path) -> str | None:
    """What is wrong with one side of a reference, as a stage reference, or None."""
    if side.path == stage.name:
        return f"stage '{stage.name}' uses itself; a stage can use only the outputs of other stages"
    if side.path in known and side.revision is not None:
        return (
            f"'{side}' names stage '{side.path}': a revision (@{side.revision}) applies only "
            "to Hub models"
        )
    if side.path not in known and _unknown(side, recipe_dir):
        close = closest(side.path, known)
        hint = f"did you mean {close!r}? " if close else ""
        return (
            f"unknown stage '{side.path}' (nor a local folder or a Hub repo id); {hint}"
            f"(stages: {', '.join(known) or 'none named'})"
        )
    return None


def _unknown(side: ModelRef, recipe_dir: Path) -> bool:
    """A bare name (no ``org/``, not a path) that names no folder: only a stage could be it."""
    path = side.path
    return not (side.is_hub or must_be_local(path) or find_local(path, [recipe_dir]))


def _mark_final(
    docs: list[Document], names: list[str | None], built: list[Stage | None], problems: list[str]
) -> None:
    """The unnamed stage is final (a second one is an error); with every stage named, the
    last document is, and no stage may use it."""
    unnamed = [i for i, d in enumerate(docs) if names[i] is None and _is_unnamed(d)]
    for i in unnamed[1:]:
        first = docs[unnamed[0]].line
        problems.append(
            docs[i].loc.error(
                (),
                f"a second stage without a name (the first starts on line {first}): only the "
                "final stage may leave out name:",
            )
        )
    index = unnamed[0] if unnamed else len(docs) - 1
    final = built[index]
    if final is None:
        return
    final.final = True
    if final.name is None:
        return
    for stage in built:
        if stage is not None and final.name in stage.uses:
            problems.append(
                stage.recipe.loc.error(
                    stage.uses[final.name],
                    f"stage '{final.name}' is the final output (every stage has a name, so the "
                    "last one is final) and no stage can use it; leave out the name: of the "
                    "stage that is the final output",
                )
            )


def _is_unnamed(doc: Document) -> bool:
    return isinstance(doc.data, dict) and "name" not in doc.data


def _order(stages: list[Stage], problems: list[str]) -> list[Stage]:
    """Dependencies first, otherwise file order; a cycle is a problem (the first one found)."""
    names = {s.name for s in stages if s.name is not None}
    done: set[str] = set()
    order: list[Stage] = []
    remaining = list(stages)
    while remaining:
        ready = next((s for s in remaining if set(s.uses) & names <= done), None)
        if ready is None:
            problems.append(_cycle(remaining))
            return order + remaining
        order.append(ready)
        remaining.remove(ready)
        if ready.name is not None:
            done.add(ready.name)
    return order


def _cycle(remaining: list[Stage]) -> str:
    """The message for a cycle among stages that all wait on another of ``remaining``."""
    by_name = {s.name: s for s in remaining if s.name is not None}
    walk: list[Stage] = [remaining[0]]
    while True:
        nxt = by_name[next(d for d in walk[-1].uses if d in by_name)]
        if nxt in walk:
            cycle = walk[walk.index(nxt) :]
            break
        walk.append(nxt)
    start = min(range(len(cycle)), key=lambda i: remaining.index(cycle[i]))
    cycle = cycle[start:] + cycle[:start]
    first, second = cycle[0], cycle[1 % len(cycle)]
    chain = " -> ".join(f"'{s.name}'" for s in [*cycle, first])
    return first.recipe.loc.error(
        first.uses[str(second.name)],
        f"stages form a cycle: {chain}; a stage can use only stages built before it",
    )
