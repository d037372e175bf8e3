"""The validated recipe, in the shape the planner consumes.

``models:`` recipes and ``slices:`` recipes both become lists of ``Source`` with parsed
parameter values and the recipe path each came from (so later phases can cite a line). A
``modules:`` recipe (multimodal models) is one ``Part`` per module, each with its own models
or slices and parameters; a recipe without ``modules:`` is one part covering every module
(``Recipe.parts``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from merge.recipe.params import ParamValue
from merge.recipe.schema import RecipeSchema, TokenizerConfig
from merge.recipe.yamlsrc import Locator, PathKey

if TYPE_CHECKING:  # pragma: no cover
    from merge.methods import Method

Params = dict[str, ParamValue]


@dataclass(frozen=True)
class Source:
    """One input of the merge: a model, its own parameters, and where it was written."""

    model: str
    params: Params
    path: PathKey
    layer_range: tuple[int, int] | None = None


@dataclass(frozen=True)
class SliceSpec:
    """An output slice: sources of equal layer count, merged layer by layer."""

    sources: tuple[Source, ...]
    base_model: str | None
    params: Params
    path: PathKey

    @property
    def length(self) -> int:
        r = self.sources[0].layer_range
        assert r is not None
        return r[1] - r[0]


@dataclass(frozen=True)
class Part:
    """What the output's tensors of one module are made of: whole models or slices, plus the
    module's own parameters (below a slice's, above the top level's in precedence).
    ``module`` is None for a recipe without ``modules:``: the part covers every module."""

    module: str | None
    models: tuple[Source, ...] | None
    slices: tuple[SliceSpec, ...] | None
    params: Params
    path: PathKey

    def sources(self) -> list[Source]:
        """Every source of the part, in recipe order."""
        if self.models is not None:
            return list(self.models)
        return [src for sl in self.slices or () for src in sl.sources]


@dataclass
class Recipe:
    """A recipe that passed schema and method checks."""

    file: Path
    text: str
    loc: Locator
    schema: RecipeSchema
    method: Method
    params: Params
    models: tuple[Source, ...] | None
    slices: tuple[SliceSpec, ...] | None
    base_model: str | None
    warnings: list[str] = field(default_factory=list)
    modules: tuple[Part, ...] | None = None

    @property
    def parts(self) -> tuple[Part, ...]:
        """The recipe's modules, or one part for the whole model."""
        if self.modules is not None:
            return self.modules
        return (Part(None, self.models, self.slices, {}, ()),)

    @property
    def dtype(self) -> str | None:
        return self.schema.dtype

    @property
    def out_dtype(self) -> str | None:
        return self.schema.out_dtype or self.schema.dtype

    @property
    def seed(self) -> int | None:
        return self.schema.seed

    @property
    def tokenizer(self) -> TokenizerConfig | None:
        return self.schema.tokenizer

    @property
    def tokenizer_source(self) -> str | None:
        if self.schema.tokenizer is not None:
            return self.schema.tokenizer.source
        return self.schema.tokenizer_source

    @property
    def chat_template(self) -> str | None:
        return self.schema.chat_template

    @property
    def allow_mismatched_architectures(self) -> bool:
        return bool(self.schema.allow_mismatched_architectures)

    def ref_paths(self) -> dict[str, PathKey]:
        """Every model named in the recipe, base first, each once, in recipe order, with the
        recipe path where it is first written."""
        found: dict[str, PathKey] = {}

        def add(ref: str | None, path: PathKey) -> None:
            if ref and ref not in found:
                found[ref] = path

        add(self.base_model, ("base_model",))
        for part in self.parts:
            for src in part.models or ():
                add(src.model, src.path + ("model",))
            for sl in part.slices or ():
                add(sl.base_model, sl.path + ("base_model",))
                for src in sl.sources:
                    add(src.model, src.path + ("model",))
        tok = self.tokenizer_source
        if tok and tok not in ("base", "union"):
            add(tok, ("tokenizer", "source") if self.tokenizer else ("tokenizer_source",))
        return found

    def model_refs(self) -> list[str]:
        """Every model named in the recipe, base first, each once, in recipe order."""
        return list(self.ref_paths())
