"""Exact k-th largest magnitude by radix select on float32 bit patterns.

For non-negative float32 values the int32 bit pattern orders like the value, so the k-th
largest ``|d|`` is found from two histograms instead of a sort: the top 16 of the 31 magnitude
bits (65,536 counters) locate the bin holding it, and the low 15 bits of the entries inside that
bin (32,768 counters) give its exact bits. Both histograms can be summed over many tensors,
which is how ``merge.globaltrim`` finds a whole-model threshold while streaming; for one tensor,
``kth_largest`` replaces ``torch.topk`` (about twice as fast, and no index tensor).

Ties: the threshold ``T`` is exact; ``kth_largest`` also says how many entries equal to ``T``
still belong to the top k (``equal``), so a mask keeping ``|d| > T`` plus the first ``equal``
entries with ``|d| == T`` (``merge.methods.sparsify.threshold_mask``) keeps exactly k.

What it does not do: NaN handling beyond bit order (a NaN ranks above every number, as in
``torch.topk``), or anything but float32 magnitudes.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "HIGH_BINS",
    "LOW_BINS",
    "LOW_BITS",
    "high_bin",
    "high_histogram",
    "kth_largest",
    "low_histogram",
    "magnitude_bits",
    "threshold_of",
]

HIGH_BINS = 1 << 16  # top 16 bits of the 31 magnitude bits
LOW_BITS = 15
LOW_BINS = 1 << LOW_BITS


def magnitude_bits(d: Tensor) -> Tensor:
    """``|d|`` in float32, flattened and viewed as int32 bit patterns (ordered like values)."""
    return d.to(torch.float32).abs().reshape(-1).view(torch.int32)


def high_histogram(bits: Tensor) -> Tensor:
    """Counts of the top 16 magnitude bits (``HIGH_BINS`` int64 counters)."""
    return torch.bincount(bits >> LOW_BITS, minlength=HIGH_BINS)


def low_histogram(bits: Tensor, high: int) -> Tensor:
    """Counts of the low 15 bits of the entries whose top 16 bits are ``high`` (on the CPU
    with numpy, whose comparisons and boolean selection are several times faster here)."""
    low = high << LOW_BITS
    if bits.device.type == "cpu":
        a = bits.numpy()
        selected = a[(a >= low) & (a < low + LOW_BINS)]
        return torch.from_numpy(np.bincount(selected - low, minlength=LOW_BINS))
    inside = bits[(bits >> LOW_BITS) == high]
    return torch.bincount(inside - low, minlength=LOW_BINS)


def high_bin(hist: Tensor, k: int) -> tuple[int, int]:
    """(bin holding the k-th largest value, entries in higher bins), counting from the top."""
    from_top = torch.flip(hist, [0]).cumsum(0)
    idx = int(torch.searchsorted(from_top, torch.tensor([k], dtype=from_top.dtype)).item())
    above = int(from_top[idx - 1].item()) if idx > 0 else 0
    return hist.numel() - 1 - idx, above


def threshold_of(high: int, low: int) -> float:
    """The float32 value whose bit pattern is ``high << LOW_BITS | low``."""
    pattern = torch.tensor([(high << LOW_BITS) | low], dtype=torch.int32)
    return float(pattern.view(torch.float32).item())


def kth_largest(bits: Tensor, k: int) -> tuple[float, int]:
    """``(T, equal)`` for ``1 <= k <= bits.numel()``: ``T`` is the k-th largest magnitude and
    ``equal`` how many entries equal to ``T`` are among the k largest (the rest are above)."""
    b, above = high_bin(high_histogram(bits), k)
    low = low_histogram(bits, b)
    t, above_in_bin = high_bin(low, k - above)
    return threshold_of(b, t), k - above - above_in_bin
