"""``lm_eval:NAME``: a task of EleutherAI's lm-evaluation-harness, run on a loaded model.

The harness is optional (``pip install 'mergesmith[eval]'``); it is imported only when such a
task is evaluated, and when it is missing the error names the extra. The model and tokenizer
already loaded are wrapped in the harness's Hugging Face model class (``HFLM``) and the task is
run with ``simple_evaluate``; its metrics come back under their lm-eval names with the filter
suffix dropped (``acc,none`` -> ``acc``), standard errors left out, ``n`` the samples scored.

What it does not do: download anything itself (the harness fetches its datasets, so this needs
the network or the datasets' cache), or check task names before the harness does.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from merge.errors import EvalError

EXTRA = "mergesmith[eval]"


def _harness() -> Any:
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
    except ImportError:
        raise EvalError(
            f"lm_eval tasks need lm-evaluation-harness: pip install '{EXTRA}'"
        ) from None
    return lm_eval, HFLM


def metrics_of(results: dict[str, Any], task: str) -> dict[str, float]:
    """The numeric metrics of ``task`` in a ``simple_evaluate`` result, suffixes dropped."""
    found = results.get("results", {}).get(task)
    if not isinstance(found, dict):
        raise EvalError(f"lm_eval:{task}: the harness returned no results for this task")
    metrics: dict[str, float] = {}
    for key, value in found.items():
        name = key.split(",", 1)[0]
        if name.endswith("_stderr") or isinstance(value, bool):
            continue
        if isinstance(value, int | float):
            metrics.setdefault(name, float(value))
    samples = results.get("n-samples", {}).get(task, {})
    if isinstance(samples, dict) and isinstance(samples.get("effective"), int):
        metrics["n"] = float(samples["effective"])
    return metrics


@dataclass
class HarnessTask:
    """``lm_eval:NAME`` (see the module docstring)."""

    task: str
    name: str = ""
    kind: str = "lm_eval"
    metrics: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        self.name = self.name or f"lm_eval:{self.task}"
        _harness()  # a missing extra is reported when the task is named, not after loading

    def evaluate(
        self, model: Any, tokenizer: Any, *, batch_size: int = 8, limit: int | None = None,
        device: str | None = None, progress: bool = False,
    ) -> dict[str, float]:  # fmt: skip
        lm_eval, HFLM = _harness()
        wrapped = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
        try:
            results = lm_eval.simple_evaluate(
                model=wrapped, tasks=[self.task], limit=limit, device=device
            )
        except KeyError as e:  # the harness's way of saying: no such task
            raise EvalError(f"lm_eval:{self.task}: unknown to lm-evaluation-harness: {e}") from None
        metrics = metrics_of(results or {}, self.task)
        self.metrics = tuple(k for k in metrics if k != "n")
        return metrics
