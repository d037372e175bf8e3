"""breadcrumbs, breadcrumbs_ties, della, della_linear and the ``rescale`` modes.

References below are plain Python over lists of floats (sorting with ``sorted``, ranks by
hand) and never call the module's helpers. Random masks are reproduced from the documented
convention: one ``torch.rand(shape, generator)`` per model, in model order, kept where the
draw is below the entry's keep probability.
"""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
from torch.testing import assert_close

from merge.methods import REQUIRED, get_method
from merge.methods.sparsify import rank_keep_probability
from merge.methods.task_family import della_check
from support import fill

SHAPE = (6, 5)
NEW = ["breadcrumbs", "breadcrumbs_ties", "della", "della_linear"]
SPARSE = ["ties", "dare_linear", "dare_ties", *NEW]
RESCALES: list[bool | str] = [False, True, "l1", "inverse_density"]


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def rand(seed: int, shape: tuple[int, ...] = SHAPE) -> torch.Tensor:
    return torch.randn(shape, generator=gen(seed))


def flat(x: torch.Tensor) -> list[float]:
    return [float(v) for v in x.reshape(-1).tolist()]


def call(name: str, xs: list[torch.Tensor], b: torch.Tensor, seed: int | None = None, /, **given):
    rng = gen(seed) if seed is not None else None
    return get_method(name).fn(xs, b, fill(name, len(xs), **given), rng)


# --- plain references -----------------------------------------------------------------------


def ref_band_keep(d: list[float], density: float, gamma: float) -> list[bool]:
    """METHODS.md: sort |d| ascending; drop the top int(gamma n) and the bottom
    n - int(density n) - int(gamma n) (if negative, drop fewer from the top)."""
    n = len(d)
    order = sorted(range(n), key=lambda j: abs(d[j]))
    keep, top = int(density * n), int(gamma * n)
    bottom = n - keep - top
    if bottom < 0:
        top += bottom
        bottom = 0
    chosen = set(order[bottom : n - top])
    return [j in chosen for j in range(n)]


def ref_della_probs(d: torch.Tensor, density: float, epsilon: float) -> list[float]:
    """Rank |d| ascending within each row of the last dim (ties: lower index first), rank
    r of n normalised as r / (n - 1) (0.5 for n = 1), p = density - eps + 2 eps rank."""
    width = d.shape[-1] if d.dim() > 1 else d.numel()
    values = flat(d)
    probs = []
    for start in range(0, len(values), width):
        row = values[start : start + width]
        order = sorted(range(width), key=lambda j: (abs(row[j]), j))
        rank = [0.0] * width
        for r, j in enumerate(order):
            rank[j] = r / (width - 1) if width > 1 else 0.5
        probs += [density - epsilon + 2 * epsilon * rank[j] for j in range(width)]
    return probs


def ref_merge(
    xs: list[torch.Tensor],
    b: torch.Tensor,
    weights: list[float],
    keeps: list[list[bool]],
    probs: list[list[float]],
    consensus: bool,
    normalize: bool,
    rescale: bool | str,
    lam: float = 1.0,
) -> torch.Tensor:
    """The task-vector formula element by element; ``probs[i][j]``: the keep probability
    (or kept fraction) that inverse_density divides by."""
    bf = flat(b)
    es = []
    for i, x in enumerate(xs):
        d = [xv - bv for xv, bv in zip(flat(x), bf, strict=True)]
        e = [dv if keeps[i][j] else 0.0 for j, dv in enumerate(d)]
        kept_l1 = sum(abs(v) for v in e)
        if rescale in (True, "l1") and kept_l1 != 0:
            e = [v * sum(abs(v) for v in d) / kept_l1 for v in e]
        elif rescale == "inverse_density":
            e = [v / probs[i][j] if v != 0 else 0.0 for j, v in enumerate(e)]
        es.append(e)
    out = []
    for j in range(len(bf)):
        o = [w * e[j] for w, e in zip(weights, es, strict=True)]
        s = 1.0 if sum(o) >= 0 else -1.0
        m = [1.0 if not consensus or (ov != 0 and math.copysign(1.0, ov) == s) else 0.0 for ov in o]
        combined = sum(mi * ov for mi, ov in zip(m, o, strict=True))
        divisor = sum(mi * w for mi, w in zip(m, weights, strict=True))
        if normalize:
            combined /= divisor if divisor != 0 else 1.0
        out.append(bf[j] + lam * combined)
    return torch.tensor(out, dtype=torch.float32).reshape(b.shape)


