"""merge: build new LLM checkpoints out of existing ones from declarative recipes.

Public API (nothing heavy is imported until used)::

    from merge import load_recipe, plan, run
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

__all__ = ["__version__", "load_recipe", "plan", "run"]

if TYPE_CHECKING:  # pragma: no cover
    from merge.api import plan, run
    from merge.recipe import load_recipe


def __getattr__(name: str) -> Any:
    if name == "load_recipe":
        from merge.recipe import load_recipe

        return load_recipe
    if name in ("plan", "run"):
        from merge import api

        return getattr(api, name)
    raise AttributeError(f"module 'merge' has no attribute {name!r}")
