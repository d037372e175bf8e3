"""The evolve config (mergekit-evolve's syntax): the genome, the tasks and their checks.

``load_config(path)`` reads a ``GENOME.yaml``::

    genome:
      models: [A, B]            # the models to merge (a base model listed here gets weights)
      merge_method: ties        # linear, task_arithmetic, ties, dare_ties or slerp
      base_model: BASE          # required by task_arithmetic, ties, dare_ties
      tokenizer_source: null    # optional, as in a recipe
      layer_granularity: 0      # N: one parameter set per N layers; 0: one for all layers
      normalize: null           # null: true for linear, ties, dare_ties (mergekit's default)
      allow_negative_weights: false
      smooth: false             # interpolate the groups' values over the layers (a gradient)
      filters: [self_attn, mlp] # separate parameters per filter, plus one for the rest
      dtype: null               # (ours) the candidates' output dtype; mergekit uses bfloat16
    tasks:
      - {name: choice:qa.jsonl, weight: 1.0, metric: acc}   # or a bare lm_eval task name
    limit: null                 # score each task's first N documents or questions
    random_init: false          # start at a seeded random point instead of equal weights

Every problem is a ``RecipeError`` at its line (``genome.yaml:4: genome.merge_method: ...``).

``load_config`` is the parsing; ``merge.evolve.genome.Genome`` the parameter space.

What it does not do: read any model or task file (``merge.evolve.search`` does), or support
mergekit's lm-eval options (``num_fewshot``, ``shuffle``, ...) other than at their defaults.
"""

from __future__ import annotations

import hashlib
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from merge.errors import MergeError, RecipeError
from merge.evolve.genome import METHOD_PARAMS, NEEDS_BASE, Genome
from merge.recipe.checks import did_you_mean
from merge.recipe.yamlsrc import Locator, load_yaml

GENOME_KEYS = (
    "models",
    "merge_method",
    "base_model",
    "tokenizer_source",
    "layer_granularity",
    "normalize",
    "allow_negative_weights",
    "smooth",
    "filters",
    "dtype",
)
# mergekit-evolve's lm-eval options: accepted at their defaults only
FIXED_TOP: dict[str, Any] = {
    "num_fewshot": None,
    "shuffle": False,
    "apply_chat_template": True,
    "fewshot_as_multiturn": True,
}
TOP_KEYS = ("genome", "tasks", "limit", "random_init", *FIXED_TOP)
TASK_KEYS = ("name", "weight", "metric")
DEFAULT_METRIC = {"perplexity": "perplexity", "generate": "exact_match"}


@dataclass(frozen=True)
class TaskSpec:
    """One scored task: its ``merge eval`` spec, weight and metric (lm-eval's name)."""

    spec: str
    weight: float
    metric: str
    where: str  # "genome.yaml:12: tasks[0]", for messages


@dataclass(frozen=True)
class EvolveConfig:
    """A parsed ``GENOME.yaml``; ``text`` is its content (part of the storage key)."""

    genome: Genome
    tasks: tuple[TaskSpec, ...]
    limit: int | None
    random_init: bool
    file: Path
    text: str
    refs: tuple[tuple[str, str], ...] = ()  # (model reference, its place in the genome)
    granularity_at: str = ""  # "genome.yaml:5: genome.layer_granularity"

    def relocate(self, e: MergeError) -> MergeError:
        """``e`` (about the recipe made from the genome) with the genome's places: a problem
        naming a model points at that model's line in the genome file."""
        head = re.compile(rf"^{re.escape(str(self.file))}:\d+: [^:]*: ")
        out = []
        for p in e.problems:
            rest = head.sub("", p)
            if rest == p:
                out.append(p)
                continue
            hit = next((w for ref, w in self.refs if f"'{ref}'" in rest), None)
            out.append(f"{hit}: {rest}" if hit else f"{self.file}: the genome's recipe: {rest}")
        err = type(e)(out)
        err.__cause__ = e
        return err

    def key(self, options: dict[str, Any]) -> str:
        """A hash of the config text and the options that shape the trajectory."""
        h = hashlib.sha256(self.text.encode())
        h.update(repr(sorted(options.items())).encode())
        return h.hexdigest()


def _local(ref: str, folder: Path) -> str:
    """A model reference with a relative local folder made absolute (a Hub id unchanged)."""
    path = (folder / ref).expanduser()
    return str(path.resolve()) if not Path(ref).is_absolute() and path.exists() else ref


def _check_keys(data: Any, allowed: Sequence[str], path: tuple, loc: Locator, out: list) -> dict:
    if not isinstance(data, dict):
        out.append(loc.error(path, f"expected a mapping, got {type(data).__name__}"))
        return {}
    for key in data:
        if key not in allowed:
            hint = did_you_mean(str(key), list(allowed))
            out.append(loc.error((*path, key), f"unknown key; {hint}"))
    return data


def _typed(data: dict, key: str, kinds: tuple, path: tuple, loc: Locator, out: list) -> Any:
    value = data.get(key)
    if value is not None and (
        not isinstance(value, kinds) or isinstance(value, bool) != (bool in kinds)
    ):
        names = " or ".join(k.__name__ for k in kinds)
        out.append(loc.error((*path, key), f"must be {names}, got {value!r}"))
        return None
    return value


