"""Interpolation on the sphere of directions: ``nuslerp``, ``multislerp`` and ``karcher``.

Each method splits tensors into a direction (unit vector) and a length, averages directions on
the sphere and restores a length. Semantics are mergekit's (so existing recipes give the same
models), with these choices where it is silent or fails:

- nuslerp: ``t = w2 / (w1 + w2)`` (0.5 when ``|w1 + w2| < 1e-6``), then slerp from model 1
  (t=0) to model 2 (t=1) of the raw tensors, or of the task vectors ``x_i - b`` when a base is
  set (the base is then added back). Flattened by default; with ``nuslerp_flatten: false`` each
  vector along the last dim (a row of a 2-D weight) is slerped on its own, or each vector along
  dim 0 with ``nuslerp_row_wise: true`` (mergekit's naming). A 1-D tensor is one vector either
  way. Where ``1 - |cos th| < 1e-6`` (parallel or opposite within ~1.4e-3 rad) it lerps. A
  zero vector has no direction: it counts as orthogonal to the other (``th = pi/2``,
  mergekit's numbers, never NaN), so ``slerp(t, 0, v) = sin(t pi/2) v``. ``t`` 0 and 1
  return the model itself.
- multislerp: task vectors if a base is set; unit vectors ``u_i = v_i / (|v_i| + eps)``; the
  weighted mean direction ``m``; tangent vectors ``u_i - (u_i.m) m`` and their weighted sum
  ``v``; ``m cos|v| + v sin|v|/|v|`` (with ``|v| + eps``) times ``sum w_i |v_i|``, plus the base.
  In exact arithmetic ``v`` is 0 (the weighted tangent vectors at the weighted mean direction
  cancel), so the result is the weighted mean direction times the weighted mean length; it is
  computed in that closed form (one accumulator, not one buffer per model), equal to
  mergekit's step-by-step result up to float rounding. **Fix:** where ``|m|`` is below
  ``max(eps, 1e-6 * sum |w_i|)`` (opposite inputs cancel; an exactly opposite pair leaves float32
  noise of ~3e-8, above mergekit's 1e-8, which it then normalises) mergekit raises for 3 or more
  models; here any count falls back to ``sum w_i v_i`` (+ base): a tensor every model left equal
  to the base gives the base.
- karcher: the Riemannian (Karcher) mean of the unit vectors, uniform weights, by log/exp
  iterations from the normalised extrinsic mean, stopping after ``max_iter`` steps or when the
  tangent step is shorter than ``tol``; times the mean norm. A base model, if set, is one more
  input (like linear). Tensors with norm ``<= tol`` take no part in the direction (they still
  count in the mean norm); all of them that small give zeros. A unit vector within 1e-3 rad
  of opposite the current mean contributes no step: the log map is undefined at ``th = pi``
  and near it ``th / sin th`` blows float32 rounding up (mergekit divides by ~0 there).

Memory: directions are never materialised per model (``u_i`` is ``x_i`` times a number), so
each method holds two tensor-sized buffers whatever the model count (``workspace``, measured
as peak RSS over the inputs with 4M-entry tensors and 2 and 6 models).

What this does not do: weighted karcher (mergekit ignores weights too), or slerp between more
than two models along a path (multislerp is a barycentre, not a path).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from merge.methods.base import Method, Param

__all__ = [
    "KARCHER",
    "MULTISLERP",
    "NUSLERP",
    "karcher",
    "multislerp",
    "multislerp_check",
    "nuslerp",
    "slerp_vectors",
]

COLINEAR_COS = 1e-6  # 1 - |cos th| below this (|sin th| < ~1.4e-3): lerp (nuslerp)
CANCEL_FLOOR = 1e-6  # multislerp: a weighted mean direction this short (relative) cancels
NORM_FLOOR = 1e-7  # nuslerp divides norms clamped to at least this
WEIGHT_SUM_EPS = 1e-6  # nuslerp: |w1 + w2| below this gives t = 0.5
OPPOSITE_EPS = 1e-3  # karcher: a direction this close (rad) to opposite the mean gives no step


def _as_2d(x: Tensor, flatten: bool, row_wise: bool) -> tuple[Tensor, int]:
    """A 2-D view of ``x`` and the dim its vectors run along: all of ``x`` as one vector, the
    vectors along the last dim (rows), or along dim 0 with ``row_wise``."""
    if flatten or x.dim() <= 1:
        return x.reshape(1, -1), 1
    if row_wise:
        return x.reshape(x.shape[0], -1), 0
    return x.reshape(-1, x.shape[-1]), 1


def slerp_vectors(
    t: float, v0: Tensor, v1: Tensor, dim: int = 1, *, inplace: bool = False
) -> Tensor:
    """Slerp each vector of the 2-D ``v0`` (t=0) along ``dim`` towards the same vector of ``v1``.

    Norms are clamped to ``NORM_FLOOR`` (a zero vector counts as orthogonal); vectors with
    ``1 - |cos th| < COLINEAR_COS`` (parallel or opposite, within ~1.4e-3 rad) are lerped.
    ``inplace`` writes the result into ``v0``."""
    n0 = torch.linalg.vector_norm(v0, dim=dim, keepdim=True).clamp_(min=NORM_FLOOR)
    n1 = torch.linalg.vector_norm(v1, dim=dim, keepdim=True).clamp_(min=NORM_FLOOR)
    dot = torch.einsum("ij,ij->i" if dim == 1 else "ij,ij->j", v0, v1).unsqueeze(dim)
    cos = (dot / (n0 * n1)).clamp_(-1.0, 1.0)
    theta = torch.acos(cos)
    sin = torch.sin(theta)
    # decided on the cosine: float32 cannot resolve angles within ~1e-3 of 0 or pi (exactly
    # opposite vectors give cos -0.99999994 or -1, and sin(acos(-1)) is -8.7e-8, not 0), so a
    # sin test would divide rounding noise by ~1e-4..1e-8 there; the lerp is exact instead
    colinear = (1.0 - cos.abs()) < COLINEAR_COS
    safe = torch.where(colinear, torch.ones_like(sin), sin)
    s0 = torch.where(colinear, torch.full_like(sin, 1 - t), torch.sin((1 - t) * theta) / safe)
    s1 = torch.where(colinear, torch.full_like(sin, t), torch.sin(t * theta) / safe)
    out = v0.mul_(s0) if inplace else v0 * s0
    return out.addcmul_(v1, s1)


def nuslerp(
    tensors: list[Tensor], base: Tensor | None, params: dict[str, Any], rng: Any = None
) -> Tensor:
    """Slerp from model 1 to model 2 at ``t = w2 / (w1 + w2)``; of task vectors with a base."""
    if len(tensors) != 2:
        raise ValueError(f"nuslerp takes exactly two tensors, got {len(tensors)}")
    w0, w1 = (float(w) for w in params["weight"])
    t = 0.5 if abs(w0 + w1) < WEIGHT_SUM_EPS else w1 / (w0 + w1)
    if t == 0:
        return tensors[0]
    if t == 1:
        return tensors[1]
    flatten, row_wise = bool(params["nuslerp_flatten"]), bool(params["nuslerp_row_wise"])
    x0, x1 = tensors
    if base is not None:
        x0, x1 = x0 - base, x1 - base
    (v0, dim), (v1, _) = _as_2d(x0, flatten, row_wise), _as_2d(x1, flatten, row_wise)
    out = slerp_vectors(t, v0, v1, dim, inplace=base is not None).reshape(tensors[0].shape)
    return out.add_(base) if base is not None else out


def _task(x: Tensor, base: Tensor | None) -> Tensor:
    """``x - base`` (a temporary), or ``x`` itself without a base (never modified)."""
    return x - base if base is not None else x


def _norm(x: Tensor) -> float:
    return float(torch.linalg.vector_norm(x))


def _dot(a: Tensor, b: Tensor) -> float:
    return float(torch.dot(a.reshape(-1), b.reshape(-1)))


def multislerp(
    tensors: list[Tensor], base: Tensor | None, params: dict[str, Any], rng: Any = None
) -> Tensor:
    """Barycentric interpolation on the sphere (tangent space at the weighted mean direction)."""
    if len(tensors) == 1:
        return tensors[0]
    weights = [float(w) for w in params["weight"]]
    if params["normalize_weights"]:
        total = sum(weights)
        if total == 0:
            raise ValueError("multislerp: the weights sum to 0, so they cannot be normalized")
        weights = [w / total for w in weights]
    eps = float(params["eps"])
    norms: list[float] = []
    mean = torch.zeros_like(tensors[0])
    for x, w in zip(tensors, weights, strict=True):
        v = _task(x, base)
        norms.append(_norm(v))
        mean.add_(v, alpha=w / (norms[-1] + eps))  # sum_i w_i u_i
        del v
    mean_norm = _norm(mean)
    # the directions cancel (exactly opposite pairs leave float32 noise of ~1e-8, so the floor
    # is relative to the weights, not just eps): weighted sum of the (task) vectors
    if mean_norm < max(eps, CANCEL_FLOOR * sum(abs(w) for w in weights)):
        mean.zero_()
        for x, w in zip(tensors, weights, strict=True):
            mean.add_(_task(x, base), alpha=w)
        return mean.add_(base) if base is not None else mean
    # m = mean / mean_norm. The tangent sum v = sum_i w_i (u_i - (u_i.m) m) is
    # sum_i w_i u_i - (sum_i w_i u_i.m) m = (mean_norm - along) m: a multiple of m, so the
    # exp map m cos|v| + v sin|v| / |v| is m times a number (|v| + eps, as mergekit).
    along = sum(
        w * _dot(_task(x, base), mean) / (mean_norm * (n + eps))
        for x, w, n in zip(tensors, weights, norms, strict=True)
    )
    tangent = mean_norm - along
    length = abs(tangent) + eps
    on_sphere = math.cos(length) + tangent * math.sin(length) / length
    scale = sum(w * n for w, n in zip(weights, norms, strict=True))
    out = mean.mul_(on_sphere * scale / mean_norm)
    return out.add_(base) if base is not None else out


def multislerp_check(params: dict[str, Any], models: list[str]) -> list[str]:
    """``normalize_weights`` cannot divide by weights that sum to 0."""
    if params["normalize_weights"] and sum(float(w) for w in params["weight"]) == 0:
        return [
            "the weights sum to 0, so normalize_weights cannot divide by them; "
            "change a weight or set normalize_weights: false"
        ]
    return []


def _karcher_step(mean: Tensor, units: list[tuple[Tensor, float]], tol: float) -> Tensor:
    """The mean of the log maps ``log_mean(u_i)`` (``u_i = x_i * s_i``), a new tensor."""
    step = torch.zeros_like(mean)
    pull = 0.0  # coefficient of ``mean`` in the step
    alpha = 1.0 / len(units)
    for x, scale in units:
        dot = min(1.0, max(-1.0, _dot(mean, x) * scale))
        theta = math.acos(dot)
        if theta < tol or math.pi - theta < OPPOSITE_EPS:  # here already, or opposite
            continue
        coef = alpha * theta / math.sin(theta)
        step.add_(x, alpha=coef * scale)
        pull -= coef * dot
    return step.add_(mean, alpha=pull)


def karcher(
    tensors: list[Tensor], base: Tensor | None, params: dict[str, Any], rng: Any = None
) -> Tensor:
    """Karcher mean of the directions (uniform weights), times the mean norm."""
    if len(tensors) == 1:
        return tensors[0]
    max_iter, tol = int(params["max_iter"]), float(params["tol"])
    norms = [_norm(x) for x in tensors]
    units = [(x, 1.0 / n) for x, n in zip(tensors, norms, strict=True) if n > tol]
    if not units:
        return torch.zeros_like(tensors[0])
    mean = torch.zeros_like(tensors[0])
    for x, scale in units:
        mean.add_(x, alpha=scale / len(units))
    size = _norm(mean)
    if size < tol:
        mean = units[0][0] * units[0][1]
    else:
        mean.div_(size)
    for _ in range(max_iter):
        step = _karcher_step(mean, units, tol)
        length = _norm(step)
        if length < tol:
            break
        mean.mul_(math.cos(length)).add_(step, alpha=math.sin(length) / length)
        del step
        size = _norm(mean)
        if size > tol:
            mean.div_(size)
    return mean.mul_(sum(norms) / len(norms))


_WEIGHT = Param("weight", True, float, help="relative weight of this model")

NUSLERP = Method(
    name="nuslerp",
    fn=nuslerp,
    params=(
        Param("weight", True, float, help="t = w2 / (w1 + w2): model 2's share"),
        Param(
            "nuslerp_flatten", False, bool, True, help="slerp whole tensors, not vector by vector"
        ),
        Param(
            "nuslerp_row_wise",
            False,
            bool,
            False,
            help="unflattened: slerp vectors along dim 0 instead of the last dim",
        ),
    ),
    base="optional",
    min_models=2,
    max_models=2,
    paper="https://github.com/arcee-ai/mergekit/blob/main/docs/merge_methods.md#nuslerp-nuslerp",
    description="slerp between two models by weight, of task vectors when a base is set",
    workspace=(0.0, 2.0),
    fixes="directions within ~1.4e-3 rad of parallel or opposite (1 - |cos| < 1e-6) are lerped: "
    "mergekit's |sin| < 1e-8 test misses exactly opposite vectors in float32 and divides "
    "rounding noise by ~1e-7",
)
MULTISLERP = Method(
    name="multislerp",
    fn=multislerp,
    params=(
        _WEIGHT,
        Param("normalize_weights", False, bool, True, help="divide weights by their sum"),
        Param("eps", False, float, 1e-8, low=0, low_open=True, help="numerical floor"),
    ),
    base="optional",
    min_models=1,
    max_models=None,
    paper="https://goddard.blog/posts/multislerp-wow-what-a-cool-idea",
    description="spherical weighted average of any number of models (or task vectors)",
    workspace=(0.0, 2.0),
    fixes="when the weighted directions cancel (|mean| < 1e-6 of the weights), mergekit raises "
    "for 3 or more models and normalises rounding noise for an opposite pair; here it falls "
    "back to the weighted sum",
    check=multislerp_check,
)
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
    workspace=(0.0, 2.0),
)
