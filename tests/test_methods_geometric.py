"""Tests for nuslerp, multislerp, karcher, model_stock, sce, ram, nearswap and arcee_fusion.

Each method is checked against a reference written here plainly: Python floats in double
precision, loops over rows and entries, never the module's helpers. Then properties: identical
inputs give that input, endpoints, documented edge cases (zero vectors, cancelling directions,
1-D tensors), determinism, purity. Random inputs come from seeded local generators.
"""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
from torch.testing import assert_close

from merge.methods import REQUIRED, get_method
from merge.methods.pairwise import fusion_importance, iqr_threshold
from merge.methods.spherical import multislerp_check
from support import fill

SHAPE = (6, 5)
NEW = ["arcee_fusion", "karcher", "model_stock", "multislerp", "nearswap", "nuslerp", "ram", "sce"]
Vec = list[float]

# --- helpers --------------------------------------------------------------------------------


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def rand(seed: int, shape: tuple[int, ...] = SHAPE, scale: float = 1.0) -> torch.Tensor:
    return torch.randn(shape, generator=gen(seed)) * scale


def family(seed: int, n: int, shape: tuple[int, ...] = SHAPE) -> tuple[list[torch.Tensor], Any]:
    """A base and ``n`` fine-tunes of it (base + 0.3 noise)."""
    b = rand(seed, shape)
    return [b + rand(seed + 1 + i, shape, 0.3) for i in range(n)], b


def call(
    name: str, xs: list[torch.Tensor], b: torch.Tensor | None, /, **given: Any
) -> torch.Tensor:
    seed = given.pop("seed", 0)
    rng = gen(seed) if get_method(name).random else None
    return get_method(name).fn(xs, b, fill(name, len(xs), **given), rng)


def flat(x: torch.Tensor) -> Vec:
    return [float(v) for v in x.reshape(-1).tolist()]


def rows(x: torch.Tensor) -> list[Vec]:
    return [[float(v) for v in r] for r in x.reshape(-1, x.shape[-1]).tolist()]


def tensor(values: Vec, shape: tuple[int, ...]) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64).reshape(shape).float()


def dot(a: Vec, b: Vec) -> float:
    return sum(p * q for p, q in zip(a, b, strict=True))


def norm(a: Vec) -> float:
    return math.sqrt(dot(a, a))


def sub(a: Vec, b: Vec) -> Vec:
    return [p - q for p, q in zip(a, b, strict=True)]


def lin(*terms: tuple[float, Vec]) -> Vec:
    """``sum c * v`` over (c, v) pairs."""
    out = [0.0] * len(terms[0][1])
    for c, v in terms:
        out = [o + c * e for o, e in zip(out, v, strict=True)]
    return out


def clamp(v: float, lo: float, hi: float) -> float:
    return min(hi, max(lo, v))


# --- references -----------------------------------------------------------------------------


def ref_slerp(t: float, a: Vec, b: Vec) -> Vec:
    na, nb = max(norm(a), 1e-7), max(norm(b), 1e-7)
    cos = clamp(dot(a, b) / (na * nb), -1.0, 1.0)
    th = math.acos(cos)
    if 1 - abs(cos) < 1e-6:
        return lin((1 - t, a), (t, b))
    return lin((math.sin((1 - t) * th) / math.sin(th), a), (math.sin(t * th) / math.sin(th), b))


def ref_nuslerp(
    x0: torch.Tensor,
    x1: torch.Tensor,
    base: torch.Tensor | None,
    w: list[float],
    flatten: bool = True,
    row_wise: bool = False,
) -> torch.Tensor:
    """2-D or 1-D tensors only."""
    t = 0.5 if abs(w[0] + w[1]) < 1e-6 else w[1] / (w[0] + w[1])
    zero = torch.zeros_like(x0)
    a, b = (x0 - (base if base is not None else zero)), (x1 - (base if base is not None else zero))
    if flatten or a.dim() == 1:
        out = tensor(ref_slerp(t, flat(a), flat(b)), tuple(a.shape))
    elif row_wise:  # vectors along dim 0: the columns
        cols = [ref_slerp(t, flat(a[:, j]), flat(b[:, j])) for j in range(a.shape[1])]
        out = tensor([cols[j][i] for i in range(a.shape[0]) for j in range(a.shape[1])], a.shape)
    else:
        out = tensor(
            [v for ra, rb in zip(rows(a), rows(b), strict=True) for v in ref_slerp(t, ra, rb)],
            a.shape,
        )
    return out + base if base is not None else out


