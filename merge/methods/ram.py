"""Reinforced agent merging (https://arxiv.org/abs/2601.13572): ``ram``.

With ``d_i = x_i - b`` (``N >= 1`` models besides the base ``b``): an entry is active for
model i if ``|d_i| > epsilon``; ``c`` = number of active models;
``out = b + sum_i d_i [active] / max(c, 1)`` (an entry changed by one model takes its change;
by several, their mean; by none, the base).

Streamed entry by entry (``Elementwise``); model by model on temporaries of its own, inputs
never modified. ``workspace`` counts buffers of a chunk's size: a sum and a uint8 count, plus
one model's task vector and mask (measured as peak RSS over the inputs, 4M-entry tensors, 2
and 6 models).
What this does not do: weights (it takes no per-model parameters).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from merge.methods.base import Method, Param, need_base
from merge.methods.stream import Elementwise

__all__ = ["RAM", "ram"]


def ram(
    tensors: list[Tensor], base: Tensor | None, params: dict[str, Any], rng: Any = None
) -> Tensor:
    """Each entry: the mean of the task vectors that changed it by more than ``epsilon``."""
    b = need_base("ram", base)
    epsilon = float(params["epsilon"])
    merged = torch.zeros_like(b)
    count = torch.zeros(b.shape, dtype=torch.uint8 if len(tensors) < 256 else torch.int32)
    for x in tensors:
        d = x - b
        active = d.gt(epsilon).logical_or_(d.lt(-epsilon))  # |d| > epsilon, no float temporary
        merged.add_(d.masked_fill_(active.logical_not(), 0.0))
        count.add_(active)
        del d, active
    return merged.div_(count.clamp_(min=1)).add_(b)


RAM = Method(
    name="ram",
    fn=ram,
    params=(
        Param(
            "epsilon",
            False,
            float,
            1e-5,
            low=0,
            help="a task-vector entry counts as a change above this magnitude",
        ),
    ),
    base="required",
    min_models=1,
    max_models=None,
    paper="https://arxiv.org/abs/2601.13572",
    description="add each entry's mean change over the models that changed it",
    workspace=(0.0, 3.0),
    stream=Elementwise.of(ram),
)
