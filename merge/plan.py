"""Recipe + checkpoint headers -> the list of tensor jobs and the shard layout.

Every check that can be made without tensor data happens here, so a run fails in its first
second or not at all for recipe reasons: missing tensors, shape mismatches, layer ranges out
of bounds, parameters whose filters leave a tensor without a value, weights summing to zero.
All problems are reported together. ``merge validate`` and ``merge plan`` stop after this.

A model is made of modules (``merge.modules``): a text-only model is one, ``text_decoder``; a
multimodal one also has a ``vision_tower`` and a ``multi_modal_projector``. A ``models:``
recipe merges every module of the reference model (base, else the first model) tensor by
tensor, each module with its own layer count for gradients; a ``slices:`` recipe stacks layer
ranges of a one-module model; a ``modules:`` recipe gives each module its own models or slices
(``merge.planjobs`` builds the jobs of one module). The output config follows the config
donor, with the layer counts of the modules built from slices and the output vocabulary.
"""

from __future__ import annotations

import re

from merge import architecture as arch
from merge import modules as mods
from merge.crimes import check_architectures, escape
from merge.errors import PlanError
from merge.jobs import DEFAULT_SEED, DTYPES, ModulePlan, Plan, TensorJob, stored_dtype
from merge.memory import peak_memory
from merge.planjobs import Ctx, models_jobs, slices_jobs
from merge.recipe import Recipe
from merge.recipe.checks import did_you_mean, method_inputs
from merge.recipe.model import Part
from merge.shardplan import TensorSpec, plan_shards
from merge.sourceset import Model
from merge.vocab import build_vocab, has_setting, sizes_differ

MAX_LISTED = 25


def _describe(found: dict[str, mods.Module]) -> str:
    return ", ".join(f"{m.name} ({m.num_layers} layers)" for m in found.values())


def _modules_problem(ctx: Ctx, path: tuple, message: str) -> None:
    ctx.problems.append(ctx.recipe.loc.error(path, message))


def _targets(ctx: Ctx, donor: str) -> list[tuple[Part, str]]:
    """Which part builds which module of the output (module names checked against the config
    donor's modules; every module needs exactly one part)."""
    recipe, found = ctx.recipe, ctx.modules(donor)
    if recipe.modules is None:
        part = recipe.parts[0]
        if part.slices is not None and len(found) > 1:
            _modules_problem(
                ctx,
                ("slices",),
                f"model '{donor}' has {len(found)} modules ({_describe(found)}), and slices "
                "stack the layers of one: give each module its own models: or slices: under "
                "modules: (mergekit's syntax for multimodal models)",
            )
            return []
        return [(part, name) for name in found]
    targets: dict[str, Part] = {}
    for part in recipe.modules:
        name = part.module or ""
        if name in mods.SINGLE_ALIASES and len(found) == 1:
            name = next(iter(found))
        if name not in found:
            _modules_problem(
                ctx,
                part.path,
                f"model '{donor}' has no module '{name}'; " + did_you_mean(name, list(found)),
            )
        elif name in targets:
            _modules_problem(ctx, part.path, f"module '{name}' is given twice")
        elif part.slices is not None and found[name].num_layers == 0:
            _modules_problem(
                ctx, part.path, f"module '{name}' has no layers to slice; give it models:"
            )
        else:
            targets[name] = part
    for name, module in found.items():
        if name not in targets:
            _modules_problem(
                ctx,
                ("modules",),
                f"no entry for module '{name}' of model '{donor}' ({len(module.tensors)} "
                f"tensors, such as '{module.tensors[0]}'): every module needs models: or "
                "slices: (mergekit would leave its tensors out of the output)",
            )
    return [(targets[name], name) for name in found if name in targets]


def _reference(recipe: Recipe, part: Part, donor: str) -> str:
    """The model whose tensor names a ``models:`` part's output takes: the config donor for
    a whole-model recipe; for a module, the base when the part uses it, else its first model."""
    if part.module is None:
        return donor
    used = {s.model for s in method_inputs(recipe.method, part.models or (), recipe.base_model)}
    base = recipe.base_model
    if base and (base in used or recipe.method.base in ("required", "optional")):
        return base
    return (part.models or ())[0].model