def deltas(xs: list[torch.Tensor], b: torch.Tensor) -> list[list[float]]:
    return [[xv - bv for xv, bv in zip(flat(x), flat(b), strict=True)] for x in xs]


# --- declarations ---------------------------------------------------------------------------

W = (True, float, REQUIRED)
D = (True, float, 1.0)
COMMON = {"weight": W, "density": D, "lambda": (False, float, 1.0)}
COMMON["int8_mask"] = (False, bool, False)


@pytest.mark.parametrize(
    ("name", "extra", "normalize", "rescale", "random"),
    [
        ("breadcrumbs", {"gamma": (True, float, 0.01)}, False, False, False),
        ("breadcrumbs_ties", {"gamma": (True, float, 0.01)}, False, False, False),
        ("della", {"epsilon": (True, float, 0.15)}, True, True, True),
        ("della_linear", {"epsilon": (True, float, 0.15)}, False, True, True),
    ],
)
def test_declarations_match_methods_md(
    name: str, extra: dict, normalize: bool, rescale: bool, random: bool
) -> None:
    m = get_method(name)
    declared = {p.name: (p.per_model, p.kind, p.default) for p in m.params}
    assert declared == {
        **COMMON,
        **extra,
        "normalize": (False, bool, normalize),
        "rescale": (False, bool, rescale),
    }
    assert (m.base, m.min_models, m.max_models, m.random) == ("required", 1, None, random)
    assert m.paper in ("https://arxiv.org/abs/2312.06795", "https://arxiv.org/abs/2406.11617")
    assert bool(m.fixes) == name.startswith("breadcrumbs")
    assert (m.check is not None) == name.startswith("della")
    per_model, fixed = m.workspace
    assert per_model >= 1 and fixed >= 2


@pytest.mark.parametrize("name", SPARSE)
def test_rescale_accepts_the_new_choices(name: str) -> None:
    p = get_method(name).param("rescale")
    assert p is not None
    for ok in (True, False, "l1", "inverse_density"):
        assert p.check(ok) is None
    assert p.check("l2") == "must be true, false, l1 or inverse_density, got 'l2'"
    assert p.check(1) == "must be true, false, l1 or inverse_density, got 1"


def test_gamma_and_epsilon_ranges() -> None:
    gamma = get_method("breadcrumbs").param("gamma")
    epsilon = get_method("della").param("epsilon")
    assert gamma is not None and epsilon is not None
    assert gamma.check(0) is None and gamma.check(1) is None
    assert gamma.check(-0.1) == "must be in [0, 1], got -0.1"
    assert epsilon.check(0) is None and epsilon.check(0.49) is None
    assert epsilon.check(0.5) == "must be in [0, 0.5), got 0.5"


# --- breadcrumbs ----------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["breadcrumbs", "breadcrumbs_ties"])
@pytest.mark.parametrize("rescale", RESCALES)
@pytest.mark.parametrize("normalize", [False, True])
def test_breadcrumbs_matches_reference(name: str, rescale: bool | str, normalize: bool) -> None:
    xs, b = [rand(1), rand(2), rand(3)], rand(4)
    weights, densities, gammas = [0.7, -0.5, 1.2], [0.45, 0.62, 0.9], [0.1, 0.0, 0.2]
    keeps = [
        ref_band_keep(d, dens, g)
        for d, dens, g in zip(deltas(xs, b), densities, gammas, strict=True)
    ]
    assert [sum(k) for k in keeps] == [13, 18, 27]  # kept fractions differ from density
    fractions = [[sum(k) / len(k)] * len(k) for k in keeps]
    out = call(
        name,
        xs,
        b,
        weight=weights,
        density=densities,
        gamma=gammas,
        normalize=normalize,
        rescale=rescale,
    )
    consensus = name == "breadcrumbs_ties"
    want = ref_merge(xs, b, weights, keeps, fractions, consensus, normalize, rescale)
    assert_close(out, want)


