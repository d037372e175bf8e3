"""The tensor jobs of one module: whole models or slices, checked against the headers.

``models_jobs`` maps every tensor of a reference model's module to the same tensor of each
input; ``slices_jobs`` stacks layer ranges of one module: output layers are renumbered
consecutively within the module, its embeddings (tensors before the layers) come from the
first slice and its other tensors outside the layers (final norm, lm_head) from the last
(the design notes' METHODS.md, Frankenmerges). Layer indices, gradients and ranges count the
module's own layers (``merge.modules``); a text-only model is one module, ``text_decoder``.
Every problem is appended to ``Ctx.problems``; nothing is raised here.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from merge import architecture as arch
from merge import modules as mods
from merge.jobs import Input, TensorJob
from merge.methods import REQUIRED, Method
from merge.methods.base import FLOAT32_MAX
from merge.methods.sparsify import inverse_density_problem
from merge.recipe import Recipe, SliceSpec, Source, lookup
from merge.recipe.checks import method_inputs
from merge.recipe.model import Params, Part
from merge.sourceset import Model
from merge.vocab import VocabPlan, align_job, model_rows, size_mismatch, vocab_tensor


@dataclass
class Ctx:
    """Mutable state while building jobs."""

    recipe: Recipe
    models: dict[str, Model]
    problems: list[str] = field(default_factory=list)
    vocab: VocabPlan | None = None
    tokenizer_setting: bool = False
    donor: str = ""  # the config donor (``merge.plan``): the output's config is its config
    missing: set[str] = field(default_factory=set)  # tensor names some model lacks (reported)
    _modules: dict[str, dict[str, mods.Module]] = field(default_factory=dict)

    def has(self, ref: str, name: str) -> str | None:
        """The tensor name that stands for ``name`` in model ``ref`` (tied lm_head aware)."""
        ckpt = self.models[ref].checkpoint
        if name in ckpt.tensors:
            return name
        if arch.ties_embeddings(ckpt.config):
            return arch.tied_partner(name, ckpt.tensors)
        return None

    def modules(self, ref: str) -> dict[str, mods.Module]:
        """Model ``ref``'s modules (``merge.modules.split``), computed once."""
        if ref not in self._modules:
            ckpt = self.models[ref].checkpoint
            self._modules[ref] = mods.split(ckpt.config, ckpt.tensors)
        return self._modules[ref]

    def module(self, ref: str, name: str) -> mods.Module:
        """Module ``name`` of model ``ref`` (empty if the model has no such tensors)."""
        return self.modules(ref).get(name) or mods.Module(name, (), 0)


