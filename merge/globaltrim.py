"""Global TIES trimming: one magnitude threshold per model over the whole model, streamed.

The TIES paper keeps the top ``k`` entries of each task vector ``d = x - b`` over the *whole*
model; mergekit (and ``trim: local``) does it per tensor. With ``trim: global`` the budget of
model ``m`` is ``k_m = sum_t int(density_{m,t} * numel_t)`` over every tensor ``t`` merged with
global trimming (with one density per model this is ``int(density * model size)``, up to
rounding per tensor), and the kept entries are the ``k_m`` largest ``|d|`` of the model.

Finding the ``k_m``-th largest magnitude exactly, without holding the model, is a radix select
on the float32 bit patterns (for non-negative floats the bit pattern orders like the value):

1. statistics pass 1: histogram of the top 16 bits of ``|d|`` per model (65,536 counters);
   the bin holding the ``k_m``-th largest value is found from the top;
2. statistics pass 2: histogram of the low 15 bits inside that bin only: the exact threshold
   ``T_m`` and how many entries equal to ``T_m`` still fit in the budget;
3. the merge: an entry is kept when ``|d| > T_m``, or when ``|d| == T_m`` and it is among the
   first such entries in plan order (flattened order within a tensor) until the budget is used,
   so exactly ``k_m`` entries are kept, like ``torch.topk`` over the concatenated model with a
   stable order.

Each job's share of the equal-to-threshold quota is fixed before the merge (``allot``): when a
model keeps all or none of its entries equal to ``T_m`` (the common case) no counting is
needed; otherwise a counting pass finds how many each job has and the quota is handed out in
plan order. Jobs can then merge in any order, in parallel.

Memory is one chunk of each input at a time per worker (the passes read through ``chunks``;
jobs run on the executor's threads) plus two histograms per model. Each statistics pass reads
the inputs once.

What it does not do: choose which tensors take part (the planner puts ``trim`` in each job's
parameters), or merge (``merge.methods.task_arithmetic.ties`` applies the thresholds).
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from merge.jobs import TensorJob
from merge.methods.radix import (
    LOW_BINS,
    high_bin,
    high_histogram,
    low_histogram,
    magnitude_bits,
    threshold_of,
)

__all__ = ["GlobalTrim", "ModelCut", "delta_bits", "global_jobs", "trims_globally"]


ReadJob = Callable[[TensorJob], Iterator[tuple[list[Tensor], Tensor]]]
"""``chunks(job)``: the job's inputs and base chunk after chunk (the base in float32; inputs
float32 or a stored floating dtype: only ``x - base`` is used)."""

Each = Callable[[Callable[[int], None], Sequence[TensorJob]], None]
"""``each(work, jobs)``: call ``work(k)`` for every index ``k`` of ``jobs``, in any order,
possibly on several threads at once (``merge.pipeline.run_jobs``)."""


def _one_by_one(work: Callable[[int], None], jobs: Sequence[TensorJob]) -> None:
    for k in range(len(jobs)):
        work(k)


class _Totals:
    """Per-model histogram totals that several threads add to."""

    def __init__(self) -> None:
        self.counts: dict[str, Tensor] = {}
        self._lock = threading.Lock()

    def add(self, model: str, h: Tensor) -> None:
        with self._lock:
            if model in self.counts:
                self.counts[model].add_(h)
            else:
                self.counts[model] = h.clone()


def global_jobs(jobs: Iterable[TensorJob]) -> list[TensorJob]:
    """The jobs merged with ``trim: global``, in plan order."""
    return [j for j in jobs if trims_globally(j)]


def trims_globally(job: TensorJob) -> bool:
    """Whether ``job`` takes part in the whole-model top-k (``trim: global``)."""
    return not job.copy and job.params.get("trim") == "global"


def delta_bits(x: Tensor, base: Tensor) -> Tensor:
    """``|x - b|`` in float32, viewed as int32 bit patterns (ordered like the values)."""
    return magnitude_bits(x - base)


@dataclass
class ModelCut:
    """The exact cut of one model: keep ``|d| > threshold`` plus ``equal_left`` more entries
    equal to ``threshold`` (the first ones met in plan order)."""

    budget: int
    total: int
    threshold: float
    equal_left: int
    equal_total: int = 0  # entries of the model equal to the threshold


class GlobalTrim:
    """Per-model thresholds found by two statistics passes, then per-job parameters."""

    def __init__(self, cuts: dict[str, ModelCut]) -> None:
        self.cuts = cuts

    @classmethod
    def compute(
        cls,
        jobs: Sequence[TensorJob],
        read_job: ReadJob,
        progress: Callable[[str], Callable[[TensorJob], None]] | None = None,
        each: Each | None = None,
    ) -> GlobalTrim:
        """Run both statistics passes over ``jobs`` (already filtered by ``global_jobs``);
        ``each`` runs a pass's per-job work (default: one job after another). Histograms are
        integer counts, so the totals do not depend on the order jobs finish in."""
        run = each or _one_by_one
        budget: dict[str, int] = {}
        total: dict[str, int] = {}
        for job in jobs:
            for inp, density in zip(job.inputs, job.params["density"], strict=True):
                budget[inp.model] = budget.get(inp.model, 0) + int(float(density) * job.numel)
                total[inp.model] = total.get(inp.model, 0) + job.numel
        hist = _Totals()
        step = progress("trim statistics 1/2") if progress else None

        def high(k: int) -> None:
            job = jobs[k]
            for tensors, base in read_job(job):
                for inp, x in zip(job.inputs, tensors, strict=True):
                    hist.add(inp.model, high_histogram(delta_bits(x, base)))
            if step:
                step(job)

        run(high, jobs)
        cuts: dict[str, ModelCut] = {}
        pending: dict[str, tuple[int, int]] = {}  # model -> (high bin, entries still needed)
        for m, h in hist.counts.items():
            k = budget[m]
            if k <= 0:
                cuts[m] = ModelCut(k, total[m], math.inf, 0)
            elif k >= total[m]:
                cuts[m] = ModelCut(k, total[m], -1.0, 0)
            else:
                b, above = high_bin(h, k)
                pending[m] = (b, k - above)
        if pending:
            cuts.update(cls._refine(jobs, read_job, pending, budget, total, progress, run))
        return cls(cuts)

    @staticmethod
    def _refine(
        jobs: Sequence[TensorJob],
        read_job: ReadJob,
        pending: dict[str, tuple[int, int]],
        budget: dict[str, int],
        total: dict[str, int],
        progress: Callable[[str], Callable[[TensorJob], None]] | None,
        run: Each,
    ) -> dict[str, ModelCut]:
        low = _Totals()
        step = progress("trim statistics 2/2") if progress else None
        todo = [j for j in jobs if any(i.model in pending for i in j.inputs)]

        def low_pass(k: int) -> None:
            job = todo[k]
            for tensors, base in read_job(job):
                for inp, x in zip(job.inputs, tensors, strict=True):
                    if inp.model in pending:
                        bits = delta_bits(x, base)
                        low.add(inp.model, low_histogram(bits, pending[inp.model][0]))
            if step:
                step(job)

        run(low_pass, todo)
        cuts = {}
        for m, (b, need) in pending.items():
            counts = low.counts.get(m, torch.zeros(LOW_BINS, dtype=torch.int64))
            t, above = high_bin(counts, need)
            threshold = threshold_of(b, t)
            equal_total = int(counts[t].item())
            cuts[m] = ModelCut(budget[m], total[m], threshold, need - above, equal_total)
        return cuts

    def counting(self) -> set[str]:
        """The models that keep some but not all of their entries equal to the threshold:
        only their jobs need ``count_equal`` before ``allot``."""
        return {m for m, c in self.cuts.items() if 0 < c.equal_left < c.equal_total}

    def count_equal(self, job: TensorJob, read_job: ReadJob) -> dict[str, int]:
        """How many entries of each counting model's task vector in ``job`` equal its
        threshold."""
        counting = self.counting()
        counts: dict[str, int] = {}
        for tensors, base in read_job(job):
            for inp, x in zip(job.inputs, tensors, strict=True):
                if inp.model in counting:
                    eq = int(((x - base).abs_() == self.cuts[inp.model].threshold).sum().item())
                    counts[inp.model] = counts.get(inp.model, 0) + eq
        return counts

    def allot(
        self, jobs: Sequence[TensorJob], counts: Sequence[dict[str, int]]
    ) -> list[dict[str, Any]]:
        """Each job's ``params`` plus ``trim_threshold`` and ``trim_equal`` (per model): the
        equal-to-threshold quota handed out in plan order (``jobs`` in plan order, ``counts``
        from ``count_equal`` for the counting models)."""
        left = {m: c.equal_left for m, c in self.cuts.items()}
        out = []
        for job, count in zip(jobs, counts, strict=True):
            thresholds: list[float] = []
            equal: list[int] = []
            for inp in job.inputs:
                cut = self.cuts[inp.model]
                if left[inp.model] <= 0:
                    take = 0
                elif left[inp.model] >= cut.equal_total:
                    take = job.numel  # every equal entry is kept
                else:
                    take = min(count.get(inp.model, 0), left[inp.model])
                    left[inp.model] -= take
                thresholds.append(cut.threshold)
                equal.append(take)
            out.append({**job.params, "trim_threshold": thresholds, "trim_equal": equal})
        return out
