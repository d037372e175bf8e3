"""``karcher``: the Riemannian (Karcher) mean of the models' directions, streamed.

Semantics (mergekit's; see ``merge.methods.spherical`` for the family): the Karcher mean of the
unit vectors, uniform weights, by log/exp iterations from the normalised extrinsic mean,
stopping after ``max_iter`` steps or when the tangent step is shorter than ``tol``; times the
mean norm. A base model, if set, is one more input (like linear). Tensors with norm ``<= tol``
take no part in the direction (they still count in the mean norm); all of them that small give
zeros. A unit vector within 1e-3 rad of opposite the current mean contributes no step.

Streamed: one statistics pass sums the inputs' Gram matrix; the iterations run on the
coefficients of the inputs (every iterate is a combination of them), so they cost no pass over
the tensor, and each output chunk is one weighted sum of the input chunks.

What this does not do: weights (mergekit ignores them too).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from torch import Tensor

from merge.methods.base import Method, Param
from merge.methods.spherical import combine, gram_add
from merge.methods.stream import Streamed, whole

__all__ = ["KARCHER", "MAX_ITER", "KarcherStream", "karcher"]

OPPOSITE_EPS = 1e-3  # a direction this close (rad) to opposite the mean gives no step


class KarcherStream(Streamed):
    """``karcher`` over chunks. Every iterate is a linear combination ``sum_i a_i x_i`` of the
    inputs (the start is one, and each log/exp step adds multiples of the inputs and of the
    mean), so one statistics pass sums the Gram matrix ``G_ij = x_i . x_j`` (exact products,
    float64 sums) and the iterations run on the coefficients: ``mean . x_j = (G a)_j``,
    ``|mean|^2 = a' G a``. Each chunk is then one weighted sum of the inputs' chunks: the
    iterations cost no pass over the tensor, and they run in float64."""

    def __init__(self, params: dict[str, Any], shape: tuple[int, ...], rng: Any = None) -> None:
        self.max_iter, self.tol = int(params["max_iter"]), float(params["tol"])
        self.gram: np.ndarray | None = None
        self.passes = 1
        self.coefs: list[float] = []

    def observe(self, step: int, xs: list[Tensor], base: Tensor | None) -> None:
        if self.gram is None:
            self.gram = np.zeros((len(xs), len(xs)), dtype=np.float64)
        gram_add(self.gram, xs)

    def end_pass(self, step: int) -> None:
        if self.gram is None:  # an empty tensor: nothing was seen
            return
        gram, tol = self.gram, self.tol
        n = len(gram)
        norms = [math.sqrt(max(float(gram[i, i]), 0.0)) for i in range(n)]
        units = [i for i in range(n) if norms[i] > tol]
        self.coefs = [0.0] * n
        if not units:
            return
        scale = np.array([1.0 / norms[i] if i in units else 0.0 for i in range(n)])

        def length(a: np.ndarray) -> float:
            return math.sqrt(max(float(((gram * a).sum(axis=1) * a).sum()), 0.0))

        mean = scale / len(units)
        size = length(mean)
        if size < tol:
            mean = np.zeros(n)
            mean[units[0]] = scale[units[0]]
        else:
            mean = mean / size
        for _ in range(self.max_iter):
            tangent = self._step(mean, units, scale)
            move = length(tangent)
            if move < tol:
                break
            mean = mean * math.cos(move) + tangent * (math.sin(move) / move)
            size = length(mean)
            if size > tol:
                mean = mean / size
        self.coefs = [float(a) * sum(norms) / n for a in mean]

    def _step(self, mean: np.ndarray, units: list[int], scale: np.ndarray) -> np.ndarray:
        """The mean of the log maps ``log_mean(u_i)`` (``u_i = x_i * scale_i``), as
        coefficients."""
        assert self.gram is not None
        along = (self.gram * mean).sum(axis=1)  # x_i . mean
        step = np.zeros(len(mean))
        pull = 0.0  # coefficient of ``mean`` in the step
        alpha = 1.0 / len(units)
        for i in units:
            dot = min(1.0, max(-1.0, float(along[i]) * float(scale[i])))
            theta = math.acos(dot)
            if theta < self.tol or math.pi - theta < OPPOSITE_EPS:  # here already, or opposite
                continue
            coef = alpha * theta / math.sin(theta)
            step[i] += coef * float(scale[i])
            pull -= coef * dot
        return step + pull * mean

    def apply(self, xs: list[Tensor], base: Tensor | None) -> Tensor:
        if len(xs) == 1:
            return xs[0]
        return combine(xs, self.coefs, xs[0])


_karcher_chunks = whole(KarcherStream, "karcher", None)


def karcher(
    tensors: list[Tensor], base: Tensor | None, params: dict[str, Any], rng: Any = None
) -> Tensor:
    """Karcher mean of the directions (uniform weights), times the mean norm."""
    if len(tensors) == 1:
        return tensors[0]
    return _karcher_chunks(tensors, base, params, rng)


MAX_ITER = 10_000
"""karcher's cap on ``max_iter``: it converges in tens of steps; more is a typo, not a need."""

KARCHER = Method(
    name="karcher",
    fn=karcher,
    params=(
        Param("max_iter", False, int, 10, low=0, high=MAX_ITER, help="most log/exp iterations"),
        Param("tol", False, float, 1e-5, low=0, low_open=True, help="stop below this step"),
    ),
    base="input",
    min_models=1,
    max_models=None,
    paper="https://en.wikipedia.org/wiki/Karcher_mean",
    description="Riemannian (Karcher) mean of the models' directions, times their mean norm",
    workspace=(2.0, 4.0),
    stream=KarcherStream,
)