def _params(
    ctx: Ctx,
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
    if ok:
        for problem in bound_problems(values, [s.model for s in inputs]):
            ctx.problems.append(f"tensor '{out_name}': {problem}")
            ok = False
    if ok and method.check is not None:
        for problem in method.check(values, [s.model for s in inputs]):
            ctx.problems.append(f"tensor '{out_name}': {problem}")
            ok = False
    return values if ok else None


def bound_problems(values: dict[str, Any], models: list[str]) -> list[str]:
    """Effective values that would overflow float32 whatever the tensors hold: weights whose
    absolute sum passes float32's range (the weighted sum and its normalisation overflow), and
    densities too small for ``rescale: inverse_density`` to divide by."""
    problems = inverse_density_problem(values, models)
    weights = values.get("weight")
    if isinstance(weights, list) and len(weights) > 1:
        total = sum(abs(float(w)) for w in weights)
        if total > FLOAT32_MAX:
            problems.append(
                f"the weights' absolute sum {total:g} is past float32's range "
                f"({FLOAT32_MAX:g}), so the weighted sum overflows; scale the weights down"
            )
    return problems


def _cast(kind: type, value: Any) -> Any:
    return float(value) if kind is float and not isinstance(value, bool) else value


def _job(
    ctx: Ctx,
    out_name: str,
    ref: Input,
    inputs: Sequence[tuple[Source, str]],
    base: tuple[Source, str] | None,
    outer: Sequence[Params],
    layer: int | None,
    num_layers: int,
    module: str = mods.TEXT,
) -> TensorJob | None:
    """One output tensor from (source, tensor name) pairs; checks presence and shapes. Only
    the text decoder's tensors are vocabulary tensors."""
    info = ctx.models[ref.model].checkpoint.tensors[ref.name]
    shape = tuple(info.shape)
    if not info.dtype.is_floating_point:
        return _integer_job(ctx, out_name, ref, [*inputs, *([base] if base else [])], layer)
    vocab = (
        module == mods.TEXT
        and ctx.vocab is not None
        and vocab_tensor(out_name, shape, _rows(ctx, ref.model))
    )
    reads: list[Input] = []
    for src, name in [*inputs, *([base] if base else [])]:
        found = ctx.has(src.model, name)
        if found is None:
            ctx.problems.append(
                f"model '{src.model}' has no tensor '{name}' (needed for "
                f"output tensor '{out_name}')"
            )
            ctx.missing.add(name)
            continue
        other_info = ctx.models[src.model].checkpoint.tensors[found]
        if not other_info.dtype.is_floating_point:
            ctx.problems.append(_dtype_problem(out_name, ref, info.dtype, src.model, other_info))
            continue
        other = tuple(other_info.shape)
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


def _integer_job(
    ctx: Ctx,
    out_name: str,
    ref: Input,
    reads: Sequence[tuple[Source, str]],
    layer: int | None,
) -> TensorJob | None:
    """An integer tensor: never averaged, copied from ``ref``; every other model's tensor
    must have its dtype and shape (here) and its bytes (when the run reads them)."""
    info = ctx.models[ref.model].checkpoint.tensors[ref.name]
    agree: list[Input] = []
    ok = True
    for src, name in reads:
        found = ctx.has(src.model, name)
        if found is None:
            ctx.problems.append(
                f"model '{src.model}' has no tensor '{name}' (needed for "
                f"output tensor '{out_name}')"
            )
            ctx.missing.add(name)
            ok = False
            continue
        other = ctx.models[src.model].checkpoint.tensors[found]
        if other.dtype != info.dtype:
            ctx.problems.append(_dtype_problem(out_name, ref, info.dtype, src.model, other))
            ok = False
        elif tuple(other.shape) != tuple(info.shape):
            ctx.problems.append(
                _shape_problem(ref, tuple(info.shape), src.model, found, tuple(other.shape))
            )
            ok = False
        elif Input(src.model, found) != ref and Input(src.model, found) not in agree:
            agree.append(Input(src.model, found))
    if not ok:
        return None
    shape = tuple(info.shape)
    return TensorJob(
        out_name, shape, info.dtype, (ref,), None, {}, layer, copy=True, agree=tuple(agree)
    )


def _dtype_problem(out_name: str, ref: Input, dtype: Any, model: str, other: Any) -> str:
    def show(d: Any) -> str:
        return str(d).removeprefix("torch.")

    return (
        f"tensor '{out_name}': dtype {show(other.dtype)} in model '{model}' does not match "
        f"{show(dtype)} in model '{ref.model}'; integer tensors are copied, never averaged, "
        "so every model must store them with the same dtype"
    )


def _shape_problem(
    ref: Input, shape: tuple[int, ...], model: str, name: str, other: tuple[int, ...]
) -> str:
    return (
        f"tensor '{name}': shape {list(other)} in model '{model}' does not match "
        f"{list(shape)} in model '{ref.model}'"
    )


def _rows(ctx: Ctx, model: str) -> int | None:
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


def models_jobs(ctx: Ctx, part: Part, module: str, ref: str) -> list[TensorJob]:
    """Every tensor of ``ref``'s module ``module``, merged from the part's whole models."""
    recipe = ctx.recipe
    inputs, base = _split(recipe.method, part.models or (), recipe.base_model)
    found = ctx.module(ref, module)
    outer = [part.params, recipe.params]
    jobs = []
    for name in found.tensors:
        job = _job(
            ctx,
            name,
            Input(ref, name),
            [(s, name) for s in inputs],
            (base, name) if base else None,
            outer,
            arch.layer_of(name),
            found.num_layers,
            module,
        )
        if job:
            jobs.append(job)
    return jobs


def _check_range(ctx: Ctx, src: Source, module: str) -> bool:
    have = ctx.module(src.model, module).num_layers
    start, end = src.layer_range or (0, 0)
    if end > have:
        what = "layers" if module == mods.TEXT else f"layers in its {module}"
        ctx.problems.append(
            ctx.recipe.loc.error(
                src.path + ("layer_range",),
                f"[{start}, {end}] is out of range: model '{src.model}' has {have} {what} "
                f"(layer_range is [start, end) with end <= {have})",
            )
        )
        return False
    return True


class _Slices:
    """Builds one module's jobs from its slices."""

    def __init__(self, ctx: Ctx, part: Part, module: str) -> None:
        self.ctx, self.part, self.module = ctx, part, module

    def split(self, sl: SliceSpec) -> tuple[list[Source], Source | None, Source]:
        """(inputs, separate base, the reference source whose tensor names are used)."""
        inputs, base = _split(self.ctx.recipe.method, sl.sources, sl.base_model)
        return inputs, base, base if base and base.layer_range else sl.sources[0]

    def outer(self, sl: SliceSpec) -> list[Params]:
        return [sl.params, self.part.params, self.ctx.recipe.params]

    def layers(self, sl: SliceSpec, offset: int, jobs: list[TensorJob], layer_map: list[int]):
        inputs, base, ref = self.split(sl)
        by_layer: dict[int, list[str]] = {}
        for name in self.ctx.module(ref.model, self.module).tensors:
            layer = arch.layer_of(name)
            if layer is not None:
                by_layer.setdefault(layer, []).append(name)
        start = (ref.layer_range or (0, 0))[0]
        for j in range(sl.length):
            layer_map.append(start + j)
            for name in by_layer.get(start + j, []):

                def at(s: Source, name: str = name, j: int = j) -> str:
                    return arch.with_layer(name, (s.layer_range or (0, 0))[0] + j)

                job = _job(
                    self.ctx,
                    arch.with_layer(name, offset + j),
                    Input(ref.model, name),
                    [(s, at(s)) for s in inputs],
                    (base, at(base)) if base else None,
                    self.outer(sl),
                    j,
                    sl.length,
                    self.module,
                )
                if job:
                    jobs.append(job)

    def edges(self, sl: SliceSpec, pre: bool) -> list[TensorJob]:
        """Embeddings from the first slice (pre) or norm and lm_head from the last (post).
        When the last slice's model ties its embeddings (no lm_head) and the output's config
        does not, its embedding is the output's lm_head."""
        inputs, base, ref = self.split(sl)
        ctx, jobs = self.ctx, []
        names = ctx.module(ref.model, self.module).tensors
        pairs = [(n, n) for n in names if arch.layer_of(n) is None and arch.is_pre(n) == pre]
        if not pre:  # a tied model's embedding stands in for the lm_head the output needs
            want = ctx.module(ctx.donor, self.module).tensors if ctx.donor in ctx.models else ()
            pairs += arch.head_stand_ins(want, names, ctx.models[ref.model].checkpoint.config)
        for name, ref_name in pairs:
            job = _job(
                ctx,
                name,
                Input(ref.model, ref_name),
                [(s, name) for s in inputs],
                (base, name) if base else None,
                self.outer(sl),
                None,
                sl.length,
                self.module,
            )
            if job:
                jobs.append(job)
        return jobs


def slices_jobs(ctx: Ctx, part: Part, module: str) -> tuple[list[TensorJob], list[int]]:
    """Module ``module``'s jobs from the part's slices, and its layer map (output layer ->
    the reference model's layer, for per-layer config entries)."""
    slices = part.slices or ()
    if not all(_check_range(ctx, s, module) for sl in slices for s in sl.sources):
        return [], []
    build = _Slices(ctx, part, module)
    jobs = build.edges(slices[0], pre=True)
    layer_map: list[int] = []
    for sl in slices:
        build.layers(sl, len(layer_map), jobs, layer_map)
    jobs.extend(build.edges(slices[-1], pre=False))
    return jobs, layer_map
