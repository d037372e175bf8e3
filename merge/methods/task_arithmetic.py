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

Each method is a ``TaskVectors`` stream (``merge.methods.stream``): the executor runs it chunk
by chunk, and the plain function runs the same chunks over tensors in memory. Statistics
passes come first where a tensor-wide quantity is needed: two radix-select passes for the
magnitude cuts of ``ties`` (local trim) and ``breadcrumbs``, one pass for the L1 sums of the
``l1`` rescale (its keep masks are kept as packed bits for the merge pass). Each model draws
from its own generator, seeded in model order from the tensor's ``rng``.

``int8_mask`` is accepted for mergekit compatibility; it only ever saved memory, and here the
sign masks are transient float32 chunks, so there is nothing left for it to save: results are
identical either way. The ``Method`` declarations live in ``task_family.py``.
"""

from __future__ import annotations

from collections import deque
from typing import Any

import numpy as np
import torch
from torch import Tensor

from merge.methods import sparsify
from merge.methods.base import MethodFn
from merge.methods.radix import magnitude_bits
from merge.methods.stream import (
    Cut,
    Streamed,
    StreamFactory,
    float64_sum,
    model_generators,
    whole,
)

__all__ = [
    "TaskVectors",
    "breadcrumbs",
    "breadcrumbs_ties",
    "dare_linear",
    "dare_ties",
    "della",
    "della_linear",
    "disjoint_merge",
    "elect_signs",
    "family",
    "linear_merge",
    "per_model",
    "signs",
    "task_arithmetic",
    "ties",
]

Kind = str | None  # the sparsifier: "magnitude", "bernoulli", "breadcrumbs", "della" or None


# --- the steps ------------------------------------------------------------------------------


def per_model(params: dict[str, Any], i: int) -> dict[str, Any]:
    """Model ``i``'s values of the per-model (list-valued) parameters."""
    return {name: value[i] for name, value in params.items() if isinstance(value, list)}


def elect_signs(weighted: list[Tensor]) -> Tensor:
    """TIES "elect": True where the majority sign ``sign(sum_i o_i)`` is + (0 counts as +)."""
    return _sum(weighted) >= 0


def signs(weighted: list[Tensor]) -> Tensor:
    """``elect_signs`` as float32 +1 / -1 (float comparisons and products are several times
    faster than boolean ones on the CPU)."""
    return _sum(weighted).ge_(0).mul_(2).sub_(1)


def disjoint_merge(
    weighted: list[Tensor], weights: list[float], sign: Tensor, normalize: bool
) -> Tensor:
    """TIES "disjoint merge": ``sum_i m_i o_i / D`` with ``m_i = [sign(o_i) == s]`` (zero entries
    never agree; ``sign``: ``s`` as +1 / -1, from ``signs``) and ``D = sum_i m_i w_i`` (0
    replaced by 1) if ``normalize``, else 1.

    Consumes ``weighted`` (its tensors are zeroed where they disagree)."""
    combined = torch.zeros_like(weighted[0])
    divisor = torch.zeros_like(weighted[0]) if normalize else None
    agree = torch.empty_like(weighted[0])
    for o, w in zip(weighted, weights, strict=True):
        torch.mul(o, sign, out=agree).gt_(0)  # 1.0 where o agrees with the sign, else 0.0
        combined.add_(o.mul_(agree))
        if divisor is not None:
            divisor.add_(agree, alpha=float(w))  # exact: agree * w is 0 or w
    if divisor is not None:
        combined.div_(divisor.add_(torch.eq(divisor, 0, out=agree)))  # 0 -> 1
    return combined


def linear_merge(weighted: list[Tensor], weights: list[float], normalize: bool) -> Tensor:
    """``sum_i o_i``, divided by ``sum_i w_i`` (0 replaced by 1) if ``normalize``.

    Consumes ``weighted`` (the sum is made in its first tensor)."""
    combined = weighted[0]
    for t in weighted[1:]:
        combined.add_(t)
    if normalize:
        combined.div_(float(sum(float(w) for w in weights)) or 1.0)
    return combined


def _sum(tensors: list[Tensor]) -> Tensor:
    out = tensors[0].clone()
    for t in tensors[1:]:
        out.add_(t)
    return out


# --- one tensor, chunk by chunk --------------------------------------------------------------


