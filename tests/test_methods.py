"""Tests for merge.methods: each formula against a plain-Python reference, plus properties.

References below loop over Python floats and never call the module's helpers. Random inputs
come from seeded local generators (never the global RNG).
"""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
from torch.testing import assert_close

from merge.methods import (
    METHODS,
    REQUIRED,
    Method,
    Param,
    get_method,
    method_names,
    register,
    suggest,
    unregister,
)
from merge.methods.sparsify import bernoulli_mask, magnitude_mask
from support import fill

SHAPE = (6, 5)
ALL = ["dare_linear", "dare_ties", "linear", "passthrough", "slerp", "task_arithmetic", "ties"]
"""The methods of the first release, specified and exercised in this file."""
EVERY = sorted(
    [
        *ALL,
        *("nuslerp", "multislerp", "karcher", "model_stock", "nearswap", "arcee_fusion"),
        *("ram", "sce", "breadcrumbs", "breadcrumbs_ties", "della", "della_linear"),
        "ramplus_tl",
    ]
)
"""Every built-in method (the later ones are tested in test_methods_geometric/_sparse/_ram.py)."""


# --- helpers --------------------------------------------------------------------------------


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def rand(seed: int, shape: tuple[int, ...] = SHAPE) -> torch.Tensor:
    return torch.randn(shape, generator=gen(seed))


def call(
    name: str,
    xs: list[torch.Tensor],
    b: torch.Tensor | None,
    seed: int | None = None,
    /,
    **given: Any,
) -> torch.Tensor:
    """Run method ``name`` with defaults + ``given``; ``seed`` seeds a fresh local generator."""
    rng = gen(seed) if seed is not None else None
    return get_method(name).fn(xs, b, fill(name, len(xs), **given), rng)


def flat(x: torch.Tensor) -> list[float]:
    return [float(v) for v in x.reshape(-1).tolist()]


def tensor(values: list[float], shape: tuple[int, ...] = SHAPE) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32).reshape(shape)


def ref_task_merge(
    xs: list[torch.Tensor],
    b: torch.Tensor,
    weights: list[float],
    keeps: list[list[bool]] | None = None,
    consensus: bool = False,
    normalize: bool = False,
    lam: float = 1.0,
    rescale: bool = False,
) -> torch.Tensor:
    """The METHODS.md task-vector formula, element by element in Python floats."""
    bf = flat(b)
    n = len(bf)
    es = []
    for i, x in enumerate(xs):
        d = [xv - bv for xv, bv in zip(flat(x), bf, strict=True)]
        e = [dv if (keeps is None or keeps[i][j]) else 0.0 for j, dv in enumerate(d)]
        kept_l1 = sum(abs(v) for v in e)
        if rescale and kept_l1 != 0:
            e = [v * sum(abs(v) for v in d) / kept_l1 for v in e]
        es.append(e)
    out = []
    for j in range(n):
        o = [w * e[j] for w, e in zip(weights, es, strict=True)]
        s = 1.0 if sum(o) >= 0 else -1.0
        m = [1.0 if not consensus or (ov != 0 and math.copysign(1.0, ov) == s) else 0.0 for ov in o]
        combined = sum(mi * ov for mi, ov in zip(m, o, strict=True))
        divisor = sum(mi * w for mi, w in zip(m, weights, strict=True))
        if normalize:
            combined /= divisor if divisor != 0 else 1.0
        out.append(bf[j] + lam * combined)
    return tensor(out, tuple(b.shape))


def top_k_keep(d: list[float], density: float) -> list[bool]:
    k = int(density * len(d))
    order = sorted(range(len(d)), key=lambda j: -abs(d[j]))
    chosen = set(order[:k])
    return [j in chosen for j in range(len(d))]