def ref_multislerp(
    xs: list[torch.Tensor], base: torch.Tensor | None, w: list[float], normalize: bool = True
) -> torch.Tensor:
    """The spec's steps one by one: unit vectors, mean direction, tangents, exp map, scale."""
    eps = 1e-8
    vs = [flat(x - base) if base is not None else flat(x) for x in xs]
    if normalize:
        w = [wi / sum(w) for wi in w]
    norms = [norm(v) for v in vs]
    units = [[e / (n + eps) for e in v] for v, n in zip(vs, norms, strict=True)]
    mean = lin(*zip(w, units, strict=True))
    if norm(mean) < eps:
        out = lin(*zip(w, vs, strict=True))
    else:
        m = [e / norm(mean) for e in mean]
        tangents = [lin((1.0, u), (-dot(u, m), m)) for u in units]
        v = lin(*zip(w, tangents, strict=True))
        length = norm(v) + eps
        on_sphere = lin((math.cos(length), m), (math.sin(length) / length, v))
        out = [e * dot(w, norms) for e in on_sphere]
    result = tensor(out, tuple(xs[0].shape))
    return result + base if base is not None else result


def ref_karcher(xs: list[torch.Tensor], max_iter: int = 10, tol: float = 1e-5) -> torch.Tensor:
    vs = [flat(x) for x in xs]
    norms = [norm(v) for v in vs]
    units = [[e / n for e in v] for v, n in zip(vs, norms, strict=True) if n > tol]
    mean = lin(*[(1 / len(units), u) for u in units])
    mean = units[0] if norm(mean) < tol else [e / norm(mean) for e in mean]
    for _ in range(max_iter):
        step = [0.0] * len(mean)
        for u in units:
            c = clamp(dot(mean, u), -1.0, 1.0)
            th = math.acos(c)
            if th < tol or math.pi - th < 1e-3:
                continue
            step = lin((1.0, step), (th / math.sin(th) / len(units), lin((1.0, u), (-c, mean))))
        length = norm(step)
        if length < tol:
            break
        mean = lin((math.cos(length), mean), (math.sin(length) / length, step))
        mean = [e / norm(mean) for e in mean]
    return tensor([e * sum(norms) / len(norms) for e in mean], tuple(xs[0].shape))


def ref_model_stock(
    xs: list[torch.Tensor], b: torch.Tensor, filter_wise: bool = False
) -> torch.Tensor:
    n = len(xs)
    as_rows = (lambda x: rows(x)) if filter_wise and b.dim() >= 2 else (lambda x: [flat(x)])
    b_rows, x_rows = as_rows(b), [as_rows(x) for x in xs]
    out = []
    for r, br in enumerate(b_rows):
        ds = [sub(xr[r], br) for xr in x_rows]
        cosines = [
            clamp(dot(ds[i], ds[j]) / max(norm(ds[i]) * norm(ds[j]), 1e-6), -1.0, 1.0)
            for i in range(n)
            for j in range(i + 1, n)
        ]
        cos = sum(cosines) / len(cosines)
        denom = 1 + (n - 1) * cos
        t = n * cos / denom if denom > 1e-6 else 0.0
        avg = lin(*[(1 / n, xr[r]) for xr in x_rows])
        out.extend(lin((t, avg), (1 - t, br)))
    return tensor(out, tuple(b.shape))


