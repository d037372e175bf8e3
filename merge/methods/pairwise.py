"""Element-wise choices between the base and one other model: ``nearswap``, ``arcee_fusion``.

With ``b`` the base and ``x`` the other model:

- nearswap (https://huggingface.co/alchemonaut/QuartetAnemoi-70B-t0.0001):
  ``w = clamp(t / max(|b - x|, 1e-6), 0, 1)`` and ``out = w x + (1 - w) b``: entries where the
  two are already close (``|b - x| <= t``) take the other model's value, the rest move towards
  it by ``t / |b - x|``. Computed as ``torch.lerp(b, x, w)``, exact at ``w`` 0 and 1.
- arcee_fusion (described in Arcee's post, ``ARCEE_FUSION.paper``): per vector along the last
  dim (a row; a 1-D tensor is one vector), ``P = softmax(x) + 1e-8``, ``Q = softmax(b) + 1e-8``
  and ``KL = sum P log(P / Q)`` (the other model's distribution against the base's, as
  mergekit); ``importance = |x - b| * KL`` of the entry's row; ``threshold = median +
  1.5 (q3 - q1)`` of the importances, each quantile the sorted value at index
  ``floor(q (n - 1))``, over all entries or, above 1e6 entries, over 1e6 entries drawn uniformly
  with replacement from the given generator (seeded per output tensor, so runs repeat exactly);
  ``out = x`` where ``importance >= threshold``, else ``b``. The KL is computed from
  log-softmaxes (``log(P) = logaddexp(log_softmax(x), log 1e-8)``), so large weights never
  overflow and no log of 0 is taken, and in float64 (a chunk of rows at a time): between a
  model and its fine-tune it is a tiny difference of large terms, which float32 (mergekit)
  gets wrong by ~1e-3 relative, enough to move the threshold and flip entries near it.

Both stream (``merge.methods.stream``): nearswap entry by entry; arcee_fusion in chunks of
whole rows, with one statistics pass that keeps the importances its quantiles are taken of
(all of them up to 1e6 entries, else those at the 1e6 indices drawn up front, which are the
whole-tensor draw's), then each chunk is masked by the threshold. ``workspace`` (in
chunk-sized float32 buffers): the importance, the mask and the output, the KL's float64
temporaries (bounded by ``ROW_CHUNK``), and the quantile sample: at most 1e6 float32 values
and 1e6 int64 indices, which is three buffers of the default chunk (1M entries) but does not
shrink with it. A row longer than a chunk is one chunk (the softmax needs the whole row).

What this does not do: more than one model besides the base (both methods are pairwise).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from merge.methods.base import Method, Param
from merge.methods.stream import Elementwise, Streamed, whole

__all__ = [
    "ARCEE_FUSION",
    "NEARSWAP",
    "FusionStream",
    "arcee_fusion",
    "fusion_importance",
    "iqr_threshold",
    "nearswap",
    "row_kl",
]

NEARSWAP_FLOOR = 1e-6
KL_EPS = 1e-8
QUANTILE_SAMPLES = 1_000_000
ROW_CHUNK = 1 << 18  # entries per chunk of rows in the KL (bounds its float64 temporaries)
_ARCEE_FUSION_POST = (
    "https://www.arcee.ai/blog/"
    "meet-mergekit-v0-1-arcee-fusion-expanded-model-support-multi-gpu-acceleration"
)


def _pair(name: str, tensors: list[Tensor], base: Tensor | None) -> tuple[Tensor, Tensor]:
    if base is None or len(tensors) != 1:
        raise ValueError(f"{name} needs a base and exactly one other tensor, got {len(tensors)}")
    return tensors[0], base


def nearswap(
    tensors: list[Tensor], base: Tensor | None, params: dict[str, Any], rng: Any = None
) -> Tensor:
    """Take the other model's entries where they are within ``t`` of the base, lerp the rest."""
    x, b = _pair("nearswap", tensors, base)
    w = torch.sub(b, x).abs_().clamp_(min=NEARSWAP_FLOOR).reciprocal_()
    w.mul_(float(params["t"])).clamp_(0.0, 1.0)
    return torch.lerp(b, x, w)


