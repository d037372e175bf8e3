"""Plan-time bound on the router's prompts: none may be longer than the base model's positions.

The ``hidden*`` gate modes run the base model on every prompt at once; a prompt longer than the
model's ``max_position_embeddings`` cannot be positioned, and its attention grows with the square
of its length (a 20,000-token prompt needed over 4 GB on a 128-position model). So every prompt
is tokenized here, with the base model's tokenizer and the BOS token the router adds, and each
one too long is a plan error naming the expert and the prompt. Nothing is truncated. A base
model planned from headers only (weights on the Hub), or one without a usable tokenizer, is
checked when its gates are computed instead (``merge.moe.forward``).
"""

from __future__ import annotations

from merge.errors import PlanError
from merge.moe.recipe import MoeRecipe
from merge.moe.router import HIDDEN_MODES
from merge.sourceset import Model


def _short(text: str) -> str:
    return repr(text if len(text) <= 40 else text[:37] + "...")


def prompt_problems(recipe: MoeRecipe, base: Model) -> list[str]:
    """One line per prompt of more tokens than the base model has positions."""
    limit = base.checkpoint.config.get("max_position_embeddings")
    if recipe.gate_mode not in HIDDEN_MODES or not isinstance(limit, int) or base.remote:
        return []
    from merge.moe.forward import _tokenizer

    try:
        tok = _tokenizer(base.directory)
    except PlanError:
        return []
    bos = 1 if tok.bos_token_id is not None else 0
    problems = []
    for e in (*recipe.experts, *([recipe.shared] if recipe.shared else [])):
        for key, prompts in (("positive_prompts", e.positive), ("negative_prompts", e.negative)):
            for i, text in enumerate(prompts):
                # verbose=False: the tokenizer's own "longer than the maximum" warning would
                # come before, and say less than, the line below
                ids = tok(text, add_special_tokens=False, verbose=False)["input_ids"]
                n = len(ids) + bos
                if n > limit:
                    problems.append(
                        recipe.loc.error(
                            e.path + (key, i),
                            f"prompt {_short(text)} of expert '{e.model}' is {n:,} tokens, "
                            f"more than the base model's {limit:,} positions "
                            "(max_position_embeddings); shorten it",
                        )
                    )
    return problems
