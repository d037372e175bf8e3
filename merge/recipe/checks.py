"""Checks shared by every part of a merge recipe: parameter names and values against the
method, and the inputs a method takes (count, base model, required parameters).

Each check appends one-line problems (``file:line: path: message``) to a list, so a recipe's
problems are all reported together; warnings (parameters another method uses, global
parameters written under a model) go to a second list.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Sequence
from typing import Any

from merge.methods import REQUIRED, Method, Param
from merge.methods.registry import METHODS
from merge.recipe.model import Params, Source
from merge.recipe.params import parse_value
from merge.recipe.yamlsrc import Locator, PathKey, format_path


def closest(word: str, allowed: Sequence[str]) -> str | None:
    """The allowed word ``word`` most likely misspells: one with the same letters (a
    transposition, ``modles`` -> ``models``) first, else difflib's closest, else None."""
    same = [a for a in allowed if sorted(a) == sorted(word) and a != word]
    if same:
        return same[0]
    close = difflib.get_close_matches(word, allowed, n=1, cutoff=0.6)
    return close[0] if close else None


def did_you_mean(word: str, allowed: Sequence[str]) -> str:
    close = closest(word, allowed)
    hint = f"did you mean {close!r}? " if close else ""
    return f"{hint}(allowed: {', '.join(allowed)})"


def parse_params(
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


def check_params(
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
                        f"unknown parameter for {method.name}; " + did_you_mean(name, allowed),
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


def _reported(problems: Sequence[str], path: PathKey, loc: Locator) -> bool:
    """Whether a problem was already reported at ``path`` or below it (a value given but
    invalid is dropped from the parameters; it is not also "missing")."""
    where = re.escape(loc.file) + r"(:\d+)?: " + re.escape(format_path(path)) + r"[:\[.]"
    return any(re.match(where, p) for p in problems)


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
                        f"'{p.name}' ({describe(p)}) under parameters:",
                    )
                )
            continue
        for src in inputs:
            if _has(p.name, [src.params, *outer]):
                continue
            if _reported(problems, (*src.path, "parameters", p.name), loc):
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
                    f"'{p.name}' ({describe(p)}) for {method.name}{hint}",
                )
            )


def describe(p: Param) -> str:
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


def check_inputs(
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
