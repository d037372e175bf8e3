"""mergekit's ``--allow-crimes``: a merge of models of different architectures is refused.

Two models are of different architectures when their configs name different ones
(``architectures[0]``, else ``model_type``; a model with neither is not compared), or, when
the names agree, when their tensor sets differ beyond the known optional tensors. Tensor sets
are compared by kind: a layer's index is left out (``model.layers.N.mlp.up_proj.weight``), so
models of different depths (the ranges a frankenmerge stacks) compare equal, and these never
count:

- ``lm_head.weight`` (any prefix): a model with tied embeddings stores none, and the planner
  lets its token embedding stand in for it (``merge.architecture.tied_partner``), so a tied
  and an untied model of one architecture merge as mergekit merges them;
- buffers older checkpoints saved and newer ones do not: rotary ``inv_freq``,
  ``position_ids``, GPT-2/GPT-Neo attention masks (``attn.bias``, ``attn.masked_bias``).

Biases do count: a model with attention or MLP biases differs from one without
(``attention_bias`` in its config). A kind that the planner already reported missing (a
tensor the output needs that a model lacks: ``Ctx.missing``) is left to that more precise
message, which no escape would silence.

Every model that a ``models:``, ``slices:`` or ``modules:`` recipe merges counts (the base
and every slice's sources included; a ``base+adapter`` reference counts as its base, whose
tensors it has); a model named only as the tokenizer source does not. A difference is a plan
error naming the models (for tensors: how many one has that another lacks, and the first
few), or, with ``allow_mismatched_architectures: true`` in the recipe or ``--allow-crimes``,
one warning. MoE recipes are not checked: their experts may differ from the base by design,
and their planner checks what it needs.

What it does not do: decide whether mixed models can actually be merged (the planner's tensor
name and shape checks do, and report every mismatch), or compare layer counts.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Iterable, Mapping
from typing import TYPE_CHECKING

from merge.architecture import LAYER_RE, ordered

if TYPE_CHECKING:  # pragma: no cover
    from merge.recipe import Recipe
    from merge.sourceset import Model

TOKENIZER_PATHS = {("tokenizer", "source"), ("tokenizer_source",)}
RECIPE_KEY = "allow_mismatched_architectures"
FLAG = "--allow-crimes"
ESCAPE = f"set {RECIPE_KEY}: true or pass {FLAG} to merge them anyway"
OPTIONAL_RE = re.compile(
    r"(^|\.)(lm_head\.weight|inv_freq|position_ids|(attn|attention)\.(bias|masked_bias))$"
)
LISTED = 3


def architecture(config: Mapping[str, object]) -> str | None:
    """``architectures[0]`` of a config, else its ``model_type``, else None."""
    names = config.get("architectures")
    if isinstance(names, list) and names and isinstance(names[0], str):
        return names[0]
    kind = config.get("model_type")
    return kind if isinstance(kind, str) else None


def escape(recipe: Recipe, allow_crimes: bool) -> str | None:
    """What allows mixed architectures: ``--allow-crimes``, the recipe key, or None."""
    if allow_crimes:
        return FLAG
    return f"{RECIPE_KEY}: true" if recipe.allow_mismatched_architectures else None


def merged_refs(recipe: Recipe, models: Mapping[str, Model]) -> list[str]:
    """The models the recipe merges, base first (not a tokenizer-only source)."""
    return [
        ref
        for ref, path in recipe.ref_paths().items()
        if path not in TOKENIZER_PATHS and ref in models
    ]


def mixed_architectures(recipe: Recipe, models: Mapping[str, Model]) -> str | None:
    """``'a' is LlamaForCausalLM; 'b' and 'c' are Qwen2ForCausalLM`` when the merged models
    differ, else None."""
    groups: dict[str, list[str]] = {}
    for ref in merged_refs(recipe, models):
        arch = architecture(models[ref].checkpoint.config)
        if arch is not None:
            groups.setdefault(arch, []).append(ref)
    if len(groups) < 2:
        return None
    return "; ".join(f"{_names(refs)} {_be(refs)} {arch}" for arch, refs in groups.items())


def kind(name: str) -> str:
    """A tensor's name with its layer index replaced by ``N``."""
    return LAYER_RE.sub(lambda m: f"{m.group(1)}{m.group(2)}.N{m.group(4)}", name, count=1)


def kinds(names: Iterable[str]) -> dict[str, list[str]]:
    """Each kind of tensor among ``names`` (optional tensors left out) -> its names."""
    found: dict[str, list[str]] = {}
    for name in names:
        if not OPTIONAL_RE.search(name):
            found.setdefault(kind(name), []).append(name)
    return found


def mixed_tensors(
    recipe: Recipe, models: Mapping[str, Model], missing: Collection[str] = ()
) -> str | None:
    """``'a' has 6 tensors 'b' lacks (x, y, z, ...)`` when the merged models' tensor sets
    differ beyond optional tensors and the kinds in ``missing`` (already reported), else
    None. Models with the same tensor kinds form a group; each other group is compared with
    the first model's."""
    skip = {kind(name) for name in missing}
    groups: dict[frozenset[str], list[str]] = {}
    found: dict[str, dict[str, list[str]]] = {}
    for ref in merged_refs(recipe, models):
        found[ref] = kinds(models[ref].checkpoint.tensors)
        groups.setdefault(frozenset(found[ref]) - skip, []).append(ref)
    if len(groups) < 2:
        return None
    (first, *_), *others = groups.values()
    said = []
    for group in others:
        said += _lacks([first], group, found, skip) + _lacks(group, [first], found, skip)
    return "; ".join(said)


def _lacks(
    having: list[str], lacking: list[str], found: dict[str, dict[str, list[str]]], skip: set[str]
) -> list[str]:
    """``'a' has 6 tensors 'b' lacks (...)``, or nothing when ``lacking[0]`` lacks none."""
    extra = set(found[having[0]]) - set(found[lacking[0]]) - skip
    if not extra:
        return []
    names = ordered(n for k in extra for n in found[having[0]][k])
    shown = ", ".join(names[:LISTED]) + (", ..." if len(names) > LISTED else "")
    count = f"{len(names)} tensor{'s' if len(names) != 1 else ''}"
    verb = "lack" if len(lacking) > 1 else "lacks"
    return [f"{_names(having)} {_have(having)} {count} {_names(lacking)} {verb} ({shown})"]


def check_architectures(
    recipe: Recipe,
    models: Mapping[str, Model],
    allowed: str | None,
    problems: list[str],
    missing: Collection[str] = (),
) -> list[str]:
    """The warnings (empty, or one when ``allowed``, the escape used); when the models mix
    architectures (names, else tensor sets) and nothing allows it, the problem goes first in
    ``problems``, with the plan's others after it."""
    mixed = mixed_architectures(recipe, models)
    what = "architectures"
    if mixed is None:
        mixed, what = mixed_tensors(recipe, models, missing), "tensors"
    if mixed is None:
        return []
    if allowed is None:
        problems.insert(0, f"{recipe.file}: the models have different {what}: {mixed}; {ESCAPE}")
        return []
    return [f"the models have different {what}: {mixed}; merging anyway ({allowed})"]


def _names(refs: list[str]) -> str:
    quoted = [f"'{r}'" for r in refs]
    return quoted[0] if len(quoted) == 1 else ", ".join(quoted[:-1]) + " and " + quoted[-1]


def _be(refs: list[str]) -> str:
    return "is" if len(refs) == 1 else "are"


def _have(refs: list[str]) -> str:
    return "has" if len(refs) == 1 else "have"