def _jobs(ctx: Ctx, donor: str) -> tuple[list[TensorJob], dict[str, list[int]], list[ModulePlan]]:
    """Every job, module by module; the layer maps of the modules built from slices; and
    each module's summary."""
    jobs: list[TensorJob] = []
    layer_maps: dict[str, list[int]] = {}
    summaries = []
    for part, module in _targets(ctx, donor):
        if part.models is not None:
            ref = _reference(ctx.recipe, part, donor)
            found = models_jobs(ctx, part, module, ref)
            layers = ctx.module(ref, module).num_layers
        else:
            found, layer_maps[module] = slices_jobs(ctx, part, module)
            layers = len(layer_maps[module])
        jobs.extend(found)
        made_of = "models" if part.models is not None else "slices"
        summaries.append(ModulePlan(module, len(found), layers, made_of))
    return jobs, layer_maps, summaries


def _config_donor(recipe: Recipe) -> str:
    """The model whose config (and, for ``models:``, tensor list) the output takes."""
    if recipe.modules is not None:
        return recipe.base_model or recipe.modules[0].sources()[0].model
    if recipe.slices:
        first = recipe.slices[0]
        inside = first.base_model in {s.model for s in first.sources}
        return first.base_model if inside and first.base_model else first.sources[0].model
    return recipe.base_model or (recipe.models or ())[0].model


def _out_dtype(recipe: Recipe, donor: Model) -> str:
    return recipe.out_dtype or stored_dtype(donor.checkpoint)


def _tokenizer_donor(recipe: Recipe, donor: str) -> str:
    """The model whose tokenizer files the output starts from (a union extends them)."""
    src = recipe.tokenizer_source
    if src in (None, "base", "union"):
        return recipe.base_model or donor
    return src


def _config_problems(recipe: Recipe, models: dict[str, Model]) -> list[str]:
    """A model whose config.json disagrees with its tensors would give a wrong output config."""
    problems = []
    for ref, m in models.items():
        shapes = {n: t.shape for n, t in m.checkpoint.tensors.items()}
        for key, said, counted, what in arch.config_disagreements(m.checkpoint.config, shapes):
            problems.append(
                f"{recipe.file}: model '{ref}': config.json has {key}: {said} but its tensors "
                f"have {counted} {what}"
            )
    return problems


_TENSOR_PROBLEM = re.compile(r"tensor '([^']*)': (.*)", re.DOTALL)


def collapse_by_tensor(problems: list[str]) -> list[str]:
    """One line per distinct problem: ``tensor 'A': p`` for many tensors with the same ``p``
    (a recipe-wide cause, such as a weight or a density) becomes
    ``tensor 'A' and 38 other tensors: p``, where the first of them stood."""
    groups: dict[str, list[str]] = {}
    order: list[str | None] = []
    lines: list[str] = []
    for problem in problems:
        match = _TENSOR_PROBLEM.fullmatch(problem)
        if match is None:
            order.append(None)
            lines.append(problem)
            continue
        name, rest = match.groups()
        if rest not in groups:
            groups[rest] = []
            order.append(rest)
        groups[rest].append(name)
    out, plain = [], iter(lines)
    for rest in order:
        if rest is None:
            out.append(next(plain))
            continue
        names = groups[rest]
        more = len(names) - 1
        others = f" and {more} other tensor{'s' if more > 1 else ''}" if more else ""
        out.append(f"tensor '{names[0]}'{others}: {rest}")
    return out