class TaskVectors(Streamed):
    """One tensor of a task-vector method over chunks (see the module notes): the cut passes
    (magnitude, breadcrumbs), the L1 pass (``rescale: l1``), then the merge.

    Inputs are only ever used as ``x - base`` (``stored_inputs``). Keep masks are float32
    1.0 / 0.0 (faster than booleans). The L1 pass keeps each model's masks as packed bits (one
    bit an entry: ``numel / 8`` bytes a sparse model, counted by the method's ``kept_bits``),
    so the merge pass neither draws nor ranks again."""

    def __init__(
        self,
        params: dict[str, Any],
        shape: tuple[int, ...],
        rng: torch.Generator | None,
        kind: Kind,
        consensus: bool,
    ) -> None:
        if params.get("trim") == "global" and "trim_threshold" not in params:
            raise ValueError("ties with trim: global needs the thresholds of merge.globaltrim")
        self.params, self.kind, self.consensus = params, kind, consensus
        self.stored_inputs = True
        numel = 1
        for dim in shape:
            numel *= dim
        n = len(params["weight"])
        self.opts = [per_model(params, i) for i in range(n)]
        self.mode = sparsify.rescale_mode(params.get("rescale", False))
        given = kind == "magnitude" and "trim_threshold" in params
        density = [float(o.get("density", 1.0)) for o in self.opts]
        self.sparse = [kind is not None and numel > 0 and (d < 1 or given) for d in density]
        self.keep: list[float] = []  # the kept fraction (inverse_density rescale)
        self.cuts: list[list[Cut]] = []
        for i, d in enumerate(density):
            cuts: list[Cut] = []
            keep = d
            if self.sparse[i] and given:
                t, eq = params["trim_threshold"][i], params["trim_equal"][i]
                cuts = [Cut.given(t, eq, numel)]
            elif self.sparse[i] and kind == "magnitude":
                cuts = [Cut(int(d * numel), numel)]
                keep = cuts[0].k / numel
            elif self.sparse[i] and kind == "breadcrumbs":
                top, kept = sparsify.band_counts(numel, d, float(self.opts[i].get("gamma", 0.0)))
                cuts = [Cut(top, numel), Cut(top + kept, numel)]
                keep = kept / numel
            self.cuts.append(cuts)
            self.keep.append(keep)
        self.row = (shape[-1] if len(shape) > 1 else max(numel, 1)) if kind == "della" else 1
        random = kind in ("bernoulli", "della") and any(self.sparse)
        self.gens = model_generators(rng, n) if random else []
        self._cutting = any(not c.trivial for cuts in self.cuts for c in cuts)
        self.l1 = self.mode == "l1" and any(self.sparse)
        self.passes = 2 * self._cutting + self.l1
        self._sums = [[0.0, 0.0] for _ in range(n)]  # |d|_1, |e|_1
        self.factor = [1.0] * n
        self._masks: list[deque[Any]] = [deque() for _ in range(n)]  # the L1 pass's, packed

    def observe(self, step: int, xs: list[Tensor], base: Tensor | None) -> None:
        base = _need_base(base)
        if self._cutting and step < 2:
            for x, cuts in zip(xs, self.cuts, strict=True):
                if any(not c.trivial for c in cuts):
                    bits = magnitude_bits(x - base)
                    for cut in cuts:
                        cut.observe(step, bits)
            return
        for i, x in enumerate(xs):  # the L1 pass
            if self.sparse[i]:
                d = x - base
                mask, _ = self._mask(i, d)
                mags = d.abs_()
                self._sums[i][0] += float64_sum(mags)
                self._sums[i][1] += float64_sum(mags.mul_(mask))
                self._masks[i].append(_pack(mask))

    def end_pass(self, step: int) -> None:
        if self._cutting and step < 2:
            for cuts in self.cuts:
                for cut in cuts:
                    cut.end_pass(step)
        if self.l1 and step == self.passes - 1:  # the merge pass comes next
            for i, (dsum, esum) in enumerate(self._sums):
                self.factor[i] = dsum / esum if esum != 0 else 1.0

    def _mask(self, i: int, d: Tensor) -> tuple[Tensor, Tensor | float]:
        """Model ``i``'s float32 keep mask of the next chunk of ``d`` (left as it is), and the
        kept fraction (per entry for della) that ``inverse_density`` divides by."""
        opts = self.opts[i]
        density = float(opts.get("density", 1.0))
        if self.kind == "bernoulli":
            return sparsify.bernoulli_mask(d, density, self.gens[i]), density
        if self.kind == "della":
            eps = float(opts.get("epsilon", 0.0))
            p = sparsify.rank_keep_probability(d.view(-1, self.row), density, eps).view(-1)
            r = sparsify.draw(d, self.gens[i], "della")
            return torch.lt(r, p, out=r), p
        mags = d.abs()
        mask = self.cuts[i][-1].mask(mags)
        if self.kind == "breadcrumbs":  # the top band is inside the kept one: 1 - 1 = 0
            mask.sub_(self.cuts[i][0].mask(mags))
        return mask, self.keep[i]

    def apply(self, xs: list[Tensor], base: Tensor | None) -> Tensor:
        base = _need_base(base)
        weights = self.params["weight"]
        weighted = []
        for i, x in enumerate(xs):
            e = x - base
            if self.sparse[i] and self.l1:
                e.mul_(_unpack(self._masks[i].popleft(), e)).mul_(self.factor[i])
            elif self.sparse[i]:
                mask, keep = self._mask(i, e)
                e.mul_(mask)
                if self.mode == "inverse_density":
                    e = _inverse_density(e, keep)
            weighted.append(e.mul_(float(weights[i])))
        if self.consensus:
            combined = disjoint_merge(weighted, weights, signs(weighted), self.params["normalize"])
        else:
            combined = linear_merge(weighted, weights, self.params["normalize"])
        del weighted
        lam = float(self.params["lambda"])
        return (combined if lam == 1.0 else combined.mul_(lam)).add_(base)  # x * 1.0 is x


