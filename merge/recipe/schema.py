"""The recipe schema: mergekit's merge-config syntax, strictly.

Pydantic models with ``extra="forbid"`` so a misspelt key is an error (with a did-you-mean),
never silently dropped. Parameter values are kept raw here (``dict[str, Any]``) and checked
against the chosen method in ``merge.recipe.validate``, where the method's parameter
declarations are known. Model references stay strings; their syntax is checked with
``merge.sources.ModelRef.parse``.
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StrictBool,
    StrictFloat,
    StrictInt,
    StrictStr,
    field_validator,
)

from merge.methods.base import finite_problem
from merge.recipe.refs import ref_text

DTYPES = {
    "float32": "float32",
    "fp32": "float32",
    "float": "float32",
    "float16": "float16",
    "fp16": "float16",
    "half": "float16",
    "bfloat16": "bfloat16",
    "bf16": "bfloat16",
}


def _finite(value: float) -> float:
    problem = finite_problem(value)
    if problem:
        raise ValueError(problem)
    return value


# A number the merge computes with: finite and within float32 (``.inf``, ``.nan``, ``1e+39``
# and integers past float32 are refused with the same message as method parameters).
FiniteNumber = Annotated[StrictFloat | StrictInt, AfterValidator(_finite)]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _check_ref(value: str) -> str:
    from merge.sources import ModelRef

    ModelRef.parse(value)  # raises ValueError with a one-line reason
    return value


# A model reference: text, or mergekit's mapping form turned into text (``merge.recipe.refs``).
RefStr = Annotated[StrictStr, BeforeValidator(ref_text), AfterValidator(_check_ref)]
# ``base``, ``union`` or a model reference (checked in ``merge.recipe.validate``).
TokenizerSource = Annotated[StrictStr, BeforeValidator(ref_text)]


class ModelEntry(Strict):
    """``models[i]``: one input model and its per-model parameters."""

    model: RefStr
    parameters: dict[str, Any] | None = None


class SliceSource(Strict):
    """``slices[i].sources[j]``: a layer range of one model."""

    model: RefStr
    layer_range: tuple[StrictInt, StrictInt]
    parameters: dict[str, Any] | None = None

    @field_validator("layer_range")
    @classmethod
    def _range(cls, v: tuple[int, int]) -> tuple[int, int]:
        if v[0] < 0 or v[1] <= v[0]:
            raise ValueError(f"must be [start, end) with 0 <= start < end, got [{v[0]}, {v[1]}]")
        return v


class Slice(Strict):
    """``slices[i]``: output layers built from equally long ranges of the sources.
    ``residual_weight`` is accepted and has no effect, as in mergekit (a warning says so)."""

    sources: list[SliceSource] = Field(min_length=1)
    base_model: RefStr | None = None
    residual_weight: FiniteNumber | None = None
    parameters: dict[str, Any] | None = None


MAX_PAD_MULTIPLE = 65536
"""``tokenizer.pad_to_multiple_of`` at most this: padding adds at most 65,535 zero rows."""


class TokenSpec(Strict):
    """``tokenizer.tokens.<token>``: where a token's embedding row comes from."""

    source: Any = None
    force: StrictBool = False


class TokenizerConfig(Strict):
    """``tokenizer:``: the output vocabulary (``merge.vocab``); ``source`` defaults to
    ``union``, as in mergekit."""

    source: TokenizerSource = "union"
    tokens: dict[str, TokenSpec] | None = None
    pad_to_multiple_of: StrictInt | None = Field(default=None, gt=0, le=MAX_PAD_MULTIPLE)


class ModuleEntry(Strict):
    """``modules.<name>``: one module of a multimodal model (``text_decoder``,
    ``vision_tower``, ``multi_modal_projector``) merged with its own models or slices and
    parameters (mergekit's ``OutputModuleDefinition``)."""

    models: list[ModelEntry] | None = Field(default=None, min_length=1)
    slices: list[Slice] | None = Field(default=None, min_length=1)
    parameters: dict[str, Any] | None = None


class RecipeSchema(Strict):
    """A whole merge recipe (mergekit's ``MergeConfiguration`` syntax plus ``seed`` and
    ``allow_mismatched_architectures``)."""

    merge_method: StrictStr
    models: list[ModelEntry] | None = Field(default=None, min_length=1)
    slices: list[Slice] | None = Field(default=None, min_length=1)
    modules: dict[StrictStr, ModuleEntry] | None = Field(default=None, min_length=1)
    base_model: RefStr | None = None
    parameters: dict[str, Any] | None = None
    dtype: StrictStr | None = None
    out_dtype: StrictStr | None = None
    tokenizer_source: TokenizerSource | None = None
    tokenizer: TokenizerConfig | None = None
    chat_template: StrictStr | None = None
    seed: StrictInt | None = Field(default=None, ge=0)
    # Merge models of different architectures (``merge.crimes``), as ``--allow-crimes`` does.
    allow_mismatched_architectures: StrictBool = False

    @field_validator("dtype", "out_dtype")
    @classmethod
    def _dtype(cls, v: str | None) -> str | None:
        if v is not None and v not in DTYPES:
            raise ValueError(f"must be one of float32, float16, bfloat16, got {v!r}")
        return None if v is None else DTYPES[v]
