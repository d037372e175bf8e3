"""MoE recipes (mergekit-moe syntax): parsed YAML -> a checked ``MoeRecipe``.

A recipe with ``experts:`` and no ``merge_method`` is an MoE recipe (``merge.recipe.validate``
sends it here). The schema (``merge.moe.schema``) checks keys and value types; this module adds
the rules between keys, each a one-line ``file:line: path: message`` naming what to change: a
known ``gate_mode`` and ``architecture``, ``experts_per_token`` at most the number of experts,
positive prompts for every expert when the gate mode needs them, at most one shared expert, and
(when ``architecture`` is given) a shared expert that the family can hold. All problems are
raised together.

``MoeRecipe`` offers the attributes of ``merge.recipe.Recipe`` that the shared phases use
(``file``, ``text``, ``loc``, ``base_model``, ``seed``, ``ref_paths`` ...), so sources, the
writer and the CLI treat both kinds alike.

What it does not do: open models (``merge.moe.plan`` checks the experts against the family from
their headers) or compute gates (``merge.moe.router``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from merge.errors import RecipeError
from merge.moe.families import Family, architecture_names, find_family
from merge.moe.router import GATE_MODES, PROMPT_MODES
from merge.moe.schema import ExpertEntry, MoeSchema
from merge.recipe.checks import did_you_mean
from merge.recipe.yamlsrc import Locator, PathKey

MOE_KEYS = ("experts", "gate_mode", "experts_per_token", "shared_experts")


@dataclass(frozen=True)
class ExpertSpec:
    """One expert (or the shared expert): its model, prompts, scales and recipe path."""

    model: str
    positive: tuple[str, ...]
    negative: tuple[str, ...]
    noise_scale: float | None
    residual_scale: float | None
    path: PathKey


@dataclass
class MoeRecipe:
    """An MoE recipe that passed the schema and the rules between its keys."""

    file: Path
    text: str
    loc: Locator
    schema: MoeSchema
    experts: tuple[ExpertSpec, ...]
    shared: ExpertSpec | None
    family: Family | None  # from ``architecture:``; None: the first family that fits
    warnings: list[str] = field(default_factory=list)

    @property
    def base_model(self) -> str:
        return self.schema.base_model

    @property
    def gate_mode(self) -> str:
        return self.schema.gate_mode

    @property
    def experts_per_token(self) -> int:
        return self.schema.experts_per_token

    @property
    def dtype(self) -> str | None:
        return self.schema.dtype

    @property
    def out_dtype(self) -> str | None:
        return self.schema.dtype

    @property
    def seed(self) -> int | None:
        return self.schema.seed

    @property
    def chat_template(self) -> str | None:
        return None  # mergekit-moe has no chat_template key: the base's template is kept

    @property
    def tokenizer_source(self) -> str | None:
        return None

    def ref_paths(self) -> dict[str, PathKey]:
        """Every model named in the recipe, base first, each once, with its recipe path."""
        found: dict[str, PathKey] = {self.base_model: ("base_model",)}
        for e in (*self.experts, *([self.shared] if self.shared else [])):
            found.setdefault(e.model, e.path + ("source_model",))
        return found

    def model_refs(self) -> list[str]:
        return list(self.ref_paths())


def _spec(e: ExpertEntry, path: PathKey) -> ExpertSpec:
    return ExpertSpec(
        e.source_model,
        tuple(e.positive_prompts or ()),
        tuple(e.negative_prompts or ()),
        None if e.noise_scale is None else float(e.noise_scale),
        None if e.residual_scale is None else float(e.residual_scale),
        path,
    )


def shared_problem(family: Family, recipe: MoeRecipe) -> tuple[PathKey, str] | None:
    """Why ``family`` cannot take the recipe's shared expert (or its absence), or None."""
    shared = recipe.shared
    if shared is None and family.shared_required:
        return (), (
            f"architecture {family.name} ({family.title}) needs exactly one shared expert: "
            "add shared_experts: with one source_model"
        )
    if shared is not None and family.shared is None:
        return ("shared_experts",), (
            f"architecture {family.name} ({family.title}) cannot hold a shared expert: remove "
            "shared_experts or use architecture: qwen2_moe or deepseek_v3"
        )
    if shared is not None and not family.shared_gate and (shared.positive or shared.negative):
        return shared.path, (
            f"the shared expert of {family.title} has no gate (it runs on every token): "
            "remove its positive_prompts and negative_prompts"
        )
    return None


def _rules(recipe: MoeRecipe, loc: Locator, problems: list[str]) -> None:
    s = recipe.schema
    if s.gate_mode not in GATE_MODES:
        problems.append(
            loc.error(
                ("gate_mode",), "unknown gate mode; " + did_you_mean(s.gate_mode, list(GATE_MODES))
            )
        )
    if s.architecture is not None and recipe.family is None:
        problems.append(
            loc.error(
                ("architecture",),
                "unknown MoE architecture; " + did_you_mean(s.architecture, architecture_names()),
            )
        )
    n = len(recipe.experts)
    if s.experts_per_token > n:
        problems.append(
            loc.error(
                ("experts_per_token",),
                f"{s.experts_per_token} is more than the {n} expert(s); lower it to at most {n} "
                "or add experts",
            )
        )
    if s.gate_mode in PROMPT_MODES:
        for e in recipe.experts:
            if not e.positive:
                problems.append(
                    loc.error(
                        e.path,
                        f"gate_mode {s.gate_mode} needs positive_prompts for every expert: add "
                        "some, or use gate_mode: random",
                    )
                )
    if s.shared_experts is not None and len(s.shared_experts) > 1:
        problems.append(
            loc.error(
                ("shared_experts",),
                f"at most one shared expert is supported, got {len(s.shared_experts)}",
            )
        )
    if recipe.family is not None and (found := shared_problem(recipe.family, recipe)):
        problems.append(loc.error(*found))


def build_moe_recipe(data: dict[str, Any], loc: Locator, text: str, file: Path) -> MoeRecipe:
    """Validate a parsed mergekit-moe recipe; raise every problem together."""
    from merge.recipe.validate import _pydantic_problem

    try:
        schema = MoeSchema.model_validate(data)
    except ValidationError as e:
        found = [_pydantic_problem(err, loc, MoeSchema) for err in e.errors()]
        raise RecipeError(list(dict.fromkeys(found))) from None
    experts = tuple(_spec(e, ("experts", i)) for i, e in enumerate(schema.experts))
    shared = (
        _spec(schema.shared_experts[0], ("shared_experts", 0)) if schema.shared_experts else None
    )
    family = find_family(schema.architecture) if schema.architecture else None
    recipe = MoeRecipe(file, text, loc, schema, experts, shared, family)
    problems: list[str] = []
    _rules(recipe, loc, problems)
    if problems:
        raise RecipeError(list(dict.fromkeys(problems)))
    return recipe
