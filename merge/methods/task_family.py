"""Declarations of the task-vector family: parameters, defaults, papers, memory, checks.

The functions are in ``task_arithmetic.py`` and the sparsifiers in ``sparsify.py``; this module
only says, per method, which parameters it takes (with METHODS.md's defaults), what it needs
and how much working memory it uses. ``rescale`` accepts ``true``/``l1`` (mergekit's L1-norm
restore), ``inverse_density`` (the papers' division by the keep probability) and ``false``.

``workspace`` of the methods added with breadcrumbs and della was measured as peak RSS above
the inputs with 1 and 3 models of 8M float32 entries: each model keeps one weighted task
vector; the fixed part is the sparsifier's transient buffers for the model being sparsified
(``topk`` scratch for breadcrumbs; magnitudes, sort indices, ranks and draws for della).
"""

from __future__ import annotations

from typing import Any

from merge.methods import task_arithmetic as fns
from merge.methods.base import Method, Param
from merge.methods.sparsify import della_bounds_problem, rescale_mode

__all__ = [
    "BREADCRUMBS",
    "BREADCRUMBS_TIES",
    "DARE_LINEAR",
    "DARE_TIES",
    "DELLA",
    "DELLA_LINEAR",
    "TASK_ARITHMETIC",
    "TIES",
    "della_check",
]

_WEIGHT = Param("weight", True, float, help="scale of this model's task vector")
_DENSITY = Param(
    "density", True, float, 1.0, low=0, high=1, low_open=True, help="fraction of entries kept"
)
_GAMMA = Param(
    "gamma", True, float, 0.01, low=0, high=1, help="fraction of largest entries dropped"
)
_EPSILON = Param(
    "epsilon",
    True,
    float,
    0.15,
    low=0,
    high=0.5,
    high_open=True,
    help="keep probabilities spread over density +/- epsilon by magnitude rank",
)
_LAMBDA = Param("lambda", False, float, 1.0, help="scale of the merged task vector")
_INT8 = Param("int8_mask", False, bool, False, help="store sign masks as int8 (memory only)")


def _normalize(default: bool) -> Param:
    return Param("normalize", False, bool, default, help="divide by the sum of (agreeing) weights")


def _rescale(default: bool) -> Param:
    return Param(
        "rescale",
        False,
        bool,
        default,
        choices=("l1", "inverse_density"),
        help="restore each pruned vector: true/l1 its L1 norm, inverse_density divide kept "
        "entries by their keep probability",
    )


def della_check(params: dict[str, Any], models: list[str]) -> list[str]:
    """Every model whose effective ``density +/- epsilon`` leaves (0, 1)."""
    problems = []
    for model, density, epsilon in zip(models, params["density"], params["epsilon"], strict=True):
        problem = della_bounds_problem(float(density), float(epsilon), f" for model '{model}'")
        if problem:
            problems.append(problem)
    return problems


_SPARSE = (_WEIGHT, _DENSITY)
_BREADCRUMBS_FIX = (
    "older mergekit releases zero the whole task vector when int(gamma * size) is 0 (every "
    "tensor under 100 entries at gamma 0.01); here, as in mergekit 0.1.5, nothing is dropped "
    "from the top then"
)


def _family(name: str, **kw: Any) -> Method:
    """A required-base, any-number-of-models method of this family."""
    return Method(
        name=name, base="required", min_models=1, max_models=None, kept_bits=_mask_bits, **kw
    )


def _mask_bits(params: dict[str, Any]) -> int:
    """The ``l1`` rescale keeps one bit an entry and model: the keep masks of its L1 pass."""
    return int(rescale_mode(params.get("rescale", False)) == "l1")


TASK_ARITHMETIC = _family(
    "task_arithmetic",
    fn=fns.task_arithmetic,
    stream=fns.family(None, False),
    params=(_WEIGHT, _normalize(False), _LAMBDA),
    paper="https://arxiv.org/abs/2212.04089",
    description="add weighted task vectors (model - base) to the base",
    workspace=(1.0, 1.0),
)
_TRIM = Param(
    "trim",
    False,
    str,
    "local",
    choices=("local", "global"),
    help="top-k per tensor (local, mergekit) or over the whole model (global, the TIES paper;"
    " two extra statistics passes over the inputs)",
)

TIES = _family(
    "ties",
    fn=fns.ties,
    stream=fns.family("magnitude", True),
    params=(*_SPARSE, _normalize(True), _LAMBDA, _INT8, _rescale(False), _TRIM),
    paper="https://arxiv.org/abs/2306.01708",
    description="trim task vectors to their largest entries, elect signs, merge the agreeing ones",
    workspace=(1.0, 6.0),
)
DARE_LINEAR = _family(
    "dare_linear",
    fn=fns.dare_linear,
    stream=fns.family("bernoulli", False),
    params=(*_SPARSE, _normalize(False), _rescale(True), _LAMBDA, _INT8),
    paper="https://arxiv.org/abs/2311.03099",
    description="randomly drop task-vector entries, rescale, add the weighted sum to the base",
    random=True,
    workspace=(1.0, 2.5),
)
DARE_TIES = _family(
    "dare_ties",
    fn=fns.dare_ties,
    stream=fns.family("bernoulli", True),
    params=(*_SPARSE, _normalize(False), _rescale(True), _LAMBDA, _INT8),
    paper="https://arxiv.org/abs/2311.03099",
    description="randomly drop task-vector entries, rescale, elect signs, merge the agreeing ones",
    random=True,
    workspace=(1.0, 2.5),
)
BREADCRUMBS = _family(
    "breadcrumbs",
    fn=fns.breadcrumbs,
    stream=fns.family("breadcrumbs", False),
    params=(*_SPARSE, _GAMMA, _normalize(False), _rescale(False), _LAMBDA, _INT8),
    paper="https://arxiv.org/abs/2312.06795",
    description="drop each task vector's largest (gamma) and smallest entries, add the rest",
    workspace=(1.25, 6.75),
    fixes=_BREADCRUMBS_FIX,
)
BREADCRUMBS_TIES = _family(
    "breadcrumbs_ties",
    fn=fns.breadcrumbs_ties,
    stream=fns.family("breadcrumbs", True),
    params=(*_SPARSE, _GAMMA, _normalize(False), _rescale(False), _LAMBDA, _INT8),
    paper="https://arxiv.org/abs/2312.06795",
    description="drop each task vector's largest and smallest entries, elect signs, merge",
    workspace=(1.25, 6.75),
    fixes=_BREADCRUMBS_FIX,
)
DELLA_LINEAR = _family(
    "della_linear",
    fn=fns.della_linear,
    stream=fns.family("della", False),
    params=(*_SPARSE, _EPSILON, _normalize(False), _rescale(True), _LAMBDA, _INT8),
    paper="https://arxiv.org/abs/2406.11617",
    description="drop entries at random, small ones more often (by rank), add the weighted sum",
    random=True,
    workspace=(1.0, 5.0),
    check=della_check,
)
DELLA = _family(
    "della",
    fn=fns.della,
    stream=fns.family("della", True),
    params=(*_SPARSE, _EPSILON, _normalize(True), _rescale(True), _LAMBDA, _INT8),
    paper="https://arxiv.org/abs/2406.11617",
    description="drop entries at random, small ones more often (by rank), elect signs, merge",
    random=True,
    workspace=(1.0, 5.0),
    check=della_check,
)
