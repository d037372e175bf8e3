"""Tests for ramplus_tl (RAM+, tensor-local) and its shared step with ram.

The reference below is the formula written plainly: Python floats, loops over entries, the
counts ``S_i`` and ``U_i`` taken by hand, never the module's helpers. Then worked examples
(entries exactly at epsilon, models with no unique entry, all-inactive tensors), properties
(when ramplus_tl is ram to the bit, identical inputs, order of models, the lambda bounds),
declarations and purity. Random inputs come from seeded local generators.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch.testing import assert_close

from merge.methods import get_method
from support import fill

SHAPE = (9, 7)


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def sparse_family(
    seed: int, n: int, p: float = 0.4, shape: tuple[int, ...] = SHAPE, dyadic: bool = False
) -> tuple[list[torch.Tensor], torch.Tensor]:
    """A base and ``n`` fine-tunes that each change a random ``p`` of its entries: unique and
    shared changes mixed. ``dyadic``: every value a multiple of 1/4 (exact sums)."""
    g = gen(seed)
    b = torch.randn(shape, generator=g)
    if dyadic:
        b = torch.round(b * 4) / 4
    xs = []
    for _ in range(n):
        keep = torch.rand(shape, generator=g) < p
        d = torch.randn(shape, generator=g) * keep
        xs.append(b + (torch.round(d * 4) / 4 if dyadic else d * 0.3))
    return xs, b


def call(name: str, xs: list[torch.Tensor], b: torch.Tensor, **given: Any) -> torch.Tensor:
    return get_method(name).fn(xs, b, fill(name, len(xs), **given), None)


def ref_ramplus(
    xs: list[torch.Tensor],
    b: torch.Tensor,
    r: float = 0.1,
    alpha: float = 0.2,
    epsilon: float = 1e-5,
) -> torch.Tensor:
    """``b + sum_i d_i [active_i] ([c = 1] lambda_i + [c > 1] / c)`` entry by entry; lambda_i
    only where model i has a unique entry (elsewhere it multiplies nothing)."""
    base = [float(v) for v in b.reshape(-1).tolist()]
    ds = [[float(v) for v in (x - b).reshape(-1).tolist()] for x in xs]  # float32 d, as defined
    active = [[abs(v) > epsilon for v in d] for d in ds]
    c = [sum(a[p] for a in active) for p in range(len(base))]
    lam: list[float | None] = []
    for a in active:
        unique = sum(1 for p, on in enumerate(a) if on and c[p] == 1)
        shared = sum(1 for p, on in enumerate(a) if on and c[p] > 1)
        rho = shared / max(unique, epsilon) if unique else None
        lam.append(None if rho is None else 1 + r * min(max(rho, 0.0), alpha))
    out = []
    for p, bp in enumerate(base):
        total = 0.0
        for i, d in enumerate(ds):
            if active[i][p]:
                li = lam[i]
                assert c[p] > 1 or li is not None
                total += d[p] * li if c[p] == 1 and li is not None else d[p] / c[p]
        out.append(bp + total)
    return torch.tensor(out, dtype=torch.float64).reshape(b.shape).float()


# --- against the reference ------------------------------------------------------------------


@pytest.mark.parametrize("n", [1, 2, 3, 5])
@pytest.mark.parametrize(
    "given",
    [
        {},
        {"r": 0.5, "alpha": 1.0},
        {"r": 2.0, "alpha": 0.3, "epsilon": 0.1},
        {"r": 0.7, "alpha": 10.0, "epsilon": 0.0},
    ],
)
def test_ramplus_matches_reference(n: int, given: dict[str, Any]) -> None:
    xs, b = sparse_family(200 + n, n)
    assert_close(call("ramplus_tl", xs, b, **given), ref_ramplus(xs, b, **given))


@pytest.mark.parametrize("seed", [210, 211, 212])
def test_ramplus_matches_reference_on_dyadic_values_at_epsilon(seed: int) -> None:
    """Task vectors on a 1/4 grid, epsilon 1/4: many entries exactly at epsilon (inactive)."""
    xs, b = sparse_family(seed, 4, p=0.6, dyadic=True)
    at_epsilon = sum(int(((x - b).abs() == 0.25).sum()) for x in xs)
    assert at_epsilon > 0
    got = call("ramplus_tl", xs, b, r=0.5, alpha=2.0, epsilon=0.25)
    assert_close(got, ref_ramplus(xs, b, r=0.5, alpha=2.0, epsilon=0.25))


def test_ramplus_worked_by_hand() -> None:
    b = torch.ones(6)
    x1 = torch.tensor([2.0, 1.25, 3.0, 1.0, 1.5, 1.0])  # d1 = [1, 1/4, 2, 0, 1/2, 0]
    x2 = torch.tensor([1.0, 1.0, 2.0, 1.0, 0.5, 1.0])  # d2 = [0, 0, 1, 0, -1/2, 0]
    x3 = torch.tensor([1.0, 1.0, 4.0, 1.0, 1.0, 1.25])  # d3 = [0, 0, 3, 0, 0, 1/4]
    # epsilon 1/4: c = [1, 0, 3, 0, 2, 0] (the two 1/4 changes are at epsilon, so inactive);
    # model 1: U = 1, S = 2, rho = 2 -> clamped to alpha 1, lambda = 1 + 0.5 = 1.5;
    # models 2 and 3 have no unique entry. Entry 2: (2 + 1 + 3) / 3; entry 4: (1/2 - 1/2) / 2
    want = torch.tensor([2.5, 1.0, 3.0, 1.0, 1.0, 1.0])
    assert torch.equal(call("ramplus_tl", [x1, x2, x3], b, r=0.5, alpha=1.0, epsilon=0.25), want)
    # epsilon 0: the 1/4 changes are unique too. Model 1: U = 2, S = 2, lambda = 1.5; model 3:
    # U = 1, S = 1, lambda = 1.5; model 2 still has none
    want = torch.tensor([2.5, 1.375, 3.0, 1.0, 1.0, 1.375])
    assert torch.equal(call("ramplus_tl", [x1, x2, x3], b, r=0.5, alpha=1.0, epsilon=0.0), want)
    # alpha 4 leaves rho = 1 unclamped: lambda = 1 + 0.5 * 1 for both
    assert torch.equal(call("ramplus_tl", [x1, x2, x3], b, r=0.5, alpha=4.0, epsilon=0.0), want)


def test_epsilon_is_also_the_ratios_floor() -> None:
    """As in mergekit: rho = S / max(U, epsilon), so epsilon 3 divides one unique entry's
    model by 3."""
    b = torch.zeros(4)
    x1 = torch.tensor([10.0, 10.0, 10.0, 0.0])  # unique at entry 0, shared at 1 and 2
    x2 = torch.tensor([0.0, 10.0, 10.0, 0.0])
    got = call("ramplus_tl", [x1, x2], b, r=1.0, alpha=5.0, epsilon=3.0)
    assert_close(got, torch.tensor([10.0 * (1 + 2 / 3), 10.0, 10.0, 0.0]))


# --- edge cases -----------------------------------------------------------------------------


def test_a_model_that_changes_nothing_contributes_nothing_even_at_epsilon_zero() -> None:
    """mergekit's ratio is 0/0 = NaN there, which turns its whole output tensor into NaN."""
    xs, b = sparse_family(220, 2)
    with_idle = call("ramplus_tl", [*xs, b.clone()], b, r=0.5, alpha=1.0, epsilon=0.0)
    assert torch.isfinite(with_idle).all()
    assert torch.equal(with_idle, call("ramplus_tl", xs, b, r=0.5, alpha=1.0, epsilon=0.0))