def ref_sce(xs: list[torch.Tensor], b: torch.Tensor, topk: float = 1.0) -> torch.Tensor:
    n, bv = len(xs), flat(b)
    d = [sub(flat(x), bv) for x in xs]
    if topk < 1:
        var = []
        for p in range(len(bv)):
            mu = sum(d[i][p] for i in range(n)) / n
            var.append(sum((d[i][p] - mu) ** 2 for i in range(n)) / n)
        k = int(topk * sum(1 for v in var if v != 0))
        keep = set(sorted(range(len(var)), key=lambda p: -var[p])[:k])
        d = [[v if p in keep else 0.0 for p, v in enumerate(di)] for di in d]
    energy = [sum(v * v for v in di) / len(di) for di in d]
    a = [e / sum(energy) for e in energy] if sum(energy) > 0 else [1 / n] * n
    out = []
    for p in range(len(bv)):
        s = 1.0 if sum(d[i][p] for i in range(n)) >= 0 else -1.0
        agree = [d[i][p] != 0 and math.copysign(1.0, d[i][p]) == s for i in range(n)]
        num = sum(a[i] * d[i][p] for i in range(n) if agree[i])
        den = sum(a[i] for i in range(n) if agree[i])
        out.append(bv[p] + num / max(den, 1e-6))
    return tensor(out, tuple(b.shape))


def ref_ram(xs: list[torch.Tensor], b: torch.Tensor, epsilon: float = 1e-5) -> torch.Tensor:
    bv, out = flat(b), []
    ds = [sub(flat(x), bv) for x in xs]
    for p in range(len(bv)):
        active = [d[p] for d in ds if abs(d[p]) > epsilon]
        out.append(bv[p] + (sum(active) / len(active) if active else 0.0))
    return tensor(out, tuple(b.shape))


def ref_nearswap(x: torch.Tensor, b: torch.Tensor, t: float) -> torch.Tensor:
    out = []
    for xv, bv in zip(flat(x), flat(b), strict=True):
        w = clamp(t / max(abs(bv - xv), 1e-6), 0.0, 1.0)
        out.append(w * xv + (1 - w) * bv)
    return tensor(out, tuple(x.shape))


def ref_softmax_eps(r: Vec) -> Vec:
    top = max(r)
    exps = [math.exp(v - top) for v in r]
    return [e / sum(exps) + 1e-8 for e in exps]


def ref_importance(x: torch.Tensor, b: torch.Tensor) -> list[float]:
    out = []
    for rx, rb in zip(rows(x), rows(b), strict=True):
        p, q = ref_softmax_eps(rx), ref_softmax_eps(rb)
        kl = sum(pi * math.log(pi / qi) for pi, qi in zip(p, q, strict=True))
        out.extend(abs(u - v) * kl for u, v in zip(rx, rb, strict=True))
    return out


def ref_threshold(values: list[float]) -> float:
    s = sorted(values)
    q1, med, q3 = (s[int(q * (len(s) - 1))] for q in (0.25, 0.5, 0.75))
    return med + 1.5 * (q3 - q1)


# --- declarations ---------------------------------------------------------------------------

F, B, Int = float, bool, int
SPEC: dict[str, tuple[str, int, int | None, bool, dict[str, tuple[bool, type, Any]]]] = {
    "nuslerp": (
        "optional",
        2,
        2,
        False,
        {
            "weight": (True, F, REQUIRED),
            "nuslerp_flatten": (False, B, True),
            "nuslerp_row_wise": (False, B, False),
        },
    ),
    "multislerp": (
        "optional",
        1,
        None,
        False,
        {
            "weight": (True, F, REQUIRED),
            "normalize_weights": (False, B, True),
            "eps": (False, F, 1e-8),
        },
    ),
    "karcher": ("input", 1, None, False, {"max_iter": (False, Int, 10), "tol": (False, F, 1e-5)}),
    "model_stock": ("required", 2, None, False, {"filter_wise": (False, B, False)}),
    "sce": ("required", 1, None, False, {"select_topk": (False, F, 1.0)}),
    "ram": ("required", 1, None, False, {"epsilon": (False, F, 1e-5)}),
    "nearswap": ("required", 1, 1, False, {"t": (False, F, REQUIRED)}),
    "arcee_fusion": ("required", 1, 1, True, {}),
}


@pytest.mark.parametrize("name", NEW)
def test_declarations_match_the_spec(name: str) -> None:
    method = get_method(name)
    base, low, high, random, params = SPEC[name]
    assert (method.base, method.min_models, method.max_models, method.random) == (
        base,
        low,
        high,
        random,
    )
    assert {p.name: (p.per_model, p.kind, p.default) for p in method.params} == params
    assert method.description and "\n" not in method.description
    assert method.paper and method.paper.startswith("https://")
    per_model, fixed = method.workspace
    assert 0 <= per_model <= 2 and 0 < fixed <= 5


