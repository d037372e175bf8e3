"""mergekit's ``--allow-crimes``: a merge of models with different architectures is refused.

A model's architecture is its config's ``architectures[0]``, else its ``model_type``; a model
with neither is not compared. Every model that a ``models:`` or ``slices:`` recipe merges
counts (the base included); a model named only as the tokenizer source does not. Models of
different architectures are a plan error naming each model and its architecture, or, with
``allow_crimes``, a warning. MoE recipes are not checked: their experts may differ from the
base by design, and their planner checks what it needs.

What it does not do: decide whether mixed models can actually be merged (the planner's tensor
name and shape checks do, and report every mismatch).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # pragma: no cover
    from merge.recipe import Recipe
    from merge.sourceset import Model

TOKENIZER_PATHS = {("tokenizer", "source"), ("tokenizer_source",)}


def architecture(config: Mapping[str, object]) -> str | None:
    """``architectures[0]`` of a config, else its ``model_type``, else None."""
    names = config.get("architectures")
    if isinstance(names, list) and names and isinstance(names[0], str):
        return names[0]
    kind = config.get("model_type")
    return kind if isinstance(kind, str) else None


def mixed_architectures(recipe: Recipe, models: Mapping[str, Model]) -> str | None:
    """``'a' is LlamaForCausalLM; 'b' and 'c' are Qwen2ForCausalLM`` when the merged models
    differ, else None."""
    groups: dict[str, list[str]] = {}
    for ref, path in recipe.ref_paths().items():
        if path in TOKENIZER_PATHS or ref not in models:
            continue
        arch = architecture(models[ref].checkpoint.config)
        if arch is not None:
            groups.setdefault(arch, []).append(ref)
    if len(groups) < 2:
        return None
    return "; ".join(
        f"{_names(refs)} {'is' if len(refs) == 1 else 'are'} {arch}"
        for arch, refs in groups.items()
    )


def check_architectures(
    recipe: Recipe, models: Mapping[str, Model], allow: bool, problems: list[str]
) -> list[str]:
    """The warnings (empty, or one when ``allow``); when the models mix architectures and
    ``allow`` is false, the problem goes to ``problems`` with the plan's others."""
    mixed = mixed_architectures(recipe, models)
    if mixed is None:
        return []
    if not allow:
        problems.append(
            f"{recipe.file}: the models have different architectures: {mixed}; pass "
            "--allow-crimes to merge them anyway"
        )
        return []
    return [f"the models have different architectures: {mixed}; merging anyway (--allow-crimes)"]


def _names(refs: list[str]) -> str:
    quoted = [f"'{r}'" for r in refs]
    return quoted[0] if len(quoted) == 1 else ", ".join(quoted[:-1]) + " and " + quoted[-1]