def example(
    name: str,
) -> tuple[list[torch.Tensor], torch.Tensor | None, dict[str, Any], int | None]:
    """A valid call of every method: tensors, base, params, seed."""
    xs = [rand(1), rand(2), rand(3)]
    if name == "linear":
        return xs, None, {"weight": [0.5, 0.3, 0.2]}, None
    if name == "passthrough":
        return xs[:1], None, {"scale": 0.5}, None
    if name == "slerp":
        return xs[:1], rand(4), {"t": 0.4}, None
    given: dict[str, Any] = {"weight": [0.5, 0.3, 0.9]}
    if name != "task_arithmetic":
        given["density"] = [0.5, 0.6, 0.7]
    return xs, rand(4), given, (7 if get_method(name).random else None)


# --- registry -------------------------------------------------------------------------------


def test_registry_lists_exactly_the_builtin_methods() -> None:
    assert method_names() == EVERY
    assert set(METHODS) == set(EVERY)
    for name in EVERY:
        assert get_method(name).name == name


def test_suggest_and_unknown_method_message() -> None:
    assert suggest("tie") == "ties"
    assert suggest("slerpp") == "slerp"
    assert suggest("qqqqqq") is None
    with pytest.raises(KeyError) as info:
        get_method("tie")
    message = str(info.value)
    assert "unknown merge method 'tie'" in message
    assert "did you mean 'ties'?" in message
    assert "dare_linear, dare_ties, della" in message


def test_register_and_unregister_a_plugin() -> None:
    plugin = Method(
        "mean_plugin",
        lambda xs, b, p, r: torch.stack(xs).mean(dim=0),
        (),
        "input",
        1,
        None,
        None,
        "mean",
    )
    register(plugin)
    try:
        assert get_method("mean_plugin") is plugin
        assert "mean_plugin" in method_names()
        with pytest.raises(ValueError, match="already registered"):
            register(plugin)
        with pytest.raises(ValueError, match="already registered"):
            register(Method("ties", plugin.fn, (), "input", 1, None, None, "shadow"))
    finally:
        assert unregister("mean_plugin") is plugin
    assert "mean_plugin" not in METHODS
    with pytest.raises(KeyError):
        get_method("mean_plugin")
    assert method_names() == EVERY


# --- parameter declarations and checks ------------------------------------------------------


def test_param_check_range_messages() -> None:
    density = get_method("ties").param("density")
    assert density is not None
    assert density.check(1.5) == "must be in (0, 1], got 1.5"
    assert density.check(0) == "must be in (0, 1], got 0"
    assert density.check(-0.1) == "must be in (0, 1], got -0.1"
    assert density.check(1) is None  # ints are numbers
    assert density.check(1e-9) is None
    t = get_method("slerp").param("t")
    assert t is not None and t.check(0) is None and t.check(1.0) is None
    assert t.check(1.01) == "must be in [0, 1], got 1.01"
    assert Param("g", False, float, 0.0, low=0).check(-1) == "must be >= 0, got -1"
    assert Param("g", False, float, 0.5, high=1, high_open=True).check(1) == "must be < 1, got 1"


def test_param_check_type_messages() -> None:
    weight = get_method("linear").param("weight")
    normalize = get_method("linear").param("normalize")
    assert weight is not None and normalize is not None
    assert weight.check("abc") == "must be a number, got 'abc'"
    assert weight.check(True) == "must be a number, got true"
    assert weight.check(None) == "must be a number, got null"
    assert weight.check(float("nan")) == "must be a finite number within float32 (got nan)"
    assert weight.check(-2) is None and weight.check(0.25) is None
    assert normalize.check(3) == "must be true or false, got 3"
    assert normalize.check("true") == "must be true or false, got 'true'"
    assert normalize.check(0) == "must be true or false, got 0"
    assert normalize.check(False) is None
    count = Param("max_iter", False, int, 10, low=1)
    assert count.check(1.5) == "must be an integer, got 1.5"
    assert count.check(True) == "must be an integer, got true"
    assert count.check(0) == "must be >= 1, got 0"
    assert count.check(3) is None


@pytest.mark.parametrize(
    ("kwargs", "expected"),
    [
        ({"low": 0, "high": 1, "low_open": True}, "(0, 1]"),
        ({"low": 0, "high": 1}, "[0, 1]"),
        ({"low": 0, "high": 0.5, "high_open": True}, "[0, 0.5)"),
        ({"low": 0}, ">= 0"),
        ({"low": 0, "low_open": True}, "> 0"),
        ({"high": 1}, "<= 1"),
        ({"high": 1, "high_open": True}, "< 1"),
        ({}, ""),
    ],
)
def test_describe_range(kwargs: dict[str, Any], expected: str) -> None:
    assert Param("p", False, float, **kwargs).describe_range() == expected