def test_all_inactive_gives_the_base_exactly() -> None:
    b = torch.randn(SHAPE, generator=gen(230))
    assert torch.equal(call("ramplus_tl", [b.clone(), b.clone()], b), b)
    small = [b + torch.full(SHAPE, 0.5**12), b - torch.full(SHAPE, 0.5**12)]  # within epsilon
    assert torch.equal(call("ramplus_tl", small, b, epsilon=0.01), b)
    assert torch.equal(call("ramplus_tl", [b.clone()], b, epsilon=0.0), b)


@pytest.mark.parametrize("shape", [(0, 4), (0,)])
def test_empty_tensors(shape: tuple[int, ...]) -> None:
    b = torch.zeros(shape)
    assert call("ramplus_tl", [b.clone(), b.clone()], b).shape == shape


# --- properties -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "n,given", [(1, {"r": 3.0, "alpha": 5.0}), (3, {"r": 0.0}), (3, {"alpha": 0.0})]
)
def test_is_ram_to_the_bit_when_nothing_is_amplified(n: int, given: dict[str, Any]) -> None:
    """One model (every change unique, S = 0), r = 0 or alpha = 0: lambda = 1 everywhere."""
    xs, b = sparse_family(240 + n, n)
    got = call("ramplus_tl", xs, b, epsilon=0.01, **given)
    assert torch.equal(got, call("ram", xs, b, epsilon=0.01))


