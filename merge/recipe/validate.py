"""From parsed YAML to a checked ``Recipe``: schema errors and method rules, all at once.

Every problem found is collected and raised together as one ``RecipeError`` whose lines read
``recipe.yaml:14: models[1].parameters.density: must be in (0, 1], got 1.5``. Nothing here
touches the filesystem beyond the recipe itself: model references are checked for syntax only.
"""

from __future__ import annotations

import difflib
import types
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Union

from pydantic import BaseModel, ValidationError

from merge.errors import RecipeError
from merge.methods import REQUIRED, Method, Param, get_method, method_names, suggest
from merge.methods.registry import METHODS
from merge.recipe.model import Params, Recipe, SliceSpec, Source
from merge.recipe.params import parse_value
from merge.recipe.schema import RecipeSchema
from merge.recipe.yamlsrc import Locator, PathKey

if typing.TYPE_CHECKING:  # pragma: no cover
    from merge.moe.recipe import MoeRecipe

CHAT_TEMPLATES = ("auto", "alpaca", "chatml", "llama3", "mistral")
MOE_KEYS = ("experts", "gate_mode", "experts_per_token", "shared_experts")


def _did_you_mean(word: str, allowed: Sequence[str]) -> str:
    close = difflib.get_close_matches(word, allowed, n=1, cutoff=0.6)
    hint = f"did you mean {close[0]!r}? " if close else ""
    return f"{hint}(allowed: {', '.join(allowed)})"


def _unwrap(ann: Any) -> Any:
    """Strip Optional/Annotated wrappers from a type annotation."""
    while True:
        origin = typing.get_origin(ann)
        if origin is typing.Annotated:
            ann = typing.get_args(ann)[0]
        elif origin in (Union, types.UnionType):
            args = [a for a in typing.get_args(ann) if a is not type(None)]
            ann = args[0] if len(args) == 1 else ann
            if len(args) != 1:
                return ann
        else:
            return ann


def _fields_at(loc: Sequence[str | int], root: Any = RecipeSchema) -> list[str]:
    """Allowed keys of the schema object at ``loc`` (for did-you-mean on unknown keys)."""
    ann: Any = root
    for part in loc:
        ann = _unwrap(ann)
        origin = typing.get_origin(ann)
        if isinstance(ann, type) and issubclass(ann, BaseModel) and isinstance(part, str):
            if part not in ann.model_fields:
                return []
            ann = ann.model_fields[part].annotation
        elif origin in (list, tuple) and isinstance(part, int):
            ann = typing.get_args(ann)[0]
        elif origin is dict:
            ann = typing.get_args(ann)[1]
        else:
            return []
    ann = _unwrap(ann)
    if isinstance(ann, type) and issubclass(ann, BaseModel):
        return list(ann.model_fields)
    return []


def _pydantic_problem(err: Any, loc: Locator, root: Any = RecipeSchema) -> str:
    path = tuple(err["loc"])
    kind = err["type"]
    if kind == "extra_forbidden":
        return loc.error(
            path, "unknown key; " + _did_you_mean(str(path[-1]), _fields_at(path[:-1], root))
        )
    if kind == "missing":
        return loc.error(path, "required key is missing")
    msg = str(err["msg"])
    msg = msg.removeprefix("Value error, ")
    msg = msg.replace("Input should be", "must be").replace("Input", "value")
    if " or instance of " in msg:
        msg = msg.split(" or instance of ")[0]
    value = err.get("input")
    if kind != "value_error" and not isinstance(value, (dict, list)) and "got" not in msg:
        msg += f", got {value!r}"
    return loc.error(path, msg)


def _parse_params(
    raw: dict[str, Any] | None, path: PathKey, loc: Locator, problems: list[str]
) -> Params:
    out: Params = {}
    for name, value in (raw or {}).items():
        parsed, errs = parse_value(value)
        for sub, msg in errs:
            problems.append(loc.error(path + (name,) + sub, msg))
        if parsed is not None:
            out[str(name)] = parsed
    return out


def _all_param_names() -> set[str]:
    return {p.name for m in METHODS.values() for p in m.params}


