"""The task-vector family's functions: task_arithmetic, ties, dare_*, breadcrumbs*, della*.

Every method here is the same four named steps, differing only in which sparsifier runs and
whether sign consensus is on (no method has its own copy of the pipeline):

    d_i = x_i - b                                  weighted_task_vectors
    e_i = rescale(sparsify(d_i, opts_i))           (sparsify.py: the sparsifiers, rescale)
    o_i = w_i e_i
    s   = sign(sum_i o_i), 0 counted as +          elect_signs
    m_i = [sign(o_i) == s]  (zeros never agree)    disjoint_merge (m_i = 1 without consensus:
    out = b + lambda * sum_i m_i o_i / D           linear_merge)

with ``D = sum_i m_i w_i`` (elementwise; 0 replaced by 1) when ``normalize`` is true, else 1.
``opts_i`` is model i's per-model parameters (``density``, ``gamma``, ``epsilon``).

================ ============ ========= =================================================
method           sparsifier   consensus defaults
================ ============ ========= =================================================
task_arithmetic  none         no        normalize false
ties             magnitude    yes       normalize true, rescale false
dare_linear      bernoulli    no        normalize false, rescale true
dare_ties        bernoulli    yes       normalize false, rescale true
breadcrumbs      breadcrumbs  no        normalize false, rescale false, gamma 0.01
breadcrumbs_ties breadcrumbs  yes       normalize false, rescale false, gamma 0.01
della_linear     della        no        normalize false, rescale true, epsilon 0.15
della            della        yes       normalize true, rescale true, epsilon 0.15
================ ============ ========= =================================================

``int8_mask`` is accepted for mergekit compatibility; it only ever saved memory, and here the
sign masks are transient booleans, so there is nothing left for it to save: results are
identical either way. The ``Method`` declarations live in ``task_family.py``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from merge.methods import sparsify
from merge.methods.base import MethodFn
from merge.methods.sparsify import Sparsifier

__all__ = [
    "breadcrumbs",
    "breadcrumbs_ties",
    "dare_linear",
    "dare_ties",
    "della",
    "della_linear",
    "disjoint_merge",
    "elect_signs",
    "linear_merge",
    "merge_task_vectors",
    "per_model",
    "pipeline",
    "task_arithmetic",
    "ties",
    "weighted_task_vectors",
]


# --- the steps ------------------------------------------------------------------------------
# Memory: the executor holds the inputs; the steps add one weighted task vector per model plus
# a few accumulators, and free everything else as they go (the temporaries they create are
# their own, so they are updated in place; inputs are never touched).


def per_model(params: dict[str, Any], i: int) -> dict[str, Any]:
    """Model ``i``'s values of the per-model (list-valued) parameters."""
    return {name: value[i] for name, value in params.items() if isinstance(value, list)}


def weighted_task_vectors(
    tensors: list[Tensor],
    base: Tensor,
    params: dict[str, Any],
    sparsifier: Sparsifier | None,
    rng: torch.Generator | None,
) -> list[Tensor]:
    """``o_i = w_i e_i`` with ``d_i = x_i - b`` and ``e_i`` = ``d_i`` sparsified with model
    i's options, then rescaled (``params["rescale"]``); in model order so draws reproduce."""
    mode = sparsify.rescale_mode(params.get("rescale", False))
    out = []
    for i, x in enumerate(tensors):
        d = x - base
        e = d
        if sparsifier is not None:
            e = sparsify.rescale(sparsifier(d, per_model(params, i), rng), d, mode)
        del d
        out.append(e.mul_(float(params["weight"][i])))  # e is a fresh temporary of ours
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
    if params.get("trim") == "global" and "trim_threshold" not in params:
        raise ValueError("ties with trim: global needs the thresholds of merge.globaltrim")
    weights = params["weight"]
    weighted = weighted_task_vectors(tensors, base, params, sparsifier, rng)
    if consensus:
        combined = disjoint_merge(weighted, weights, elect_signs(weighted), params["normalize"])
    else:
        combined = linear_merge(weighted, weights, params["normalize"])
    del weighted
    return combined.mul_(float(params["lambda"])).add_(base)


def pipeline(sparsifier: Sparsifier | None, consensus: bool, name: str, doc: str) -> MethodFn:
    """The method function that runs ``merge_task_vectors`` with one sparsifier and consensus
    choice: every family member is one of these, none has its own copy of the steps."""

    def fn(
        tensors: list[Tensor], base: Tensor | None, params: dict[str, Any], rng: Any = None
    ) -> Tensor:
        return merge_task_vectors(
            tensors, base, params, rng, sparsifier=sparsifier, consensus=consensus
        )

    fn.__name__ = fn.__qualname__ = name
    fn.__doc__ = doc
    return fn


task_arithmetic = pipeline(
    None,
    False,
    "task_arithmetic",
    "``b + lambda * sum w_i d_i`` (divided by ``sum w_i`` if normalize).",
)
ties = pipeline(
    sparsify.magnitude,
    True,
    "ties",
    "Magnitude top-k per model (per tensor, or over the whole model with ``trim: global``: the "
    "executor then adds each model's ``trim_threshold``/``trim_equal``), then sign consensus "
    "and disjoint (normalized) merge.",
)
dare_linear = pipeline(
    sparsify.bernoulli, False, "dare_linear", "Bernoulli(density) keep mask, rescale, weighted sum."
)
dare_ties = pipeline(
    sparsify.bernoulli, True, "dare_ties", "Bernoulli(density) keep mask, rescale, sign consensus."
)
breadcrumbs = pipeline(
    sparsify.breadcrumbs,
    False,
    "breadcrumbs",
    "Drop each task vector's largest (gamma) and smallest entries, add the weighted sum.",
)
breadcrumbs_ties = pipeline(
    sparsify.breadcrumbs,
    True,
    "breadcrumbs_ties",
    "Breadcrumbs' band of magnitudes per model, then TIES sign consensus.",
)
della_linear = pipeline(
    sparsify.della,
    False,
    "della_linear",
    "Keep entries with rank-based probabilities (MagPrune), rescale, add the weighted sum.",
)
della = pipeline(
    sparsify.della, True, "della", "MagPrune keep mask per model, rescale, then sign consensus."
)
