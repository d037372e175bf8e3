"""Sparsification masks, keep probabilities and the rescale option for task vectors
``d = x - b``: the pieces ``merge.methods.task_arithmetic.TaskVectors`` merges with.

The sparsifiers, by the ``kind`` of ``TaskVectors`` (``keep`` is what ``inverse_density``
divides by; ``density >= 1`` keeps everything and draws nothing):

================ ========================================================== ==================
kind             kept entries                                               ``keep``
================ ========================================================== ==================
``magnitude``    exactly ``k = int(density * n)`` largest ``|d|`` (TIES)   ``k / n``
``bernoulli``    each with probability ``density`` (DARE)                   ``density``
``breadcrumbs``  ``|d|`` ranks ``[top, top + k)`` from the largest, with    ``k / n``
                 ``top = int(gamma * n)`` lowered until the band fits
``della``        each with probability ``p`` from its rank in its row       ``p`` per entry
================ ========================================================== ==================

Papers: TIES https://arxiv.org/abs/2306.01708, DARE https://arxiv.org/abs/2311.03099, Model
Breadcrumbs https://arxiv.org/abs/2312.06795, DELLA https://arxiv.org/abs/2406.11617.

Exact counts: ``magnitude`` and ``breadcrumbs`` keep exactly their counts even with tied
magnitudes (exact radix cuts, ties to the first entries in flattened order:
``merge.methods.stream.Cut``). Breadcrumbs' band is the top ``top + k`` minus the top ``top``;
the two cuts nest. **Fix vs
mergekit:** when ``int(gamma * n) == 0`` mergekit keeps ``sorted[n_bot:-0]``, an empty slice,
and zeroes the whole tensor (every small norm vector); here no top entry is dropped then.

DELLA ranks: within each row (the last dim; a 1-D tensor is one row) the entries are ranked by
``|d|`` ascending, ``0 .. n-1``, equal magnitudes in index order (a stable sort), and the rank
is normalised as ``r / (n - 1)`` to [0, 1], as mergekit's ``della_magprune`` does (its
``(rank - min) / (max - min)`` on ranks ``1 .. n``). A row of one entry has rank 0.5 (mergekit
divides by zero there). Keep probability ``p = density - epsilon + 2 * epsilon * rank``, which
averages ``density`` over a row; ``density +/- epsilon`` must lie in (0, 1) (the planner checks
this before any data is read; here it is a ``ValueError``). mergekit ranks along dim 1, which
is the last dim for every 1-D and 2-D tensor.

Random draws (``bernoulli`` and ``della``): one ``torch.rand(d.shape, generator=rng)`` per
model's chunk, from that model's generator; an entry is kept where the draw is ``< p``
(``p = density`` for ``bernoulli``), so with ``epsilon = 0`` della draws exactly DARE's mask.

Rescale (``rescale`` parameter, see ``rescale_mode``): ``l1`` (``true``, mergekit's) gives
``e * |d|_1 / |e|_1`` (unchanged when ``|e|_1 == 0``); ``inverse_density`` (the papers')
divides each kept entry by its ``keep``; ``false`` leaves ``e`` as it is.

Everything here is pure: inputs are never modified, the global RNG is never used.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from torch import Tensor

from merge.methods.radix import kth_largest

__all__ = [
    "RescaleMode",
    "band_counts",
    "bernoulli_mask",
    "della_bounds_problem",
    "draw",
    "magnitude_mask",
    "rank_keep_probability",
    "rescale_mode",
    "threshold_mask",
]

RescaleMode = Literal["l1", "inverse_density"] | None


# --- masks ----------------------------------------------------------------------------------


def magnitude_mask(d: Tensor, density: float) -> Tensor:
    """Bool mask of exactly ``k = int(density * numel)`` entries with the largest ``|d|``: the
    exact k-th largest by radix select (``merge.methods.radix``), entries equal to it kept in
    flattened order until there are k."""
    n = d.numel()
    k = min(int(density * n), n)
    if k == 0:
        return torch.zeros(d.shape, dtype=torch.bool, device=d.device)
    if k == n:
        return torch.ones(d.shape, dtype=torch.bool, device=d.device)
    mags = d.to(torch.float32).abs()  # one |d| for both the select and the mask
    threshold, equal = kth_largest(mags.reshape(-1).view(torch.int32), k)
    return threshold_mask(d, threshold, equal, mags=mags)


def threshold_mask(
    d: Tensor, threshold: float, equal: int, *, mags: Tensor | None = None
) -> Tensor:
    """Bool mask of ``|d| > threshold`` plus the first ``equal`` entries (flattened order) with
    ``|d| == threshold``: the per-tensor share of a whole-model top-k (``merge.globaltrim``).
    ``mags``: ``|d|`` if the caller already has it."""
    mags = d.abs() if mags is None else mags
    mask = mags > threshold
    if equal > 0:
        ties = (mags == threshold).reshape(-1)
        ties &= ties.cumsum(0) <= equal
        mask |= ties.reshape(d.shape)
    return mask


def bernoulli_mask(d: Tensor, density: float, rng: torch.Generator | None) -> Tensor:
    """Float32 1.0 / 0.0 mask keeping each entry with probability ``density`` (drawn from
    ``rng`` only; float, not bool: several times faster to make and to multiply by)."""
    if density >= 1:
        return torch.ones(d.shape, dtype=torch.float32, device=d.device)
    return draw(d, rng, "bernoulli").lt_(density)


def band_counts(n: int, density: float, gamma: float) -> tuple[int, int]:
    """``(top, keep)``: drop the ``top`` largest, keep the next ``keep`` (METHODS.md)."""
    keep = min(int(density * n), n)
    top = int(gamma * n)
    bottom = n - keep - top
    if bottom < 0:  # not enough left below the top: drop fewer from the top
        top += bottom
    return top, keep


def della_bounds_problem(density: float, epsilon: float, where: str = "") -> str | None:
    """Why ``(density, epsilon)`` cannot be used by della, or ``None`` (``where``, e.g.
    ``" for model 'x'"``, goes into the message). ``density >= 1`` keeps everything."""
    if density >= 1 or (density - epsilon > 0 and density + epsilon < 1):
        return None
    return (
        f"density +/- epsilon must be in (0, 1){where}, got density {density:g} and epsilon "
        f"{epsilon:g} (use epsilon < {min(density, 1 - density):g})"
    )


def rank_keep_probability(d: Tensor, density: float, epsilon: float) -> Tensor:
    """DELLA's ``p = density - epsilon + 2 * epsilon * rank`` with ``rank`` the normalised
    ascending rank of ``|d|`` in its row (module docstring). A fresh float32 tensor."""
    problem = della_bounds_problem(density, epsilon)
    if problem:
        raise ValueError(problem)
    n = d.shape[-1] if d.dim() > 1 else d.numel()
    rows = d.reshape(-1, n)
    rank = torch.empty(rows.shape, dtype=torch.float32, device=d.device)
    order = _row_order(rows.abs())
    steps = torch.arange(n, dtype=torch.float32, device=d.device).expand(rows.shape)
    rank.scatter_(-1, order, steps)
    del order
    if n > 1:
        rank.div_(n - 1)
    else:
        rank.fill_(0.5)
    return rank.mul_(2 * epsilon).add_(density - epsilon).reshape(d.shape)


def _row_order(mags: Tensor) -> Tensor:
    """``argsort(mags, dim=-1, stable=True)`` for non-negative float32 rows. On the CPU: numpy's
    vectorised int64 sort of ``bits << 32 | column`` keys (equal magnitudes order by column,
    as a stable sort does), about 20 times faster than torch's row sorts."""
    if mags.device.type != "cpu" or mags.shape[-1] >= 2**31:
        return torch.argsort(mags, dim=-1, stable=True)
    columns = torch.arange(mags.shape[-1], dtype=torch.int64)
    keys = mags.contiguous().view(torch.int32).to(torch.int64)  # the one int64 buffer
    keys.bitwise_left_shift_(32).bitwise_or_(columns)
    keys.numpy().sort(axis=-1)  # in place
    return keys.bitwise_and_(0xFFFFFFFF)