# per method: base role, min/max models, random; params: name -> (per_model, kind, default)
W = (True, float, REQUIRED)
SPARSE = {"weight": W, "density": (True, float, 1.0), "lambda": (False, float, 1.0)}
FLAGS = {"int8_mask": (False, bool, False)}
SPEC: dict[str, tuple[str, int, int | None, bool, dict[str, tuple[bool, type, Any]]]] = {
    "linear": ("input", 1, None, False, {"weight": W, "normalize": (False, bool, True)}),
    "passthrough": ("none", 1, 1, False, {"scale": (True, float, 1.0)}),
    "slerp": ("required", 1, 1, False, {"t": (False, float, REQUIRED)}),
    "task_arithmetic": (
        "required",
        1,
        None,
        False,
        {"weight": W, "normalize": (False, bool, False), "lambda": (False, float, 1.0)},
    ),
    "ties": (
        "required",
        1,
        None,
        False,
        {
            **SPARSE,
            **FLAGS,
            "normalize": (False, bool, True),
            "rescale": (False, bool, False),
            "trim": (False, str, "local"),
        },
    ),
}
for _dare in ("dare_linear", "dare_ties"):
    _params: dict[str, tuple[bool, type, Any]] = {
        **SPARSE,
        **FLAGS,
        "normalize": (False, bool, False),
        "rescale": (False, bool, True),
    }
    SPEC[_dare] = ("required", 1, None, True, _params)


@pytest.mark.parametrize("name", ALL)
def test_declarations_match_the_spec(name: str) -> None:
    method = get_method(name)
    base, low, high, random, params = SPEC[name]
    assert (method.base, method.min_models, method.max_models, method.random) == (
        base,
        low,
        high,
        random,
    )
    declared = {p.name: (p.per_model, p.kind, p.default) for p in method.params}
    assert declared == params
    assert method.description and "\n" not in method.description
    assert method.paper is None or method.paper.startswith("https://")
    assert method.param("no_such_param") is None


# --- every method: purity -------------------------------------------------------------------


@pytest.mark.parametrize("name", ALL)
def test_pure_no_mutation_float32_same_shape_no_global_rng(name: str) -> None:
    xs, b, given, seed = example(name)
    before = [x.clone() for x in xs], (b.clone() if b is not None else None)
    rng_state = torch.get_rng_state()
    out = call(name, xs, b, seed, **given)
    assert torch.equal(torch.get_rng_state(), rng_state)
    assert out.dtype == torch.float32 and out.shape == xs[0].shape
    for x, x0 in zip(xs, before[0], strict=True):
        assert torch.equal(x, x0)
    if b is not None:
        assert before[1] is not None and torch.equal(b, before[1])


# --- linear / passthrough -------------------------------------------------------------------


@pytest.mark.parametrize("normalize", [True, False])
def test_linear_matches_reference(normalize: bool) -> None:
    xs, weights = [rand(1), rand(2), rand(3)], [0.5, 0.3, -0.2]
    values = [flat(x) for x in xs]
    expected = []
    for j in range(len(values[0])):
        total = sum(w * v[j] for w, v in zip(weights, values, strict=True))
        expected.append(total / sum(weights) if normalize else total)
    out = call("linear", xs, None, weight=weights, normalize=normalize)
    assert_close(out, tensor(expected))


def test_linear_identical_inputs_give_that_input() -> None:
    x = rand(5)
    assert_close(call("linear", [x, x, x], None, weight=[0.2, 0.7, 0.1]), x)


def test_linear_zero_weight_sum_is_not_divided() -> None:
    x1, x2 = rand(1), rand(2)
    assert_close(call("linear", [x1, x2], None, weight=[1.0, -1.0]), x1 - x2)


