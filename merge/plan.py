"""Recipe + checkpoint headers -> the list of tensor jobs and the shard layout.

Every check that can be made without tensor data happens here, so a run fails in its first
second or not at all for recipe reasons: missing tensors, shape mismatches, layer ranges out
of bounds, parameters whose filters leave a tensor without a value, weights summing to zero.
All problems are reported together. ``merge validate`` and ``merge plan`` stop after this.

``models:`` recipes map every tensor of the reference model (base, else the first model) to
the same tensor of each input. ``slices:`` recipes stack layer ranges: output layers are
renumbered consecutively, embeddings come from the first slice and the final norm and lm_head
from the last (../shared/METHODS.md, Frankenmerges).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from merge import architecture as arch
from merge.errors import PlanError
from merge.jobs import DEFAULT_SEED, DTYPES, Input, Plan, TensorJob, stored_dtype
from merge.memory import peak_memory
from merge.methods import REQUIRED, Method
from merge.recipe import Recipe, SliceSpec, Source, lookup
from merge.recipe.checks import method_inputs
from merge.recipe.model import Params
from merge.sourceset import Model
from merge.vocab import (
    VocabPlan,
    align_job,
    build_vocab,
    has_setting,
    model_rows,
    size_mismatch,
    sizes_differ,
    vocab_tensor,
)
from merge.writer import TensorSpec, plan_shards

MAX_LISTED = 25


@dataclass
class _Ctx:
    """Mutable state while building jobs."""

    recipe: Recipe
    models: dict[str, Model]
    problems: list[str] = field(default_factory=list)
    vocab: VocabPlan | None = None
    tokenizer_setting: bool = False

    def has(self, ref: str, name: str) -> str | None:
        """The tensor name that stands for ``name`` in model ``ref`` (tied lm_head aware)."""
        ckpt = self.models[ref].checkpoint
        if name in ckpt.tensors:
            return name
        if arch.ties_embeddings(ckpt.config):
            return arch.tied_partner(name, ckpt.tensors)
        return None


def _params(
    ctx: _Ctx,
    out_name: str,
    inputs: Sequence[Source],
    outer: Sequence[Params],
    layer: int | None,
    num_layers: int,
) -> dict[str, Any] | None:
    method = ctx.recipe.method
    values: dict[str, Any] = {}
    ok = True
    for p in method.params:
        if p.per_model:
            got = [lookup(p.name, [s.params, *outer], out_name, layer, num_layers) for s in inputs]
            for src, v in zip(inputs, got, strict=True):
                if v is None and p.default is REQUIRED:
                    ctx.problems.append(
                        f"tensor '{out_name}': no value of '{p.name}' for model "
                        f"'{src.model}' matches this tensor (check the filters)"
                    )
                    ok = False
            values[p.name] = [p.default if v is None else _cast(p.kind, v) for v in got]
        else:
            v = lookup(p.name, outer, out_name, layer, num_layers)
            if v is None and p.default is REQUIRED:
                ctx.problems.append(
                    f"tensor '{out_name}': no value of global parameter "
                    f"'{p.name}' matches this tensor (check the filters)"
                )
                ok = False
            values[p.name] = p.default if v is None else _cast(p.kind, v)
    if ok and method.name == "linear" and values.get("normalize") and sum(values["weight"]) == 0:
        ctx.problems.append(
            f"tensor '{out_name}': the weights sum to 0, so normalize cannot "
            "divide by them; change a weight or set normalize: false"
        )
        ok = False
    if ok and method.check is not None:
        for problem in method.check(values, [s.model for s in inputs]):
            ctx.problems.append(f"tensor '{out_name}': {problem}")
            ok = False
    return values if ok else None


def _cast(kind: type, value: Any) -> Any:
    return float(value) if kind is float and not isinstance(value, bool) else value


def _job(
    ctx: _Ctx,
    out_name: str,
    ref: Input,
    inputs: Sequence[tuple[Source, str]],
    base: tuple[Source, str] | None,
    outer: Sequence[Params],
    layer: int | None,
    num_layers: int,
) -> TensorJob | None:
    """One output tensor from (source, tensor name) pairs; checks presence and shapes."""
    info = ctx.models[ref.model].checkpoint.tensors[ref.name]
    shape = tuple(info.shape)
    if not info.dtype.is_floating_point:
        return TensorJob(out_name, shape, info.dtype, (ref,), None, {}, layer, copy=True)
    vocab = ctx.vocab is not None and vocab_tensor(out_name, shape, _rows(ctx, ref.model))
    reads: list[Input] = []
    for src, name in [*inputs, *([base] if base else [])]:
        found = ctx.has(src.model, name)
        if found is None:
            ctx.problems.append(
                f"model '{src.model}' has no tensor '{name}' (needed for "
                f"output tensor '{out_name}')"
            )
            continue
        other = tuple(ctx.models[src.model].checkpoint.tensors[found].shape)
        want = (_rows(ctx, src.model), *shape[1:]) if vocab else shape
        if other != want:
            vocabs = vocab_tensor(out_name, shape, _rows(ctx, ref.model)) and vocab_tensor(
                out_name, other, _rows(ctx, src.model)
            )
            if not (vocabs and other[1:] == shape[1:]):
                ctx.problems.append(_shape_problem(ref, shape, src.model, found, other))
            elif not ctx.tokenizer_setting:  # with one, the tokenizer problems explain it
                ctx.problems.append(size_mismatch(ctx.models))
            continue
        reads.append(Input(src.model, found))
    if len(reads) != len(inputs) + (1 if base else 0):
        return None
    params = _params(ctx, out_name, [s for s, _ in inputs], outer, layer, num_layers)
    if params is None:
        return None
    base_in = reads.pop() if base else None
    job = TensorJob(out_name, shape, info.dtype, tuple(reads), base_in, params, layer)
    if not vocab or ctx.vocab is None:
        return job
    fill_base = base[0].model if base else ctx.recipe.base_model
    return align_job(ctx.vocab, job, fill_base, ctx.models, ctx.has, ctx.problems)


def _shape_problem(
    ref: Input, shape: tuple[int, ...], model: str, name: str, other: tuple[int, ...]
) -> str:
    return (
        f"tensor '{name}': shape {list(other)} in model '{model}' does not match "
        f"{list(shape)} in model '{ref.model}'"
    )


def _rows(ctx: _Ctx, model: str) -> int | None:
    """``model``'s vocabulary size (embedding rows)."""
    if ctx.vocab is not None:
        found = ctx.vocab.models.get(model)
        return found.rows if found else None
    ckpt = ctx.models[model].checkpoint
    return model_rows(ckpt.config, ckpt.tensors)