@pytest.mark.parametrize(("density", "gamma"), [(0.3, 0.1), (0.5, 0.2), (0.8, 0.3), (0.2, 0.0)])
def test_breadcrumbs_keeps_exact_counts_with_tied_magnitudes(density: float, gamma: float) -> None:
    signs = torch.where(rand(5, (8, 10)) > 0, 1.0, -1.0)
    levels = torch.tensor([4.0, 4.0, 3.0, 3.0, 3.0, 2.0, 2.0, 2.0, 1.0, 1.0] * 8).reshape(8, 10)
    x = signs * levels
    out = call("breadcrumbs", [x], torch.zeros(8, 10), weight=1.0, density=density, gamma=gamma)
    n = x.numel()
    keep, top = int(density * n), int(gamma * n)
    top = min(top, n - keep)
    kept = out != 0
    assert int(kept.sum()) == keep
    assert torch.equal(out[kept], x[kept])
    band = sorted((abs(v) for v in flat(x)), reverse=True)[top : top + keep]
    assert sorted(flat(x[kept].abs()), reverse=True) == band


def test_breadcrumbs_fix_small_tensors_keep_their_band_not_zeros() -> None:
    """int(gamma n) == 0: mergekit keeps sorted[n_bot:-0] (nothing); we drop no top entry."""
    b = torch.zeros(32)  # like a norm vector: 32 * 0.01 rounds to 0
    x = torch.linspace(-1.6, 1.5, 32)
    out = call("breadcrumbs", [x], b, weight=1.0, density=0.5)
    kept = out != 0
    assert int(kept.sum()) == 16
    assert torch.equal(out[kept], x[kept])
    assert bool((x[kept].abs() >= x[~kept].abs().max()).all())  # the 16 largest
    # the same tensor with gamma large enough to matter drops the very largest
    out = call("breadcrumbs", [x], b, weight=1.0, density=0.5, gamma=0.1)
    assert int((out != 0).sum()) == 16 and float(out[0]) == 0.0  # |-1.6| was the largest


def test_breadcrumbs_density_one_keeps_everything() -> None:
    xs, b = [rand(1), rand(2)], rand(4)
    want = call("ties", xs, b, weight=[0.3, 0.6], normalize=False)
    got = call("breadcrumbs_ties", xs, b, weight=[0.3, 0.6], density=1.0, gamma=0.5)
    assert torch.equal(got, want)  # density 1 means keep everything (as mergekit)


# --- della ----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["della", "della_linear"])
@pytest.mark.parametrize("rescale", RESCALES)
@pytest.mark.parametrize("shape", [(6, 5), (30,), (2, 3, 5)])
def test_della_matches_reference(name: str, rescale: bool | str, shape: tuple[int, ...]) -> None:
    xs, b = [rand(1, shape), rand(2, shape), rand(3, shape)], rand(4, shape)
    weights, densities, epsilons = [0.7, 0.5, 1.2], [0.5, 0.3, 0.7], [0.2, 0.1, 0.25]
    seeds = torch.randint(0, 2**62, (3,), generator=gen(99), dtype=torch.int64).tolist()
    keeps, probs = [], []
    for x, dens, eps, seed in zip(xs, densities, epsilons, seeds, strict=True):
        p = ref_della_probs(x - b, dens, eps)
        u = flat(torch.rand(shape, generator=gen(seed)))
        keeps.append([uj < pj for uj, pj in zip(u, p, strict=True)])
        probs.append(p)
    normalize = name == "della"
    out = call(
        name,
        xs,
        b,
        99,
        weight=weights,
        density=densities,
        epsilon=epsilons,
        normalize=normalize,
        rescale=rescale,
    )
    want = ref_merge(xs, b, weights, keeps, probs, name == "della", normalize, rescale)
    assert_close(out, want)


