"""Interpolation on the sphere of directions: ``nuslerp`` and ``multislerp`` (``karcher``, the
third of the family, is in ``merge.methods.karcher``; it shares the helpers here).

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

Streamed (``merge.methods.stream``; each ``fn`` runs its stream over in-memory tensors, so the
executor's chunked path and the whole-tensor path give the same bits):

- nuslerp: flattened, one statistics pass sums ``|v0|^2``, ``|v1|^2`` and ``v0.v1`` (exact
  float64 products of the float32 task vectors, float64 sums), then each chunk is
  ``s0 v0 + s1 v1``; by rows (the last dim), chunks of whole rows and no pass; with
  ``row_wise``, chunks of whole rows of the ``(shape[0], -1)`` view and one pass summing each
  column's products row after row (a cumulative sum from the running total: the same additions
  in the same order for any chunk size), then each chunk with its columns' coefficients.
- multislerp and karcher: one statistics pass sums the models' Gram matrix ``v_i . v_j``
  (exact products, float64 sums). Every vector these methods form is a linear combination of
  the inputs (the weighted mean direction; karcher's every iterate and log-map step), so the
  norms, dot products and all of karcher's ``max_iter`` iterations run on coefficients in
  float64, and each output chunk is one weighted sum of the input chunks: no pass per
  iteration. The Gram's sums over chunks may round differently for other chunk sizes
  (~1e-16 relative); chunk bounds are fixed by the shape, so outputs never depend on threads
  or the memory budget.

Memory: a chunk's task vectors in float32 and float64 and one float64 product per model
(``workspace``, in chunk-sized float32 buffers), plus the row sums (one row) with
``row_wise``; nothing tensor-sized.

What this does not do: weighted karcher (mergekit ignores weights too), or slerp between more
than two models along a path (multislerp is a barycentre, not a path).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from torch import Tensor

from merge.methods.base import Method, Param
from merge.methods.stream import Streamed, float64_sum, whole

__all__ = [
    "MULTISLERP",
    "NUSLERP",
    "MultislerpStream",
    "NuslerpStream",
    "multislerp",
    "multislerp_check",
    "nuslerp",
    "slerp_coefficients",
]

COLINEAR_COS = 1e-6  # 1 - |cos th| below this (|sin th| < ~1.4e-3): lerp (nuslerp)
CANCEL_FLOOR = 1e-6  # multislerp: a weighted mean direction this short (relative) cancels
NORM_FLOOR = 1e-7  # nuslerp divides norms clamped to at least this
WEIGHT_SUM_EPS = 1e-6  # nuslerp: |w1 + w2| below this gives t = 0.5


def _task(x: Tensor, base: Tensor | None) -> Tensor:
    """``x - base`` (a temporary), or ``x`` itself without a base (never modified)."""
    return x - base if base is not None else x


def _wide(x: Tensor) -> Tensor:
    """``x`` in float64: products of two such entries are exact (24 + 24 bits < 53)."""
    return x.to(torch.float64)


def _row_sums(a: Tensor, b: Tensor) -> Tensor:
    """``sum_j a_ij b_ij`` per row of two float64 matrices: numpy's pairwise sum on the CPU,
    whose order depends on the row's length only (not on the number of rows or threads)."""
    if a.device.type != "cpu":
        return (a * b).sum(dim=1)
    return torch.from_numpy(np.sum((a * b).numpy(), axis=1))


def gram_add(gram: np.ndarray, vs: list[Tensor]) -> None:
    """Add the chunk's exact products ``v_i . v_j`` (summed in float64) to ``gram``."""
    wide = [_wide(v) for v in vs]
    for i, a in enumerate(wide):
        for j in range(i, len(wide)):
            gram[i, j] += float64_sum(a * wide[j])
            gram[j, i] = gram[i, j]


def combine(vs: list[Tensor], coefs: list[float], like: Tensor) -> Tensor:
    """``sum_i coefs[i] vs[i]`` in float32, in model order (a new tensor)."""
    out = torch.zeros_like(like, dtype=torch.float32)
    for v, c in zip(vs, coefs, strict=True):
        if c != 0.0:
            out.add_(v, alpha=c)
    return out


# --- nuslerp ----------------------------------------------------------------------------------


def slerp_coefficients(
    t: float, squares0: Tensor, squares1: Tensor, dots: Tensor
) -> tuple[Tensor, Tensor]:
    """Per vector, the float64 ``(s0, s1)`` of ``slerp(t, v0, v1) = s0 v0 + s1 v1`` from the
    vectors' squared norms and dot product. Norms are clamped to ``NORM_FLOOR`` (a zero vector
    counts as orthogonal); vectors with ``1 - |cos th| < COLINEAR_COS`` (parallel or opposite,
    within ~1.4e-3 rad) are lerped."""
    n0 = squares0.sqrt().clamp_(min=NORM_FLOOR)
    n1 = squares1.sqrt().clamp_(min=NORM_FLOOR)
    cos = (dots / (n0 * n1)).clamp_(-1.0, 1.0)
    theta = torch.acos(cos)
    # decided on the cosine: angles within ~1e-3 of 0 or pi divide rounding noise by sin th
    # ~ 1e-4..1e-8 (float32 inputs that are exactly opposite, up to rounding); lerp there
    colinear = (1.0 - cos.abs()) < COLINEAR_COS
    safe = torch.where(colinear, torch.ones_like(theta), torch.sin(theta))
    s0 = torch.where(colinear, torch.full_like(theta, 1 - t), torch.sin((1 - t) * theta) / safe)
    s1 = torch.where(colinear, torch.full_like(theta, t), torch.sin(t * theta) / safe)
    return s0, s1


