"""Named sparsification steps for task vectors ``d = x - b``.

A sparsifier maps ``(d, density, rng)`` to ``e``, a copy of ``d`` with some entries zeroed
(``d`` itself when ``density >= 1``; never modified):

- ``magnitude``: keep exactly ``k = int(density * numel)`` entries of largest ``|d|``
  (TIES, https://arxiv.org/abs/2306.01708). Exact ties in magnitude are broken by
  ``torch.topk``, so the count is always exactly ``k``.
- ``bernoulli``: keep each entry independently with probability ``density``, drawn as
  ``torch.rand(d.shape, generator=rng) < density`` (DARE, https://arxiv.org/abs/2311.03099).
  ``density >= 1`` keeps everything and draws nothing, so the generator is not advanced.

``l1_rescale`` restores the L1 norm of the pruned vector (mergekit's ``rescale``):
``e * |d|_1 / |e|_1``, left unchanged when ``|e|_1 == 0``.

Everything here is pure: inputs are never modified, the global RNG is never used.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

__all__ = [
    "SPARSIFIERS",
    "Sparsifier",
    "bernoulli",
    "bernoulli_mask",
    "l1_rescale",
    "magnitude",
    "magnitude_mask",
]

Sparsifier = Callable[[Tensor, float, "torch.Generator | None"], Tensor]


def magnitude_mask(d: Tensor, density: float) -> Tensor:
    """Bool mask of exactly ``k = int(density * numel)`` entries with the largest ``|d|``."""
    n = d.numel()
    k = min(int(density * n), n)
    mask = torch.zeros(n, dtype=torch.bool, device=d.device)
    if k > 0:
        top = torch.topk(d.reshape(-1).abs(), k, sorted=False).indices
        mask[top] = True
    return mask.reshape(d.shape)


def bernoulli_mask(d: Tensor, density: float, rng: torch.Generator | None) -> Tensor:
    """Bool mask keeping each entry with probability ``density`` (drawn from ``rng`` only)."""
    if density >= 1:
        return torch.ones(d.shape, dtype=torch.bool, device=d.device)
    if rng is None:
        raise ValueError("bernoulli sparsification needs a seeded torch.Generator, got None")
    draw = torch.rand(d.shape, generator=rng, dtype=torch.float32, device=rng.device)
    return (draw < density).to(d.device)


def magnitude(d: Tensor, density: float, rng: torch.Generator | None = None) -> Tensor:
    """``e = d * magnitude_mask(d, density)``; ``rng`` is unused."""
    if density >= 1:
        return d
    return d * magnitude_mask(d, density)


def bernoulli(d: Tensor, density: float, rng: torch.Generator | None) -> Tensor:
    """``e = d * bernoulli_mask(d, density, rng)``."""
    if density >= 1:
        return d
    return d * bernoulli_mask(d, density, rng)


def l1_rescale(e: Tensor, d: Tensor) -> Tensor:
    """``e * |d|_1 / |e|_1``: the pruned vector scaled back to the L1 norm of the original."""
    kept = e.abs().sum()
    if kept.item() == 0:
        return e
    return e * (d.abs().sum() / kept)


SPARSIFIERS: dict[str, Sparsifier] = {"magnitude": magnitude, "bernoulli": bernoulli}