def _split(
    method: Method, sources: Sequence[Source], base: str | None
) -> tuple[list[Source], Source | None]:
    """(per-model inputs, separate base source) for a method."""
    inputs = method_inputs(method, sources, base)
    if method.base not in ("required", "optional") or (method.base == "optional" and not base):
        return inputs, None
    found = next((s for s in sources if s.model == base), None)
    return inputs, found or Source(base or "", {}, ("base_model",))


def _models_jobs(ctx: _Ctx) -> tuple[list[TensorJob], str]:
    recipe = ctx.recipe
    sources = recipe.models or ()
    inputs, base = _split(recipe.method, sources, recipe.base_model)
    donor = _config_donor(recipe)
    ckpt = ctx.models[donor].checkpoint
    num_layers = ckpt.layer_count
    jobs = []
    for name in arch.ordered(ckpt.tensors):
        layer = arch.layer_of(name)
        job = _job(
            ctx,
            name,
            Input(donor, name),
            [(s, name) for s in inputs],
            (base, name) if base else None,
            [recipe.params],
            layer,
            num_layers,
        )
        if job:
            jobs.append(job)
    return jobs, donor


def _check_range(ctx: _Ctx, src: Source) -> bool:
    ckpt = ctx.models[src.model].checkpoint
    have = ckpt.layer_count
    start, end = src.layer_range or (0, 0)
    if end > have:
        ctx.problems.append(
            ctx.recipe.loc.error(
                src.path + ("layer_range",),
                f"[{start}, {end}] is out of range: model '{src.model}' has {have} layers "
                f"(layer_range is [start, end) with end <= {have})",
            )
        )
        return False
    return True


def _slice_layer_jobs(
    ctx: _Ctx, sl: SliceSpec, offset: int, jobs: list[TensorJob], layer_map: list[int]
) -> None:
    recipe = ctx.recipe
    inputs, base = _split(recipe.method, sl.sources, sl.base_model)
    ref = base if base and base.layer_range else sl.sources[0]
    names = ctx.models[ref.model].checkpoint.tensors
    by_layer: dict[int, list[str]] = {}
    for name in arch.ordered(names):
        layer = arch.layer_of(name)
        if layer is not None:
            by_layer.setdefault(layer, []).append(name)
    outer = [sl.params, recipe.params]
    start = (ref.layer_range or (0, 0))[0]
    for j in range(sl.length):
        layer_map.append(start + j)
        for name in by_layer.get(start + j, []):
            out = arch.with_layer(name, offset + j)

            def at(s: Source, name: str = name, j: int = j) -> str:
                return arch.with_layer(name, (s.layer_range or (0, 0))[0] + j)

            job = _job(
                ctx,
                out,
                Input(ref.model, name),
                [(s, at(s)) for s in inputs],
                (base, at(base)) if base else None,
                outer,
                j,
                sl.length,
            )
            if job:
                jobs.append(job)