def _check_params(
    params: Params,
    path: PathKey,
    method: Method,
    per_model_level: bool,
    loc: Locator,
    problems: list[str],
    warnings: list[str],
) -> None:
    """Names known to the method, placed where they act, and values of the right type/range."""
    known_elsewhere = _all_param_names()
    for name, value in params.items():
        p = method.param(name)
        where = path + (name,)
        if p is None:
            if name in known_elsewhere:
                warnings.append(loc.error(where, f"{method.name} does not use '{name}'; ignored"))
            else:
                allowed = [q.name for q in method.params]
                problems.append(
                    loc.error(
                        where,
                        f"unknown parameter for {method.name}; " + _did_you_mean(name, allowed),
                    )
                )
            continue
        if per_model_level and not p.per_model:
            warnings.append(
                loc.error(
                    where,
                    f"'{name}' is a global parameter of {method.name}: it has no "
                    "effect here; put it under the top-level or slice parameters",
                )
            )
        for sub, leaf in value.leaves():
            msg = p.check(leaf)
            if msg:
                problems.append(loc.error(where + sub, msg))


def _has(name: str, levels: Sequence[Params]) -> bool:
    return any(name in lv for lv in levels)


def _check_required(
    method: Method,
    inputs: Sequence[Source],
    outer: Sequence[Params],
    at: PathKey,
    base: str | None,
    loc: Locator,
    problems: list[str],
) -> None:
    for p in method.params:
        if p.default is not REQUIRED:
            continue
        if not p.per_model:
            if not _has(p.name, outer):
                problems.append(
                    loc.error(
                        at,
                        f"{method.name} needs the global parameter "
                        f"'{p.name}' ({_describe(p)}) under parameters:",
                    )
                )
            continue
        for src in inputs:
            if _has(p.name, [src.params, *outer]):
                continue
            hint = ""
            if src.model == base and method.base == "input":
                hint = (
                    f"; {method.name} merges base_model like any other model, so give it "
                    f"a weight too, or drop base_model"
                )
            problems.append(
                loc.error(
                    src.path,
                    f"model '{src.model}' needs the parameter "
                    f"'{p.name}' ({_describe(p)}) for {method.name}{hint}",
                )
            )


def _describe(p: Param) -> str:
    rng = p.describe_range()
    if p.kind in (bool, str):
        return p.describe_choices()
    kind = {int: "an integer", float: "a number"}.get(p.kind, p.kind.__name__)
    return f"{kind} in {rng}" if rng else kind


def method_inputs(method: Method, sources: Sequence[Source], base: str | None) -> list[Source]:
    """The sources that the method takes as per-model inputs (the base, when separate, not)."""
    if method.base in ("required", "optional"):
        return [s for s in sources if s.model != base]
    if method.base == "input" and base and all(s.model != base for s in sources):
        return [*sources, Source(base, {}, ("base_model",))]
    return list(sources)


def _check_inputs(
    method: Method,
    sources: Sequence[Source],
    outer: Sequence[Params],
    base: str | None,
    at: PathKey,
    loc: Locator,
    problems: list[str],
) -> None:
    if method.base == "required":
        if not base:
            problems.append(
                loc.error(
                    at,
                    f"{method.name} needs base_model: the model the others "
                    "are merged relative to (one of the models)",
                )
            )
            return
    inputs = method_inputs(method, sources, base)
    n, lo, hi = len(inputs), method.min_models, method.max_models
    if n < lo or (hi is not None and n > hi):
        want = f"exactly {lo}" if lo == hi else f"at least {lo}" if hi is None else f"{lo} to {hi}"
        separate = method.base == "required" or (method.base == "optional" and base)
        besides = " besides the base model" if separate else ""
        problems.append(loc.error(at, f"{method.name} takes {want} model(s){besides}, got {n}"))
    _check_required(method, inputs, outer, at, base, loc, problems)


def _source(raw: Any, path: PathKey, loc: Locator, problems: list[str]) -> Source:
    params = _parse_params(raw.parameters, path + ("parameters",), loc, problems)
    layer_range = tuple(raw.layer_range) if getattr(raw, "layer_range", None) else None
    return Source(raw.model, params, path, layer_range)  # type: ignore[arg-type]


