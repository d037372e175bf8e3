"""Parameter values: scalars, gradients and filter lists, and how a tensor picks its value.

A value in a recipe is a scalar (``0.5``), a gradient (``[0, 0.5, 1]``, interpolated over the
layers) or a list of filters (``[{filter: self_attn, value: ...}, {value: ...}]``: the first
entry whose filter is a substring of the tensor name wins; no filter, or ``"*"``, matches all).
Semantics follow the design notes (METHODS.md): for layer ``l`` of ``L``, ``t = l/(L-1)``,
``s = t*(n-1)``, linear interpolation between entries ``floor(s)`` and ``ceil(s)``; tensors
outside the layers take the first entry.

This module is pure: parsing reports problems as strings, resolution is arithmetic.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from merge.methods.base import finite_problem

Scalar = bool | int | float | str


@dataclass(frozen=True)
class Gradient:
    """A list of numbers interpolated across the layers."""

    values: tuple[float, ...]

    def at(self, layer: int | None, num_layers: int) -> float:
        n = len(self.values)
        if layer is None or n == 1 or num_layers <= 1:
            return float(self.values[0])
        t = layer / (num_layers - 1)
        s = t * (n - 1)
        lo = min(int(math.floor(s)), n - 1)
        hi = min(int(math.ceil(s)), n - 1)
        frac = s - lo
        return float(self.values[lo]) * (1 - frac) + float(self.values[hi]) * frac


Leaf = Scalar | Gradient


@dataclass(frozen=True)
class Rule:
    """One filter entry: ``filter`` None matches every tensor."""

    filter: str | None
    value: Leaf

    def matches(self, tensor: str) -> bool:
        return self.filter is None or self.filter == "*" or self.filter in tensor


@dataclass(frozen=True)
class ParamValue:
    """A parsed parameter value: a list of rules (a plain value is one catch-all rule)."""

    rules: tuple[Rule, ...]

    def at(self, tensor: str, layer: int | None, num_layers: int) -> Scalar | None:
        """The value for ``tensor`` in ``layer`` of ``num_layers``; None if no rule matches."""
        for rule in self.rules:
            if rule.matches(tensor):
                v = rule.value
                return v.at(layer, num_layers) if isinstance(v, Gradient) else v
        return None

    def leaves(self) -> Iterator[tuple[tuple[int | str, ...], Scalar]]:
        """Every scalar the value can produce, with its sub-path (for type and range checks)."""
        single = len(self.rules) == 1 and self.rules[0].filter is None
        for i, rule in enumerate(self.rules):
            base: tuple[int | str, ...] = () if single else (i, "value")
            if isinstance(rule.value, Gradient):
                for j, x in enumerate(rule.value.values):
                    yield base + (j,), x
            else:
                yield base, rule.value

    @property
    def covers_all(self) -> bool:
        """True when some rule matches every tensor."""
        return any(r.filter is None or r.filter == "*" for r in self.rules)


def _is_scalar(x: Any) -> bool:
    return isinstance(x, (bool, int, float, str))


def _leaf(raw: Any) -> Leaf | str:
    """A scalar or gradient, or a problem description."""
    if _is_scalar(raw):
        return raw
    if (
        isinstance(raw, list)
        and raw
        and all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in raw)
    ):
        for j, x in enumerate(raw):
            problem = finite_problem(x)
            if problem:  # also keeps float() below from overflowing on a huge integer
                return f"entry {j}: {problem}"
        return Gradient(tuple(float(x) for x in raw))
    if isinstance(raw, list) and not raw:
        return "must not be an empty list"
    return (
        "must be a number, true/false, a list of numbers (gradient) "
        f"or a list of {{filter, value}} entries, got {raw!r}"
    )


def parse_value(raw: Any) -> tuple[ParamValue | None, list[tuple[tuple[int | str, ...], str]]]:
    """Parse a raw YAML value. Returns (value, problems as (sub-path, message))."""
    if isinstance(raw, list) and raw and all(isinstance(x, dict) for x in raw):
        rules: list[Rule] = []
        problems: list[tuple[tuple[int | str, ...], str]] = []
        for i, entry in enumerate(raw):
            unknown = sorted(set(entry) - {"filter", "value"})
            if unknown:
                problems.append(((i, unknown[0]), "unknown key; allowed: filter, value"))
            if "value" not in entry:
                problems.append(((i,), "filter entry needs a 'value'"))
                continue
            flt = entry.get("filter")
            if flt is not None and not isinstance(flt, str):
                problems.append(((i, "filter"), f"must be a string, got {flt!r}"))
                continue
            leaf = _leaf(entry["value"])
            if isinstance(leaf, str) and not _is_scalar(entry["value"]):
                problems.append(((i, "value"), leaf))
                continue
            rules.append(Rule(flt, leaf))
        return (ParamValue(tuple(rules)) if not problems else None), problems
    leaf = _leaf(raw)
    if isinstance(leaf, str) and not _is_scalar(raw):
        return None, [((), leaf)]
    return ParamValue((Rule(None, leaf),)), []


def lookup(
    name: str,
    levels: Sequence[Mapping[str, ParamValue]],
    tensor: str,
    layer: int | None,
    num_layers: int,
) -> Scalar | None:
    """Resolve ``name`` for one tensor through levels of precedence (highest first)."""
    for level in levels:
        value = level.get(name)
        if value is not None:
            got = value.at(tensor, layer, num_layers)
            if got is not None:
                return got
    return None