def check(name: str, param: str, value: Any) -> str | None:
    p = get_method(name).param(param)
    assert p is not None
    return p.check(value)


def test_parameter_ranges() -> None:
    assert check("nearswap", "t", 0) == "must be > 0, got 0"
    assert check("sce", "select_topk", 1.5) == "must be in (0, 1], got 1.5"
    assert check("sce", "select_topk", 0.1) is None
    assert check("ram", "epsilon", -1e-3) == "must be >= 0, got -0.001"
    assert check("karcher", "max_iter", 2.5) == "must be an integer, got 2.5"
    assert check("multislerp", "eps", 0) == "must be > 0, got 0"


# --- every method: purity -------------------------------------------------------------------

EXAMPLES: dict[str, dict[str, Any]] = {
    "nuslerp": {"weight": [0.3, 0.7]},
    "multislerp": {"weight": [0.2, 0.3, 0.5]},
    "karcher": {},
    "model_stock": {},
    "sce": {"select_topk": 0.5},
    "ram": {},
    "nearswap": {"t": 0.1},
    "arcee_fusion": {},
}
COUNT = {"nuslerp": 2, "nearswap": 1, "arcee_fusion": 1}


PURITY_CASES = [
    (name, with_base)
    for name in NEW
    for with_base in {"required": [True], "input": [False]}.get(
        get_method(name).base, [True, False]
    )
]


@pytest.mark.parametrize("name,with_base", PURITY_CASES)
def test_pure_no_mutation_float32_same_shape_no_global_rng(name: str, with_base: bool) -> None:
    xs, b = family(10, COUNT.get(name, 3))
    base = b if with_base else None
    before = [x.clone() for x in xs], b.clone()
    state = torch.get_rng_state()
    out = call(name, xs, base, **EXAMPLES[name])
    assert torch.equal(torch.get_rng_state(), state)
    assert out.dtype == torch.float32 and out.shape == xs[0].shape
    assert torch.isfinite(out).all()
    assert all(torch.equal(x, x0) for x, x0 in zip(xs, before[0], strict=True))
    assert torch.equal(b, before[1])


# --- nuslerp --------------------------------------------------------------------------------


@pytest.mark.parametrize("flatten,row_wise", [(True, False), (False, False), (False, True)])
@pytest.mark.parametrize("with_base", [True, False])
@pytest.mark.parametrize("weights", [[0.3, 0.7], [2.0, 1.0], [1.0, -0.25]])
def test_nuslerp_matches_reference(
    flatten: bool, row_wise: bool, with_base: bool, weights: list[float]
) -> None:
    xs, b = family(20, 2)
    base = b if with_base else None
    given = {"weight": weights, "nuslerp_flatten": flatten, "nuslerp_row_wise": row_wise}
    got = call("nuslerp", xs, base, **given)
    assert_close(got, ref_nuslerp(xs[0], xs[1], base, weights, flatten, row_wise))


def test_nuslerp_weight_endpoints_return_the_model_itself() -> None:
    xs, b = family(21, 2)
    for base in (None, b):
        assert torch.equal(call("nuslerp", xs, base, weight=[1.0, 0.0]), xs[0])
        assert torch.equal(call("nuslerp", xs, base, weight=[0.0, 3.0]), xs[1])


def test_nuslerp_weights_summing_to_zero_use_t_one_half() -> None:
    xs, b = family(22, 2)
    half = call("nuslerp", xs, b, weight=[1.0, 1.0])
    assert_close(call("nuslerp", xs, b, weight=[1.0, -1.0]), half)
    assert_close(call("nuslerp", xs, b, weight=[1e-7, 0.0]), half)
    assert not torch.allclose(call("nuslerp", xs, b, weight=[1.0, 3.0]), half)


def test_nuslerp_identical_inputs_and_colinear_inputs() -> None:
    x = rand(23)
    assert_close(call("nuslerp", [x, x.clone()], None, weight=[0.4, 0.6]), x)
    got = call("nuslerp", [x, 2 * x], None, weight=[0.5, 0.5])  # parallel: lerp
    assert_close(got, 1.5 * x)


