"""What a plan is made of: tensor jobs, the plan itself, and per-tensor seeds.

Pure data: the planner (``merge.plan``) builds these from a recipe and checkpoint headers, the
executor runs them, ``merge.report`` prints them.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from merge.methods import Method
from merge.shardplan import ShardPlan

if TYPE_CHECKING:  # pragma: no cover
    from merge.moe.layout import MoeLayout
    from merge.moe.recipe import MoeRecipe
    from merge.recipe import Recipe
    from merge.sourceset import Model
    from merge.vocab import Alignment, VocabPlan

DEFAULT_SEED = 20240101
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass(frozen=True)
class Input:
    """One tensor to read: ``name`` in model ``model`` (a recipe reference)."""

    model: str
    name: str


@dataclass(frozen=True)
class VocabAlign:
    """A vocabulary tensor (embeddings, lm_head): before the method runs, every input (and
    the base) is moved into the output vocabulary's rows by ``alignment``. ``extra``: tensors
    read only for rows an override takes from a model that is not an input of the job."""

    alignment: Alignment
    extra: tuple[Input, ...] = ()


@dataclass
class TensorJob:
    """How one output tensor is made (``inputs`` keep their own shapes when ``vocab`` is
    set; ``shape`` is the output's).

    ``copy`` jobs read their one input and cast it; an MoE expert's copy may first get seeded
    Gaussian noise of std ``noise`` and a factor ``scale`` (mergekit-moe's ``noise_scale`` and
    ``residual_scale``). An integer tensor is a copy whose ``agree`` inputs (the other
    models') must hold the same bytes, else the run fails. ``computed`` jobs have no inputs:
    their tensor is computed after planning (MoE gates) and handed to the executor by name;
    the string says how, for ``merge plan``."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    inputs: tuple[Input, ...]
    base: Input | None
    params: dict[str, Any]
    layer: int | None
    copy: bool = False
    vocab: VocabAlign | None = None
    computed: str | None = None
    noise: float = 0.0
    scale: float = 1.0
    agree: tuple[Input, ...] = ()  # an integer copy's other models: must be bit-identical

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n


@dataclass(frozen=True)
class ModulePlan:
    """One module of the output (``merge.modules``): its tensors and layers, and whether whole
    models or slices make it."""

    name: str
    tensors: int
    layers: int
    made_of: str  # "models" or "slices"


@dataclass
class Plan:
    """Everything a run needs, decided before any tensor data is read."""

    recipe: Recipe | MoeRecipe
    method: Method
    models: dict[str, Model]
    jobs: list[TensorJob]
    shards: ShardPlan
    out_dtype: str
    donor: str
    tokenizer_donor: str
    config: dict[str, Any]
    seed: int
    peak_bytes: int
    warnings: list[str] = field(default_factory=list)
    vocab: VocabPlan | None = None
    moe: MoeLayout | None = None
    modules: list[ModulePlan] = field(default_factory=list)


def stored_dtype(checkpoint: Any) -> str:
    """The dtype a model is stored in: its config's ``dtype``/``torch_dtype``, else its first
    floating tensor's, else float32 (the output dtype when a recipe names none)."""
    for key in ("dtype", "torch_dtype"):
        if checkpoint.config.get(key) in DTYPES:
            return str(checkpoint.config[key])
    for info in checkpoint.tensors.values():
        for name, dt in DTYPES.items():
            if info.dtype == dt:
                return name
    return "float32"


def tensor_seed(seed: int, name: str) -> int:
    """The seed of one output tensor's generator: independent of order and threads."""
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)
