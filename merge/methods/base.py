"""What a merge method is: a pure tensor function plus the typed parameters it declares.

A method never reads files, logs, changes dtype or device, mutates its inputs or touches the
global RNG. The planner checks every parameter value against its ``Param`` before any tensor is
read, fills in defaults, and then calls ``method.fn(tensors, base, params, rng)`` per tensor.

Call convention of ``Method.fn``:

- ``tensors``: float32 tensors of one shape. For ``base="required"`` the non-base models in
  recipe order; for ``base="input"`` every model, the base included; for ``base="none"`` the
  single input.
- ``base``: the base model's float32 tensor for ``base="required"``, else ``None``.
- ``params``: every declared parameter, defaults already applied; per-model parameters are lists
  aligned with ``tensors``, global ones are scalars.
- ``rng``: a seeded CPU ``torch.Generator`` for ``random`` methods, else ``None``.

The result is a float32 tensor of the same shape. It may be one of the inputs (unchanged, e.g. a
passthrough with scale 1), so callers must not modify it in place.

This module holds no method and no registry (see ``registry.py``).
"""

from __future__ import annotations

import enum
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor

__all__ = ["REQUIRED", "Method", "MethodFn", "Param", "ParamCheck", "need_base", "show_value"]


class _Required(enum.Enum):
    REQUIRED = "REQUIRED"

    def __repr__(self) -> str:
        return "REQUIRED"


REQUIRED = _Required.REQUIRED
"""Sentinel default: the parameter has no default and must be given."""

MethodFn = Callable[
    [list[Tensor], "Tensor | None", dict[str, Any], "torch.Generator | None"], Tensor
]
BaseRole = Literal["input", "required", "optional", "none"]
ParamCheck = Callable[[dict[str, Any], list[str]], list[str]]
"""``check(params, models) -> problems``: a rule across one tensor's effective values."""