def test_nuslerp_zero_task_vector_counts_as_orthogonal_no_nan() -> None:
    """A model equal to the base has no direction: th = pi/2, so out = b + sin(t pi/2) d."""
    xs, b = family(24, 1)
    t = 0.25
    for flatten in (True, False):
        given = {"weight": [1 - t, t], "nuslerp_flatten": flatten}
        got = call("nuslerp", [b.clone(), xs[0]], b, **given)
        assert torch.isfinite(got).all()
        assert_close(got, b + math.sin(t * math.pi / 2) * (xs[0] - b))
        both = call("nuslerp", [b.clone(), b.clone()], b, **given)
        assert torch.equal(both, b)


def test_nuslerp_row_wise_is_the_transposed_problem_and_1d_is_one_vector() -> None:
    xs, b = family(25, 2)
    per_col = call(
        "nuslerp", xs, b, weight=[0.3, 0.7], nuslerp_flatten=False, nuslerp_row_wise=True
    )
    transposed = call(
        "nuslerp",
        [x.T.contiguous() for x in xs],
        b.T.contiguous(),
        weight=[0.3, 0.7],
        nuslerp_flatten=False,
    )
    assert_close(per_col, transposed.T)
    vs, vb = family(26, 2, (17,))
    for row_wise in (False, True):
        got = call(
            "nuslerp", vs, vb, weight=[0.3, 0.7], nuslerp_flatten=False, nuslerp_row_wise=row_wise
        )
        assert_close(got, call("nuslerp", vs, vb, weight=[0.3, 0.7]))


# --- multislerp -----------------------------------------------------------------------------


@pytest.mark.parametrize("with_base", [True, False])
@pytest.mark.parametrize("normalize", [True, False])
def test_multislerp_matches_reference(with_base: bool, normalize: bool) -> None:
    xs, b = family(30, 3)
    base = b if with_base else None
    w = [0.5, 1.5, 1.0]
    got = call("multislerp", xs, base, weight=w, normalize_weights=normalize)
    assert_close(got, ref_multislerp(xs, base, w, normalize))


def test_multislerp_length_is_the_weighted_mean_length() -> None:
    xs = [rand(31 + i, scale=1 + i) for i in range(3)]
    got = call("multislerp", xs, None, weight=[1.0, 2.0, 1.0])
    want = (1 * xs[0].norm() + 2 * xs[1].norm() + 1 * xs[2].norm()) / 4
    assert_close(got.norm(), want)


def test_multislerp_identical_and_single_inputs() -> None:
    xs, b = family(32, 1)
    x = xs[0]
    for base in (None, b):
        assert_close(call("multislerp", [x, x.clone(), x.clone()], base, weight=[1.0, 2.0, 3.0]), x)
    assert call("multislerp", [x], b, weight=[1.0]) is x


def test_multislerp_cancelling_directions_fall_back_to_the_weighted_sum() -> None:
    """Task vectors a, -2a and 0: the weighted unit vectors sum to exactly 0, where mergekit
    raises for three models; here the result is the weighted sum of the task vectors."""
    b = torch.round(rand(33) * 4)  # small integers: every difference below is exact
    a = torch.round(rand(34) * 3) + 0.5
    xs, w = [b + a, b - 2 * a, b.clone()], [1.0, 1.0, 5.0]
    got = call("multislerp", xs, b, weight=w)
    assert torch.isfinite(got).all()
    assert_close(got, b - a / 7)
    assert_close(got, ref_multislerp(xs, b, w))
    assert torch.equal(call("multislerp", [b.clone()] * 3, b, weight=[1.0, 1.0, 1.0]), b)


def test_multislerp_check_reports_weights_summing_to_zero() -> None:
    params = {"weight": [1.0, -1.0], "normalize_weights": True, "eps": 1e-8}
    assert multislerp_check(params, ["a", "b"]) == [
        "the weights sum to 0, so normalize_weights cannot divide by them; "
        "change a weight or set normalize_weights: false"
    ]
    assert multislerp_check({**params, "normalize_weights": False}, ["a", "b"]) == []
    assert multislerp_check({**params, "weight": [1.0, 1.0]}, ["a", "b"]) == []


# --- karcher --------------------------------------------------------------------------------


