"""``merge eval --card``: the results in the output's model card, as ``model-index`` metadata.

Design
------
The results are facts of the output, kept in ``merge-card.json`` under ``eval``
(``{"model_name": ..., "results": [{task, kind, metric, value, n}, ...]}``) so that the card
stays a function of the output's files: ``merge card OUT`` prints them and ``merge card
--write`` keeps them. ``record(out, results)`` merges new results into that list (a task and
metric already there is replaced, the others kept) and rewrites the card through
``merge.card.output.card(write=True)``, which also updates the manifest's entries, so
``merge verify`` still passes and ``merge publish`` uploads the card with them.

The card's front matter gets them as huggingface_hub's ``EvalResult`` objects in
``ModelCardData(eval_results=..., model_name=...)`` (``hub_results``), which writes the Hub's
``model-index``; no YAML is written here. The body gets an Evaluation table (``section``).
A file task is named by its kind and file name (``choice:qa.jsonl``), never its local path.

What it does not do: evaluate (``merge.eval.run``), or write the card of a folder that is not a
merge output (no ``merge-card.json`` or manifest: an error says so).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from merge.errors import EvalError

if TYPE_CHECKING:  # pragma: no cover
    from huggingface_hub import EvalResult

    from merge.eval.run import EvalResults

TASK_TYPE = "text-generation"
HARNESS = ("lm-evaluation-harness", "https://github.com/EleutherAI/lm-evaluation-harness")


def card_name(name: str, kind: str) -> str:
    """The task as the card names it: ``kind:file name`` for a file task, else as given."""
    if kind == "lm_eval":
        return name
    return f"{kind}:{Path(name.partition(':')[2]).name}"


def entries(results: EvalResults) -> list[dict[str, Any]]:
    """The ``merge-card.json`` entries of the results: one per task and metric."""
    return [
        {"task": card_name(r.name, r.kind), "kind": r.kind, "metric": m, "value": v, "n": r.n}
        for r in results.results
        for m, v in r.metrics.items()
    ]


def merged(old: Sequence[Mapping[str, Any]], new: Sequence[Mapping[str, Any]]) -> list[dict]:
    """``old`` with each (task, metric) of ``new`` replaced or added, in first-seen order."""
    by_key = {(e["task"], e["metric"]): dict(e) for e in old}
    for e in new:
        by_key[(e["task"], e["metric"])] = dict(e)
    return list(by_key.values())


def hub_results(entries: Sequence[Mapping[str, Any]]) -> list[EvalResult]:
    """The card entries as huggingface_hub ``EvalResult`` objects (the ``model-index``)."""
    from huggingface_hub import EvalResult

    out = []
    for e in entries:
        task = str(e["task"])
        kind, _, arg = task.partition(":")
        harness = kind == "lm_eval"
        out.append(
            EvalResult(
                task_type=TASK_TYPE,
                dataset_type=arg,
                dataset_name=arg if harness else task,
                metric_type=str(e["metric"]),
                metric_value=float(e["value"]),
                metric_name=str(e["metric"]),
                source_name=HARNESS[0] if harness else None,
                source_url=HARNESS[1] if harness else None,
            )
        )
    return out


def section(entries: Sequence[Mapping[str, Any]]) -> str:
    """The card body's Evaluation table."""
    rows = ["| Task | Metric | Value | n |", "|---|---|---|---|"]
    rows += [f"| `{e['task']}` | {e['metric']} | {e['value']:.4f} | {e['n']} |" for e in entries]
    return "Scored with `merge eval`:\n\n" + "\n".join(rows)


def require_output(out: str | Path) -> Path:
    """``out`` as a Path when it is a merge output (manifest and card facts), else EvalError."""
    from merge.build.manifest import read_manifest
    from merge.card import facts as card_facts

    path = Path(out)
    if not path.is_dir() or read_manifest(path) is None:
        raise EvalError(f"{out}: --card needs a merge output directory (with merge-manifest.json)")
    card_facts.load(path)
    return path


def record(out: str | Path, results: EvalResults) -> list[str]:
    """Add ``results`` to the card of the merge output ``out``; the files rewritten."""
    from merge.card import facts as card_facts
    from merge.card.output import card

    out = require_output(out)
    facts = card_facts.load(out)
    before = facts.get("eval") or {}
    facts["eval"] = {
        "model_name": before.get("model_name") or out.resolve().name,
        "results": merged(before.get("results", []), entries(results)),
    }
    (out / card_facts.CARD_DATA_NAME).write_text(card_facts.dump(facts), encoding="utf-8")
    return card(out, write=True).written
