"""The task-vector family: task_arithmetic, ties, dare_linear, dare_ties.

Every method here is the same four named steps, differing only in which sparsifier runs and
whether sign consensus is on (no method has its own copy of the pipeline):

    d_i = x_i - b                                  task_vectors
    e_i = sparsify(d_i, density_i)                 sparsify_all  (then l1_rescale if rescale)
    o_i = w_i e_i                                  apply_weights
    s   = sign(sum_i o_i), 0 counted as +          sign_consensus
    m_i = [sign(o_i) == s]  (zeros never agree)    sign_consensus (m_i = 1 without consensus)
    out = b + lambda * sum_i m_i o_i / D           combine

with ``D = sum_i m_i w_i`` (elementwise; 0 replaced by 1) when ``normalize`` is true, else 1.

=============== ============ ============== ======================================
method          sparsifier   consensus      defaults
=============== ============ ============== ======================================
task_arithmetic none         no             normalize false
ties            magnitude    yes            normalize true, rescale false
dare_linear     bernoulli    no             normalize false, rescale true
dare_ties       bernoulli    yes            normalize false, rescale true
=============== ============ ============== ======================================

``int8_mask`` only changes the dtype the consensus masks are stored in (int8 instead of
float32); results are identical.
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
    "apply_weights",
    "combine",
    "dare_linear",
    "dare_ties",
    "merge_task_vectors",
    "sign_consensus",
    "sparsify_all",
    "task_arithmetic",
    "task_vectors",
    "ties",
]


# --- the steps ------------------------------------------------------------------------------


def task_vectors(tensors: list[Tensor], base: Tensor) -> list[Tensor]:
    """``d_i = x_i - b``."""
    return [x - base for x in tensors]


def sparsify_all(
    deltas: list[Tensor],
    densities: list[float],
    sparsifier: Sparsifier,
    rng: torch.Generator | None,
    rescale: bool,
) -> list[Tensor]:
    """``e_i = sparsifier(d_i, density_i)`` in model order (so random draws are reproducible),
    then ``e_i * |d_i|_1 / |e_i|_1`` if ``rescale``."""
    out = []
    for d, density in zip(deltas, densities, strict=True):
        e = sparsifier(d, float(density), rng)
        out.append(l1_rescale(e, d) if rescale else e)
    return out


def apply_weights(deltas: list[Tensor], weights: list[float]) -> list[Tensor]:
    """``o_i = w_i e_i``."""
    return [d * float(w) for d, w in zip(deltas, weights, strict=True)]


def sign_consensus(weighted: list[Tensor], int8_mask: bool = False) -> list[Tensor]:
    """TIES "elect": ``s = sign(sum_i o_i)`` with 0 counted as +, then ``m_i = [sign(o_i) == s]``.

    Entries where ``o_i == 0`` never agree, so they drop out of the divisor too. Masks are int8
    if ``int8_mask`` else float32 (same numbers)."""
    total = _sum(weighted)
    majority = torch.where(total >= 0, 1.0, -1.0)
    dtype = torch.int8 if int8_mask else torch.float32
    return [(torch.sign(o) == majority).to(dtype) for o in weighted]


def combine(
    base: Tensor,
    weighted: list[Tensor],
    weights: list[float],
    masks: list[Tensor] | None,
    normalize: bool,
    lam: float,
) -> Tensor:
    """TIES "disjoint merge": ``b + lam * sum_i m_i o_i / D``.

    ``D = sum_i m_i w_i`` elementwise (``sum_i w_i`` without masks), 0 replaced by 1, used only
    if ``normalize``."""
    if masks is None:
        combined = _sum(weighted)
        divisor: Tensor | float = float(sum(float(w) for w in weights)) or 1.0
    else:
        combined = _sum([m * o for m, o in zip(masks, weighted, strict=True)])
        divisor = _sum([m * float(w) for m, w in zip(masks, weights, strict=True)])
        divisor = torch.where(divisor == 0, 1.0, divisor)
    if normalize:
        combined = combined / divisor
    return base + float(lam) * combined


def _sum(tensors: list[Tensor]) -> Tensor:
    out = tensors[0]
    for t in tensors[1:]:
        out = out + t
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
    deltas = task_vectors(tensors, base)
    if sparsifier is not None:
        deltas = sparsify_all(deltas, params["density"], sparsifier, rng, params["rescale"])
    weighted = apply_weights(deltas, params["weight"])
    masks = sign_consensus(weighted, params.get("int8_mask", False)) if consensus else None
    return combine(base, weighted, params["weight"], masks, params["normalize"], params["lambda"])


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
)
