"""``merge eval``: score a model on tasks and print, or record in the model card, the results.

- ``merge.eval.data``: reading task files (text, JSONL) with file:line errors;
- ``merge.eval.loglik``: batched log-likelihoods of token sequences and of continuations;
- ``merge.eval.tasks``: the built-in tasks (``perplexity:FILE``, ``choice:FILE``,
  ``generate:FILE``) behind one ``Task`` protocol, and ``parse_task(spec)``;
- ``merge.eval.harness``: ``lm_eval:NAME`` through lm-evaluation-harness (the ``eval`` extra);
- ``merge.eval.run``: loading a model reference and evaluating it on tasks (``evaluate``);
- ``merge.eval.card``: the results as the model card's ``model-index`` (``merge eval --card``).

For code that already holds a model (``merge evolve``): ``parse_task(spec).evaluate(model,
tokenizer, batch_size=..., limit=..., device=..., progress=...)`` or ``evaluate_loaded``.
"""

from merge.eval.run import EvalResults, TaskResult, evaluate, evaluate_loaded, load_model
from merge.eval.tasks import Task, parse_task

__all__ = [
    "EvalResults",
    "Task",
    "TaskResult",
    "evaluate",
    "evaluate_loaded",
    "load_model",
    "parse_task",
]