def draw(d: Tensor, rng: torch.Generator | None, what: str) -> Tensor:
    """One uniform float32 draw per entry of ``d`` from ``rng`` (``what``: for the error)."""
    if rng is None:
        raise ValueError(f"{what} sparsification needs a seeded torch.Generator, got None")
    draw = torch.rand(d.shape, generator=rng, dtype=torch.float32, device=rng.device)
    return draw.to(d.device)


# --- rescale --------------------------------------------------------------------------------


MIN_INVERSE_DENSITY = 1e-6
"""The smallest ``density`` that ``rescale: inverse_density`` may divide by: below it the
kept entries are scaled past float32 (``density: 1e-300`` made every output NaN)."""


def inverse_density_problem(params: dict[str, Any], models: list[str]) -> list[str]:
    """Every model whose ``density`` is too small for ``rescale: inverse_density``."""
    if params.get("rescale") != "inverse_density":
        return []
    return [
        f"density {float(d):g} for model '{m}' is below {MIN_INVERSE_DENSITY:g}, too small "
        f"for rescale: inverse_density to divide by; raise it or use rescale: l1"
        for m, d in zip(models, params.get("density", []), strict=False)
        if float(d) < MIN_INVERSE_DENSITY
    ]


def rescale_mode(value: bool | str) -> RescaleMode:
    """The ``rescale`` parameter as a mode: true/"l1" -> "l1", false -> None."""
    if value is True or value == "l1":
        return "l1"
    if value == "inverse_density":
        return "inverse_density"
    if value is False:
        return None
    raise ValueError(f"rescale must be true, false, 'l1' or 'inverse_density', got {value!r}")
