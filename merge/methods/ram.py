"""Reinforced agent merging (https://arxiv.org/abs/2601.13572): ``ram`` and ``ramplus_tl``.

With ``d_i = x_i - b`` (``N >= 1`` models besides the base ``b``), both methods share one step:
an entry is *active* for model i if ``|d_i| > epsilon`` (strictly: a change of exactly
``epsilon`` is not one), and ``c`` = the number of models active at the entry.

- ram: ``out = b + sum_i d_i [active_i] / max(c, 1)``: an entry changed by one model takes its
  change; by several, their mean; by none, the base.
- ramplus_tl (RAM+, tensor-local): an active entry of model i is *unique* where ``c = 1`` and
  *shared* where ``c > 1``. Per model, over the whole tensor, ``U_i`` = its unique entries and
  ``S_i`` = its shared ones (exact integer counts); ``rho_i = S_i / max(U_i, epsilon)``,
  ``lambda_i = 1 + r clamp(rho_i, 0, alpha)``, and
  ``out = b + sum_i d_i [active_i] ([c = 1] lambda_i + [c > 1] / c)``: unique changes are
  amplified by their model's ``lambda_i`` (in [1, 1 + r alpha]), shared ones averaged as ram
  does. Computed as ram's mean of the active ``d_i`` where ``c != 1`` and the sum of the
  ``lambda_i d_i`` (the one active model's) where ``c = 1``.

Edge cases of ramplus_tl. No active entry at all (or every ``x_i = b``): the base, exactly.
One model: every change is unique, ``S = 0`` and ``lambda = 1``: ram's bytes; so too with
``r = 0`` or ``alpha = 0``. ``U_i = 0`` (model i changes nothing alone): ``lambda_i`` scales
no entry, and is taken as 1; mergekit computes it as ``S_i / epsilon`` then, which with
``epsilon = 0`` and a model that changes nothing is 0/0 = NaN, and its ``0 * NaN`` makes the
whole output tensor NaN (**fix**: here that model simply contributes nothing). ``epsilon`` is
also the ratio's floor, as in mergekit: with ``epsilon > 1`` a model with fewer than
``epsilon`` unique entries divides by ``epsilon``. Rounding: ``rho_i`` and ``lambda_i`` are
computed in float64 from the exact counts and rounded to float32 once (mergekit computes them
in float32, from counts rounded to float32 above 2^24 entries), and a shared entry is
``(sum d_i) / c`` like ram (mergekit sums ``d_i / c``): each can differ from mergekit in the
last bit.

Streaming: ram is elementwise (``Elementwise``). ramplus_tl (``RamPlusStream``) makes one
statistics pass: per chunk ``c`` and the sum of ``i + 1`` over the active models (at ``c = 1``
the one model's number), so ``U_i`` is a count of those numbers over the entries with
``c = 1``; ``S_i`` = model i's active entries minus ``U_i``. Then each chunk is merged with the
``lambda_i``. Inputs are only used as ``x - b`` (``stored_inputs``) and never modified; both
work model by model. ``workspace`` counts buffers of a chunk's size (of the tensor's on the
whole-tensor path), measured as peak RSS over the inputs, 4M-entry tensors in one chunk, 2
and 6 models: ram keeps a sum and a uint8 count besides one model's task vector and mask;
ramplus_tl also the sum of the ``lambda_i d_i`` (3.75 buffers in all).
What this does not do: weights (neither method takes per-model parameters), or RAM+'s
model-wide form (its counts over every tensor of the model).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from merge.methods.base import Method, Param, need_base
from merge.methods.stream import Elementwise, Streamed, whole

__all__ = ["RAM", "RAMPLUS_TL", "RamPlusStream", "ram", "ramplus_tl"]

Each = Callable[[int, Tensor, Tensor], object]
"""``each(i, d_i, active_i)``: sees model i's task vector (zero where inactive) and its
activity mask (bool), both of the input's shape and only valid during the call."""


def _counter(b: Tensor, n: int) -> Tensor:
    """Zeros of ``b``'s shape and device, of an integer type that holds ``0 .. n``."""
    return torch.zeros(b.shape, dtype=torch.uint8 if n < 256 else torch.int32, device=b.device)


def tally(
    tensors: list[Tensor], b: Tensor, epsilon: float, each: Each | None = None
) -> tuple[Tensor, Tensor]:
    """The step both methods share: ``(sum_i d_i [active_i], c)``, model by model (one task
    vector at a time); ``each(i, d_i, active_i)`` is called for every model."""
    merged = torch.zeros_like(b)
    count = _counter(b, len(tensors))
    for i, x in enumerate(tensors):
        d = x - b
        active = d.gt(epsilon).logical_or_(d.lt(-epsilon))  # |d| > epsilon, no float temporary
        merged.add_(d.masked_fill_(active.logical_not(), 0.0))
        count.add_(active)
        if each is not None:
            each(i, d, active)
        del d, active
    return merged, count