def test_passthrough_scale() -> None:
    x = rand(1)
    assert torch.equal(call("passthrough", [x], None), x)
    assert_close(call("passthrough", [x], None, scale=2.5), tensor([2.5 * v for v in flat(x)]))
    with pytest.raises(ValueError):
        call("passthrough", [x, x], None)


# --- slerp ----------------------------------------------------------------------------------


def ref_slerp(t: float, x0: torch.Tensor, x1: torch.Tensor) -> torch.Tensor:
    a, c = flat(x0), flat(x1)
    na, nc = math.sqrt(sum(v * v for v in a)), math.sqrt(sum(v * v for v in c))
    dot = sum(p * q for p, q in zip(a, c, strict=True)) / (
        (na if na > 1e-8 else 1) * (nc if nc > 1e-8 else 1)
    )
    if abs(dot) > 0.9995:
        return tensor([(1 - t) * p + t * q for p, q in zip(a, c, strict=True)], tuple(x0.shape))
    th = math.acos(dot)
    s0, s1 = math.sin((1 - t) * th) / math.sin(th), math.sin(t * th) / math.sin(th)
    return tensor([s0 * p + s1 * q for p, q in zip(a, c, strict=True)], tuple(x0.shape))


@pytest.mark.parametrize("t", [0.1, 0.3, 0.5, 0.85])
def test_slerp_matches_reference(t: float) -> None:
    base, other = rand(1), rand(2)
    out = call("slerp", [other], base, t=t)
    assert_close(out, ref_slerp(t, base, other))
    # genuinely spherical: differs from the straight line between the two
    assert not torch.allclose(out, (1 - t) * base + t * other, atol=1e-3)


def test_slerp_endpoints_are_exact() -> None:
    base, other = rand(1), rand(2)
    assert torch.equal(call("slerp", [other], base, t=0), base)
    assert torch.equal(call("slerp", [other], base, t=1.0), other)


@pytest.mark.parametrize("factor", [2.0, -1.0, -3.0])
def test_slerp_near_parallel_falls_back_to_lerp(factor: float) -> None:
    base = rand(1)
    other = base * factor + 1e-5 * rand(2)
    out = call("slerp", [other], base, t=0.3)
    assert torch.isfinite(out).all()
    assert_close(out, 0.7 * base + 0.3 * other)


def test_slerp_zero_norm_base_is_not_divided() -> None:
    other = rand(2)
    out = call("slerp", [other], torch.zeros(SHAPE), t=0.3)
    assert_close(out, other * math.sin(0.3 * math.pi / 2))


def test_slerp_tiny_norm_is_used_without_normalising() -> None:
    # |base| = 5e-9 <= 1e-8: its "unit vector" is itself, so dot ~ 0 although it is parallel
    other = rand(2)
    base = other / torch.linalg.vector_norm(other) * 5e-9
    out = call("slerp", [other], base, t=0.3)
    assert_close(out, ref_slerp(0.3, base, other))
    assert_close(out, other * math.sin(0.3 * math.pi / 2))


# --- task arithmetic ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("normalize", "lam"), [(False, 1.0), (True, 1.0), (False, 0.5), (True, 2.0)]
)
def test_task_arithmetic_matches_reference(normalize: bool, lam: float) -> None:
    xs, b, weights = [rand(1), rand(2), rand(3)], rand(4), [0.6, 0.3, 0.4]
    out = call("task_arithmetic", xs, b, weight=weights, normalize=normalize, **{"lambda": lam})
    assert_close(out, ref_task_merge(xs, b, weights, normalize=normalize, lam=lam))


def test_normalize_with_weights_summing_to_zero_divides_by_one() -> None:
    b = rand(4)
    x1, x2 = b + 1.0, b - 2.0
    out = call("task_arithmetic", [x1, x2], b, weight=[1.0, -1.0], normalize=True)
    assert_close(out, b + 3.0)  # 1*1 + (-1)*(-2) = 3, divisor sum w = 0 -> 1
    # with consensus: o = [1, 2] both agree (+), agreeing weights 1 + (-1) = 0 -> 1
    out = call("ties", [x1, x2], b, weight=[1.0, -1.0], normalize=True)
    assert_close(out, b + 3.0)