def row_kl(x: Tensor, b: Tensor) -> Tensor:
    """``KL(P || Q)`` per vector along the last dim, ``P = softmax(x) + 1e-8``,
    ``Q = softmax(b) + 1e-8``; float32 of shape ``x.shape[:-1] + (1,)`` (``(1,)`` for 1-D).

    Computed in float64, a chunk of rows at a time: for a fine-tune the two distributions are
    close, the KL is a small difference of large terms, and float32 loses most of its digits."""
    rows_x = x.reshape(-1, x.shape[-1]) if x.dim() else x.reshape(1, 1)
    rows_b = b.reshape(rows_x.shape)
    out = torch.empty(rows_x.shape[0], 1, dtype=torch.float64, device=rows_x.device)
    log_eps = torch.tensor(math.log(KL_EPS), dtype=torch.float64)
    step = max(1, ROW_CHUNK // max(1, rows_x.shape[1]))
    for start in range(0, rows_x.shape[0], step):
        chunk_x = rows_x[start : start + step].to(torch.float64)
        chunk_b = rows_b[start : start + step].to(torch.float64)
        log_p = torch.logaddexp(torch.log_softmax(chunk_x, dim=-1), log_eps)
        log_q = torch.logaddexp(torch.log_softmax(chunk_b, dim=-1), log_eps)
        del chunk_x, chunk_b
        p = log_p.exp()
        out[start : start + step, 0] = (p * log_p.sub_(log_q)).sum(dim=-1)
    out32 = out.to(torch.float32)
    return out32.reshape(*x.shape[:-1], 1) if x.dim() else out32.reshape(())


def fusion_importance(x: Tensor, b: Tensor) -> Tensor:
    """``|x - b|`` times the KL divergence of the entry's row (a new tensor)."""
    return torch.sub(x, b).abs_().mul_(row_kl(x, b))


def iqr_threshold(values: Tensor, rng: torch.Generator | None) -> float:
    """``median + 1.5 (q3 - q1)``; quantiles at sorted index ``floor(q (n - 1))``, over every
    value or over ``QUANTILE_SAMPLES`` drawn with replacement from ``rng`` if there are more."""
    flat = values.reshape(-1)
    if flat.numel() > QUANTILE_SAMPLES:
        if rng is None:
            raise ValueError("arcee_fusion needs a generator to sample quantiles, got None")
        flat = flat[torch.randint(flat.numel(), (QUANTILE_SAMPLES,), generator=rng)]
    ordered = torch.sort(flat).values
    last = ordered.numel() - 1
    q1, median, q3 = (float(ordered[int(q * last)]) for q in (0.25, 0.5, 0.75))
    return median + 1.5 * (q3 - q1)


class FusionStream(Streamed):
    """``arcee_fusion`` over chunks of whole rows (the KL is per row). One statistics pass
    computes each chunk's importances and keeps the ones the quantiles are taken of: every
    one up to ``QUANTILE_SAMPLES`` entries (at most that many float32 values), else the
    entries at the ``QUANTILE_SAMPLES`` indices drawn up front from the generator, exactly
    those of the whole-tensor draw (sorted once, so each chunk picks its own by a binary
    search; the multiset, hence the sorted values, is the same). Then each chunk keeps
    ``x`` where its importance (recomputed, the same bits) reaches the threshold."""

    def __init__(self, params: dict[str, Any], shape: tuple[int, ...], rng: Any = None) -> None:
        numel = math.prod(shape)
        self.row = max(shape[-1], 1) if shape else 1
        self.passes = 1
        self.threshold = 0.0
        self._at = 0  # the flat index of the next chunk
        self._picks: Tensor | None = None
        if numel > QUANTILE_SAMPLES:
            if rng is None:
                raise ValueError("arcee_fusion needs a generator to sample quantiles, got None")
            drawn = torch.randint(numel, (QUANTILE_SAMPLES,), generator=rng)
            self._picks = torch.sort(drawn).values
        self._values = torch.empty(min(numel, QUANTILE_SAMPLES), dtype=torch.float32)

    def _importance(self, xs: list[Tensor], base: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
        x, b = _pair("arcee_fusion", xs, base)
        rows = (-1, self.row)
        return x, b, fusion_importance(x.view(rows), b.view(rows)).view(-1)

    def observe(self, step: int, xs: list[Tensor], base: Tensor | None) -> None:
        _, _, importance = self._importance(xs, base)
        start, stop = self._at, self._at + importance.numel()
        self._at = stop
        importance = importance.to(self._values.device)
        if self._picks is None:
            self._values[start:stop] = importance
            return
        bounds = torch.tensor([start, stop], dtype=self._picks.dtype)
        lo, hi = (int(i) for i in torch.searchsorted(self._picks, bounds))
        self._values[lo:hi] = importance[self._picks[lo:hi] - start]

    def end_pass(self, step: int) -> None:
        if self._values.numel():
            self.threshold = iqr_threshold(self._values, None)
        self._values = torch.empty(0)

    def apply(self, xs: list[Tensor], base: Tensor | None) -> Tensor:
        x, b, importance = self._importance(xs, base)
        return torch.where(importance >= self.threshold, x, b)


arcee_fusion = whole(
    FusionStream,
    "arcee_fusion",
    "The other model's entries whose importance reaches the IQR threshold; the base elsewhere.",
)


NEARSWAP = Method(
    name="nearswap",
    fn=nearswap,
    params=(
        Param(
            "t",
            False,
            float,
            low=0,
            low_open=True,
            help="entries within t of the base take the other model's value",
        ),
    ),
    base="required",
    min_models=1,
    max_models=1,
    paper="https://huggingface.co/alchemonaut/QuartetAnemoi-70B-t0.0001",
    description="take the other model's values where they are close to the base's, lerp the rest",
    workspace=(0.0, 2.0),
    stream=Elementwise.of(nearswap),
)
ARCEE_FUSION = Method(
    name="arcee_fusion",
    fn=arcee_fusion,
    params=(),
    base="required",
    min_models=1,
    max_models=1,
    paper=_ARCEE_FUSION_POST,
    description="take the other model's entries whose change and row KL divergence stand out",
    random=True,
    workspace=(0.0, 5.0),
    stream=FusionStream,
    fixes="the row KL is computed in float64: mergekit's float32 KL between a model and its "
    "fine-tune is off by up to ~4e-3 relative, which moves the threshold",
)
