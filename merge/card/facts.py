"""What a model card is made of (``merge-card.json``), and the rules for its front matter.

Design
------
A build knows things the card needs that no other output file keeps: the inputs' own cards
(their ``license``, ``language``, ``datasets`` and ``pipeline_tag``), the method's name, paper
and description, the output's dtype and parameter count, the MoE sections with the routing
report. ``gather(plan)`` collects them into one JSON object, written into the output as
``merge-card.json``, so that the card is later a pure function of (that file, the recipe, the
manifest's inputs, the lock's presence) and ``merge card OUT`` works offline, without the
inputs.

``decide(facts)`` applies the rules, every value taken from an input card or the config:

- ``license``: the one every input card that states a license gives; inputs that state none
  do not count; a disagreement leaves it out with a warning naming each input's license; the
  ``license`` override (``--license``) wins;
- ``language`` and ``datasets``: kept when every input's card states the same set; an input
  without a card or without the field leaves it out (unlike the license, nothing is known of
  what that input was trained on or speaks);
- ``pipeline_tag``: the config donor's card value, else from the config's architectures
  (``*ForCausalLM`` -> ``text-generation``; a config with a ``vision_config`` ->
  ``image-text-to-text``), else left out;
- ``tags``: ``merge``, ``mergesmith``, the method, the MoE family for an MoE and ``lora``
  when adapters were merged;
- ``eval`` (optional, added by ``merge eval --card``, ``merge.eval.card``): scores, passed to
  the card's ``model-index`` and its Evaluation section.

What this module does not do: render the card (``merge.card.render``), write files or read
the manifest (``merge.card.output``).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from merge.card.render import Fields
from merge.errors import BuildError
from merge.links import inside
from merge.sources import ModelRef

if TYPE_CHECKING:  # pragma: no cover
    from merge.jobs import Plan

CARD_DATA_NAME = "merge-card.json"
VERSION = 1
CARD_KEYS = ("license", "language", "datasets", "pipeline_tag")


def _strings(value: Any) -> list[str] | None:
    """A card's ``language`` / ``datasets``: one string or a list, as a sorted list."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and value and all(isinstance(v, str) for v in value):
        return sorted(set(value))
    return None


def input_card(folder: Path | None) -> dict[str, Any] | None:
    """The fields of the model card (``README.md``) in ``folder`` that the output's card uses;
    None when there is no card or its front matter is unreadable."""
    from huggingface_hub import metadata_load

    path = folder / "README.md" if folder is not None else None
    if path is None or not path.is_file():
        return None
    inside(path, path.parent)
    try:
        meta = metadata_load(path) or {}
    except Exception:  # a card whose front matter is not YAML states nothing
        return None
    return {
        "license": meta["license"] if isinstance(meta.get("license"), str) else None,
        "language": _strings(meta.get("language")),
        "datasets": _strings(meta.get("datasets")),
        "pipeline_tag": meta["pipeline_tag"] if isinstance(meta.get("pipeline_tag"), str) else None,
    }


def _side_cards(p: Plan) -> dict[str, dict[str, Any] | None]:
    """Input ref (each side of ``base+adapter``) -> its card fields, recipe order."""
    cards: dict[str, dict[str, Any] | None] = {}
    for ref, model in p.models.items():
        parsed = ModelRef.parse(ref)
        cards.setdefault(str(parsed.base), input_card(model.directory))
        if parsed.lora is not None:
            cards.setdefault(str(parsed.lora), input_card(model.adapter))
    return cards


