"""Spherical linear interpolation between the base and one other model (Shoemake 1985).

With ``x0`` the base, ``x1`` the other model, flattened:

    u_k = x_k / |x_k|            (x_k itself when |x_k| <= 1e-8)
    dot = u0 . u1
    if |dot| > 0.9995:  out = (1 - t) x0 + t x1                       (near (anti)parallel: lerp)
    else:               th = acos(dot)
                        out = sin((1 - t) th) / sin(th) x0 + sin(t th) / sin(th) x1

The raw tensors (not the unit vectors) are interpolated, so norms are interpolated too.
``t = 0`` returns the base and ``t = 1`` the other model exactly (the inputs themselves).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from merge.methods.base import Method, Param
from merge.methods.stream import Streamed, float64_sum, whole

__all__ = ["DOT_THRESHOLD", "EPS", "SLERP", "SlerpStream", "slerp", "slerp_tensors"]

DOT_THRESHOLD = 0.9995
EPS = 1e-8


def _unit_dot(x0: Tensor, x1: Tensor) -> float:
    """Cosine of the flattened tensors; a tensor with norm <= EPS is used as is."""
    n0 = torch.linalg.vector_norm(x0).item()
    n1 = torch.linalg.vector_norm(x1).item()
    dot = torch.dot(x0.reshape(-1), x1.reshape(-1)).item()
    return dot / ((n0 if n0 > EPS else 1.0) * (n1 if n1 > EPS else 1.0))


def slerp_tensors(t: float, x0: Tensor, x1: Tensor) -> Tensor:
    """Slerp from ``x0`` (t=0) to ``x1`` (t=1); lerp when ``|dot| > DOT_THRESHOLD``."""
    if t == 0:
        return x0
    if t == 1:
        return x1
    dot = _unit_dot(x0, x1)
    if abs(dot) > DOT_THRESHOLD:
        return x0 * (1 - t) + x1 * t
    theta = math.acos(dot)
    sin_theta = math.sin(theta)
    s0 = math.sin((1 - t) * theta) / sin_theta
    s1 = math.sin(t * theta) / sin_theta
    return x0 * s0 + x1 * s1


class SlerpStream(Streamed):
    """``slerp`` over chunks: one pass sums the dot product and squared norms (float64 sums of
    the float32 products, ``float64_sum``), then each chunk is ``s0 * base + s1 * x``."""

    def __init__(self, params: dict[str, Any], shape: tuple[int, ...], rng: Any = None) -> None:
        self.t = float(params["t"])
        self.passes = 0 if self.t in (0.0, 1.0) else 1
        self._sums = [0.0, 0.0, 0.0]  # x0.x0, x1.x1, x0.x1
        self.coef = (1.0 - self.t, self.t)

    @staticmethod
    def _pair(xs: list[Tensor], base: Tensor | None) -> tuple[Tensor, Tensor]:
        if base is None or len(xs) != 1:
            raise ValueError(f"slerp needs a base and exactly one other tensor, got {len(xs)}")
        return base, xs[0]

    def observe(self, step: int, xs: list[Tensor], base: Tensor | None) -> None:
        x0, x1 = self._pair(xs, base)
        # fixed-order sums of products (not BLAS, whose order and threading vary)
        self._sums[0] += float64_sum(x0 * x0)
        self._sums[1] += float64_sum(x1 * x1)
        self._sums[2] += float64_sum(x0 * x1)

    def end_pass(self, step: int) -> None:
        n0, n1 = math.sqrt(self._sums[0]), math.sqrt(self._sums[1])
        dot = self._sums[2] / ((n0 if n0 > EPS else 1.0) * (n1 if n1 > EPS else 1.0))
        if abs(dot) <= DOT_THRESHOLD:
            theta = math.acos(dot)
            sin_theta = math.sin(theta)
            t = self.t
            self.coef = (math.sin((1 - t) * theta) / sin_theta, math.sin(t * theta) / sin_theta)

    def apply(self, xs: list[Tensor], base: Tensor | None) -> Tensor:
        x0, x1 = self._pair(xs, base)
        if self.t == 0.0:
            return x0
        if self.t == 1.0:
            return x1
        return x0 * self.coef[0] + x1 * self.coef[1]


slerp = whole(
    SlerpStream,
    "slerp",
    "Slerp between ``base`` (t=0) and the single other tensor (t=1) at ``params['t']``.",
)


SLERP = Method(
    name="slerp",
    fn=slerp,
    params=(
        Param("t", False, float, low=0, high=1, help="0 gives the base model, 1 the other one"),
    ),
    base="required",
    min_models=1,
    max_models=1,
    paper="https://en.wikipedia.org/wiki/Slerp",
    description="spherical interpolation between the base model and one other model",
    workspace=(0.0, 2.5),
    stream=SlerpStream,
)
