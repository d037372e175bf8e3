"""MoE expert noise (``noise_scale``) as a chunk-invariant draw: any range of a tensor's noise
can be made on its own, and equals the same range of the whole tensor's noise bit for bit.

The flattened tensor is cut into fixed blocks of ``NOISE_BLOCK`` elements (the last one
shorter), which depend on the tensor's size only. Block ``i`` draws its standard normals from
its own ``torch.Generator``, seeded from (the output tensor's seed, ``i``): a counter-based
scheme, so a streamed copy reads the blocks its chunk overlaps and a whole-tensor copy draws
every block in turn, and both see the same numbers whatever the chunk size, thread count or
memory budget.

This changed the noise once (release notes in the README's MoE section): before it, one
generator per tensor drew the whole tensor's noise in one call.

What it does not do: other randomness (methods draw from ``merge.methods.stream``'s per-model
generators; gates from the router's own generator).
"""

from __future__ import annotations

import hashlib

import torch

NOISE_BLOCK = 1 << 16  # elements per generator; fixed: changing it changes every output


def block_seed(tensor_seed: int, block: int) -> int:
    """The seed of block ``block`` of the tensor whose generator seed is ``tensor_seed``."""
    digest = hashlib.sha256(f"{tensor_seed}:{block}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def noise_range(tensor_seed: int, numel: int, start: int, stop: int) -> torch.Tensor:
    """Standard normal float32 noise of the flat elements ``[start, stop)`` of a tensor of
    ``numel`` elements (the same numbers as that slice of ``noise_range(s, n, 0, n)``)."""
    stop = max(start, min(stop, numel))
    out = torch.empty(stop - start, dtype=torch.float32)
    for block in range(start // NOISE_BLOCK, -(-stop // NOISE_BLOCK)):
        lo = block * NOISE_BLOCK
        size = min(NOISE_BLOCK, numel - lo)
        gen = torch.Generator().manual_seed(block_seed(tensor_seed, block))
        draw = torch.randn(size, generator=gen)
        a, b = max(start, lo), min(stop, lo + size)
        out[a - start : b - start] = draw[a - lo : b - lo]
    return out