@pytest.mark.parametrize("max_iter", [0, 1, 10])
def test_karcher_matches_reference(max_iter: int) -> None:
    xs = [rand(40 + i, scale=1 + i) for i in range(3)]
    assert_close(call("karcher", xs, None, max_iter=max_iter), ref_karcher(xs, max_iter))


def log_map_residual(mean: torch.Tensor, xs: list[torch.Tensor]) -> float:
    """``|sum_i log_m(u_i)|`` at the unit direction of ``mean``: 0 at the Karcher mean."""
    m = mean.double().flatten() / mean.double().norm()
    total = torch.zeros_like(m)
    for x in xs:
        u = x.double().flatten() / x.double().norm()
        c = float(torch.clamp(u @ m, -1, 1))
        th = math.acos(c)
        if th > 0:
            total += th / math.sin(th) * (u - c * m)
    return float(total.norm())


def test_karcher_converges_to_the_riemannian_mean() -> None:
    xs = [rand(50 + i) + 0.5 * rand(60) for i in range(4)]  # spread directions
    start = call("karcher", xs, None, max_iter=0)
    done = call("karcher", xs, None, max_iter=100, tol=1e-7)
    assert log_map_residual(start, xs) > 1e-2  # the extrinsic mean is not the Karcher mean
    assert log_map_residual(done, xs) < 1e-5
    assert_close(done.norm(), torch.stack([x.norm() for x in xs]).mean())


def test_karcher_of_two_is_the_slerp_midpoint_and_scale_equivariant() -> None:
    a, b = rand(70), rand(71, scale=3)
    got = call("karcher", [a, b], None, max_iter=50, tol=1e-7)
    mid = torch.tensor(
        ref_slerp(
            0.5, [v / a.norm().item() for v in flat(a)], [v / b.norm().item() for v in flat(b)]
        )
    )
    assert_close(got.flatten(), (mid * (a.norm() + b.norm()) / 2).float(), rtol=1e-4, atol=1e-5)
    assert_close(call("karcher", [2.5 * a, 2.5 * b], None), 2.5 * call("karcher", [a, b], None))


def test_karcher_identical_zero_and_opposite_inputs() -> None:
    x = rand(72)
    assert_close(call("karcher", [x, x.clone(), x.clone()], None), x)
    zero = torch.zeros(SHAPE)
    assert torch.equal(call("karcher", [zero, zero.clone()], None), zero)
    # a zero tensor takes no part in the direction but counts in the mean norm
    assert_close(call("karcher", [x, zero], None), x / 2)
    opposite = call("karcher", [x, -x], None)  # no geodesic mean: the first direction, no NaN
    assert torch.isfinite(opposite).all()
    assert_close(opposite, x)


# --- model_stock ----------------------------------------------------------------------------


@pytest.mark.parametrize("n", [2, 3, 5])
@pytest.mark.parametrize("filter_wise", [False, True])
def test_model_stock_matches_reference(n: int, filter_wise: bool) -> None:
    xs, b = family(80 + n, n)
    assert_close(
        call("model_stock", xs, b, filter_wise=filter_wise), ref_model_stock(xs, b, filter_wise)
    )


def test_model_stock_worked_by_hand() -> None:
    """Orthogonal task vectors of equal length: cos 0, t 0, the base. At 60 degrees: cos 1/2,
    N=2: t = 1 / 1.5 = 2/3."""
    b = torch.tensor([1.0, 1.0, 1.0])
    assert_close(
        call("model_stock", [b + torch.tensor([1.0, 0, 0]), b + torch.tensor([0, 1.0, 0])], b), b
    )
    d1, d2 = torch.tensor([1.0, 0, 0]), torch.tensor([0.5, math.sqrt(3) / 2, 0])
    want = (2 / 3) * (b + (d1 + d2) / 2) + (1 / 3) * b
    assert_close(call("model_stock", [b + d1, b + d2], b), want)


def test_model_stock_identical_models_and_zero_task_vectors() -> None:
    xs, b = family(90, 1)
    assert_close(call("model_stock", [xs[0], xs[0].clone(), xs[0].clone()], b), xs[0])
    assert_close(call("model_stock", [b.clone(), b.clone()], b), b)


