"""The parameter space of a merge and the map from a parameter vector to a recipe.

``Genome.size`` is the length of the vector CMA-ES searches, laid out as mergekit lays out its
genotype: ``[layer group, model, filter set, parameter]``, flattened. ``Genome.recipe(x)``
turns a vector into a normal recipe mapping (what ``merge run`` reads): weights are taken
``abs`` unless ``allow_negative_weights``, densities ``abs`` clamped into ``[0.001, 1]``; one
group without ``smooth`` is a ``models:`` recipe of scalars (or filter lists), groups are
``slices:`` of ``layer_granularity`` layers, ``smooth`` gives gradients over the layers. For
``slerp`` each group takes its two highest-weighted models, the first as the slice's base,
``t`` the softmax share of the second. The score of a candidate is the sum of task weight
times metric, maximised: give a lower-is-better metric (perplexity) a negative weight, as in
mergekit.

The config that holds a genome is parsed by ``merge.evolve.config``.

What it does not do: read any file, or know the tasks.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from merge.errors import RecipeError

METHOD_PARAMS: dict[str, tuple[str, ...]] = {
    "linear": ("weight",),
    "task_arithmetic": ("weight",),
    "ties": ("weight", "density"),
    "dare_ties": ("weight", "density"),
    "slerp": ("t",),
}
NEEDS_BASE = ("task_arithmetic", "ties", "dare_ties")
NORMALIZED_BY_DEFAULT = ("linear", "ties", "dare_ties")
DENSITY_MIN = 1e-3


@dataclass(frozen=True)
class Genome:
    """The parameter space of a merge (see the module docstring)."""

    models: tuple[str, ...]
    merge_method: str
    base_model: str | None
    tokenizer_source: str | None
    layer_granularity: int
    normalize: bool | None
    allow_negative_weights: bool
    smooth: bool
    filters: tuple[str, ...]
    dtype: str | None
    layers: int = 0  # the input models' layer count, set by ``with_layers``

    @property
    def groups(self) -> int:
        g = self.layer_granularity
        return self.layers // g if g > 0 and self.layers else 1

    @property
    def params(self) -> tuple[str, ...]:
        return METHOD_PARAMS[self.merge_method]

    @property
    def shape(self) -> tuple[int, int, int, int]:
        return (self.groups, len(self.models), len(self.filters) + 1, len(self.params))

    @property
    def size(self) -> int:
        return math.prod(self.shape)

    def with_layers(self, layers: int, where: str) -> Genome:
        """This genome for models of ``layers`` layers; RecipeError at ``where`` (the place of
        ``layer_granularity``) when the granularity does not divide them."""
        g = self.layer_granularity
        if g > 0 and layers % g:
            raise RecipeError(f"{where}: {g} does not divide the models' {layers} layers")
        return Genome(**{**self.__dict__, "layers": layers})

    def initial(self, rng: Any, random: bool = False) -> list[float]:
        """mergekit's starting point: weights 1/models, densities 1 (``random``: uniform
        in [0, 1) from ``rng``, a numpy Generator)."""
        if random:
            return [float(v) for v in rng.random(self.size)]
        first = [1.0 / len(self.models)] + [1.0] * (len(self.params) - 1)
        return first * (self.size // len(self.params))

    def values(self, x: Sequence[float]) -> dict[str, list[list[list[float]]]]:
        """``x`` as ``{param: [group][model][filter set]}``, each value transformed."""
        if len(x) != self.size:
            raise ValueError(f"a vector of {len(x)} values for a genome of {self.size}")
        g, m, f, p = self.shape
        out: dict[str, list[list[list[float]]]] = {}
        for k, name in enumerate(self.params):
            at = lambda gi, mi, fi: float(x[((gi * m + mi) * f + fi) * p + k])  # noqa: E731,B023
            out[name] = [
                [[self._transform(name, at(gi, mi, fi)) for fi in range(f)] for mi in range(m)]
                for gi in range(g)
            ]
        return out

    def _transform(self, param: str, v: float) -> float:
        if param == "density":
            return min(1.0, max(DENSITY_MIN, abs(v)))
        return v if self.allow_negative_weights else abs(v)

    def recipe(self, x: Sequence[float]) -> dict[str, Any]:
        """The recipe mapping of the candidate ``x`` (plain floats, YAML-safe)."""
        from merge.methods import METHODS

        vals = self.values(x)
        top: dict[str, Any] = {"merge_method": self.merge_method}
        if self.merge_method == "slerp":
            top["slices"] = self._slerp_slices(vals["t"])
        elif self.smooth:
            top["models"] = self._smooth_models(vals)
        elif self.groups > 1:
            top["slices"] = self._slices(vals)
        else:
            top["models"] = self._entries(vals, 0, None)
        if self.base_model is not None:
            top["base_model"] = self.base_model
        normalize = self.normalize
        if normalize is None:
            normalize = self.merge_method in NORMALIZED_BY_DEFAULT
        names = {p.name for p in METHODS[self.merge_method].params}
        if "normalize" in names:
            top["parameters"] = {"normalize": normalize}
        if self.tokenizer_source is not None:
            top["tokenizer_source"] = self.tokenizer_source
        if self.dtype is not None:
            top["dtype"] = self.dtype
        return top

    def probe_recipe(self) -> dict[str, Any]:
        """A recipe over the genome's models that needs no layer count (to open them and
        learn it): the starting point's, or for slerp a linear merge."""
        if self.merge_method != "slerp":
            one = Genome(**{**self.__dict__, "layer_granularity": 0, "smooth": False})
            return one.recipe(one.initial(None))
        top: dict[str, Any] = {
            "merge_method": "linear",
            "models": [{"model": m, "parameters": {"weight": 1.0}} for m in self.models],
        }
        top["models"] += self._base_entry(None)
        for key in ("tokenizer_source", "dtype"):
            if getattr(self, key) is not None:
                top[key] = getattr(self, key)
        return top

    def _param(self, per_set: list[Any]) -> Any:
        if not self.filters:
            return per_set[0]
        rules = [{"filter": f, "value": v} for f, v in zip(self.filters, per_set, strict=False)]
        return [*rules, {"value": per_set[-1]}]

    def _entries(self, vals: dict[str, Any], gi: int, layers: list[int] | None) -> list[dict]:
        out = []
        for mi, model in enumerate(self.models):
            e: dict[str, Any] = {"model": model}
            if layers is not None:
                e["layer_range"] = list(layers)
            e["parameters"] = {k: self._param(v[gi][mi]) for k, v in vals.items()}
            out.append(e)
        return out + self._base_entry(layers)

    def _base_entry(self, layers: list[int] | None) -> list[dict]:
        if self.base_model is None or self.base_model in self.models:
            return []
        return [{"model": self.base_model, **({"layer_range": layers} if layers else {})}]

    def _ranges(self) -> list[list[int]]:
        step = self.layers // self.groups
        return [[i * step, (i + 1) * step] for i in range(self.groups)]

    def _slices(self, vals: dict[str, Any]) -> list[dict]:
        return [{"sources": self._entries(vals, gi, r)} for gi, r in enumerate(self._ranges())]

    def _smooth_models(self, vals: dict[str, Any]) -> list[dict]:
        out = []
        for mi, model in enumerate(self.models):
            params = {}
            for k, v in vals.items():
                per_set = [
                    [v[gi][mi][fi] for gi in range(self.groups)] for fi in range(self.shape[2])
                ]
                params[k] = self._param([s[0] if len(s) == 1 else s for s in per_set])
            out.append({"model": model, "parameters": params})
        return out + self._base_entry(None)

    def _slerp_slices(self, t: list[list[list[float]]]) -> list[dict]:
        out = []
        for gi, r in enumerate(self._ranges() if self.layers else [[0, 0]]):
            w = [t[gi][mi][0] for mi in range(len(self.models))]
            first, second = sorted(range(len(w)), key=lambda i: (-w[i], i))[:2]
            share = 1.0 / (1.0 + math.exp(w[first] - w[second]))
            sources = [{"model": self.models[i], "layer_range": list(r)} for i in (first, second)]
            out.append(
                {
                    "sources": sources + self._base_entry(list(r)),
                    "base_model": self.models[first],
                    "parameters": {"t": share},
                }
            )
        return out