def _slices(
    schema: RecipeSchema,
    method: Method,
    top: Params,
    loc: Locator,
    problems: list[str],
    warnings: list[str],
) -> tuple[SliceSpec, ...]:
    out: list[SliceSpec] = []
    for i, sl in enumerate(schema.slices or ()):
        path: PathKey = ("slices", i)
        params = _parse_params(sl.parameters, path + ("parameters",), loc, problems)
        _check_params(params, path + ("parameters",), method, False, loc, problems, warnings)
        sources = []
        for j, raw in enumerate(sl.sources):
            src = _source(raw, path + ("sources", j), loc, problems)
            _check_params(
                src.params, src.path + ("parameters",), method, True, loc, problems, warnings
            )
            sources.append(src)
        lengths = {s.layer_range[1] - s.layer_range[0] for s in sources if s.layer_range}
        if len(lengths) > 1:
            ranges = ", ".join(f"{list(s.layer_range or ())}" for s in sources)
            problems.append(
                loc.error(
                    path + ("sources",),
                    f"all sources of a slice need layer ranges of the same length, got {ranges}",
                )
            )
        base = sl.base_model or schema.base_model
        separate = method.base == "required" or (method.base == "optional" and base)
        if separate and base and all(s.model != base for s in sources):
            problems.append(
                loc.error(
                    path + ("sources",),
                    f"{method.name} needs the base model '{base}' among the sources of every slice",
                )
            )
        else:
            _check_inputs(method, sources, [params, top], base, path, loc, problems)
        out.append(SliceSpec(tuple(sources), sl.base_model or schema.base_model, params, path))
    return tuple(out)


def _check_extras(schema: RecipeSchema, loc: Locator, problems: list[str]) -> None:
    from merge.sources import ModelRef

    tok = schema.tokenizer.source if schema.tokenizer else schema.tokenizer_source
    tok_path: PathKey = ("tokenizer", "source") if schema.tokenizer else ("tokenizer_source",)
    if tok is not None and tok not in ("base", "union"):
        try:
            ModelRef.parse(tok)
        except ValueError as e:
            problems.append(loc.error(tok_path, f"must be base, union or a model: {e}"))
    if schema.tokenizer is not None and schema.tokenizer_source is not None:
        problems.append(
            loc.error(
                ("tokenizer_source",),
                "give either tokenizer_source or a tokenizer: block, not both",
            )
        )
    ct = schema.chat_template
    if ct is not None and ct not in CHAT_TEMPLATES and "{{" not in ct and "{%" not in ct:
        problems.append(
            loc.error(
                ("chat_template",),
                f"must be one of {', '.join(CHAT_TEMPLATES)} or a Jinja template, got {ct!r}",
            )
        )


def build_recipe(data: Any, loc: Locator, text: str, file: Path) -> Recipe | MoeRecipe:
    """Validate parsed YAML against the schema and the chosen method; raise all problems.
    A mergekit-moe recipe (``experts:`` without ``merge_method``) becomes a ``MoeRecipe``."""
    if not isinstance(data, dict):
        kind = "empty" if data is None else f"a {type(data).__name__}"
        raise RecipeError(
            f"{loc.file}: a recipe must be a mapping of keys (merge_method, "
            f"models or slices, ...), got {kind}"
        )
    if any(k in data for k in MOE_KEYS) and "merge_method" not in data:
        from merge.moe.recipe import build_moe_recipe

        return build_moe_recipe(data, loc, text, file)
    try:
        schema = RecipeSchema.model_validate(data)
    except ValidationError as e:
        raise RecipeError([_pydantic_problem(err, loc) for err in e.errors()]) from None
    problems: list[str] = []
    warnings: list[str] = []
    try:
        method = get_method(schema.merge_method)
    except KeyError:
        close = suggest(schema.merge_method)
        hint = f"did you mean {close!r}? " if close else ""
        raise RecipeError(
            loc.error(
                ("merge_method",),
                f"unknown merge method "
                f"{schema.merge_method!r}; {hint}(allowed: "
                f"{', '.join(method_names())})",
            )
        ) from None
    top = _parse_params(schema.parameters, ("parameters",), loc, problems)
    _check_params(top, ("parameters",), method, False, loc, problems, warnings)
    models = slices = None
    if (schema.models is None) == (schema.slices is None):
        problems.append(
            loc.error((), "give exactly one of models: (whole models) or slices: (layer ranges)")
        )
    elif schema.models is not None:
        models = tuple(
            _source(m, ("models", i), loc, problems) for i, m in enumerate(schema.models)
        )
        for src in models:
            _check_params(
                src.params, src.path + ("parameters",), method, True, loc, problems, warnings
            )
        _check_inputs(method, models, [top], schema.base_model, ("models",), loc, problems)
    else:
        slices = _slices(schema, method, top, loc, problems, warnings)
    _check_extras(schema, loc, problems)
    if problems:
        raise RecipeError(list(dict.fromkeys(problems)))
    return Recipe(file, text, loc, schema, method, top, models, slices, schema.base_model, warnings)