class NuslerpStream(Streamed):
    """``nuslerp`` over chunks. Flattened (or 1-D): one statistics pass sums the squared
    norms and the dot product of the two (task) vectors, exact products summed in float64,
    then each chunk is ``s0 v0 + s1 v1``. Vectors along the last dim: chunks of whole rows,
    each row slerped on its own, no pass. Along dim 0 (``nuslerp_row_wise``): chunks of whole
    rows of the ``(shape[0], -1)`` view, and one pass accumulating each column's sums row
    after row (a cumulative sum starting from the running total: the same float64 additions
    in the same order whatever the chunk size), then each chunk with its columns'
    coefficients. ``t`` 0 or 1: the model itself, no pass."""

    def __init__(self, params: dict[str, Any], shape: tuple[int, ...], rng: Any = None) -> None:
        w0, w1 = (float(w) for w in params["weight"])
        self.t = 0.5 if abs(w0 + w1) < WEIGHT_SUM_EPS else w1 / (w0 + w1)
        flatten = bool(params["nuslerp_flatten"]) or len(shape) <= 1
        self.mode = "flat" if flatten else "cols" if params["nuslerp_row_wise"] else "rows"
        numel = math.prod(shape)
        if self.mode == "rows":
            self.row = max(shape[-1], 1)
        elif self.mode == "cols":
            self.row = max(numel // shape[0], 1) if shape[0] else 1
        self.passes = 0 if self.t in (0.0, 1.0) or self.mode == "rows" else 1
        width = self.row if self.mode == "cols" else 1
        self._sums = torch.zeros(3, width, dtype=torch.float64)  # v0.v0, v1.v1, v0.v1
        self.coef: tuple[Tensor, Tensor] | None = None

    def _pair(self, xs: list[Tensor], base: Tensor | None) -> tuple[Tensor, Tensor]:
        if len(xs) != 2:
            raise ValueError(f"nuslerp takes exactly two tensors, got {len(xs)}")
        return _task(xs[0], base), _task(xs[1], base)

    def observe(self, step: int, xs: list[Tensor], base: Tensor | None) -> None:
        v0, v1 = self._pair(xs, base)
        a, b = _wide(v0), _wide(v1)
        if self.mode == "flat":
            for k, (p, q) in enumerate(((a, a), (b, b), (a, b))):
                self._sums[k, 0] += float64_sum(p * q)
            return
        sums = self._sums.to(a.device)
        a, b = a.view(-1, self.row), b.view(-1, self.row)
        for k, (p, q) in enumerate(((a, a), (b, b), (a, b))):
            block = torch.cat([sums[k : k + 1], p * q])  # the running total, then each row
            sums[k] = torch.cumsum(block, dim=0)[-1]
        self._sums = sums

    def end_pass(self, step: int) -> None:
        self.coef = slerp_coefficients(self.t, self._sums[0], self._sums[1], self._sums[2])

    def apply(self, xs: list[Tensor], base: Tensor | None) -> Tensor:
        if self.t in (0.0, 1.0):
            return xs[0] if self.t == 0.0 else xs[1]
        v0, v1 = self._pair(xs, base)
        if self.mode == "rows":
            a, b = _wide(v0).view(-1, self.row), _wide(v1).view(-1, self.row)
            s0, s1 = slerp_coefficients(self.t, _row_sums(a, a), _row_sums(b, b), _row_sums(a, b))
            s0, s1 = s0.unsqueeze(1), s1.unsqueeze(1)
        else:
            assert self.coef is not None
            s0, s1 = (c.unsqueeze(0) for c in self.coef)  # (1, 1) or (1, columns)
        f32, dev = torch.float32, v0.device
        out = v0.view(-1, self.row) * s0.to(dev, f32)  # flat: row 1, one coefficient
        out = out.addcmul_(v1.view(-1, self.row), s1.to(dev, f32)).view(-1)
        return out.add_(base) if base is not None else out


def _nuslerp_shortcut(tensors: list[Tensor], params: dict[str, Any]) -> Tensor | None:
    """The model itself where ``t`` is 0 or 1 (no copy), else ``None``."""
    if len(tensors) != 2:
        raise ValueError(f"nuslerp takes exactly two tensors, got {len(tensors)}")
    w0, w1 = (float(w) for w in params["weight"])
    t = 0.5 if abs(w0 + w1) < WEIGHT_SUM_EPS else w1 / (w0 + w1)
    return tensors[0] if t == 0 else tensors[1] if t == 1 else None


_nuslerp_chunks = whole(NuslerpStream, "nuslerp", None)


def nuslerp(
    tensors: list[Tensor], base: Tensor | None, params: dict[str, Any], rng: Any = None
) -> Tensor:
    """Slerp from model 1 to model 2 at ``t = w2 / (w1 + w2)``; of task vectors with a base."""
    same = _nuslerp_shortcut(tensors, params)
    return same if same is not None else _nuslerp_chunks(tensors, base, params, rng)


# --- multislerp -------------------------------------------------------------------------------


class MultislerpStream(Streamed):
    """``multislerp`` over chunks: one statistics pass sums the Gram matrix of the (task)
    vectors, ``G_ij = v_i . v_j`` (exact products summed in float64); the norms, the weighted
    mean direction ``m = sum_i c_i v_i`` with ``c_i = w_i / (|v_i| + eps)``, its length
    ``sqrt(c' G c)`` and each ``v_i . m = (G c)_i`` follow from it, so every chunk is one
    weighted sum of the models' chunks."""

    def __init__(self, params: dict[str, Any], shape: tuple[int, ...], rng: Any = None) -> None:
        weights = [float(w) for w in params["weight"]]
        if params["normalize_weights"]:
            total = sum(weights)
            if total == 0:
                raise ValueError("multislerp: the weights sum to 0, so they cannot be normalized")
            weights = [w / total for w in weights]
        self.weights, self.eps = weights, float(params["eps"])
        n = len(weights)
        self.passes = 1 if n > 1 else 0
        self.gram = np.zeros((n, n), dtype=np.float64)
        self.coefs = [1.0] * n

    def observe(self, step: int, xs: list[Tensor], base: Tensor | None) -> None:
        gram_add(self.gram, [_task(x, base) for x in xs])

    def end_pass(self, step: int) -> None:
        w, eps, gram = self.weights, self.eps, self.gram
        norms = [math.sqrt(max(float(gram[i, i]), 0.0)) for i in range(len(w))]
        c = np.array([wi / (n + eps) for wi, n in zip(w, norms, strict=True)])
        pulls = (gram * c).sum(axis=1)  # v_i . (sum_j c_j v_j)
        mean_norm = math.sqrt(max(float((pulls * c).sum()), 0.0))
        # the directions cancel (exactly opposite pairs leave float32 noise of ~1e-8, so the
        # floor is relative to the weights, not just eps): weighted sum of the (task) vectors
        if mean_norm < max(eps, CANCEL_FLOOR * sum(abs(wi) for wi in w)):
            self.coefs = list(w)
            return
        # m = mean / mean_norm. The tangent sum v = sum_i w_i (u_i - (u_i.m) m) is
        # sum_i w_i u_i - (sum_i w_i u_i.m) m = (mean_norm - along) m: a multiple of m, so the
        # exp map m cos|v| + v sin|v| / |v| is m times a number (|v| + eps, as mergekit).
        along = sum(
            wi * float(p) / (mean_norm * (n + eps))
            for wi, p, n in zip(w, pulls, norms, strict=True)
        )
        tangent = mean_norm - along
        length = abs(tangent) + eps
        on_sphere = math.cos(length) + tangent * math.sin(length) / length
        scale = sum(wi * n for wi, n in zip(w, norms, strict=True))
        self.coefs = [float(ci) * on_sphere * scale / mean_norm for ci in c]

    def apply(self, xs: list[Tensor], base: Tensor | None) -> Tensor:
        if len(xs) == 1:
            return xs[0]
        out = combine([_task(x, base) for x in xs], self.coefs, xs[0])
        return out.add_(base) if base is not None else out


_multislerp_chunks = whole(MultislerpStream, "multislerp", None)


def multislerp(
    tensors: list[Tensor], base: Tensor | None, params: dict[str, Any], rng: Any = None
) -> Tensor:
    """Barycentric interpolation on the sphere (tangent space at the weighted mean direction)."""
    if len(tensors) == 1:
        return tensors[0]
    return _multislerp_chunks(tensors, base, params, rng)


def multislerp_check(params: dict[str, Any], models: list[str]) -> list[str]:
    """``normalize_weights`` cannot divide by weights that sum to 0."""
    if params["normalize_weights"] and sum(float(w) for w in params["weight"]) == 0:
        return [
            "the weights sum to 0, so normalize_weights cannot divide by them; "
            "change a weight or set normalize_weights: false"
        ]
    return []


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
    workspace=(2.0, 4.0),
    stream=NuslerpStream,
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
    workspace=(2.0, 4.0),
    stream=MultislerpStream,
    fixes="when the weighted directions cancel (|mean| < 1e-6 of the weights), mergekit raises "
    "for 3 or more models and normalises rounding noise for an opposite pair; here it falls "
    "back to the weighted sum",
    check=multislerp_check,
)
