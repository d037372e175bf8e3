"""In-memory merges: a recipe merged straight into a live model, no checkpoint written.

``InMemoryMerger(base_recipe)`` opens the recipe's models once (memory-mapped checkpoints and
their headers, kept for every merge) and builds one target model from the base plan's output
config. ``merge(recipe)`` plans a candidate (the same models, other parameters) with the
normal planner, every check and error included, then runs the normal executor
(``merge.execute.execute_into``) with a ``merge.evolve.target.ParamSink``: each output tensor
is cast to its planned dtype exactly as ``merge run`` casts it before writing, and copied
into the model's parameter of that name. The model then holds the bytes ``merge run`` would
write for that recipe. Memory: the mapped inputs (shared by every worker) plus the one model;
streamed jobs write chunk by chunk straight into the parameters.

A candidate must make the target's output: the same tensors, shapes, dtypes and config
(a tokenizer setting that changes the vocabulary per candidate is refused with the tensors
that differ). ``tokenizer()`` is the base plan's output tokenizer (the donor's, or the one a
tokenizer setting builds), the same for every candidate.

What it does not do: MoE recipes, locks (``merge.build.locked``), Hub models whose weights
are not downloaded yet (they are downloaded when opened), model cards or manifests.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from types import TracebackType
from typing import Any

import yaml

from merge.errors import PlanError, RecipeError
from merge.evolve.target import ParamSink, build_model, check_target
from merge.execute import execute_into
from merge.finite import FiniteCheck
from merge.jobs import Plan
from merge.moe.recipe import MoeRecipe
from merge.plan import make_plan
from merge.recipe import Recipe, load_recipe, parse_recipe
from merge.resources import Resources
from merge.settings import applied, device_name
from merge.shardplan import TensorSpec
from merge.sourceset import Model, close_models, iter_unique_dirs, open_models
from merge.tokenizer import resolve_template, write_tokenizer

RecipeLike = str | Path | Recipe | Mapping[str, Any]
ONE_SHARD = 2**62  # the shard layout does not matter in memory


def as_recipe(recipe: RecipeLike, file: Path | None = None) -> Recipe:
    """A checked merge recipe from a path, a ``Recipe`` or a mapping (the YAML's data; its
    relative paths resolve against ``file``'s folder, default the working directory)."""
    if isinstance(recipe, Mapping):
        where = file or Path.cwd() / "recipe.yaml"
        rec = parse_recipe(yaml.safe_dump(dict(recipe), sort_keys=False), str(where))
    elif isinstance(recipe, (Recipe, MoeRecipe)):
        rec = recipe
    else:
        rec = load_recipe(recipe)
    if isinstance(rec, MoeRecipe):
        raise RecipeError(f"{rec.file}: in-memory merges take merge recipes, not MoE recipes")
    return rec


class InMemoryMerger:
    """Merges recipes over one set of opened models into one reused target model.

    ``device``: where the model lives and the method math runs (``cpu``, ``cuda[:N]``,
    ``auto``); ``threads``/``max_memory`` as ``merge run``'s; ``seed`` overrides every
    recipe's; ``warn`` gets each plan warning once and the finite check's warnings
    (``strict_finite`` as ``merge run --strict-finite``). Use it as a context manager, or
    call ``close``."""

    def __init__(
        self,
        base_recipe: RecipeLike,
        *,
        device: str = "cpu",
        threads: int | None = None,
        max_memory: str | int | None = None,
        seed: int | None = None,
        trust_remote_code: bool = False,
        cache_dir: str | Path | None = None,
        allow_crimes: bool = False,
        strict_finite: bool = False,
        warn: Callable[[str], None] | None = None,
    ) -> None:
        self._base = as_recipe(base_recipe)
        self._settings: dict[str, Any] = {
            "trust_remote_code": trust_remote_code,
            "cache_dir": cache_dir,
        }
        self._device = device_name(device)
        self._resources = Resources.resolve(threads, max_memory, self._device)
        self._seed, self._crimes, self._strict = seed, allow_crimes, strict_finite
        self._scanned = False  # whether a merge has checked the inputs for NaN/Inf
        self._warn = warn
        self._warned: set[str] = set()
        with applied(**self._settings):
            self._models: dict[str, Model] = open_models(self._base)
        try:
            self._plan = self._make_plan(self._base)
        except BaseException:
            self.close()
            raise
        self._specs = _specs(self._plan)
        self._target: Any = None
        self._slots: dict[str, Any] = {}
        self._tokenizer: Any = None

    def _make_plan(self, rec: Recipe) -> Plan:
        with applied(**self._settings):
            p = make_plan(
                rec, self._models, seed=self._seed, shard_bytes=ONE_SHARD, allow_crimes=self._crimes
            )
        for w in p.warnings:
            if self._warn is not None and w not in self._warned:
                self._warned.add(w)
                self._warn(w)
        return p

    @property
    def config(self) -> dict[str, Any]:
        """The output config of the base recipe (as ``merge run`` would write it)."""
        return dict(self._plan.config)

    def model(self) -> Any:
        """The target model (built on first use, then the same object for every merge)."""
        if self._target is None:
            with applied(**self._settings):
                model = build_model(self._plan, self._device)
            slots = dict(model.state_dict())
            check_target(self._specs, slots, f"the {type(model).__name__} built from its config")
            self._target, self._slots = model, slots
        return self._target

    def tokenizer(self) -> Any:
        """The output tokenizer of the base recipe (as ``merge run`` would write it)."""
        if self._tokenizer is None:
            from transformers import AutoTokenizer

            p = self._plan
            template = resolve_template(p.recipe.chat_template, iter_unique_dirs(p.models))
            built = p.vocab.tokenizer if p.vocab else None
            added = p.vocab.added if p.vocab else []
            with tempfile.TemporaryDirectory(prefix="merge-tokenizer-") as tmp:
                donor = p.models[p.tokenizer_donor].directory
                write_tokenizer(donor, Path(tmp), template, built, added)
                remote = bool(self._settings["trust_remote_code"])
                self._tokenizer = AutoTokenizer.from_pretrained(tmp, trust_remote_code=remote)
        return self._tokenizer

    def plan(self, recipe: RecipeLike) -> Plan:
        """The checked plan of a candidate over the opened models; PlanError when it names
        other models or makes another output than the target's."""
        rec = as_recipe(recipe, self._base.file)
        ours, theirs = set(self._models), set(rec.ref_paths())
        if ours != theirs:
            raise RecipeError(
                f"{rec.file}: a candidate must use the base recipe's models; "
                f"missing {sorted(ours - theirs)}, new {sorted(theirs - ours)}"
            )
        p = self._make_plan(rec)
        _same_output(self._plan, self._specs, p)
        return p

    def merge(self, recipe: RecipeLike) -> Any:
        """Merge ``recipe`` into the target model and return it (its previous contents are
        all overwritten; nothing of an earlier merge is kept)."""
        p = self.plan(recipe)
        model = self.model()
        sink = ParamSink(self._slots, self._specs)
        # The inputs never change between candidates: check them in the first merge only.
        finite = FiniteCheck(self._strict, self._warn, scan=not self._scanned)
        with applied(**self._settings):
            execute_into(p, sink, progress=False, resources=self._resources, finite=finite)
        self._scanned = True
        sink.close()
        return model

    def close(self) -> None:
        """Close the opened models (the target model stays usable)."""
        close_models(getattr(self, "_models", {}))
        self._models = {}

    def __enter__(self) -> InMemoryMerger:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def _specs(p: Plan) -> dict[str, TensorSpec]:
    return {s.name: s for s in p.shards.specs}


def _same_output(base: Plan, specs: dict[str, TensorSpec], p: Plan) -> None:
    """A candidate's plan must make exactly the target's tensors and config."""
    theirs = _specs(p)
    problems = [
        f"tensor '{n}': the target has {specs[n].shape} {specs[n].dtype}, the candidate makes "
        f"{theirs[n].shape} {theirs[n].dtype}"
        for n in specs.keys() & theirs.keys()
        if specs[n] != theirs[n]
    ]
    problems += [f"the candidate does not make tensor '{n}'" for n in specs.keys() - theirs]
    problems += [
        f"the candidate makes tensor '{n}', not in the target" for n in theirs.keys() - specs.keys()
    ]
    if p.config != base.config:
        keys = sorted(k for k in {*p.config, *base.config} if p.config.get(k) != base.config.get(k))
        problems.append(f"the candidate's output config differs in {keys}")
    if problems:
        raise PlanError([f"{p.recipe.file}: {m}" for m in sorted(problems)])