def test_model_stock_cancelling_directions_keep_the_base() -> None:
    """Mean cosine -1/(N-1): 1 + (N-1) cos = 0; the base is kept (no division by ~0)."""
    b = torch.zeros(3)
    got2 = call(
        "model_stock", [b + torch.tensor([1.0, 2.0, 0.0]), b - torch.tensor([2.0, 4.0, 0.0])], b
    )
    assert torch.isfinite(got2).all()
    assert_close(got2, b)
    s = math.sqrt(3) / 2
    ds = [
        torch.tensor([1.0, 0.0, 0.0]),
        torch.tensor([-0.5, s, 0.0]),
        torch.tensor([-0.5, -s, 0.0]),
    ]
    got3 = call("model_stock", [b + 3 * d for d in ds], b)
    assert torch.isfinite(got3).all()
    assert_close(got3, b)
    # just off the singular point the formula applies (and is large): the guard is narrow
    near = call(
        "model_stock", [b + torch.tensor([1.0, 0.0, 0.0]), b + torch.tensor([-1.0, 0.05, 0.0])], b
    )
    assert (near - b).abs().max() > 10


def test_model_stock_filter_wise_on_1d_is_the_whole_vector() -> None:
    xs, b = family(92, 3, (11,))
    assert_close(call("model_stock", xs, b, filter_wise=True), call("model_stock", xs, b))


# --- sce ------------------------------------------------------------------------------------


@pytest.mark.parametrize("topk", [1.0, 0.5, 0.1])
@pytest.mark.parametrize("n", [1, 3])
def test_sce_matches_reference(topk: float, n: int) -> None:
    xs, b = family(100 + n, n, (8, 7))
    assert_close(call("sce", xs, b, select_topk=topk), ref_sce(xs, b, topk))


def test_sce_identical_models() -> None:
    xs, b = family(110, 1)
    same = [xs[0], xs[0].clone(), xs[0].clone()]
    assert_close(call("sce", same, b), xs[0])
    # no variance anywhere: select_topk keeps no position (as mergekit), leaving the base
    assert_close(call("sce", same, b, select_topk=0.5), b)
    assert_close(call("sce", [b.clone(), b.clone()], b), b)


def test_sce_keeps_exactly_k_positions_with_tied_variances() -> None:
    """Variances (x1/2)^2: 2.25, 1, 1, then four tied at 0.25; 7 nonzero, select_topk 0.6
    keeps int(4.2) = 4: the three largest and the first of the tied ones."""
    b = torch.zeros(10)
    x1 = torch.tensor([1.0, 1, 1, 1, 2, 2, 0, 0, 0, 3])
    got = call("sce", [x1, torch.zeros(10)], b, select_topk=0.6)
    assert torch.equal(got != 0, torch.tensor([1, 0, 0, 0, 1, 1, 0, 0, 0, 1], dtype=torch.bool))
    assert_close(got, x1 * (got != 0))


# --- ram ------------------------------------------------------------------------------------


@pytest.mark.parametrize("epsilon", [1e-5, 0.2])
def test_ram_matches_reference(epsilon: float) -> None:
    xs, b = family(120, 3)
    assert_close(call("ram", xs, b, epsilon=epsilon), ref_ram(xs, b, epsilon))


def test_ram_worked_by_hand() -> None:
    b = torch.tensor([1.0, 1.0, 1.0, 1.0])
    x1 = torch.tensor([1.5, 1.0, 3.0, 1.05])
    x2 = torch.tensor([1.0, 1.0, 2.0, 0.9])
    # entry 0: only x1 changed it; 1: nobody; 2: both, mean; 3: |0.05| below epsilon, so x2's
    want = torch.tensor([1.5, 1.0, 2.5, 0.9])
    assert_close(call("ram", [x1, x2], b, epsilon=0.08), want)
    assert_close(call("ram", [x1, x1.clone()], b), x1)


# --- nearswap -------------------------------------------------------------------------------


@pytest.mark.parametrize("t", [0.01, 0.2, 1.0])
def test_nearswap_matches_reference(t: float) -> None:
    xs, b = family(130, 1)
    assert_close(call("nearswap", xs, b, t=t), ref_nearswap(xs[0], b, t))


