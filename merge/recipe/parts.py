"""The parts of a merge recipe: ``models:``, ``slices:`` or ``modules:``, checked against the
method.

``build_parts`` turns the schema's inputs into ``Source``/``SliceSpec`` values with parsed
parameters. A recipe gives exactly one of ``models`` (whole models), ``slices`` (layer ranges)
or ``modules`` (mergekit's per-module syntax for multimodal models: each module, e.g.
``text_decoder`` or ``vision_tower``, gives exactly one of ``models`` or ``slices`` and may
have ``parameters`` of its own). Parameter precedence, highest first: a source's own, the
slice's, the module's, the top level's. Which modules a model has is only known from its
tensors, so module names are checked at plan time (``merge.modules``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from merge.methods import Method
from merge.recipe.checks import check_inputs, check_params, parse_params
from merge.recipe.model import Params, Part, SliceSpec, Source
from merge.recipe.schema import RecipeSchema
from merge.recipe.yamlsrc import Locator, PathKey


class _Checker:
    """The method and the problem and warning lists every part is checked into."""

    def __init__(
        self, method: Method, loc: Locator, problems: list[str], warnings: list[str]
    ) -> None:
        self.method, self.loc, self.problems, self.warnings = method, loc, problems, warnings

    def params(self, raw: dict[str, Any] | None, path: PathKey, per_model: bool) -> Params:
        parsed = parse_params(raw, path, self.loc, self.problems)
        check_params(parsed, path, self.method, per_model, self.loc, self.problems, self.warnings)
        return parsed

    def source(self, raw: Any, path: PathKey) -> Source:
        params = self.params(raw.parameters, path + ("parameters",), True)
        layer_range = tuple(raw.layer_range) if getattr(raw, "layer_range", None) else None
        return Source(raw.model, params, path, layer_range)  # type: ignore[arg-type]

    def models(
        self, raw: Sequence[Any], path: PathKey, outer: Sequence[Params], base: str | None
    ) -> tuple[Source, ...]:
        sources = tuple(self.source(m, path + (i,)) for i, m in enumerate(raw))
        check_inputs(self.method, sources, outer, base, path, self.loc, self.problems)
        return sources

    def slices(
        self, raw: Sequence[Any], path: PathKey, outer: Sequence[Params], base: str | None
    ) -> tuple[SliceSpec, ...]:
        return tuple(self.slice(sl, path + (i,), outer, base) for i, sl in enumerate(raw))

    def slice(
        self, sl: Any, path: PathKey, outer: Sequence[Params], top_base: str | None
    ) -> SliceSpec:
        method, loc = self.method, self.loc
        params = self.params(sl.parameters, path + ("parameters",), False)
        if sl.residual_weight is not None:
            self.warnings.append(
                loc.error(
                    path + ("residual_weight",),
                    "has no effect (mergekit accepts and ignores it too); remove it",
                )
            )
        sources = [self.source(raw, path + ("sources", j)) for j, raw in enumerate(sl.sources)]
        lengths = {s.layer_range[1] - s.layer_range[0] for s in sources if s.layer_range}
        if len(lengths) > 1:
            ranges = ", ".join(f"{list(s.layer_range or ())}" for s in sources)
            self.problems.append(
                loc.error(
                    path + ("sources",),
                    f"all sources of a slice need layer ranges of the same length, got {ranges}",
                )
            )
        base = sl.base_model or top_base
        separate = method.base == "required" or (method.base == "optional" and base)
        if separate and base and all(s.model != base for s in sources):
            self.problems.append(
                loc.error(
                    path + ("sources",),
                    f"{method.name} needs the base model '{base}' among the sources of every slice",
                )
            )
        else:
            check_inputs(method, sources, [params, *outer], base, path, loc, self.problems)
        return SliceSpec(tuple(sources), base, params, path)

    def part(
        self, raw: Any, path: PathKey, module: str | None, top: Params, base: str | None
    ) -> Part | None:
        """One module's (or the whole recipe's) models or slices; None if it gives neither
        or both (reported)."""
        params = self.params(raw.parameters, path + ("parameters",), False) if module else {}
        outer = [params, top] if module else [top]
        if (raw.models is None) == (raw.slices is None):
            what = f"module '{module}'" if module else "a recipe"
            extra = "" if module else ", or modules: (per module, for multimodal models)"
            self.problems.append(
                self.loc.error(
                    path,
                    f"{what} needs exactly one of models: (whole models) or slices: "
                    f"(layer ranges){extra}",
                )
            )
            return None
        if raw.models is not None:
            models = self.models(raw.models, path + ("models",), outer, base)
            return Part(module, models, None, params, path)
        slices = self.slices(raw.slices, path + ("slices",), outer, base)
        return Part(module, None, slices, params, path)


def build_parts(
    schema: RecipeSchema,
    method: Method,
    top: Params,
    loc: Locator,
    problems: list[str],
    warnings: list[str],
) -> tuple[Part | None, tuple[Part, ...] | None]:
    """(the whole-model part, None) for ``models:``/``slices:`` recipes, (None, the module
    parts) for ``modules:`` recipes; problems and warnings are appended."""
    check = _Checker(method, loc, problems, warnings)
    given = [k for k in ("models", "slices", "modules") if getattr(schema, k) is not None]
    if len(given) != 1:
        problems.append(
            loc.error(
                (),
                "give exactly one of models: (whole models), slices: (layer ranges) or "
                "modules: (per module, for multimodal models); got "
                + (" and ".join(given) or "none"),
            )
        )
        return None, None
    if schema.modules is None:
        return check.part(schema, (), None, top, schema.base_model), None
    parts = []
    for name, raw in schema.modules.items():
        found = check.part(raw, ("modules", name), name, top, schema.base_model)
        if found is not None:
            parts.append(found)
    return None, tuple(parts)
