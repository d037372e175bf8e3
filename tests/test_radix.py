"""Radix select: the exact k-th largest magnitude and the count of ties it keeps."""

from __future__ import annotations

import pytest
import torch

from merge.methods.radix import kth_largest, magnitude_bits
from merge.methods.sparsify import magnitude_mask


def _reference(d: torch.Tensor, k: int) -> tuple[float, int]:
    mags = sorted((abs(float(v)) for v in d.reshape(-1)), reverse=True)
    t = mags[k - 1]
    return t, k - sum(1 for m in mags if m > t)


@pytest.mark.parametrize("quantized", [False, True])
def test_kth_largest_equals_a_sort(quantized: bool) -> None:
    gen = torch.Generator().manual_seed(3)
    d = torch.randn(997, generator=gen)
    if quantized:
        d = torch.round(d * 4) / 4  # many exact ties, and -0.0 / 0.0
    for k in (1, 2, 10, 498, 996, 997):
        assert kth_largest(magnitude_bits(d), k) == _reference(d, k), k


def test_magnitude_mask_keeps_exactly_k_first_ties_in_order() -> None:
    d = torch.tensor([0.5, -1.0, 0.5, 0.25, -0.5, 1.0, 0.0, -0.0])
    mask = magnitude_mask(d, 0.5)  # k = 4: both 1.0 entries, then the first two 0.5s
    assert mask.tolist() == [True, True, True, False, False, True, False, False]
    assert magnitude_mask(d, 1.0).all() and not magnitude_mask(d, 0.1).any()


def test_magnitude_mask_matches_topk_without_ties() -> None:
    gen = torch.Generator().manual_seed(4)
    d = torch.randn(64, 48, generator=gen)
    for density in (0.01, 0.3, 0.77):
        k = int(density * d.numel())
        want = torch.zeros(d.numel(), dtype=torch.bool)
        want[torch.topk(d.reshape(-1).abs(), k).indices] = True
        assert torch.equal(magnitude_mask(d, density), want.reshape(d.shape))
