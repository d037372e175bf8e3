"""The card in an output directory: written at build time, printed or rewritten later.

Design
------
At build time (``write(plan, out, inputs, ...)``, called by ``merge.api.run`` after the
tensors, config, tokenizer, recipe and lock copy are in place and before the manifest), the
card's facts (``merge.card.facts.gather``) go to ``merge-card.json`` and ``README.md`` is
rendered from them, the recipe and the resolved inputs (the manifest's, with their commits).

``merge card OUT`` (``card(out)``) renders the same text again from the output's own files:
``merge-card.json``, ``merge-recipe.yaml``, the manifest's ``inputs`` and whether the lock copy
``merge-recipe.lock`` is there; it needs neither the inputs nor the network, and a card built
and a card printed from the same files are the same bytes. With ``write`` it rewrites
``README.md`` (and ``merge-card.json``, which records a ``license`` override) and updates the
manifest's entries for both, so ``merge verify`` holds.

What it does not do: upload (``merge publish``), or change any other file of the output.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from merge.card import facts as card_facts
from merge.card.facts import CARD_DATA_NAME
from merge.card.render import model_card
from merge.errors import BuildError

if TYPE_CHECKING:  # pragma: no cover
    from merge.jobs import Plan

CARD_NAME = "README.md"
RECIPE_NAME = "merge-recipe.yaml"
LOCK_NAME = "merge-recipe.lock"
# A multi-stage build's final output also holds the whole file and its lock: it reproduces
# from those (its merge-recipe.yaml is its own stage's document, which names earlier stages).
STAGES_NAME = "merge-stages.yaml"
STAGES_LOCK_NAME = "merge-stages.lock"


def reproduction(out: Path) -> tuple[str, str | None]:
    """(the recipe file a downloader runs, its lock or None) among ``out``'s files."""
    if (out / STAGES_NAME).is_file():
        return STAGES_NAME, STAGES_LOCK_NAME if (out / STAGES_LOCK_NAME).is_file() else None
    return RECIPE_NAME, LOCK_NAME if (out / LOCK_NAME).is_file() else None


def _shown(out: Path, recipe_text: str) -> str:
    """The recipe the card shows: a multi-stage build's whole file, else the output's own."""
    stages = out / STAGES_NAME
    return stages.read_text(encoding="utf-8") if stages.is_file() else recipe_text


def render(
    facts: Mapping[str, Any],
    recipe_text: str,
    inputs: Sequence[Mapping[str, Any]],
    files: tuple[str, str | None],
    license: str | None = None,
) -> tuple[str, list[str]]:
    """(README.md's text, the warnings of its fields) from what the card is made of."""
    fields, warnings = card_facts.decide(facts, license)
    method = facts["method"]
    text = model_card(
        recipe_text=recipe_text,
        method_name=method["name"],
        method_paper=method["paper"],
        method_description=method["description"],
        models=facts["models"],
        base_model=facts["base_model"],
        tool_version=facts["tool_version"],
        seed=facts["seed"],
        dtype=facts["dtype"],
        num_params=facts["num_params"],
        extra_sections=[(h, b) for h, b in facts["sections"]] + _evaluation(fields),
        title=facts["title"],
        inputs=inputs,
        fields=fields,
        recipe_name=files[0],
        lock_name=files[1],
    )
    return text, warnings


def _evaluation(fields: Any) -> list[tuple[str, str]]:
    """The Evaluation section of ``merge eval --card`` results, if any."""
    if not fields.evaluations:
        return []
    from merge.eval.card import section

    return [("Evaluation", section(fields.evaluations))]


def write(
    p: Plan,
    out: Path,
    inputs: Sequence[Mapping[str, Any]],
    *,
    tool_version: str,
    license: str | None = None,
) -> list[str]:
    """Write ``merge-card.json`` and ``README.md`` of a build into ``out``; the warnings."""
    facts = card_facts.gather(p, tool_version, license)
    (out / CARD_DATA_NAME).write_text(card_facts.dump(facts), encoding="utf-8")
    text, warnings = render(facts, _shown(out, p.recipe.text), inputs, reproduction(out))
    (out / CARD_NAME).write_text(text, encoding="utf-8")
    return warnings


@dataclass
class Card:
    """What ``card`` made: the text, its warnings, and the files rewritten (``write``)."""

    text: str
    warnings: list[str] = field(default_factory=list)
    written: list[str] = field(default_factory=list)


def card(out: str | Path, *, license: str | None = None, write: bool = False) -> Card:
    """``merge card OUT [--write] [--license X]`` (see the module docstring)."""
    from merge.build.manifest import read_manifest, update_files

    out = Path(out)
    if not out.is_dir():
        raise BuildError(f"{out}: not a directory; expected a merge output")
    manifest = read_manifest(out)
    if manifest is None:
        raise BuildError(f"{out}: no merge-manifest.json; rebuild the output with merge run")
    facts = card_facts.load(out)
    recipe = out / RECIPE_NAME
    if not recipe.is_file():
        raise BuildError(f"{recipe}: missing; rebuild the output with merge run")
    if license is not None:
        facts["license"] = license
    text, warnings = render(
        facts,
        _shown(out, recipe.read_text(encoding="utf-8")),
        manifest["inputs"],
        reproduction(out),
    )
    result = Card(text, warnings)
    if write:
        (out / CARD_DATA_NAME).write_text(card_facts.dump(facts), encoding="utf-8")
        (out / CARD_NAME).write_text(text, encoding="utf-8")
        result.written = [CARD_NAME, CARD_DATA_NAME]
        update_files(out, manifest, result.written)
    return result