def test_della_rows_worked_by_hand() -> None:
    d = torch.tensor([[3.0, -1.0, 2.0, 0.5], [0.0, 0.0, 1.0, -5.0]])
    p = rank_keep_probability(d, 0.5, 0.15)
    # ranks by |d| ascending: row 0 -> [3, 1, 2, 0]; row 1 (0 == 0: index order) -> [0, 1, 2, 3]
    want = torch.tensor([[0.65, 0.45, 0.55, 0.35], [0.35, 0.45, 0.55, 0.65]])
    assert_close(p, want)
    assert_close(
        rank_keep_probability(torch.tensor([[7.0], [-1.0]]), 0.4, 0.1), torch.full((2, 1), 0.4)
    )
    assert_close(
        rank_keep_probability(torch.tensor([2.0, -9.0, 0.1]), 0.5, 0.2),
        torch.tensor([0.5, 0.7, 0.3]),
    )


def test_della_keep_probabilities_are_monotone_and_average_density() -> None:
    d = rand(7, (16, 50))
    density, eps = 0.4, 0.15
    p = rank_keep_probability(d, density, eps)
    for row_d, row_p in zip(d, p, strict=True):
        order = row_d.abs().argsort()
        assert bool((row_p[order].diff() > 0).all())  # strictly increasing with |d|
        assert_close(row_p.mean(), torch.tensor(density))
        assert_close(row_p.min(), torch.tensor(density - eps))
        assert_close(row_p.max(), torch.tensor(density + eps))
    assert torch.equal(d, rand(7, (16, 50)))  # input untouched


def test_della_keep_rates_follow_the_probabilities() -> None:
    x, zero = rand(8, (400, 100)), torch.zeros(400, 100)
    out = call("della_linear", [x], zero, 3, weight=1.0, density=0.4, epsilon=0.2, rescale=False)
    kept = out != 0
    assert torch.equal(out[kept], x[kept])
    assert abs(kept.float().mean().item() - 0.4) < 0.01
    ranks = x.abs().argsort(dim=-1).argsort(dim=-1)  # 0 = smallest in its row
    low, high = kept[ranks < 10].float().mean().item(), kept[ranks >= 90].float().mean().item()
    assert abs(low - 0.22) < 0.02 and abs(high - 0.58) < 0.02  # p ~ 0.2 + 0.4 * rank / 99


@pytest.mark.parametrize(
    ("della_name", "dare_name"), [("della_linear", "dare_linear"), ("della", "dare_ties")]
)
def test_della_with_epsilon_zero_draws_dares_mask(della_name: str, dare_name: str) -> None:
    xs, b = [rand(1), rand(2)], rand(4)
    given: dict[str, Any] = {"weight": [0.6, 0.8], "density": [0.3, 0.7], "normalize": True}
    got = call(della_name, xs, b, 5, epsilon=0.0, **given)
    assert torch.equal(got, call(dare_name, xs, b, 5, **given))


@pytest.mark.parametrize(
    ("name", "reference"), [("della_linear", "task_arithmetic"), ("della", "ties")]
)
def test_della_density_one_keeps_all_and_draws_nothing(name: str, reference: str) -> None:
    xs, b = [rand(1), rand(2)], rand(4)
    rng = gen(3)
    state = rng.get_state()
    params = fill(name, 2, weight=[0.8, 0.4], density=1.0, epsilon=0.3, normalize=True)
    out = get_method(name).fn(xs, b, params, rng)
    assert torch.equal(out, call(reference, xs, b, weight=[0.8, 0.4], normalize=True))
    assert torch.equal(rng.get_state(), state)


