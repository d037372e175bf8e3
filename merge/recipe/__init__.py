"""Recipes: YAML with line numbers -> strict schema -> a checked ``Recipe``."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from merge.recipe.model import Recipe, SliceSpec, Source
from merge.recipe.params import Gradient, ParamValue, Rule, lookup
from merge.recipe.validate import build_recipe
from merge.recipe.yamlsrc import Locator, format_path, load_yaml, parse_yaml

if TYPE_CHECKING:  # pragma: no cover
    from merge.moe.recipe import MoeRecipe

__all__ = [
    "Gradient",
    "Locator",
    "ParamValue",
    "Recipe",
    "Rule",
    "SliceSpec",
    "Source",
    "format_path",
    "load_recipe",
    "lookup",
    "parse_recipe",
]


def parse_recipe(text: str, file: str = "recipe.yaml") -> Recipe | MoeRecipe:
    """Parse and check recipe text (``file`` is used in messages and to resolve paths)."""
    data, loc = parse_yaml(text, file)
    return build_recipe(data, loc, text, Path(file))


def load_recipe(path: str | Path) -> Recipe | MoeRecipe:
    """Read, parse and check a recipe file (a merge or an MoE recipe); raises RecipeError
    listing every problem."""
    path = Path(path)
    data, loc, text = load_yaml(path)
    return build_recipe(data, loc, text, path)
