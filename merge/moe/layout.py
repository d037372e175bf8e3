"""Where every tensor of an MoE checkpoint comes from: the jobs of a planned MoE.

``layout_jobs`` lists, for a checked ``MoeLayout``, the base's tensors without its dense MLP
(copied and cast), per layer each expert's dense MLP under the family's expert names (copied,
with mergekit-moe's ``noise_scale`` on every MLP tensor and ``residual_scale`` on
``down_proj``), and the ``computed`` jobs whose data ``merge.moe.gates`` supplies at run time:
router rows, the shared expert's gate, DeepSeek-V3's score-correction bias and (without a shared
expert) its zero-width shared MLP. Jobs come in output order: embeddings, layers, head.

What it does not do: any checking (``merge.moe.plan`` did it from the headers before).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from merge import architecture as arch
from merge.jobs import Input, TensorJob
from merge.moe.families import PROJS, Family, dense_mlp, is_dense_mlp
from merge.moe.recipe import ExpertSpec, MoeRecipe
from merge.moe.router import PROMPT_MODES
from merge.sourceset import Model


@dataclass
class MoeLayout:
    """The MoE side of a plan: family, experts and sizes; the routing report after a run."""

    family: Family
    num_layers: int
    hidden: int
    experts: tuple[ExpertSpec, ...]
    shared: ExpertSpec | None
    gate_mode: str
    experts_per_token: int
    intermediate: int
    shared_intermediate: int | None
    report: list[str] = field(default_factory=list)


# --- jobs --------------------------------------------------------------------------------------


def _expert_jobs(
    fam: Family,
    layer: int,
    spec: ExpertSpec,
    index: int | None,
    models: dict[str, Model],
    dtype: torch.dtype,
) -> list[TensorJob]:
    """One expert's (or, ``index=None``, the shared expert's) MLP tensors of one layer."""
    jobs = []
    for proj in PROJS:
        src = dense_mlp(layer, proj)
        info = models[spec.model].checkpoint.tensors[src]
        name = fam.shared_name(layer, proj) if index is None else fam.expert(layer, index, proj)
        scale = spec.residual_scale if proj == "down" and spec.residual_scale is not None else 1.0
        jobs.append(
            TensorJob(
                name,
                tuple(info.shape),
                dtype,
                (Input(spec.model, src),),
                None,
                {},
                layer,
                copy=True,
                noise=spec.noise_scale or 0.0,
                scale=scale,
            )
        )
    return jobs


def _gate_how(recipe: MoeRecipe, specs: tuple[ExpertSpec, ...]) -> str:
    mode = recipe.gate_mode
    if mode not in PROMPT_MODES:
        return f"computed: gate_mode {mode}, seeded"
    n = sum(len(e.positive) + len(e.negative) for e in specs)
    return f"computed: gate_mode {mode} from {n} prompts"


def _layer_jobs(
    recipe: MoeRecipe, lay: MoeLayout, models: dict[str, Model], layer: int, dtype: torch.dtype
) -> list[TensorJob]:
    fam = lay.family
    e_count = len(lay.experts)
    jobs = [
        TensorJob(
            fam.router(layer),
            (e_count, lay.hidden),
            dtype,
            (),
            None,
            {},
            layer,
            computed=_gate_how(recipe, lay.experts),
        )
    ]
    if fam.score_bias:
        jobs.append(
            TensorJob(
                fam.score_bias_name(layer),
                (e_count,),
                torch.float32,
                (),
                None,
                {},
                layer,
                computed="computed: zeros (DeepSeek-V3 score correction bias)",
            )
        )
    for i, spec in enumerate(lay.experts):
        jobs += _expert_jobs(fam, layer, spec, i, models, dtype)
    if lay.shared is None and fam.score_bias:  # DeepSeek-V3 builds a 0-wide shared expert
        for proj in PROJS:
            shape = (lay.hidden, 0) if proj == "down" else (0, lay.hidden)
            how = "computed: empty (n_shared_experts: 0)"
            jobs.append(
                TensorJob(
                    fam.shared_name(layer, proj), shape, dtype, (), None, {}, layer, computed=how
                )
            )
    if lay.shared is not None:
        jobs += _expert_jobs(fam, layer, lay.shared, None, models, dtype)
        if fam.shared_gate:
            jobs.append(
                TensorJob(
                    fam.shared_gate_name(layer),
                    (1, lay.hidden),
                    dtype,
                    (),
                    None,
                    {},
                    layer,
                    computed=_gate_how(recipe, (lay.shared,)),
                )
            )
    return jobs


def layout_jobs(
    recipe: MoeRecipe, lay: MoeLayout, models: dict[str, Model], dtype: torch.dtype
) -> list[TensorJob]:
    base = models[recipe.base_model].checkpoint
    jobs: list[TensorJob] = []
    for name in base.tensors:
        if is_dense_mlp(name):
            continue
        info = base.tensors[name]
        out = dtype if info.dtype.is_floating_point else info.dtype
        jobs.append(
            TensorJob(
                name,
                tuple(info.shape),
                out,
                (Input(recipe.base_model, name),),
                None,
                {},
                arch.layer_of(name),
                copy=True,
            )
        )
    for layer in range(lay.num_layers):
        jobs += _layer_jobs(recipe, lay, models, layer, dtype)
    return sorted(jobs, key=lambda j: arch.sort_key(j.name))