def test_task_arithmetic_zero_task_vectors_give_base() -> None:
    b = rand(4)
    assert torch.equal(call("task_arithmetic", [b.clone(), b.clone()], b, weight=[0.7, 0.6]), b)


@pytest.mark.parametrize("name", ["task_arithmetic", "ties", "dare_linear", "dare_ties"])
def test_lambda_scales_the_merged_task_vector(name: str) -> None:
    xs, b, given, seed = example(name)
    assert b is not None
    one = call(name, xs, b, seed, **given)
    half = call(name, xs, b, seed, **{**given, "lambda": 0.5})
    assert_close(half - b, 0.5 * (one - b))


# --- ties -----------------------------------------------------------------------------------


@pytest.mark.parametrize(("normalize", "rescale"), [(True, False), (False, False), (True, True)])
def test_ties_matches_reference(normalize: bool, rescale: bool) -> None:
    xs, b, weights, densities = (
        [rand(1), rand(2), rand(3)],
        rand(4),
        [0.7, 0.5, 1.2],
        [0.4, 0.6, 0.3],
    )
    keeps = [
        top_k_keep([xv - bv for xv, bv in zip(flat(x), flat(b), strict=True)], dens)
        for x, dens in zip(xs, densities, strict=True)
    ]
    out = call(
        "ties", xs, b, weight=weights, density=densities, normalize=normalize, rescale=rescale
    )
    expected = ref_task_merge(xs, b, weights, keeps, True, normalize, 1.0, rescale)
    assert_close(out, expected)


@pytest.mark.parametrize("density", [0.1, 0.5, 0.53, 0.9])
def test_ties_keeps_exactly_k_entries_with_magnitude_ties(density: float) -> None:
    signs = torch.where(rand(1) > 0, 1.0, -1.0)
    x = signs * torch.tensor([3.0, 3.0, 1.0, 1.0, 1.0] * 6).reshape(SHAPE)  # 12 tied at 3, 18 at 1
    out = call("ties", [x], torch.zeros(SHAPE), weight=1.0, density=density, normalize=False)
    k = int(density * x.numel())
    kept = out != 0
    assert int(kept.sum()) == k
    assert torch.equal(out[kept], x[kept])  # kept entries unchanged
    dropped_max = x[~kept].abs().max() if k < x.numel() else torch.tensor(0.0)
    assert bool((x[kept].abs() >= dropped_max).all())  # never a smaller one kept over a larger


def test_sign_consensus_worked_by_hand() -> None:
    # o_i = w_i d_i; s = sign(sum o_i), 0 -> +; only entries agreeing with s (nonzero) count.
    b = torch.full((5,), 10.0)
    d = [[1.0, -1.0, 1.0, 0.0, 2.0], [2.0, 1.0, -1.0, 0.0, -1.0], [-4.0, 1.0, -1.0, 5.0, 0.0]]
    xs = [b + torch.tensor(v) for v in d]
    w = [0.5, 1.0, 2.0]
    # sums of o: [-5.5, 2.5, -2.5, 10, 0] -> s = [-, +, -, +, +]
    # agreeing sums: [-8, 3, -3, 10, 1]; agreeing weights: [2, 3, 3, 2, 0.5]
    normalized = torch.tensor([6.0, 11.0, 9.0, 15.0, 12.0])
    plain = torch.tensor([2.0, 13.0, 7.0, 20.0, 11.0])
    for name, seed in (("ties", None), ("dare_ties", 0)):
        for int8_mask in (False, True):
            given: dict[str, Any] = {"weight": w, "int8_mask": int8_mask}
            assert_close(call(name, xs, b, seed, normalize=True, **given), normalized)
            assert_close(call(name, xs, b, seed, normalize=False, **given), plain)


def test_ties_int8_mask_gives_identical_result() -> None:
    xs, b, given, _ = example("ties")
    assert torch.equal(call("ties", xs, b, int8_mask=True, **given), call("ties", xs, b, **given))