def _genome(data: Any, loc: Locator, folder: Path, out: list) -> Genome | None:
    path: tuple = ("genome",)
    g = _check_keys(data, GENOME_KEYS, path, loc, out)
    models = g.get("models")
    if not isinstance(models, list) or not models or not all(isinstance(m, str) for m in models):
        out.append(loc.error((*path, "models"), "required: a list of model references"))
        models = []
    method = g.get("merge_method")
    if method not in METHOD_PARAMS:
        what = f"unknown merge method {method!r}" if method is not None else "required"
        hint = did_you_mean(str(method), list(METHOD_PARAMS))
        out.append(loc.error((*path, "merge_method"), f"{what}; {hint}"))
    base = _typed(g, "base_model", (str,), path, loc, out)
    if method in NEEDS_BASE and base is None:
        out.append(loc.error((*path, "merge_method"), f"{method} needs a base_model"))
    gran = _typed(g, "layer_granularity", (int,), path, loc, out) or 0
    if gran < 0:
        out.append(loc.error((*path, "layer_granularity"), f"must be >= 0, got {gran}"))
    filters = g.get("filters") or []
    if not isinstance(filters, list) or not all(isinstance(f, str) and f for f in filters):
        out.append(loc.error((*path, "filters"), "must be a list of tensor-name substrings"))
        filters = []
    smooth = bool(_typed(g, "smooth", (bool,), path, loc, out))
    if method == "slerp" and (smooth or filters):
        out.append(loc.error(path, "slerp takes neither smooth nor filters (as in mergekit)"))
    if method == "slerp" and len(models) < 2:
        out.append(loc.error((*path, "models"), "slerp needs at least two models"))
    genome = Genome(
        models=tuple(_local(m, folder) for m in models),
        merge_method=str(method),
        base_model=_local(base, folder) if base else None,
        tokenizer_source=_typed(g, "tokenizer_source", (str,), path, loc, out),
        layer_granularity=max(0, gran),
        normalize=_typed(g, "normalize", (bool,), path, loc, out),
        allow_negative_weights=bool(_typed(g, "allow_negative_weights", (bool,), path, loc, out)),
        smooth=smooth,
        filters=tuple(filters),
        dtype=_typed(g, "dtype", (str,), path, loc, out),
    )
    return genome if method in METHOD_PARAMS else None


def _task_spec(name: str, folder: Path) -> str:
    kind, sep, arg = name.partition(":")
    if not sep:
        return f"lm_eval:{name}"  # mergekit's tasks are lm-eval task names
    if kind in ("perplexity", "choice", "generate") and not Path(arg).expanduser().is_absolute():
        return f"{kind}:{(folder / arg).resolve()}"
    return name


def _tasks(data: Any, loc: Locator, folder: Path, out: list) -> tuple[TaskSpec, ...]:
    if not isinstance(data, list) or not data:
        out.append(loc.error(("tasks",), "required: a list of tasks ({name, weight, metric})"))
        return ()
    tasks = []
    for i, raw in enumerate(data):
        path: tuple = ("tasks", i)
        t = {"name": raw} if isinstance(raw, str) else _check_keys(raw, TASK_KEYS, path, loc, out)
        name = t.get("name")
        if not isinstance(name, str) or not name:
            out.append(loc.error((*path, "name"), "required: a task such as choice:FILE"))
            continue
        weight = t.get("weight", 1.0)
        if (
            isinstance(weight, bool)
            or not isinstance(weight, (int, float))
            or not math.isfinite(weight)
        ):
            out.append(loc.error((*path, "weight"), f"must be a finite number, got {weight!r}"))
            weight = 0.0
        spec = _task_spec(name, folder)
        metric = t.get("metric") or DEFAULT_METRIC.get(spec.partition(":")[0], "acc")
        if not isinstance(metric, str):
            out.append(loc.error((*path, "metric"), f"must be a metric name, got {metric!r}"))
            metric = "acc"
        tasks.append(TaskSpec(spec, float(weight), metric.split(",")[0], loc.where(path)))
    return tuple(tasks)


def load_config(path: str | Path) -> EvolveConfig:
    """Parse and check ``GENOME.yaml``; one RecipeError holding every problem."""
    file = Path(path)
    data, loc, text = load_yaml(file)
    out: list[str] = []
    top = _check_keys(data, TOP_KEYS, (), loc, out)
    for key, default in FIXED_TOP.items():
        if key in top and top[key] != default:
            out.append(loc.error((key,), f"only {default!r} is supported by merge evolve"))
    folder = file.resolve().parent
    if "genome" not in top and isinstance(data, dict):
        out.append(loc.error(("genome",), "required"))
    genome = _genome(top.get("genome"), loc, folder, out) if "genome" in top else None
    tasks = _tasks(top.get("tasks"), loc, folder, out)
    limit = _typed(top, "limit", (int,), (), loc, out)
    if limit is not None and limit < 1:
        out.append(loc.error(("limit",), f"must be >= 1, got {limit}"))
    random_init = bool(_typed(top, "random_init", (bool,), (), loc, out))
    if out or genome is None:
        raise RecipeError(out or [f"{file}: no genome"])
    refs = [(m, loc.where(("genome", "models", i))) for i, m in enumerate(genome.models)]
    if genome.base_model is not None:
        refs.append((genome.base_model, loc.where(("genome", "base_model"))))
    at = loc.where(("genome", "layer_granularity"))
    return EvolveConfig(genome, tasks, limit, random_init, file, text, tuple(refs), at)