def _pack(mask: Tensor) -> Any:
    """A float32 1.0 / 0.0 mask kept between passes: packed bits on the CPU, else booleans."""
    if mask.device.type != "cpu":
        return mask.bool()
    return np.packbits(mask.numpy() != 0)


def _unpack(packed: Any, like: Tensor) -> Tensor:
    """The mask ``_pack`` kept, as 0/1 numbers the size and device of ``like``."""
    if isinstance(packed, Tensor):
        return packed
    return torch.from_numpy(np.unpackbits(packed, count=like.numel()))


def _need_base(base: Tensor | None) -> Tensor:
    if base is None:
        raise ValueError("task-vector methods need a base tensor, got None")
    return base


def _inverse_density(e: Tensor, keep: Tensor | float) -> Tensor:
    if isinstance(keep, Tensor):
        return e.div_(keep)  # zeros stay zeros: every p > 0
    return e if keep <= 0 or keep >= 1 else e.div_(keep)


def family(kind: Kind, consensus: bool) -> StreamFactory:
    """The ``TaskVectors`` factory of one sparsifier and consensus choice."""
    return lambda params, shape, rng: TaskVectors(params, shape, rng, kind, consensus)


def _method(kind: Kind, consensus: bool, name: str, doc: str) -> MethodFn:
    return whole(family(kind, consensus), name, doc)


task_arithmetic = _method(
    None,
    False,
    "task_arithmetic",
    "``b + lambda * sum w_i d_i`` (divided by ``sum w_i`` if normalize).",
)
ties = _method(
    "magnitude",
    True,
    "ties",
    "Magnitude top-k per model (per tensor, or over the whole model with ``trim: global``: the "
    "executor then adds each model's ``trim_threshold``/``trim_equal``), then sign consensus "
    "and disjoint (normalized) merge.",
)
dare_linear = _method(
    "bernoulli", False, "dare_linear", "Bernoulli(density) keep mask, rescale, weighted sum."
)
dare_ties = _method(
    "bernoulli", True, "dare_ties", "Bernoulli(density) keep mask, rescale, sign consensus."
)
breadcrumbs = _method(
    "breadcrumbs",
    False,
    "breadcrumbs",
    "Drop each task vector's largest (gamma) and smallest entries, add the weighted sum.",
)
breadcrumbs_ties = _method(
    "breadcrumbs",
    True,
    "breadcrumbs_ties",
    "Breadcrumbs' band of magnitudes per model, then TIES sign consensus.",
)
della_linear = _method(
    "della",
    False,
    "della_linear",
    "Keep entries with rank-based probabilities (MagPrune), rescale, add the weighted sum.",
)
della = _method(
    "della", True, "della", "MagPrune keep mask per model, rescale, then sign consensus."
)
