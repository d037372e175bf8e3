"""The model card (``README.md``) of a merged checkpoint, and what it is made of.

- ``merge.card.render``: the card's text, a pure function of what it is given;
- ``merge.card.facts``: what a build knows that the card needs (the input cards' license,
  language, datasets and pipeline tag; the method; the MoE report), kept in the output as
  ``merge-card.json``, and the rules that decide the front matter's fields from it;
- ``merge.card.output``: writing the card at build time and ``merge card OUT [--write]``.
"""

from merge.card.render import Fields, hub_id, model_card

__all__ = ["Fields", "hub_id", "model_card"]