def ram(
    tensors: list[Tensor], base: Tensor | None, params: dict[str, Any], rng: Any = None
) -> Tensor:
    """Each entry: the mean of the task vectors that changed it by more than ``epsilon``."""
    b = need_base("ram", base)
    merged, count = tally(tensors, b, float(params["epsilon"]))
    return merged.div_(count.clamp_(min=1)).add_(b)


def ramplus_lambda(shared: int, unique: int, r: float, alpha: float, epsilon: float) -> float:
    """``lambda_i = 1 + r clamp(S_i / max(U_i, epsilon), 0, alpha)`` in float64; 1 where the
    model has no unique entry (nothing to scale)."""
    if unique == 0:
        return 1.0
    return 1.0 + r * min(max(shared / max(unique, epsilon), 0.0), alpha)


class RamPlusStream(Streamed):
    """``ramplus_tl`` over chunks: one statistics pass counts each model's unique and active
    entries exactly (Python ints), then each chunk is merged with the ``lambda_i``."""

    passes = 1
    stored_inputs = True

    def __init__(self, params: dict[str, Any], shape: tuple[int, ...], rng: Any = None) -> None:
        self.r = float(params["r"])
        self.alpha = float(params["alpha"])
        self.epsilon = float(params["epsilon"])
        self.unique: list[int] = []
        self.active: list[int] = []
        self.lambdas: list[float] = []

    def observe(self, step: int, xs: list[Tensor], base: Tensor | None) -> None:
        b, n = need_base("ramplus_tl", base), len(xs)
        if not self.active:
            self.unique, self.active = [0] * n, [0] * n
        code = _counter(b, n)  # sum of (i + 1) over the active models: at c = 1, the one

        def each(i: int, d: Tensor, active: Tensor) -> None:
            code.add_(active, alpha=i + 1)  # may wrap where c > 1: never read there
            self.active[i] += int(torch.count_nonzero(active))

        _, count = tally(xs, b, self.epsilon, each)
        alone = torch.bincount(code.mul_(count == 1).reshape(-1), minlength=n + 1).tolist()
        self.unique = [u + a for u, a in zip(self.unique, alone[1:], strict=True)]

    def end_pass(self, step: int) -> None:
        args = (self.r, self.alpha, self.epsilon)
        self.lambdas = [
            ramplus_lambda(a - u, u, *args) for a, u in zip(self.active, self.unique, strict=True)
        ]

    def apply(self, xs: list[Tensor], base: Tensor | None) -> Tensor:
        b = need_base("ramplus_tl", base)
        if all(lam == 1.0 for lam in self.lambdas):  # nothing amplified: ram itself
            return ram(xs, b, {"epsilon": self.epsilon})
        scaled = torch.zeros_like(b)  # sum of lambda_i d_i: at c = 1, the one model's

        def each(i: int, d: Tensor, active: Tensor) -> None:
            scaled.add_(d, alpha=self.lambdas[i])

        merged, count = tally(xs, b, self.epsilon, each)
        unique = count == 1
        merged.div_(count.clamp_(min=1))
        return torch.where(unique, scaled, merged, out=scaled).add_(b)


ramplus_tl = whole(
    RamPlusStream,
    "ramplus_tl",
    "ram, with each model's unique changes times ``1 + r clamp(S_i / max(U_i, eps), 0, alpha)``.",
)

EPSILON = Param(
    "epsilon",
    False,
    float,
    1e-5,
    low=0,
    help="a task-vector entry counts as a change above this magnitude",
)

RAM = Method(
    name="ram",
    fn=ram,
    params=(EPSILON,),
    base="required",
    min_models=1,
    max_models=None,
    paper="https://arxiv.org/abs/2601.13572",
    description="add each entry's mean change over the models that changed it",
    workspace=(0.0, 3.0),
    stream=Elementwise.of(ram),
)
RAMPLUS_TL = Method(
    name="ramplus_tl",
    fn=ramplus_tl,
    stream=RamPlusStream,
    params=(
        Param(
            "r",
            False,
            float,
            0.1,
            low=0,
            help="rescaling strength: unique changes are scaled by 1 + r * the clamped ratio",
        ),
        Param(
            "alpha",
            False,
            float,
            0.2,
            low=0,
            help="upper clamp of a model's shared-to-unique ratio of changed entries",
        ),
        EPSILON,
    ),
    base="required",
    min_models=1,
    max_models=None,
    paper="https://arxiv.org/abs/2601.13572",
    description="ram, with each model's unique changes amplified by its shared-to-unique ratio",
    workspace=(0.0, 4.0),
    fixes=(
        "a model that changes no entry with epsilon 0 contributes nothing: mergekit's ratio "
        "is 0/0 there and turns the whole tensor into NaN"
    ),
)