def make_plan(
    recipe: Recipe,
    models: dict[str, Model],
    *,
    seed: int | None = None,
    shard_bytes: int = 5 * 10**9,
    allow_crimes: bool = False,
) -> Plan:
    """Build and check the whole plan; raise PlanError listing every problem (models of
    different architectures first, unless ``allow_crimes`` or the recipe's
    ``allow_mismatched_architectures``: then a warning)."""
    donor = _config_donor(recipe)
    ctx = Ctx(recipe, models, tokenizer_setting=has_setting(recipe), donor=donor)
    ctx.problems.extend(_config_problems(recipe, models))
    if not models[donor].checkpoint.config:
        ctx.problems.append(
            f"{recipe.file}: model '{donor}' has no config.json (or an empty one), and the "
            "output's config.json is made from it; add the model's config.json"
        )
    tok_donor = _tokenizer_donor(recipe, donor)
    implicit = not ctx.tokenizer_setting and sizes_differ(models)
    if ctx.tokenizer_setting or implicit:  # implicit: as tokenizer_source: base (merge.vocab)
        ctx.tokenizer_setting = True
        ctx.vocab = build_vocab(recipe, models, tok_donor, ctx.problems, implicit=implicit)
    jobs, layer_maps, modules = _jobs(ctx, donor)
    allowed = escape(recipe, allow_crimes)
    crimes = check_architectures(recipe, models, allowed, ctx.problems, ctx.missing)
    if ctx.problems:
        problems = collapse_by_tensor(list(dict.fromkeys(ctx.problems)))
        if len(problems) > MAX_LISTED:
            problems = problems[:MAX_LISTED] + [f"... and {len(problems) - MAX_LISTED} more"]
        raise PlanError(problems)
    out_dtype = _out_dtype(recipe, models[donor])
    for job in jobs:
        if not job.copy:
            job.dtype = DTYPES[out_dtype]
    shards = plan_shards([TensorSpec(j.name, j.shape, j.dtype) for j in jobs], shard_bytes)
    vocab_size = ctx.vocab.rows if ctx.vocab else None
    config = arch.output_config(
        models[donor].checkpoint.config,
        out_dtype,
        layer_maps.get(mods.TEXT),
        vocab_size,
        layer_maps.get(mods.VISION),
    )
    untied = _untied_head(models, jobs, config)
    chosen = seed if seed is not None else recipe.seed if recipe.seed is not None else DEFAULT_SEED
    return Plan(
        recipe,
        recipe.method,
        models,
        jobs,
        shards,
        out_dtype,
        donor,
        tok_donor,
        config,
        chosen,
        peak_memory(jobs, models, recipe.method),
        [
            *crimes,
            *untied,
            *recipe.warnings,
            *(ctx.vocab.warnings if ctx.vocab else ()),
            *_unused_tensors(recipe, models, jobs, donor),
        ],
        ctx.vocab,
        modules=modules if len(modules) > 1 or recipe.modules is not None else [],
    )


def _untied_head(models: dict[str, Model], jobs: list[TensorJob], config: dict) -> list[str]:
    """When the config ties embeddings but the output's lm_head is made from an untied
    model's own lm_head (a frankenmerge's last slice), untie ``config`` so the head is used,
    and say so."""
    if not arch.ties_embeddings(config):
        return []
    for job in jobs:
        for inp in (*job.inputs, *([job.base] if job.base else [])):
            head = arch.layer_of(inp.name) is None and inp.name.endswith("lm_head.weight")
            if head and not arch.ties_embeddings(models[inp.model].checkpoint.config):
                arch.untie(config)
                return [
                    f"'{job.name}' comes from model '{inp.model}', whose embeddings are not "
                    "tied: the output config says tie_word_embeddings: false"
                ]
    return []


def _unused_tensors(
    recipe: Recipe, models: dict[str, Model], jobs: list[TensorJob], donor: str
) -> list[str]:
    """Warn about input tensors that no output tensor reads (``models:`` recipes only; slices
    drop layers on purpose), e.g. an untied lm_head merged onto a donor with tied embeddings."""
    if any(part.slices is not None for part in recipe.parts):
        return []
    read: dict[str, set[str]] = {}
    for job in jobs:
        extra = job.vocab.extra if job.vocab else ()
        for inp in [*job.inputs, *([job.base] if job.base else []), *extra, *job.agree]:
            read.setdefault(inp.model, set()).add(inp.name)
    warnings = []
    for ref, model in models.items():
        if ref not in read:
            continue
        unused = sorted(set(model.checkpoint.tensors) - read[ref])
        if unused:
            more = f" and {len(unused) - 1} more" if len(unused) > 1 else ""
            warnings.append(
                f"model '{ref}': {len(unused)} tensor(s) are not in the output and are ignored: "
                f"'{unused[0]}'{more} (the output has the tensors of '{donor}')"
            )
    return warnings