def gather(p: Plan, tool_version: str, license: str | None = None) -> dict[str, Any]:
    """The ``merge-card.json`` object of a planned build (see the module docstring)."""
    sections: list[tuple[str, str]] = []
    tags = ["merge", "mergesmith", p.method.name]
    if p.moe is not None:
        from merge.moe.card import moe_sections

        sections = moe_sections(p.moe, p.donor, p.moe.report)
        tags += ["moe", p.moe.family.name]
    if any(m.adapter is not None for m in p.models.values()):
        tags.append("lora")
    arch = p.config.get("architectures")
    return {
        "version": VERSION,
        "tool_version": tool_version,
        "title": "Mixture of experts" if p.moe is not None else None,
        "method": {
            "name": p.method.name,
            "paper": p.method.paper,
            "description": p.method.description,
        },
        "dtype": p.out_dtype,
        "num_params": sum(j.numel for j in p.jobs),
        "seed": p.seed,
        "base_model": p.recipe.base_model,
        "models": list(p.models),
        "donor": str(ModelRef.parse(p.donor).base),
        "input_cards": _side_cards(p),
        "architectures": [a for a in arch if isinstance(a, str)] if isinstance(arch, list) else [],
        "vision": "vision_config" in p.config,
        "tags": list(dict.fromkeys(tags)),
        "sections": [list(s) for s in sections],
        "license": license,
    }


def infer_license(licenses: Mapping[str, str | None]) -> tuple[str | None, str | None]:
    """(the license every input stating one agrees on, or None; the warning when they
    disagree). ``licenses``: input ref -> its card's license (None: states none)."""
    stated = {ref: lic for ref, lic in licenses.items() if lic}
    if len(set(stated.values())) <= 1:
        return next(iter(stated.values()), None), None
    each = ", ".join(f"{ref}: {lic}" for ref, lic in stated.items())
    return None, (
        f"license: the input cards disagree ({each}); the card states no license; "
        "set one with --license"
    )


def _agreed(values: list[list[str] | None]) -> list[str] | None:
    """The one value every input states; None when any input states none or another one (a
    merge's languages or datasets are only known when all of its inputs say the same)."""
    if not values or any(not v or v != values[0] for v in values):
        return None
    return values[0]


def pipeline_tag(donor_tag: str | None, architectures: list[str], vision: bool) -> str | None:
    """The donor card's pipeline tag, else the one the architectures imply, else None."""
    if donor_tag:
        return donor_tag
    if vision and any(a.endswith("ForConditionalGeneration") for a in architectures):
        return "image-text-to-text"
    if any(a.endswith("ForCausalLM") for a in architectures):
        return "text-generation"
    return None


def decide(facts: Mapping[str, Any], license: str | None = None) -> tuple[Fields, list[str]]:
    """The card's front-matter fields and warnings; ``license`` (or the facts' own
    override) replaces the inferred license."""
    cards = {ref: c or {} for ref, c in facts["input_cards"].items()}
    override = license or facts.get("license")
    inferred, warning = infer_license({ref: c.get("license") for ref, c in cards.items()})
    donor = cards.get(facts["donor"], {})
    fields = Fields(
        license=override or inferred,
        language=_agreed([c.get("language") for c in cards.values()]),
        datasets=_agreed([c.get("datasets") for c in cards.values()]),
        pipeline_tag=pipeline_tag(
            donor.get("pipeline_tag"), list(facts["architectures"]), bool(facts["vision"])
        ),
        tags=list(facts["tags"]),
        evaluations=list((facts.get("eval") or {}).get("results", [])),
        model_name=(facts.get("eval") or {}).get("model_name"),
    )
    return fields, [warning] if warning and not override else []


def dump(facts: Mapping[str, Any]) -> str:
    return json.dumps(facts, indent=2) + "\n"


def load(out: Path) -> dict[str, Any]:
    """The ``merge-card.json`` of ``out``; BuildError naming the file when it is unusable."""
    path = out / CARD_DATA_NAME
    if not path.is_file():
        raise BuildError(
            f"{path}: missing; this output was built without a card (or by an older version); "
            "rebuild it with merge run"
        )
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise BuildError(f"{path}: cannot read: {e}; rebuild the output with merge run") from None
    if not isinstance(data, dict) or data.get("version") != VERSION:
        raise BuildError(
            f"{path}: not a card file version this tool reads ({VERSION}); "
            "rebuild the output with merge run"
        )
    return data
