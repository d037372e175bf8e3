"""The task-vector family: task_arithmetic, ties, dare_linear, dare_ties.

Every method here is the same four named steps, differing only in which sparsifier runs and
whether sign consensus is on (no method has its own copy of the pipeline):

    d_i = x_i - b                                  weighted_task_vectors
    e_i = sparsify(d_i, density_i)                 (then l1_rescale if rescale)
    o_i = w_i e_i
    s   = sign(sum_i o_i), 0 counted as +          elect_signs
    m_i = [sign(o_i) == s]  (zeros never agree)    disjoint_merge (m_i = 1 without consensus:
    out = b + lambda * sum_i m_i o_i / D           linear_merge)

with ``D = sum_i m_i w_i`` (elementwise; 0 replaced by 1) when ``normalize`` is true, else 1.

=============== ============ ============== ======================================
method          sparsifier   consensus      defaults
=============== ============ ============== ======================================
task_arithmetic none         no             normalize false
ties            magnitude    yes            normalize true, rescale false
dare_linear     bernoulli    no             normalize false, rescale true
dare_ties       bernoulli    yes            normalize false, rescale true
=============== ============ ============== ======================================

``int8_mask`` is accepted for mergekit compatibility; it only ever saved memory, and here the
sign masks are transient booleans, so there is nothing left for it to save: results are
identical either way.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from merge.methods.base import Method, Param
from merge.methods.sparsify import Sparsifier, bernoulli, l1_rescale, magnitude

__all__ = [
    "DARE_LINEAR",
    "DARE_TIES",
    "TASK_ARITHMETIC",
    "TIES",
    "disjoint_merge",
    "elect_signs",
    "linear_merge",
    "dare_linear",
    "dare_ties",
    "merge_task_vectors",
    "task_arithmetic",
    "weighted_task_vectors",
    "ties",
]


# --- the steps ------------------------------------------------------------------------------
# Memory: the executor holds the inputs; the steps add one weighted task vector per model plus
# a few accumulators, and free everything else as they go (the temporaries they create are
# their own, so they are updated in place; inputs are never touched).


def weighted_task_vectors(
    tensors: list[Tensor],
    base: Tensor,
    weights: list[float],
    densities: list[float] | None,
    sparsifier: Sparsifier | None,
    rng: torch.Generator | None,
    rescale: bool,
) -> list[Tensor]:
    """``o_i = w_i e_i`` with ``d_i = x_i - b``, ``e_i = sparsify(d_i, density_i)`` (then
    ``e_i * |d_i|_1 / |e_i|_1`` if ``rescale``), in model order so random draws reproduce."""
    out = []
    for i, (x, w) in enumerate(zip(tensors, weights, strict=True)):
        d = x - base
        e = d
        if sparsifier is not None and densities is not None:
            e = sparsifier(d, float(densities[i]), rng)
            if rescale:
                e = l1_rescale(e, d)
        del d
        out.append(e.mul_(float(w)))  # e is a fresh temporary of ours
    return out


def elect_signs(weighted: list[Tensor]) -> Tensor:
    """TIES "elect": True where the majority sign ``sign(sum_i o_i)`` is + (0 counts as +)."""
    return _sum(weighted) >= 0


def disjoint_merge(
    weighted: list[Tensor], weights: list[float], positive: Tensor, normalize: bool
) -> Tensor:
    """TIES "disjoint merge": ``sum_i m_i o_i / D`` with ``m_i = [sign(o_i) == s]`` (zero entries
    never agree) and ``D = sum_i m_i w_i`` (0 replaced by 1) if ``normalize``, else 1.

    Consumes ``weighted`` (its tensors are zeroed where they disagree)."""
    combined = torch.zeros_like(weighted[0])
    divisor = torch.zeros_like(weighted[0]) if normalize else None
    for o, w in zip(weighted, weights, strict=True):
        agree = torch.where(positive, o > 0, o < 0)
        combined.add_(o.mul_(agree))
        if divisor is not None:
            divisor.add_(agree.to(divisor.dtype).mul_(float(w)))
    if divisor is not None:
        combined.div_(divisor.masked_fill_(divisor == 0, 1.0))
    return combined


def linear_merge(weighted: list[Tensor], weights: list[float], normalize: bool) -> Tensor:
    """``sum_i o_i``, divided by ``sum_i w_i`` (0 replaced by 1) if ``normalize``."""
    combined = _sum(weighted)
    if normalize:
        combined.div_(float(sum(float(w) for w in weights)) or 1.0)
    return combined


def _sum(tensors: list[Tensor]) -> Tensor:
    out = tensors[0].clone()
    for t in tensors[1:]:
        out.add_(t)
    return out


# --- the pipeline ---------------------------------------------------------------------------


def merge_task_vectors(
    tensors: list[Tensor],
    base: Tensor | None,
    params: dict[str, Any],
    rng: torch.Generator | None,
    *,
    sparsifier: Sparsifier | None,
    consensus: bool,
) -> Tensor:
    """Run the steps: task vectors -> sparsify -> weight -> sign consensus -> combine."""
    if base is None:
        raise ValueError("task-vector methods need a base tensor, got None")
    weights = params["weight"]
    weighted = weighted_task_vectors(
        tensors,
        base,
        weights,
        params.get("density"),
        sparsifier,
        rng,
        bool(params.get("rescale", False)),
    )
    if consensus:
        combined = disjoint_merge(weighted, weights, elect_signs(weighted), params["normalize"])
    else:
        combined = linear_merge(weighted, weights, params["normalize"])
    del weighted
    return combined.mul_(float(params["lambda"])).add_(base)


def task_arithmetic(
    tensors: list[Tensor], base: Tensor | None, params: dict[str, Any], rng: Any = None
) -> Tensor:
    """``b + lambda * sum w_i d_i`` (divided by ``sum w_i`` if normalize)."""
    return merge_task_vectors(tensors, base, params, rng, sparsifier=None, consensus=False)


def ties(
    tensors: list[Tensor], base: Tensor | None, params: dict[str, Any], rng: Any = None
) -> Tensor:
    """Magnitude top-k per model, then sign consensus and disjoint (normalized) merge."""
    return merge_task_vectors(tensors, base, params, rng, sparsifier=magnitude, consensus=True)


def dare_linear(
    tensors: list[Tensor], base: Tensor | None, params: dict[str, Any], rng: Any
) -> Tensor:
    """Bernoulli(density) keep mask per model, L1 rescale: ``b + lambda sum w_i e_i``."""
    return merge_task_vectors(tensors, base, params, rng, sparsifier=bernoulli, consensus=False)


def dare_ties(
    tensors: list[Tensor], base: Tensor | None, params: dict[str, Any], rng: Any
) -> Tensor:
    """Bernoulli(density) keep mask per model, L1 rescale, then TIES sign consensus."""
    return merge_task_vectors(tensors, base, params, rng, sparsifier=bernoulli, consensus=True)


# --- declarations ---------------------------------------------------------------------------

_WEIGHT = Param("weight", True, float, help="scale of this model's task vector")
_DENSITY = Param(
    "density", True, float, 1.0, low=0, high=1, low_open=True, help="fraction of entries kept"
)
_LAMBDA = Param("lambda", False, float, 1.0, help="scale of the merged task vector")
_INT8 = Param("int8_mask", False, bool, False, help="store sign masks as int8 (memory only)")


def _normalize(default: bool) -> Param:
    return Param("normalize", False, bool, default, help="divide by the sum of (agreeing) weights")


def _rescale(default: bool) -> Param:
    return Param("rescale", False, bool, default, help="restore each pruned vector's L1 norm")


_SPARSE = (_WEIGHT, _DENSITY)

TASK_ARITHMETIC = Method(
    name="task_arithmetic",
    fn=task_arithmetic,
    params=(_WEIGHT, _normalize(False), _LAMBDA),
    base="required",
    min_models=1,
    max_models=None,
    paper="https://arxiv.org/abs/2212.04089",
    description="add weighted task vectors (model - base) to the base",
    workspace=(1.0, 1.0),
)
TIES = Method(
    name="ties",
    fn=ties,
    params=(*_SPARSE, _normalize(True), _LAMBDA, _INT8, _rescale(False)),
    base="required",
    min_models=1,
    max_models=None,
    paper="https://arxiv.org/abs/2306.01708",
    description="trim task vectors to their largest entries, elect signs, merge the agreeing ones",
    workspace=(1.0, 6.0),
)
DARE_LINEAR = Method(
    name="dare_linear",
    fn=dare_linear,
    params=(*_SPARSE, _normalize(False), _rescale(True), _LAMBDA, _INT8),
    base="required",
    min_models=1,
    max_models=None,
    paper="https://arxiv.org/abs/2311.03099",
    description="randomly drop task-vector entries, rescale, add the weighted sum to the base",
    random=True,
    workspace=(1.0, 2.5),
)
DARE_TIES = Method(
    name="dare_ties",
    fn=dare_ties,
    params=(*_SPARSE, _normalize(False), _rescale(True), _LAMBDA, _INT8),
    base="required",
    min_models=1,
    max_models=None,
    paper="https://arxiv.org/abs/2311.03099",
    description="randomly drop task-vector entries, rescale, elect signs, merge the agreeing ones",
    random=True,
    workspace=(1.0, 2.5),
)