def show_value(value: Any) -> str:
    """Render a recipe value the way a user wrote it in YAML: true/false, null, 'text', 1.5."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    return repr(value)


def need_base(name: str, base: Tensor | None) -> Tensor:
    """``base``, or a ``ValueError`` naming method ``name`` if it is ``None`` (a method with
    ``base="required"`` called without one)."""
    if base is None:
        raise ValueError(f"{name} needs a base tensor, got None")
    return base


FLOAT32_MAX = 3.4028234663852886e38
"""The largest finite float32: every numeric parameter must lie within +/- this."""


def finite_problem(value: int | float) -> str | None:
    """``"must be a finite number within float32 (got inf)"`` for a value that cannot be
    computed with (infinite, NaN, or past float32's range: a huge integer included), else
    ``None``. Comparing an int with a float is exact in Python, so nothing overflows here."""
    if isinstance(value, float) and math.isnan(value):
        return f"must be a finite number within float32 (got {show_value(value)})"
    if not -FLOAT32_MAX <= value <= FLOAT32_MAX:
        digits = len(str(abs(value))) if isinstance(value, int) else 0
        shown = f"an integer of {digits} digits" if digits > 40 else show_value(value)
        return f"must be a finite number within float32 (got {shown})"
    return None


def _num(x: float) -> str:
    return f"{x:g}"


@dataclass(frozen=True)
class Param:
    """One declared parameter of a method: its type, range, default and scope.

    ``per_model`` parameters are given under ``models[i].parameters`` (one value per model);
    the others under the top-level ``parameters``. ``kind`` is ``float``, ``int``, ``bool`` or
    ``str``. ``low``/``high`` bound numbers, inclusive unless ``low_open``/``high_open``.
    ``choices``: the allowed strings of a ``str`` parameter, or strings a ``bool`` parameter
    also accepts (``rescale: inverse_density`` beside ``rescale: true``).
    """

    name: str
    per_model: bool
    kind: type
    default: Any = REQUIRED
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    help: str = ""
    choices: tuple[str, ...] = ()

    @property
    def required(self) -> bool:
        """True when the parameter has no default."""
        return self.default is REQUIRED

    def check(self, value: Any) -> str | None:
        """Return ``None`` if ``value`` is acceptable, else a message like
        ``"must be in (0, 1], got 1.5"``. Bools are not numbers, numbers are not bools, and
        ints are accepted where floats are expected."""
        if self.choices and isinstance(value, str):
            if value in self.choices:
                return None
            return f"must be {self.describe_choices()}, got {show_value(value)}"
        if self.kind is str:
            return f"must be {self.describe_choices()}, got {show_value(value)}"
        if self.kind is bool:
            if not isinstance(value, bool):
                return f"must be {self.describe_choices()}, got {show_value(value)}"
            return None
        if self.kind is int:
            if isinstance(value, bool) or not isinstance(value, int):
                return f"must be an integer, got {show_value(value)}"
        elif isinstance(value, bool) or not isinstance(value, (int, float)):
            return f"must be a number, got {show_value(value)}"
        problem = finite_problem(value)
        if problem:
            return problem
        if not self._in_range(value):
            rng = self.describe_range()
            where = f"in {rng}" if rng[0] in "([" else rng
            return f"must be {where}, got {show_value(value)}"
        return None

    def _in_range(self, value: float) -> bool:
        if self.low is not None and (value <= self.low if self.low_open else value < self.low):
            return False
        if self.high is not None and (value >= self.high if self.high_open else value > self.high):
            return False
        return True

    def describe_choices(self) -> str:
        """``"true, false, l1 or inverse_density"`` (bool/str parameters)."""
        words = (["true", "false"] if self.kind is bool else []) + list(self.choices)
        if len(words) == 2 and self.kind is bool:
            return "true or false"
        return ", ".join(words[:-1]) + f" or {words[-1]}" if len(words) > 1 else words[0]

    def describe_range(self) -> str:
        """The allowed range in words: ``"(0, 1]"``, ``">= 0"``, ``"< 1"`` or ``""`` (any)."""
        if self.kind in (bool, str):
            return ""
        if self.low is not None and self.high is not None:
            left = "(" if self.low_open else "["
            right = ")" if self.high_open else "]"
            return f"{left}{_num(self.low)}, {_num(self.high)}{right}"
        if self.low is not None:
            return f"{'>' if self.low_open else '>='} {_num(self.low)}"
        if self.high is not None:
            return f"{'<' if self.high_open else '<='} {_num(self.high)}"
        return ""


@dataclass(frozen=True)
class Method:
    """A named merge method: its pure tensor function, parameters and metadata.

    ``base``: ``"input"`` (a base model, if set, is merged like any other model),
    ``"required"`` (the base is separate, e.g. task vectors), ``"optional"`` (separate when
    ``base_model`` is set, else ``base`` is ``None``), ``"none"`` (no base at all).
    ``fixes``: how this method differs from mergekit's on purpose (a defect fixed), or "".
    ``min_models``/``max_models`` count ``tensors``, not a required base.
    ``workspace``: (per model, fixed) number of extra float32 buffers of the tensor's size the
    function holds at its peak, measured; the planner's peak-memory estimate uses it.
    ``stream``: how the method runs chunk by chunk (``merge.methods.stream``), or ``None``:
    the executor then reads each tensor whole and calls ``fn``. A streamed method's ``fn`` must
    give the same result as its stream (``stream.whole`` builds it from the stream).
    ``kept_bits``: bits per entry and model that a stream keeps from its statistics passes to
    its merge pass, given a tensor's parameters (the task family's packed keep masks under
    the ``l1`` rescale: 1), for the memory estimate; ``None``: nothing is kept.
    ``check``: optional rule across parameters (e.g. della's ``density +/- epsilon`` in (0, 1))
    that the planner runs on each tensor's effective ``params``, with ``models`` the input
    model references aligned with per-model lists; it returns messages (naming the model where
    one is at fault), which the planner reports with the tensor's name.
    """

    name: str
    fn: MethodFn
    params: tuple[Param, ...]
    base: BaseRole
    min_models: int
    max_models: int | None
    paper: str | None
    description: str
    random: bool = False
    workspace: tuple[float, float] = (1.0, 2.0)
    fixes: str = ""
    check: ParamCheck | None = None
    stream: Callable[..., Any] | None = None
    kept_bits: Callable[[dict[str, Any]], int] | None = None

    def param(self, name: str) -> Param | None:
        """The declared parameter called ``name``, or ``None``."""
        for p in self.params:
            if p.name == name:
                return p
        return None
