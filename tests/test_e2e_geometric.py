"""End to end for nuslerp, multislerp, karcher, model_stock, sce, ram, nearswap, arcee_fusion.

One recipe per method over the tiny Llama fixtures (llama_base and two fine-tunes of it) runs
through ``merge.api.run``; every output tensor is compared with the method's formula computed
here in float64 with plain torch, and the output is loaded with transformers and generates.
Plan-time checks of these methods (model counts, weights summing to 0) are at the end.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from torch import Tensor
from torch.testing import assert_close

import support
from merge import api
from merge.errors import PlanError, RecipeError
from support import run_recipe
from tiny import assert_loads_and_generates, load_state

State = dict[str, Tensor]


def states(*dirs: Path) -> list[State]:
    return support.states(*dirs, dtype=torch.float64)


def check_all(out: Path, formula: Any, *, exact_where: Any = None) -> None:
    """Every output tensor equals ``formula(name)`` (float64, compared at float32 precision);
    ``exact_where(name)`` may return a mask of entries to leave out (borderline decisions)."""
    got = load_state(out)
    assert got
    for name, tensor in got.items():
        want = formula(name)
        if exact_where is not None:
            keep = ~exact_where(name)
            tensor, want = tensor[keep], want[keep]
        assert_close(tensor.double(), want, rtol=2e-5, atol=2e-6, msg=name)
    assert_loads_and_generates(out)


@pytest.fixture
def models(llama_base: Path, llama_ft1: Path, llama_ft2: Path) -> tuple[Path, Path, Path]:
    return llama_base, llama_ft1, llama_ft2


# --- formulas (float64) ---------------------------------------------------------------------


def slerp_rows(t: float, a: Tensor, b: Tensor) -> Tensor:
    """Slerp per row of 2-D ``a`` -> ``b``; norms clamped at 1e-7; lerp where
    1 - |cos| < 1e-6."""
    na = a.norm(dim=-1, keepdim=True).clamp(min=1e-7)
    nb = b.norm(dim=-1, keepdim=True).clamp(min=1e-7)
    cos = ((a * b).sum(-1, keepdim=True) / (na * nb)).clamp(-1, 1)
    th = torch.acos(cos)
    s = torch.sin(th)
    slerped = (torch.sin((1 - t) * th) * a + torch.sin(t * th) * b) / s
    return torch.where(1 - cos.abs() < 1e-6, (1 - t) * a + t * b, slerped)


def as_rows(x: Tensor) -> Tensor:
    return x.reshape(-1, x.shape[-1]) if x.dim() > 1 else x.reshape(1, -1)


# --- one recipe per method ------------------------------------------------------------------


def test_nuslerp_rows_of_task_vectors(tmp_path: Path, models: tuple[Path, Path, Path]) -> None:
    base, ft1, ft2 = models
    out = run_recipe(
        tmp_path,
        {
            "merge_method": "nuslerp",
            "base_model": str(base),
            "models": [
                {"model": str(ft1), "parameters": {"weight": 0.3}},
                {"model": str(ft2), "parameters": {"weight": 0.9}},
            ],
            "parameters": {"nuslerp_flatten": False},
        },
    )
    b, x, y = states(base, ft1, ft2)
    t = 0.9 / 1.2

    def formula(n: str) -> Tensor:
        rows = slerp_rows(t, as_rows(x[n] - b[n]), as_rows(y[n] - b[n]))
        return b[n] + rows.reshape(b[n].shape)

    check_all(out, formula)


def test_nuslerp_flat_without_base(tmp_path: Path, models: tuple[Path, Path, Path]) -> None:
    _, ft1, ft2 = models
    out = run_recipe(
        tmp_path,
        {
            "merge_method": "nuslerp",
            "models": [
                {"model": str(ft1), "parameters": {"weight": 1.0}},
                {"model": str(ft2), "parameters": {"weight": 1.0}},
            ],
        },
    )
    x, y = states(ft1, ft2)
    check_all(
        out, lambda n: slerp_rows(0.5, x[n].reshape(1, -1), y[n].reshape(1, -1)).reshape(x[n].shape)
    )


def test_multislerp_of_task_vectors(tmp_path: Path, models: tuple[Path, Path, Path]) -> None:
    base, ft1, ft2 = models
    out = run_recipe(
        tmp_path,
        {
            "merge_method": "multislerp",
            "base_model": str(base),
            "models": [
                {"model": str(ft1), "parameters": {"weight": 1.0}},
                {"model": str(ft2), "parameters": {"weight": 3.0}},
            ],
        },
    )
    b, x, y = states(base, ft1, ft2)
    w, eps = [0.25, 0.75], 1e-8

    def formula(n: str) -> Tensor:
        vs = [(m[n] - b[n]).flatten() for m in (x, y)]
        norms = [v.norm() for v in vs]
        us = [v / (r + eps) for v, r in zip(vs, norms, strict=True)]
        mean = w[0] * us[0] + w[1] * us[1]
        m = mean / mean.norm()
        tangent = sum(wi * (u - (u @ m) * m) for wi, u in zip(w, us, strict=True))
        length = tangent.norm() + eps
        point = m * torch.cos(length) + tangent * torch.sin(length) / length
        return b[n] + (point * (w[0] * norms[0] + w[1] * norms[1])).reshape(b[n].shape)

    check_all(out, formula)


def test_karcher_takes_base_model_as_an_input(
    tmp_path: Path, models: tuple[Path, Path, Path]
) -> None:
    base, ft1, ft2 = models
    out = run_recipe(
        tmp_path,
        {
            "merge_method": "karcher",
            "base_model": str(base),
            "models": [{"model": str(ft1)}, {"model": str(ft2)}],
            "parameters": {"max_iter": 20, "tol": 1e-7},
        },
    )
    everyone = states(ft1, ft2, base)

    def formula(n: str) -> Tensor:
        units = [s[n].flatten() / s[n].norm() for s in everyone]
        m = sum(units) / len(units)
        m = m / m.norm()
        for _ in range(20):
            step = torch.zeros_like(m)
            for u in units:
                th = torch.acos((u @ m).clamp(-1, 1))
                if th > 1e-7:
                    step += th / torch.sin(th) * (u - (u @ m) * m) / len(units)
            if step.norm() < 1e-7:
                break
            m = torch.cos(step.norm()) * m + torch.sin(step.norm()) * step / step.norm()
            m = m / m.norm()
        mean_norm = sum(s[n].norm() for s in everyone) / len(everyone)
        return (m * mean_norm).reshape(everyone[0][n].shape)

    check_all(out, formula)


def test_model_stock(tmp_path: Path, models: tuple[Path, Path, Path]) -> None:
    base, ft1, ft2 = models
    out = run_recipe(
        tmp_path,
        {
            "merge_method": "model_stock",
            "base_model": str(base),
            "models": [{"model": str(ft1)}, {"model": str(ft2)}, {"model": str(base)}],
        },
    )
    b, x, y = states(base, ft1, ft2)

    def formula(n: str) -> Tensor:
        d1, d2 = (x[n] - b[n]).flatten(), (y[n] - b[n]).flatten()
        cos = (d1 @ d2) / (d1.norm() * d2.norm())
        t = 2 * cos / (1 + cos)
        return t * (x[n] + y[n]) / 2 + (1 - t) * b[n]

    check_all(out, formula)


def test_sce_with_variance_selection(tmp_path: Path, models: tuple[Path, Path, Path]) -> None:
    base, ft1, ft2 = models
    out = run_recipe(
        tmp_path,
        {
            "merge_method": "sce",
            "base_model": str(base),
            "models": [{"model": str(ft1)}, {"model": str(ft2)}],
            "parameters": {"select_topk": 0.3},
        },
    )
    b, x, y = states(base, ft1, ft2)
    cuts: dict[str, tuple[Tensor, float]] = {}

    def formula(n: str) -> Tensor:
        d = torch.stack([(x[n] - b[n]).flatten(), (y[n] - b[n]).flatten()])
        var = d.var(dim=0, unbiased=False)
        k = int(0.3 * int((var != 0).sum()))
        order = var.argsort(descending=True)
        cuts[n] = (var, float(var[order[k - 1]]) if k else math.inf)
        keep = torch.zeros_like(var, dtype=torch.bool)
        keep[order[:k]] = True
        d = d * keep
        energy = (d**2).mean(dim=1)
        a = energy / energy.sum() if energy.sum() > 0 else torch.full_like(energy, 0.5)
        sign = torch.where(d.sum(0) >= 0, 1.0, -1.0)
        agree = (torch.sign(d) == sign).double() * a[:, None]
        merged = (agree * d).sum(0) / agree.sum(0).clamp(min=1e-6)
        return b[n] + merged.reshape(b[n].shape)

    def borderline(n: str) -> Tensor:  # positions whose variance is within rounding of the cut
        var, cut = cuts[n]
        return ((var - cut).abs() <= 1e-4 * cut).reshape(b[n].shape)

    check_all(out, formula, exact_where=borderline)


def test_ram(tmp_path: Path, models: tuple[Path, Path, Path]) -> None:
    base, ft1, ft2 = models
    out = run_recipe(
        tmp_path,
        {
            "merge_method": "ram",
            "base_model": str(base),
            "models": [{"model": str(ft1)}, {"model": str(ft2)}],
            "parameters": {"epsilon": 0.02},
        },
    )
    raw = [{k: v for k, v in load_state(p).items()} for p in (base, ft1, ft2)]

    def formula(n: str) -> Tensor:
        b = raw[0][n].double()
        ds = [(m[n] - raw[0][n]).double() for m in raw[1:]]  # float32 task vectors, as defined
        active = [d.abs() > 0.02 for d in ds]
        total = sum(d * a for d, a in zip(ds, active, strict=True))
        count = sum(a.double() for a in active)
        return b + total / count.clamp(min=1)

    check_all(out, formula)
    got, name = load_state(out), "model.layers.2.mlp.down_proj.weight"
    changed = [(m[name] - raw[0][name]).abs() > 0.02 for m in raw[1:]]
    assert bool((changed[0] & changed[1]).any()) and bool((~changed[0] & ~changed[1]).any())
    assert torch.equal(
        got[name][~changed[0] & ~changed[1]], raw[0][name][~changed[0] & ~changed[1]]
    )


def test_nearswap(tmp_path: Path, models: tuple[Path, Path, Path]) -> None:
    base, ft1, _ = models
    out = run_recipe(
        tmp_path,
        {
            "merge_method": "nearswap",
            "base_model": str(base),
            "models": [{"model": str(ft1)}],
            "parameters": {"t": 0.01},
        },
    )
    b, x = states(base, ft1)

    def formula(n: str) -> Tensor:
        w = (0.01 / (b[n] - x[n]).abs().clamp(min=1e-6)).clamp(0, 1)
        return w * x[n] + (1 - w) * b[n]

    check_all(out, formula)


def test_arcee_fusion(tmp_path: Path, models: tuple[Path, Path, Path]) -> None:
    base, ft1, _ = models
    out = run_recipe(
        tmp_path,
        {
            "merge_method": "arcee_fusion",
            "base_model": str(base),
            "models": [{"model": str(ft1)}],
        },
    )
    b, x = states(base, ft1)
    near: dict[str, Tensor] = {}
    kept = 0

    def formula(n: str) -> Tensor:
        nonlocal kept
        p = torch.softmax(x[n], dim=-1) + 1e-8
        q = torch.softmax(b[n], dim=-1) + 1e-8
        kl = (p * torch.log(p / q)).sum(-1, keepdim=True)
        importance = (x[n] - b[n]).abs() * kl
        s = importance.flatten().sort().values
        last = s.numel() - 1
        q1, med, q3 = (s[int(f * last)] for f in (0.25, 0.5, 0.75))
        threshold = med + 1.5 * (q3 - q1)
        near[n] = (importance - threshold).abs() <= 1e-4 * threshold.abs() + 1e-12
        keep = importance >= threshold
        kept += int(keep.sum())
        return torch.where(keep, x[n], b[n])

    check_all(out, formula, exact_where=lambda n: near[n])
    assert kept > 0


# --- plan-time checks -----------------------------------------------------------------------


def plan_problem(tmp_path: Path, recipe: dict[str, Any]) -> str:
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    with pytest.raises((RecipeError, PlanError)) as info:
        api.plan(path)
    return str(info.value)


def test_plan_rejects_wrong_model_counts_and_zero_weight_sums(
    tmp_path: Path, models: tuple[Path, Path, Path]
) -> None:
    base, ft1, ft2 = models
    three = [{"model": str(m), "parameters": {"weight": 1.0}} for m in (base, ft1, ft2)]
    msg = plan_problem(tmp_path, {"merge_method": "nuslerp", "models": three})
    assert "nuslerp takes exactly 2 model(s), got 3" in msg
    msg = plan_problem(
        tmp_path,
        {"merge_method": "model_stock", "base_model": str(base), "models": [{"model": str(ft1)}]},
    )
    assert "model_stock takes at least 2 model(s) besides the base model, got 1" in msg
    msg = plan_problem(
        tmp_path,
        {"merge_method": "nearswap", "base_model": str(base), "models": [{"model": str(ft1)}]},
    )
    assert "nearswap needs the global parameter 't'" in msg
    zero_sum = {
        "merge_method": "multislerp",
        "models": [
            {"model": str(ft1), "parameters": {"weight": 1.0}},
            {"model": str(ft2), "parameters": {"weight": [1.0, -1.0]}},
        ],
    }
    msg = plan_problem(tmp_path, zero_sum)
    assert (  # one line for the 9 tensors of layer 3
        "tensor 'model.layers.3.input_layernorm.weight' and 8 other tensors: the weights sum to "
        "0, so normalize_weights cannot divide by them; change a weight or set "
        "normalize_weights: false"
    ) in msg
    assert "model.layers.0." not in msg  # layer 0 has weights 1 and 1


def test_nuslerp_base_listed_among_models_is_the_separate_base(
    tmp_path: Path, models: tuple[Path, Path, Path]
) -> None:
    """mergekit recipes often list the base under models too (with a weight): it is the base."""
    base, ft1, ft2 = models
    path = tmp_path / "listed.yaml"
    recipe = {
        "merge_method": "nuslerp",
        "base_model": str(base),
        "models": [
            {"model": str(m), "parameters": {"weight": w}}
            for m, w in ((ft1, 0.6), (ft2, 0.2), (base, 1.0))
        ],
    }
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    plan = api.plan(path)
    job = next(j for j in plan.jobs if j.name == "model.layers.1.mlp.up_proj.weight")
    assert [i.model for i in job.inputs] == [str(ft1), str(ft2)]
    assert job.base is not None and job.base.model == str(base)
    assert job.params["weight"] == [0.6, 0.2]