def test_della_bounds() -> None:
    params = fill("della", 3, weight=1.0, density=[0.9, 0.5, 0.1], epsilon=[0.15, 0.15, 0.1])
    assert della_check(params, ["a", "b", "c"]) == [
        "density +/- epsilon must be in (0, 1) for model 'a', got density 0.9 and epsilon 0.15 "
        "(use epsilon < 0.1)",
        "density +/- epsilon must be in (0, 1) for model 'c', got density 0.1 and epsilon 0.1 "
        "(use epsilon < 0.1)",
    ]
    ok = fill("della", 2, weight=1.0, density=[1.0, 0.5], epsilon=[0.3, 0.49])
    assert della_check(ok, ["a", "b"]) == []  # density 1 keeps everything, needs no bound
    xs, b = [rand(1)], rand(4)
    with pytest.raises(ValueError, match=r"density \+/- epsilon must be in \(0, 1\)"):
        call("della", xs, b, 1, weight=1.0, density=0.9, epsilon=0.15)
    with pytest.raises(ValueError, match="Generator"):
        call("della", xs, b, None, weight=1.0, density=0.5)


# --- rescale --------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["ties", "dare_linear", "breadcrumbs", "della_linear"])
def test_rescale_modes_on_one_model(name: str) -> None:
    """Same mask in every mode; l1 restores |d|_1, inverse_density divides by the keep
    probability: density (dare), kept fraction k/n (ties, breadcrumbs), p per entry (della)."""
    x, zero = rand(6, (20, 29)), torch.zeros(20, 29)
    given: dict[str, Any] = {"weight": 1.0, "density": 0.33, "normalize": False}
    seed = 4 if get_method(name).random else None
    plain = call(name, [x], zero, seed, rescale=False, **given)
    kept = plain != 0
    assert torch.equal(plain[kept], x[kept]) and 0 < int(kept.sum()) < x.numel()
    l1 = call(name, [x], zero, seed, rescale="l1", **given)
    assert torch.equal(l1, call(name, [x], zero, seed, rescale=True, **given))
    assert torch.equal(l1 != 0, kept)
    assert_close(l1.abs().sum(), x.abs().sum())
    inverse = call(name, [x], zero, seed, rescale="inverse_density", **given)
    assert torch.equal(inverse != 0, kept)
    if name == "della_linear":
        keep = torch.tensor(ref_della_probs(x, 0.33, 0.15)).reshape(x.shape)[kept]
    elif name == "dare_linear":
        keep = torch.tensor(0.33)
    else:
        keep = torch.tensor(int(0.33 * 580) / 580)  # 191 / 580, not 0.33
    assert_close(inverse[kept], x[kept] / keep)


# --- every new method: purity, determinism, lambda -------------------------------------------


@pytest.mark.parametrize("name", NEW)
@pytest.mark.parametrize("rescale", RESCALES)
def test_pure_deterministic_no_global_rng(name: str, rescale: bool | str) -> None:
    xs, b = [rand(1), rand(2), rand(3)], rand(4)
    given: dict[str, Any] = {"weight": [0.5, 0.3, 0.9], "density": [0.5, 0.6, 0.7]}
    before = [x.clone() for x in xs], b.clone()
    state = torch.get_rng_state()
    seed = 7 if get_method(name).random else None
    out = call(name, xs, b, seed, rescale=rescale, **given)
    assert torch.equal(torch.get_rng_state(), state)
    assert out.dtype == torch.float32 and out.shape == SHAPE
    assert all(torch.equal(x, x0) for x, x0 in zip(xs, before[0], strict=True))
    assert torch.equal(b, before[1])
    assert torch.equal(out, call(name, xs, b, seed, rescale=rescale, **given))
    if seed is not None:
        assert not torch.equal(out, call(name, xs, b, seed + 1, rescale=rescale, **given))
    half = call(name, xs, b, seed, rescale=rescale, **{**given, "lambda": 0.5})
    assert_close(half - b, 0.5 * (out - b))
