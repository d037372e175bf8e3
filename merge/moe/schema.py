"""The MoE recipe schema: mergekit-moe's config syntax, strictly.

Pydantic models with ``extra="forbid"`` (a misspelt key is an error with a did-you-mean, never
dropped), in the style of ``merge.recipe.schema``. Only the shapes and ranges of values are
checked here; the rules between keys (gate mode vs prompts, experts per token vs experts, the
output family) live in ``merge.moe.recipe``, and everything that needs checkpoint headers in
``merge.moe.plan``.
"""

from __future__ import annotations

from pydantic import Field, StrictInt, StrictStr, field_validator

from merge.recipe.schema import DTYPES, FiniteNumber, RefStr, Strict

Number = FiniteNumber


class ExpertEntry(Strict):
    """``experts[i]`` / ``shared_experts[0]``: a model whose dense MLP becomes an expert."""

    source_model: RefStr
    positive_prompts: list[StrictStr] | None = None
    negative_prompts: list[StrictStr] | None = None
    noise_scale: Number | None = Field(default=None, ge=0)
    residual_scale: Number | None = None


class MoeSchema(Strict):
    """A whole mergekit-moe recipe (``MoEMergeConfig`` syntax plus ``seed``)."""

    base_model: RefStr
    experts: list[ExpertEntry] = Field(min_length=1)
    gate_mode: StrictStr = "hidden"
    experts_per_token: StrictInt = Field(default=2, ge=1)
    dtype: StrictStr | None = None
    architecture: StrictStr | None = None
    shared_experts: list[ExpertEntry] | None = None
    seed: StrictInt | None = Field(default=None, ge=0)

    @field_validator("dtype")
    @classmethod
    def _dtype(cls, v: str | None) -> str | None:
        if v is not None and v not in DTYPES:
            raise ValueError(f"must be one of float32, float16, bfloat16, got {v!r}")
        return None if v is None else DTYPES[v]