def _slice_edge_jobs(ctx: _Ctx, sl: SliceSpec, pre: bool) -> list[TensorJob]:
    """Embeddings from the first slice (pre) or norm and lm_head from the last (post)."""
    recipe = ctx.recipe
    inputs, base = _split(recipe.method, sl.sources, sl.base_model)
    ref = base if base and base.layer_range else sl.sources[0]
    names = ctx.models[ref.model].checkpoint.tensors
    jobs = []
    for name in arch.ordered(names):
        if arch.layer_of(name) is not None or arch.is_pre(name) != pre:
            continue
        job = _job(
            ctx,
            name,
            Input(ref.model, name),
            [(s, name) for s in inputs],
            (base, name) if base else None,
            [sl.params, recipe.params],
            None,
            sl.length,
        )
        if job:
            jobs.append(job)
    return jobs


def _slices_jobs(ctx: _Ctx) -> tuple[list[TensorJob], str, list[int]]:
    slices = ctx.recipe.slices or ()
    if not all(_check_range(ctx, s) for sl in slices for s in sl.sources):
        return [], slices[0].sources[0].model, []
    jobs = _slice_edge_jobs(ctx, slices[0], pre=True)
    layer_map: list[int] = []
    for sl in slices:
        _slice_layer_jobs(ctx, sl, len(layer_map), jobs, layer_map)
    jobs.extend(_slice_edge_jobs(ctx, slices[-1], pre=False))
    return jobs, _config_donor(ctx.recipe), layer_map


def _config_donor(recipe: Recipe) -> str:
    """The model whose config (and tensor list) the output takes."""
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


def make_plan(
    recipe: Recipe,
    models: dict[str, Model],
    *,
    seed: int | None = None,
    shard_bytes: int = 5 * 10**9,
) -> Plan:
    """Build and check the whole plan; raise PlanError listing every problem."""
    ctx = _Ctx(recipe, models, tokenizer_setting=has_setting(recipe))
    tok_donor = _tokenizer_donor(recipe, _config_donor(recipe))
    implicit = not ctx.tokenizer_setting and sizes_differ(models)
    if ctx.tokenizer_setting or implicit:  # implicit: as tokenizer_source: base (merge.vocab)
        ctx.tokenizer_setting = True
        ctx.vocab = build_vocab(recipe, models, tok_donor, ctx.problems, implicit=implicit)
    layer_map: list[int] | None = None
    if recipe.slices:
        jobs, donor, layer_map = _slices_jobs(ctx)
    else:
        jobs, donor = _models_jobs(ctx)
    if ctx.problems:
        problems = list(dict.fromkeys(ctx.problems))
        if len(problems) > MAX_LISTED:
            problems = problems[:MAX_LISTED] + [f"... and {len(problems) - MAX_LISTED} more"]
        raise PlanError(problems)
    out_dtype = _out_dtype(recipe, models[donor])
    for job in jobs:
        if not job.copy:
            job.dtype = DTYPES[out_dtype]
    shards = plan_shards([TensorSpec(j.name, j.shape, j.dtype) for j in jobs], shard_bytes)
    vocab_size = ctx.vocab.rows if ctx.vocab else None
    config = arch.output_config(models[donor].checkpoint.config, out_dtype, layer_map, vocab_size)
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
            *recipe.warnings,
            *(ctx.vocab.warnings if ctx.vocab else ()),
            *_unused_tensors(recipe, models, jobs, donor),
        ],
        ctx.vocab,
    )


def _unused_tensors(
    recipe: Recipe, models: dict[str, Model], jobs: list[TensorJob], donor: str
) -> list[str]:
    """Warn about input tensors that no output tensor reads (``models:`` recipes only; slices
    drop layers on purpose), e.g. an untied lm_head merged onto a donor with tied embeddings."""
    if recipe.slices:
        return []
    read: dict[str, set[str]] = {}
    for job in jobs:
        extra = job.vocab.extra if job.vocab else ()
        for inp in [*job.inputs, *([job.base] if job.base else []), *extra]:
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