def test_identical_inputs_share_every_change_so_they_are_ram() -> None:
    """No unique entry: each change is averaged over N equal task vectors, ~ that input."""
    xs, b = sparse_family(250, 1)
    same = [xs[0], xs[0].clone(), xs[0].clone()]
    got = call("ramplus_tl", same, b, r=1.0, alpha=1.0)
    assert torch.equal(got, call("ram", same, b))
    assert_close(got, xs[0])


def test_unique_changes_are_scaled_by_lambda_and_shared_ones_averaged() -> None:
    xs, b = sparse_family(260, 3, p=0.5)
    r, alpha = 0.5, 0.4
    got = call("ramplus_tl", xs, b, r=r, alpha=alpha, epsilon=0.0)
    ds = [x - b for x in xs]
    active = torch.stack([d != 0 for d in ds])
    c = active.sum(0)
    ram = call("ram", xs, b, epsilon=0.0)
    assert torch.equal(got[c != 1], ram[c != 1])
    for i, d in enumerate(ds):
        alone = active[i] & (c == 1)
        shared = active[i] & (c > 1)
        lam = 1 + r * min(int(shared.sum()) / int(alone.sum()), alpha)
        assert 1 < lam <= 1 + r * alpha
        assert torch.equal(got[alone], b[alone] + d[alone] * torch.tensor(lam))


def test_order_of_models_does_not_matter_on_exact_values() -> None:
    xs, b = sparse_family(270, 4, p=0.5, dyadic=True)
    want = call("ramplus_tl", xs, b, r=0.5, alpha=1.0)
    for order in ([3, 2, 1, 0], [1, 3, 0, 2]):
        assert torch.equal(call("ramplus_tl", [xs[i] for i in order], b, r=0.5, alpha=1.0), want)


def test_lambda_is_tensor_local() -> None:
    """The same unique change gets a larger lambda in a tensor where its model shares more."""
    b = torch.zeros(8)
    x1 = torch.tensor([1.0, 1.0, 0, 0, 0, 0, 0, 0])  # unique at 0, shared at 1
    x2 = torch.tensor([0, 1.0, 0, 0, 0, 0, 0, 0])
    few = call("ramplus_tl", [x1, x2], b, r=1.0, alpha=10.0)
    x1[2:] = 1.0
    x2[2:] = 1.0  # now shared at 1..7: S = 7
    many = call("ramplus_tl", [x1, x2], b, r=1.0, alpha=10.0)
    assert (float(few[0]), float(many[0])) == (2.0, 8.0)


# --- declarations, purity -------------------------------------------------------------------


def test_declarations() -> None:
    method = get_method("ramplus_tl")
    assert (method.base, method.min_models, method.max_models, method.random) == (
        "required",
        1,
        None,
        False,
    )
    assert {p.name: (p.per_model, p.kind, p.default) for p in method.params} == {
        "r": (False, float, 0.1),
        "alpha": (False, float, 0.2),
        "epsilon": (False, float, 1e-5),
    }
    assert method.paper == get_method("ram").paper == "https://arxiv.org/abs/2601.13572"
    assert method.description and "\n" not in method.description
    assert method.stream is not None and method.fixes
    for p in method.params:
        assert p.help
        assert p.check(0) is None
        assert p.check(-0.5) == "must be >= 0, got -0.5"


def test_pure_deterministic_float32_same_shape_no_global_rng() -> None:
    xs, b = sparse_family(280, 3)
    before = [x.clone() for x in xs], b.clone()
    state = torch.get_rng_state()
    out = call("ramplus_tl", xs, b, r=0.5, alpha=1.0)
    assert torch.equal(torch.get_rng_state(), state)
    assert out.dtype == torch.float32 and out.shape == b.shape
    assert all(torch.equal(x, x0) for x, x0 in zip(xs, before[0], strict=True))
    assert torch.equal(b, before[1])
    assert torch.equal(out, call("ramplus_tl", xs, b, r=0.5, alpha=1.0))
    with pytest.raises(ValueError, match="ramplus_tl needs a base tensor"):
        get_method("ramplus_tl").fn(xs, None, fill("ramplus_tl", 3), None)