def test_ties_identical_models_give_that_model() -> None:
    x, b = rand(1), rand(4)
    assert_close(call("ties", [x, x, x], b, weight=[0.2, 0.3, 0.5]), x)


# --- dare -----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["dare_linear", "dare_ties"])
@pytest.mark.parametrize(("normalize", "rescale"), [(False, True), (False, False), (True, True)])
def test_dare_matches_reference(name: str, normalize: bool, rescale: bool) -> None:
    xs, b, weights, densities = (
        [rand(1), rand(2), rand(3)],
        rand(4),
        [0.7, 0.5, 1.2],
        [0.5, 0.7, 0.3],
    )
    # the documented convention: one generator per model, seeded in model order from the
    # tensor's generator, and one torch.rand of the tensor's shape from each
    seeds = torch.randint(0, 2**62, (3,), generator=gen(123), dtype=torch.int64).tolist()
    keeps = [
        flat((torch.rand(SHAPE, generator=gen(s)) < dens).float())
        for s, dens in zip(seeds, densities, strict=True)
    ]
    keep_lists = [[v == 1.0 for v in k] for k in keeps]
    out = call(
        name, xs, b, 123, weight=weights, density=densities, normalize=normalize, rescale=rescale
    )
    expected = ref_task_merge(
        xs, b, weights, keep_lists, name == "dare_ties", normalize, 1.0, rescale
    )
    assert_close(out, expected)


@pytest.mark.parametrize("name", ["dare_linear", "dare_ties"])
def test_dare_is_deterministic_per_seed(name: str) -> None:
    xs, b, given, _ = example(name)
    assert torch.equal(call(name, xs, b, 11, **given), call(name, xs, b, 11, **given))
    assert not torch.equal(call(name, xs, b, 11, **given), call(name, xs, b, 12, **given))


@pytest.mark.parametrize(
    ("name", "reference"), [("dare_linear", "task_arithmetic"), ("dare_ties", "ties")]
)
def test_dare_with_density_one_equals_its_deterministic_counterpart(
    name: str, reference: str
) -> None:
    xs, b, weights = [rand(1), rand(2)], rand(4), [0.8, 0.4]
    rng = gen(3)
    state = rng.get_state()
    for normalize in (False, True):
        params = fill(name, 2, weight=weights, density=1.0, normalize=normalize)
        out = get_method(name).fn(xs, b, params, rng)
        assert torch.equal(out, call(reference, xs, b, weight=weights, normalize=normalize))
    assert torch.equal(rng.get_state(), state)  # density 1 draws nothing


def test_dare_rescale_preserves_l1_norm_and_keep_fraction() -> None:
    x, zero = rand(1, (200, 100)), torch.zeros(200, 100)
    pruned = call("dare_linear", [x], zero, 5, weight=1.0, density=0.3, rescale=False)
    kept = pruned != 0
    assert 0.28 < kept.float().mean().item() < 0.32
    assert torch.equal(pruned[kept], x[kept])
    rescaled = call("dare_linear", [x], zero, 5, weight=1.0, density=0.3)
    assert torch.equal(rescaled != 0, kept)  # same draws
    assert_close(rescaled.abs().sum(), x.abs().sum())


def test_sparsify_masks_directly() -> None:
    d = tensor([v + 0.5 for v in range(-15, 15)])  # -14.5 ... 14.5
    kept = magnitude_mask(d, 0.2)  # k = 6
    assert sorted(d[kept].tolist()) == [-14.5, -13.5, -12.5, 12.5, 13.5, 14.5]
    rng = gen(1)
    state = rng.get_state()
    assert bool(bernoulli_mask(d, 1.0, rng).all())
    assert torch.equal(rng.get_state(), state)  # density >= 1 draws nothing
    want = (torch.rand(SHAPE, generator=gen(1)) < 0.4).float()
    assert torch.equal(bernoulli_mask(d, 0.4, rng), want)  # 1.0 kept, 0.0 dropped


def test_dare_without_generator_is_an_error() -> None:
    xs, b, given, _ = example("dare_linear")
    with pytest.raises(ValueError, match="Generator"):
        call("dare_linear", xs, b, None, **given)