def test_nearswap_endpoints() -> None:
    xs, b = family(131, 1)
    assert torch.equal(call("nearswap", xs, b, t=1e6), xs[0])  # every |b - x| <= t: the model
    assert_close(call("nearswap", xs, b, t=1e-9), b, rtol=0, atol=1e-8)  # tiny t: the base
    assert torch.equal(call("nearswap", [b.clone()], b, t=1e-3), b)


# --- arcee_fusion ---------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [140, 141, 142])
@pytest.mark.parametrize("shape", [(16, 12), (40,)])
def test_arcee_fusion_matches_reference(seed: int, shape: tuple[int, ...]) -> None:
    b = rand(seed, shape)
    x = b + rand(seed + 10, shape, 0.5) ** 3  # heavy tails: some entries stand out
    importance = ref_importance(x, b)
    threshold = ref_threshold(importance)
    keep = [v >= threshold for v in importance]
    assert min(abs(v - threshold) for v in importance) > 1e-6 * threshold  # no borderline entry
    want = torch.where(torch.tensor(keep).reshape(shape), x, b)
    got = call("arcee_fusion", [x], b)
    assert torch.equal(got, want)
    assert 0 < sum(keep) < len(keep)


def test_arcee_fusion_kl_is_stable_for_large_weights() -> None:
    b, x = rand(150, (4, 64), 300.0), rand(151, (4, 64), 300.0)
    got = fusion_importance(x, b)
    assert torch.isfinite(got).all()
    assert_close(
        got.double().flatten(),
        torch.tensor(ref_importance(x, b), dtype=torch.float64),
        rtol=1e-4,
        atol=1e-6,
    )


def test_arcee_fusion_identical_inputs_give_the_base() -> None:
    b = rand(152)
    assert torch.equal(call("arcee_fusion", [b.clone()], b), b)


def test_arcee_fusion_samples_quantiles_from_the_generator_only() -> None:
    """Above 1e6 entries the quantiles come from 1e6 draws of the given generator."""
    b = rand(153, (1001, 1000))
    x = b + rand(154, (1001, 1000), 0.1)
    state = torch.get_rng_state()
    one = call("arcee_fusion", [x], b, seed=5)
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(one, call("arcee_fusion", [x], b, seed=5))
    importance = fusion_importance(x, b)
    t5, t6 = iqr_threshold(importance, gen(5)), iqr_threshold(importance, gen(6))
    assert t5 != t6 and t5 == iqr_threshold(importance, gen(5))
    s = importance.flatten().sort().values
    n = s.numel() - 1
    exact = float(s[n // 2] + 1.5 * (s[int(0.75 * n)] - s[int(0.25 * n)]))
    assert abs(t5 - exact) < 0.01 * exact
    with pytest.raises(ValueError, match="needs a generator"):
        iqr_threshold(importance, None)


def test_nuslerp_exactly_opposite_task_vectors_are_lerped() -> None:
    """cos rounds to -1 and sin(acos(-1)) is -8.7e-8 in float32: still the lerp, not noise."""
    gen = torch.Generator().manual_seed(5)
    b = torch.randn(8, 16, generator=gen)
    d = torch.randn(8, 16, generator=gen) * 0.05
    zero = torch.zeros_like(b)
    for flatten in (True, False):
        # exactly opposite (base 0): the lerp at t = 0.5 of d and -d is exactly 0
        out = call("nuslerp", [d, -d], zero, weight=[1.0, 1.0], nuslerp_flatten=flatten)
        assert out.abs().max() < 1e-7, flatten
        # opposite up to the rounding of b + d - b: the base up to that rounding
        out = call("nuslerp", [b + d, b - d], b, weight=[1.0, 1.0], nuslerp_flatten=flatten)
        assert (out - b).abs().max() < 1e-5, flatten
    out = call("nuslerp", [b + d, b - d], b, weight=[3.0, 1.0])
    assert_close(out - b, 0.5 * d, rtol=1e-4, atol=1e-6)  # (1 - t) d - t d at t = 1/4


def test_multislerp_exactly_opposite_pair_falls_back_to_the_weighted_sum() -> None:
    gen = torch.Generator().manual_seed(6)
    b = torch.randn(64, generator=gen)
    d = torch.randn(64, generator=gen) * 0.05
    out = call("multislerp", [b + d, b - d], b, weight=[1.0, 1.0])
    assert (out - b).abs().max() < 1e-6
