"""From parsed YAML to a checked ``Recipe``: schema errors and method rules, all at once.

Every problem found is collected and raised together as one ``RecipeError`` whose lines read
``recipe.yaml:14: models[1].parameters.density: must be in (0, 1], got 1.5``. Nothing here
touches the filesystem beyond the recipe itself: model references are checked for syntax only.
The recipe's parts (``models``, ``slices`` or ``modules``) are built by ``merge.recipe.parts``
with the checks of ``merge.recipe.checks``. Configs of other mergekit tools (evolve's
``genome:``/``tasks:``) get one line naming the feature, never "unknown key".
"""

from __future__ import annotations

import types
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Union

from pydantic import BaseModel, ValidationError

from merge.errors import RecipeError
from merge.methods import get_method, method_names, suggest
from merge.recipe.checks import check_params, did_you_mean, parse_params
from merge.recipe.model import Recipe
from merge.recipe.parts import build_parts
from merge.recipe.schema import RecipeSchema
from merge.recipe.yamlsrc import Locator, PathKey
from merge.tokenizer import TEMPLATES

if typing.TYPE_CHECKING:  # pragma: no cover
    from merge.moe.recipe import MoeRecipe

CHAT_TEMPLATES = ("auto", *sorted(TEMPLATES))
MOE_KEYS = ("experts", "gate_mode", "experts_per_token", "shared_experts")
# Keys of configs for other mergekit tools: one line each, naming the command that runs them.
NOT_SUPPORTED = {
    "genome": "a mergekit-evolve config (genome:, tasks:): run it with merge evolve",
    "tasks": "a mergekit-evolve config (genome:, tasks:): run it with merge evolve",
}


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
            path, "unknown key; " + did_you_mean(str(path[-1]), _fields_at(path[:-1], root))
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
    if schema.tokenizer and "" in (schema.tokenizer.tokens or {}):
        line = loc.line(("tokenizer", "tokens", ""))
        problems.append(f"{loc.file}:{line}: tokenizer.tokens: a token name must not be empty")
    ct = schema.chat_template
    if ct is not None and ct not in CHAT_TEMPLATES and "{{" not in ct and "{%" not in ct:
        problems.append(
            loc.error(
                ("chat_template",),
                f"must be one of {', '.join(CHAT_TEMPLATES)} or a Jinja template, got {ct!r}",
            )
        )
    elif ct is not None and ct not in CHAT_TEMPLATES:
        _check_jinja(ct, loc, problems)


def _check_jinja(template: str, loc: Locator, problems: list[str]) -> None:
    """A recipe's own chat template must parse (it is parsed, never rendered, here), or the
    output's tokenizer would fail at its first ``apply_chat_template``."""
    import jinja2  # transformers' dependency; imported only when a recipe has a template

    try:
        jinja2.Environment().parse(template)
    except jinja2.TemplateSyntaxError as e:
        problems.append(
            loc.error(
                ("chat_template",),
                f"not a valid Jinja template: {e.message} (line {e.lineno} of the template)",
            )
        )


def _not_supported(data: dict[str, Any], loc: Locator) -> None:
    """One line per key of a mergekit tool's config that we do not run yet."""
    found = [key for key in data if key in NOT_SUPPORTED]
    if found:
        messages = dict.fromkeys(NOT_SUPPORTED[key] for key in found)
        first = {NOT_SUPPORTED[key]: key for key in reversed(found)}
        raise RecipeError(
            [loc.error((first[m],), f"{m}; this file is not a merge recipe") for m in messages]
        )


def _name_warning(data: dict[str, Any], loc: Locator) -> list[str]:
    """mergekit-multi names each stage of a multi-stage recipe; one recipe ignores it."""
    if "name" not in data:
        return []
    return [
        loc.error(
            ("name",),
            "names a stage of a mergekit-multi recipe; a single recipe ignores it",
        )
    ]


def _method(schema: RecipeSchema, loc: Locator) -> Any:
    try:
        return get_method(schema.merge_method)
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


def build_recipe(data: Any, loc: Locator, text: str, file: Path) -> Recipe | MoeRecipe:
    """Validate parsed YAML against the schema and the chosen method; raise all problems.
    A mergekit-moe recipe (``experts:`` without ``merge_method``) becomes a ``MoeRecipe``."""
    if not isinstance(data, dict):
        kind = "empty" if data is None else f"a {type(data).__name__}"
        raise RecipeError(
            f"{loc.file}: a recipe must be a mapping of keys (merge_method, "
            f"models or slices, ...), got {kind}"
        )
    _not_supported(data, loc)
    warnings = _name_warning(data, loc)
    data = {k: v for k, v in data.items() if k != "name"}
    if any(k in data for k in MOE_KEYS) and "merge_method" not in data:
        from merge.moe.recipe import build_moe_recipe

        moe = build_moe_recipe(data, loc, text, file)
        moe.warnings[:0] = warnings
        return moe
    try:
        schema = RecipeSchema.model_validate(data)
    except ValidationError as e:
        raise RecipeError([_pydantic_problem(err, loc) for err in e.errors()]) from None
    problems: list[str] = []
    method = _method(schema, loc)
    top = parse_params(schema.parameters, ("parameters",), loc, problems)
    check_params(top, ("parameters",), method, False, loc, problems, warnings)
    whole, modules = build_parts(schema, method, top, loc, problems, warnings)
    _check_extras(schema, loc, problems)
    if problems:
        raise RecipeError(list(dict.fromkeys(problems)))
    models = whole.models if whole else None
    slices = whole.slices if whole else None
    return Recipe(
        file, text, loc, schema, method, top, models, slices, schema.base_model, warnings, modules
    )
