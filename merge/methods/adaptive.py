"""Task-vector merges whose coefficients come from the task vectors: model_stock, sce.

With ``d_i = x_i - b`` (``N`` models besides the base ``b``):

- model_stock (https://arxiv.org/abs/2403.19522): ``cos`` = the mean pairwise cosine of the
  ``d_i`` (norm products clamped to >= 1e-6, each cosine to [-1, 1]), over the whole tensor or,
  with ``filter_wise``, per vector along the last dim (a 1-D tensor is one vector);
  ``t = N cos / (1 + (N-1) cos)`` and ``out = t mean(x_i) + (1 - t) b``. The mean pairwise
  cosine of N vectors is >= -1/(N-1), so the denominator is >= 0 and is 0 only when the unit
  task vectors sum to 0: there ``t = 0`` (the base) wherever the denominator is <= 1e-6, as
  mergekit 0.1.5 also does. Zero task vectors have cosine 0 with everything.
- sce (FuseChat, https://arxiv.org/abs/2408.07990): if ``select_topk < 1``, keep only the
  ``int(select_topk * count)`` positions of highest variance across models (population variance;
  ``count`` = positions with nonzero variance; none kept if that rounds to 0, as in mergekit;
  ties at the cut go to the lowest positions, where mergekit's ``topk`` picks any);
  ``a_i = mean(d_i^2) / sum_j mean(d_j^2)`` (uniform if all are 0); TIES sign election on the
  sum of the ``d_i`` (0 counts as +), ``m_i = [sign(d_i) == s]``;
  ``out = b + sum a_i m_i d_i / max(sum a_i m_i, 1e-6)``.

Both are streamed chunk by chunk (``merge.methods.stream``): model_stock with one statistics
pass that sums the squared norms and pairwise dot products in float64 (with ``filter_wise``,
chunks of whole rows and no pass); sce with two radix-select passes over the variances
(``select_topk < 1``) and one float64 pass for the energies. Both work model by model on
temporaries of their own; inputs are never modified. ``workspace`` counts buffers of a
chunk's size (of the tensor's on the whole-tensor path): model_stock's statistics pass holds
every task vector, sce holds every task vector plus its accumulators and the variance
selection (sce's was measured as peak RSS over the inputs, 4M-entry tensors, 2 and 6 models).
What this does not do: weights (neither method takes per-model parameters); ram and
ramplus_tl, whose coefficients come from counts of changed entries, are in ``ram.py``.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from merge.methods.base import Method, Param, need_base
from merge.methods.radix import magnitude_bits
from merge.methods.stream import Cut, Streamed, float64_sum, whole
from merge.methods.task_arithmetic import elect_signs

__all__ = ["MODEL_STOCK", "SCE", "SceStream", "StockStream", "model_stock", "sce"]

STOCK_NORM_FLOOR = 1e-6
STOCK_DENOM_EPS = 1e-6
SCE_DIVISOR_FLOOR = 1e-6


# --- model_stock ------------------------------------------------------------------------------


def _mean_pairwise_cos(rows: list[Tensor], b_rows: Tensor) -> Tensor:
    """Per row: the mean over pairs i < j of ``d_i.d_j / max(|d_i||d_j|, 1e-6)`` in [-1, 1],
    ``d_i = rows[i] - b_rows`` (recomputed per pair: two task vectors at a time)."""
    n = len(rows)
    norms = [torch.linalg.vector_norm(r - b_rows, dim=-1) for r in rows]
    total = torch.zeros_like(norms[0])
    for i in range(n):
        d_i = rows[i] - b_rows
        for j in range(i + 1, n):
            dot = torch.einsum("ij,ij->i", d_i, rows[j] - b_rows)
            total.add_((dot / (norms[i] * norms[j]).clamp_(min=STOCK_NORM_FLOOR)).clamp_(-1, 1))
    return total.div_(n * (n - 1) // 2)


class StockStream(Streamed):
    """``model_stock`` over chunks. Per tensor: one statistics pass sums each task vector's
    squared norm and the pairwise dot products in float64 (``float64_sum``), then each chunk
    is merged with the one ``t``. With ``filter_wise`` (and 2+ dims) every row has its own
    ``t``: chunks hold whole rows, and each chunk's rows are merged on their own."""

    def __init__(self, params: dict[str, Any], shape: tuple[int, ...], rng: Any = None) -> None:
        self.rows = bool(params["filter_wise"]) and len(shape) >= 2
        self.row = shape[-1] if self.rows else 1
        self.passes = 0 if self.rows else 1
        self._squares: list[float] = []
        self._dots: dict[tuple[int, int], float] = {}
        self._cos = 0.0

    def observe(self, step: int, xs: list[Tensor], base: Tensor | None) -> None:
        b, n = need_base("model_stock", base), _stock_models(xs)
        deltas = [x - b for x in xs]
        if not self._squares:
            self._squares = [0.0] * n
        for i, d in enumerate(deltas):
            self._squares[i] += float64_sum(d * d)
            for j in range(i + 1, n):
                self._dots[i, j] = self._dots.get((i, j), 0.0) + float64_sum(d * deltas[j])

    def end_pass(self, step: int) -> None:
        n = len(self._squares)
        if n < 2:  # an empty tensor: nothing was seen
            return
        norms = [math.sqrt(s) for s in self._squares]
        total = 0.0
        for (i, j), dot in self._dots.items():
            total += min(1.0, max(-1.0, dot / max(norms[i] * norms[j], STOCK_NORM_FLOOR)))
        self._cos = total / (n * (n - 1) // 2)

    def apply(self, xs: list[Tensor], base: Tensor | None) -> Tensor:
        b, n = need_base("model_stock", base), _stock_models(xs)
        if self.rows:
            b_rows = b.view(-1, self.row)
            rows = [x.view(-1, self.row) for x in xs]
            cos = _mean_pairwise_cos(rows, b_rows)
        else:
            b_rows, rows = b.view(1, -1), [x.view(1, -1) for x in xs]
            cos = torch.full((1,), self._cos, dtype=b.dtype, device=b.device)
        denom = 1 + (n - 1) * cos
        ok = denom > STOCK_DENOM_EPS
        t = torch.where(ok, n * cos / torch.where(ok, denom, 1.0), 0.0).unsqueeze(-1)
        out = torch.zeros_like(b_rows)
        for x in rows:
            out.add_(x)
        return out.mul_(t / n).addcmul_(b_rows, 1 - t).view(-1)


def _stock_models(xs: list[Tensor]) -> int:
    if len(xs) < 2:
        raise ValueError(f"model_stock needs at least two tensors besides the base, got {len(xs)}")
    return len(xs)


model_stock = whole(
    StockStream,
    "model_stock",
    "``t mean(x_i) + (1 - t) b`` with ``t`` from the mean pairwise cosine of the task vectors.",
)


# --- sce --------------------------------------------------------------------------------------


def _variance(deltas: list[Tensor]) -> Tensor:
    """Population variance across ``deltas``, taken of ``d_i - d_0`` (the same value,
    numerically safer): positions where every model agrees exactly get exactly 0."""
    n = len(deltas)
    mean = torch.zeros_like(deltas[0])
    for d in deltas[1:]:
        mean.add_(d - deltas[0])
    mean.div_(n)
    var = mean.square()  # the i = 0 term: (0 - mean)^2
    for d in deltas[1:]:
        var.add_((d - deltas[0]).sub_(mean).square_())
    return var.div_(n)


class SceStream(Streamed):
    """``sce`` over chunks. With ``select_topk < 1``: two radix-select passes over the
    variances (``Cut``, its ``k`` decided from the nonzero count pass 0 sees; ties at the cut
    go to the first positions), then one pass summing each masked task vector's squares in
    float64 (the energies); then each chunk is merged. Without selection only the energy pass
    runs."""

    def __init__(self, params: dict[str, Any], shape: tuple[int, ...], rng: Any = None) -> None:
        self.topk = float(params["select_topk"])
        numel = math.prod(shape)
        self.numel = numel
        self.cut = Cut(None, numel) if self.topk < 1 else None
        self.passes = 3 if self.cut is not None else 1
        self._nonzero = 0
        self._energy: list[float] = []
        self.coefs: list[float] = []

    def _deltas(self, xs: list[Tensor], base: Tensor | None) -> list[Tensor]:
        b = need_base("sce", base)
        return [x - b for x in xs]

    def _select(self, deltas: list[Tensor]) -> list[Tensor]:
        if self.cut is not None:
            keep = self.cut.mask(_variance(deltas))
            deltas = [d.mul_(keep) for d in deltas]
        return deltas

    def observe(self, step: int, xs: list[Tensor], base: Tensor | None) -> None:
        deltas = self._deltas(xs, base)
        if step < self.passes - 1:  # the variance cut's two passes
            assert self.cut is not None
            var = _variance(deltas)
            if step == 0:
                self._nonzero += int(torch.count_nonzero(var))
            self.cut.observe(step, magnitude_bits(var))
            return
        if not self._energy:
            self._energy = [0.0] * len(deltas)
        for i, d in enumerate(self._select(deltas)):
            self._energy[i] += float64_sum(d * d)

    def end_pass(self, step: int) -> None:
        if step < self.passes - 1:
            assert self.cut is not None
            if step == 0:
                self.cut.decide(int(self.topk * self._nonzero))
            self.cut.end_pass(step)
            return
        if self.cut is not None:
            self.cut.rewind()  # the merge pass masks the same entries again
        n = len(self._energy)
        if n == 0:  # an empty tensor: no chunk was seen, none will be merged
            return
        energy = [e / self.numel for e in self._energy]  # mean squares
        total = sum(energy)
        self.coefs = [e / total for e in energy] if total > 0 else [1.0 / n] * n

    def apply(self, xs: list[Tensor], base: Tensor | None) -> Tensor:
        b = need_base("sce", base)
        deltas = self._select(self._deltas(xs, base))
        positive = elect_signs(deltas)
        merged = torch.zeros_like(b)
        divisor = torch.zeros_like(b)
        for d, a in zip(deltas, self.coefs, strict=True):
            agree = torch.where(positive, d > 0, d < 0)
            merged.add_(d.mul_(agree), alpha=a)
            divisor.add_(agree, alpha=a)
        del deltas, positive
        return merged.div_(divisor.clamp_(min=SCE_DIVISOR_FLOOR)).add_(b)


sce = whole(
    SceStream, "sce", "Select (variance top-k), calculate (mean-square weights), erase (signs)."
)


MODEL_STOCK = Method(
    name="model_stock",
    fn=model_stock,
    stream=StockStream,
    params=(
        Param(
            "filter_wise",
            False,
            bool,
            False,
            help="one interpolation factor per vector along the last dim, not per tensor",
        ),
    ),
    base="required",
    min_models=2,
    max_models=None,
    paper="https://arxiv.org/abs/2403.19522",
    description="move from the base towards the models' average by an angle-derived factor",
    workspace=(1.0, 2.0),
)
SCE = Method(
    name="sce",
    fn=sce,
    stream=SceStream,
    params=(
        Param(
            "select_topk",
            False,
            float,
            1.0,
            low=0,
            high=1,
            low_open=True,
            help="fraction of positions kept, by variance across models",
        ),
    ),
    base="required",
    min_models=1,
    max_models=None,
    paper="https://arxiv.org/abs/2408.07990",
    description="select high-variance positions, weight models by energy, erase minority signs",
    workspace=(1.0, 4.0),
)
