"""Evaluating a model on tasks: load it from a reference, run each task, collect the results.

``load_model(ref)`` resolves a model reference as recipes do (``merge.sources``: a local folder,
else a Hub id, downloaded through ``merge.hub``) and loads it with transformers' Auto classes in
the checkpoint's own dtype, in eval mode, on ``device``; transformers runs the model's own code
only with ``trust_remote_code`` (``merge.settings``). A ``base+adapter`` reference is refused:
merge the adapter first.

``evaluate_loaded(model, tokenizer, tasks)`` runs tasks (specs or ``Task`` objects) on a model
already in memory, as ``merge evolve`` does many times; ``evaluate(ref, specs)`` is ``merge
eval``: every spec is parsed (and its file checked) before the model is loaded.

What it does not do: print (``merge.clieval``) or write cards (``merge.eval.card``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from merge.errors import EvalError, SourceError
from merge.eval.tasks import Task, parse_task


@dataclass(frozen=True)
class TaskResult:
    """One task's metrics (lm-eval names) and the number of documents or questions."""

    name: str
    kind: str
    metrics: dict[str, float]
    n: int


@dataclass
class EvalResults:
    """What ``evaluate`` found: the model as given and each task's result, in order."""

    model: str
    results: list[TaskResult] = field(default_factory=list)

    def as_json(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "results": {r.name: {**r.metrics, "n": r.n} for r in self.results},
        }

    def table(self) -> str:
        """Columns task, metric, value, n: one row per metric."""
        rows = [("task", "metric", "value", "n")]
        for r in self.results:
            for metric, value in r.metrics.items():
                rows.append((r.name, metric, f"{value:.4f}", str(r.n)))
        widths = [max(len(row[i]) for row in rows) for i in range(4)]
        lines = [
            "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in rows
        ]
        return "\n".join(lines)


def load_model(
    ref: str | Path,
    *,
    device: str | None = None,
    trust_remote_code: bool = False,
) -> tuple[Any, Any, Path]:
    """(model, tokenizer, folder) of a model reference (see the module docstring)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    from merge.sources import ModelRef, resolve

    try:
        parsed = ModelRef.parse(str(ref))
    except ValueError as e:
        raise SourceError(f"model {e}") from None
    if parsed.lora is not None:
        raise EvalError(f"model '{ref}': evaluate a merged model, not base+adapter; merge it first")
    folder = resolve(parsed)
    if not (folder / "config.json").is_file():
        raise EvalError(f"model '{ref}': {folder} has no config.json")
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        raise EvalError(f"model '{ref}': cannot load its tokenizer: {_first(e)}") from None
    shown = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # loading a local folder: no bar worth showing
    try:
        model: Any = AutoModelForCausalLM.from_pretrained(
            folder, dtype="auto", trust_remote_code=trust_remote_code
        )
    except (OSError, ValueError) as e:
        raise EvalError(f"model '{ref}': cannot load it: {_first(e)}") from None
    finally:
        if shown:
            hf_logging.enable_progress_bar()
    model.eval()
    if device is not None:
        model.to(torch.device(device))
    return model, tokenizer, folder


def _first(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


def check_options(batch_size: int, limit: int | None) -> None:
    """EvalError for a batch size or limit below 1."""
    if batch_size < 1:
        raise EvalError(f"--batch-size must be at least 1, got {batch_size}")
    if limit is not None and limit < 1:
        raise EvalError(f"--limit must be at least 1, got {limit}")


def evaluate_loaded(
    model: Any,
    tokenizer: Any,
    tasks: Sequence[str | Task],
    *,
    batch_size: int = 8,
    limit: int | None = None,
    device: str | None = None,
    progress: bool = False,
    model_name: str = "",
) -> EvalResults:
    """Run each task (a spec or a Task) on a model in memory; the results in task order."""
    check_options(batch_size, limit)
    parsed = [parse_task(t) if isinstance(t, str) else t for t in tasks]
    results = EvalResults(model_name)
    for task in parsed:
        metrics = task.evaluate(
            model, tokenizer, batch_size=batch_size, limit=limit, device=device, progress=progress
        )
        n = int(metrics.pop("n", 0))
        results.results.append(TaskResult(task.name, task.kind, metrics, n))
    return results


def evaluate(
    ref: str | Path,
    specs: Sequence[str],
    *,
    batch_size: int = 8,
    limit: int | None = None,
    device: str | None = None,
    progress: bool = False,
    trust_remote_code: bool = False,
) -> EvalResults:
    """``merge eval REF --task ...``: parse every spec, load the model, run the tasks."""
    from merge.settings import applied

    if not specs:
        raise EvalError(
            "no task given; add --task KIND:ARG (perplexity, choice, generate, lm_eval)"
        )
    check_options(batch_size, limit)
    tasks = [parse_task(s) for s in specs]
    with applied(trust_remote_code=trust_remote_code):
        model, tokenizer, _ = load_model(ref, device=device, trust_remote_code=trust_remote_code)
        return evaluate_loaded(
            model,
            tokenizer,
            tasks,
            batch_size=batch_size,
            limit=limit,
            device=device,
            progress=progress,
            model_name=str(ref),
        )
