"""MoE recipe + checkpoint headers -> the tensor jobs of the MoE checkpoint.

Design
------
``make_moe_plan`` picks the output family (``architecture:``, else the first family whose
rules the base and the experts meet), checks every model against it from headers only, and
returns an ordinary ``merge.jobs.Plan`` whose jobs are:

- the base model's tensors (attention, norms, embeddings, lm_head) copied and cast, without
  its dense MLP;
- per layer and expert, the expert model's dense ``mlp.{gate,up,down}_proj`` copied under the
  family's expert name, with mergekit-moe's ``noise_scale`` (seeded Gaussian noise added to
  every MLP tensor of that expert, drawn in fixed blocks so the copy streams: ``merge.noise``)
  and ``residual_scale`` (a factor on ``down_proj``, the tensor that writes into the residual
  stream); the same for the shared expert;
- ``computed`` jobs for the router rows (``[experts, hidden]`` per layer), the shared expert's
  gate (``[1, hidden]``) and DeepSeek-V3's zero score-correction bias. Their data comes from
  ``merge.moe.gates`` in ``merge run`` only, so ``merge validate`` and ``merge plan`` read no
  tensor data.

Problems (a model of the wrong type, attention biases the family cannot hold, missing MLP
tensors, mismatched hidden or intermediate sizes, layer counts) are collected and raised
together as one ``PlanError``, each naming the recipe line, the model and what to change.

What it does not do: compute gates (``merge.moe.router``), merge expert weights with each
other, or take experts whose layer count differs from the base's.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch

from merge import architecture as arch
from merge.errors import PlanError
from merge.jobs import DEFAULT_SEED, DTYPES, Plan, stored_dtype
from merge.memory import peak_memory
from merge.methods import Method
from merge.moe.families import FAMILIES, PROJS, Family, MoeShape, dense_mlp
from merge.moe.families import output_config as family_config
from merge.moe.layout import MoeLayout, layout_jobs
from merge.moe.prompts import prompt_problems
from merge.moe.recipe import ExpertSpec, MoeRecipe, shared_problem
from merge.shardplan import TensorSpec, plan_shards
from merge.sourceset import Model

ATTN_BIAS_RE = re.compile(r"\.self_attn\.(\w+)\.bias$")
MLP_BIAS_RE = re.compile(r"\.mlp\.\w+\.bias$")


def _no_method(*_: object) -> torch.Tensor:  # MoE jobs are copies or computed, never merged
    raise RuntimeError("MoE plans have no merge method")


MOE_METHOD = Method(
    name="moe",
    fn=_no_method,
    params=(),
    base="none",
    min_models=1,
    max_models=None,
    paper="https://arxiv.org/abs/2401.04088",
    description=(
        "Mixture of experts (mergekit-moe syntax): attention, norms and embeddings come from "
        "the base model, each expert's MLP from its source model, and a router per layer "
        "chooses the experts for each token."
    ),
)


@dataclass
class _Check:
    recipe: MoeRecipe
    models: dict[str, Model]
    family: Family
    problems: list[str] = field(default_factory=list)

    def error(self, path: tuple[str | int, ...], message: str) -> None:
        self.problems.append(self.recipe.loc.error(path, message))


def _hidden(model: Model) -> int | None:
    cfg = model.checkpoint.config
    value = cfg.get("hidden_size")
    return value if isinstance(value, int) else None


def _check_type(c: _Check, ref: str, path: tuple[str | int, ...]) -> None:
    kind = c.models[ref].checkpoint.config.get("model_type")
    fam = c.family
    if kind not in fam.expert_types:
        c.error(
            path,
            f"model '{ref}' is a {kind} model, which {fam.title} cannot hold (it takes "
            f"{', '.join(fam.expert_types)} models): use other models or another architecture",
        )


def _check_base(c: _Check) -> None:
    ref = c.recipe.base_model
    names = c.models[ref].checkpoint.tensors
    biases = sorted(n for n in names if ATTN_BIAS_RE.search(n))
    fam = c.family
    bad = biases if fam.attn_bias == "none" else []
    if fam.attn_bias == "qkv":
        bad = [n for n in biases if ".o_proj." in n]
    if bad:
        c.error(
            ("base_model",),
            f"model '{ref}' has attention biases ('{bad[0]}'), which {fam.title} cannot hold: "
            "use a base model without them or architecture: qwen2_moe",
        )


def _mlp_size(c: _Check, spec: ExpertSpec, num_layers: int, hidden: int) -> int | None:
    """The expert's MLP intermediate size, after checking every layer's MLP tensors."""
    ckpt = c.models[spec.model].checkpoint
    where = spec.path + ("source_model",)
    if ckpt.layer_count != num_layers:
        c.error(
            where,
            f"model '{spec.model}' has {ckpt.layer_count} layers, but the base model has "
            f"{num_layers}: every expert needs the base's layer count",
        )
        return None
    biases = [n for n in ckpt.tensors if MLP_BIAS_RE.search(n)]
    if biases:
        c.error(
            where,
            f"model '{spec.model}' has MLP biases ('{biases[0]}'), which MoE experts cannot hold",
        )
    size: int | None = None
    for layer in range(num_layers):
        for proj in PROJS:
            name = dense_mlp(layer, proj)
            info = ckpt.tensors.get(name)
            if info is None:
                c.error(
                    where, f"model '{spec.model}' has no tensor '{name}' (a dense MLP is needed)"
                )
                return None
            inner = info.shape[1] if proj == "down" else info.shape[0]
            want = (hidden, inner) if proj == "down" else (inner, hidden)
            size = inner if size is None else size
            if tuple(info.shape) != want or inner != size:
                c.error(
                    where,
                    f"tensor '{name}': shape {list(info.shape)} in model '{spec.model}' does not "
                    f"fit the base's hidden size {hidden} (expected {list(want)})",
                )
                return None
    return size


def _check_sizes(c: _Check, num_layers: int, hidden: int) -> tuple[int, int | None] | None:
    sizes = [_mlp_size(c, e, num_layers, hidden) for e in c.recipe.experts]
    shared = c.recipe.shared
    shared_size = _mlp_size(c, shared, num_layers, hidden) if shared else None
    if any(s is None for s in sizes) or (shared and shared_size is None):
        return None
    first = sizes[0]
    assert first is not None
    for e, s in zip(c.recipe.experts, sizes, strict=True):
        if s != first:
            c.error(
                e.path + ("source_model",),
                f"model '{e.model}' has MLP intermediate size {s}, but experts[0] has {first}: "
                "all experts need the same size",
            )
            return None
    if shared and c.family.score_bias and shared_size != first:
        c.error(
            shared.path + ("source_model",),
            f"model '{shared.model}' has MLP intermediate size {shared_size}, but {c.family.title} "
            f"needs its shared expert the size of the experts ({first})",
        )
        return None
    return first, shared_size


def _check(c: _Check, num_layers: int, hidden: int) -> tuple[int, int | None] | None:
    found = shared_problem(c.family, c.recipe)
    if found:
        c.error(*found)
        return None
    _check_type(c, c.recipe.base_model, ("base_model",))
    for e in (*c.recipe.experts, *([c.recipe.shared] if c.recipe.shared else [])):
        _check_type(c, e.model, e.path + ("source_model",))
    _check_base(c)
    if c.problems:
        return None
    for e in (*c.recipe.experts, *([c.recipe.shared] if c.recipe.shared else [])):
        h = _hidden(c.models[e.model])
        if h is not None and h != hidden:
            c.error(
                e.path + ("source_model",),
                f"model '{e.model}' has hidden size {h}, but the base model has {hidden}",
            )
    if c.problems:
        return None
    return _check_sizes(c, num_layers, hidden)


def _choose(
    recipe: MoeRecipe, models: dict[str, Model], num_layers: int, hidden: int
) -> tuple[Family, tuple[int, int | None]]:
    """The family (given, else the first that fits) and the (expert, shared) MLP sizes."""
    kind = models[recipe.base_model].checkpoint.config.get("model_type")
    if recipe.family is not None:
        candidates = [recipe.family]
    else:
        candidates = [f for f in FAMILIES if kind in f.expert_types]
        if not candidates:
            types = sorted({t for f in FAMILIES for t in f.expert_types})
            raise PlanError(
                recipe.loc.error(
                    ("base_model",),
                    f"model '{recipe.base_model}' is a {kind} model; MoE assembly takes "
                    f"{', '.join(types)} models",
                )
            )
    reports: list[tuple[bool, list[str]]] = []
    for fam in candidates:
        c = _Check(recipe, models, fam)
        sizes = _check(c, num_layers, hidden)
        if sizes is not None and not c.problems:
            return fam, sizes
        reports.append((shared_problem(fam, recipe) is None, c.problems))
    # report the first family that could hold the shared expert (else the first family)
    best = next((found for ok, found in reports if ok), reports[0][1])
    raise PlanError(list(dict.fromkeys(best)))


def _out_dtype(recipe: MoeRecipe, base: Model) -> str:
    return recipe.dtype or stored_dtype(base.checkpoint)


def make_moe_plan(
    recipe: MoeRecipe,
    models: dict[str, Model],
    *,
    seed: int | None = None,
    shard_bytes: int = 5 * 10**9,
) -> Plan:
    """Choose the family, check every model from headers, and plan every output tensor."""
    base = models[recipe.base_model]
    num_layers = base.checkpoint.layer_count
    hidden = _hidden(base)
    if hidden is None:
        raise PlanError(
            recipe.loc.error(
                ("base_model",), f"model '{recipe.base_model}': config.json has no hidden_size"
            )
        )
    fam, (inner, shared_inner) = _choose(recipe, models, num_layers, hidden)
    too_long = prompt_problems(recipe, base)
    if too_long:
        raise PlanError(too_long)
    lay = MoeLayout(
        fam,
        num_layers,
        hidden,
        recipe.experts,
        recipe.shared,
        recipe.gate_mode,
        recipe.experts_per_token,
        inner,
        shared_inner,
    )
    out_dtype = _out_dtype(recipe, base)
    jobs = layout_jobs(recipe, lay, models, DTYPES[out_dtype])
    shards = plan_shards([TensorSpec(j.name, j.shape, j.dtype) for j in jobs], shard_bytes)
    has_qkv_bias = any(n.endswith("self_attn.q_proj.bias") for n in base.checkpoint.tensors)
    shape = MoeShape(
        len(recipe.experts), recipe.experts_per_token, inner, shared_inner, has_qkv_bias
    )
    config = family_config(fam, arch.output_config(base.checkpoint.config, out_dtype, None), shape)
    chosen = seed if seed is not None else recipe.seed if recipe.seed is not None else DEFAULT_SEED
    return Plan(
        recipe,
        MOE_METHOD,
        models,
        jobs,
        shards,
        out_dtype,
        recipe.base_model,
        recipe.base_model,
        config,
        chosen,
        peak_memory(jobs, models, MOE_METHOD),
        list(recipe.warnings),
        None,
        lay,
    )
