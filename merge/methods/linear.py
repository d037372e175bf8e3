"""Weighted averages and single-source copies: ``linear`` and ``passthrough``.

- linear (Model Soups, https://arxiv.org/abs/2203.05482): ``sum_i w_i x_i / sum_i w_i``, or
  ``sum_i w_i x_i`` with ``normalize: false``. A base model, if the recipe names one, is just
  another input with its own weight. If the weights sum to 0 the unnormalised sum is returned
  (the planner reports that case; this is only a guard against dividing by zero).
- passthrough: exactly one input, times ``scale`` (default 1). It is what ``slices``
  frankenmerges are built from.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

from merge.methods.base import Method, Param
from merge.methods.stream import Elementwise

__all__ = ["LINEAR", "PASSTHROUGH", "linear", "passthrough"]


def linear(
    tensors: list[Tensor], base: Tensor | None, params: dict[str, Any], rng: Any = None
) -> Tensor:
    """``sum_i w_i x_i / sum_i w_i`` (no division if ``normalize`` is false or the sum is 0)."""
    weights = [float(w) for w in params["weight"]]
    if len(weights) != len(tensors):
        raise ValueError(f"linear: {len(tensors)} tensors but {len(weights)} weights")
    out = tensors[0] * weights[0]  # a new tensor: the in-place steps below round as out = ...
    for x, w in zip(tensors[1:], weights[1:], strict=True):
        out.add_(x * w)
    total = sum(weights)
    if params["normalize"] and total != 0:
        out.div_(total)
    return out


def passthrough(
    tensors: list[Tensor], base: Tensor | None, params: dict[str, Any], rng: Any = None
) -> Tensor:
    """``x * scale`` for the single input ``x``; ``x`` itself (not copied) when ``scale == 1``."""
    if len(tensors) != 1:
        raise ValueError(f"passthrough takes exactly one tensor, got {len(tensors)}")
    scale = float(params["scale"][0])
    return tensors[0] if scale == 1.0 else tensors[0] * scale


LINEAR = Method(
    name="linear",
    fn=linear,
    params=(
        Param("weight", True, float, help="weight of this model in the average"),
        Param("normalize", False, bool, True, help="divide by the sum of the weights"),
    ),
    base="input",
    min_models=1,
    max_models=None,
    paper="https://arxiv.org/abs/2203.05482",
    description="weighted average of the models' tensors",
    workspace=(0.0, 2.0),
    stream=Elementwise.of(linear),
    fixes="a base_model without a weight is reported at validation with a hint "
    "(mergekit crashes mid-merge)",
)

PASSTHROUGH = Method(
    name="passthrough",
    fn=passthrough,
    params=(Param("scale", True, float, 1.0, help="multiply the tensor by this"),),
    base="none",
    min_models=1,
    max_models=1,
    paper=None,
    description="copy one model's tensor unchanged (optionally scaled); builds frankenmerges",
    workspace=(0.0, 0.0),
    stream=Elementwise.of(passthrough),
)
