"""Chunked merging (merge.methods.stream): any chunk size gives the same output as one chunk,
exact cuts across chunks keep exactly k with ties in flattened order, and the executor's
streamed path writes the same bytes as the whole-tensor path."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from test_parallel import recipes, shard_bytes

import merge.methods.stream as stream
from merge import api
from merge.memory import streamed
from merge.methods import get_method
from merge.methods.radix import magnitude_bits
from merge.methods.stream import Cut, chunk_bounds, float64_sum
from support import run_recipe

SHAPE = (37, 11)  # 407 entries: chunks of 7 and 64 entries split rows and leave a short tail


def tensors(seed: int, n: int, quantized: bool = False) -> tuple[list[torch.Tensor], torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(SHAPE, generator=g)
    xs = [base + torch.randn(SHAPE, generator=g) for _ in range(n)]
    if quantized:  # few distinct magnitudes: many exact ties at every cut
        xs = [base + torch.round(x - base) / 4 for x in xs]
    return xs, base


# every method whose ``fn`` runs its stream (``stream.whole``); linear's stream is its plain
# elementwise function, covered by the executor tests (streamed vs the whole-tensor path)
CASES: list[tuple[str, dict[str, Any], bool]] = [
    ("slerp", {"t": 0.3}, True),
    ("task_arithmetic", {"weight": [0.7, -0.4, 1.1], "normalize": False, "lambda": 0.9}, True),
    ("ties", {"density": [0.3, 0.5, 0.71]}, True),
    ("ties", {"density": [0.3, 0.5, 0.71], "rescale": "inverse_density"}, True),
    ("dare_ties", {"density": [0.3, 0.5, 0.7], "rescale": "inverse_density"}, True),
    ("dare_linear", {"density": [0.3, 0.5, 0.7], "rescale": False}, True),
    ("dare_ties", {"density": [0.3, 0.5, 0.7]}, False),  # l1: float64 sums over chunks
    ("ties", {"density": [0.3, 0.5, 0.71], "rescale": "l1"}, False),  # l1 after the cuts
    ("breadcrumbs_ties", {"density": [0.4, 0.6, 0.5], "rescale": "l1"}, False),
    ("breadcrumbs", {"density": [0.4, 0.6, 0.5], "gamma": [0.05, 0.1, 0.0]}, True),
    ("breadcrumbs_ties", {"density": [0.4, 0.6, 0.5], "gamma": [0.05, 0.1, 0.2]}, True),
    ("della", {"density": [0.4, 0.6, 0.5], "epsilon": [0.1, 0.2, 0.3]}, False),
    ("della_linear", {"density": [0.4, 0.6, 0.5], "rescale": False}, True),
    ("model_stock", {"filter_wise": False}, False),  # float64 sums over chunks
    ("model_stock", {"filter_wise": True}, True),  # whole rows: each chunk on its own
    ("sce", {"select_topk": 0.4}, False),  # exact variance cut, float64 energies
    ("sce", {"select_topk": 1.0}, False),
    ("ramplus_tl", {"r": 0.5, "alpha": 1.0, "epsilon": 0.5}, True),  # exact counts over chunks
    ("ramplus_tl", {}, True),  # every entry shared: no lambda
]


def full_params(name: str, params: dict[str, Any], models: int) -> dict[str, Any]:
    """``params`` with the method's defaults filled in and per-model values as lists."""
    full: dict[str, Any] = {}
    for p in get_method(name).params:
        default = None if p.required else p.default
        value = params.get(p.name, default if p.name != "weight" else [1.0] * models)
        full[p.name] = value if not p.per_model or isinstance(value, list) else [value] * models
    return full


def call(name: str, params: dict[str, Any], quantized: bool) -> torch.Tensor:
    method = get_method(name)
    xs, base = tensors(3, 1 if name == "slerp" else 3, quantized)
    full = full_params(name, params, len(xs) + (method.base == "input"))
    rng = torch.Generator().manual_seed(11) if method.random else None
    inputs = [base, *xs] if method.base == "input" else xs
    return method.fn(inputs, None if method.base == "input" else base, full, rng)


@pytest.mark.parametrize("quantized", [False, True])
@pytest.mark.parametrize(("name", "params", "exact"), CASES)
def test_any_chunk_size_gives_the_one_chunk_result(
    name: str, params: dict[str, Any], exact: bool, quantized: bool, monkeypatch: Any
) -> None:
    assert get_method(name).stream is not None
    want = call(name, params, quantized)  # one chunk: 407 entries < CHUNK_ELEMENTS
    for size in (7, 64, 400):
        monkeypatch.setattr(stream, "CHUNK_ELEMENTS", size)
        got = call(name, params, quantized)
        if exact:
            assert torch.equal(got, want), (name, size)
        else:
            torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


def test_float64_sum_is_the_exact_sum_rounded_once_more() -> None:
    g = torch.Generator().manual_seed(5)
    t = torch.randn(100_003, generator=g) * torch.logspace(-6, 6, 100_003)  # wide range
    exact = math.fsum(t.tolist())
    got = float64_sum(t)
    assert got == pytest.approx(exact, rel=1e-13, abs=1e-9)
    assert got != float(t.sum())  # not a float32 accumulation
    assert float64_sum(t[5:9]) == math.fsum(t[5:9].tolist())  # tiny sums are exact
    assert float64_sum(torch.empty(0)) == 0.0
    half = torch.tensor([0.5, 1.25, -3.0], dtype=torch.bfloat16)
    assert float64_sum(half) == -1.25  # converted first: numpy has no bfloat16


def test_chunk_bounds_are_whole_rows_and_cover_the_tensor() -> None:
    assert chunk_bounds(10, 1, 4) == [(0, 4), (4, 8), (8, 10)]
    assert chunk_bounds(12, 5, 4) == [(0, 5), (5, 10), (10, 12)]  # a row never splits
    assert chunk_bounds(30, 5, 12) == [(0, 10), (10, 20), (20, 30)]
    assert chunk_bounds(0, 3) == []


@pytest.mark.parametrize("seed", range(6))
def test_cut_over_chunks_keeps_exactly_k_with_ties_in_flat_order(seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    n = int(torch.randint(1, 300, (1,), generator=g))
    d = torch.randint(-6, 7, (n,), generator=g).float() / 3  # heavy ties, zeros included
    k = int(torch.randint(0, n + 1, (1,), generator=g))
    size = int(torch.randint(1, 50, (1,), generator=g))
    bounds = chunk_bounds(n, 1, size)
    cut = Cut(k, n)
    for step in range(2):
        for a, b in bounds:
            cut.observe(step, magnitude_bits(d[a:b]))
        cut.end_pass(step)
    for _ in range(2):  # the L1 pass and the merge pass mask the same entries
        got = torch.cat([cut.mask(d[a:b].abs()) for a, b in bounds])
        cut.rewind()
        order = sorted(range(n), key=lambda i: (-abs(float(d[i])), i))
        want = torch.zeros(n, dtype=torch.bool)
        want[order[:k]] = True
        assert torch.equal(got, want.float())  # exactly 1.0 kept, 0.0 dropped


@pytest.mark.parametrize(
    "method",
    ["ties", "dare_ties", "slerp", "breadcrumbs", "della", "model_stock", "sce", "ramplus_tl"],
)
def test_executor_chunk_size_does_not_change_the_bytes(
    tmp_path: Path,
    method: str,
    llama_base: Path,
    llama_ft1: Path,
    llama_ft2: Path,
    monkeypatch: Any,
) -> None:
    recipe = recipes(llama_base, llama_ft1, llama_ft2)[method]
    want = shard_bytes(run_recipe(tmp_path, recipe, "default", threads=2))
    monkeypatch.setattr(stream, "CHUNK_ELEMENTS", 96)  # many chunks per tensor
    small = run_recipe(tmp_path, recipe, "small-chunks", threads=2)
    if method == "dare_ties" or method == "della":  # l1 sums round per chunk in float64
        got, ref = _load(small), _load(tmp_path / "default")
        for name in ref:
            torch.testing.assert_close(got[name], ref[name], rtol=2e-3, atol=1e-6)
    else:
        assert shard_bytes(small) == want


def _load(out: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    state: dict[str, torch.Tensor] = {}
    for f in out.glob("*.safetensors"):
        state.update(load_file(str(f)))
    return state


@pytest.mark.parametrize("method", ["ties", "dare_ties", "della", "breadcrumbs", "ramplus_tl"])
def test_task_vectors_subtract_inputs_in_their_stored_dtype(
    tmp_path: Path, method: str, make_checkpoint: Any
) -> None:
    """The executor hands the task family (and ramplus_tl) its inputs as stored (bf16, fp16)
    and the float32 base; the bytes equal the whole-tensor path's, which converts every input
    first."""
    base = make_checkpoint("base", dtype=torch.bfloat16, seed=21)
    ft1 = make_checkpoint("ft1", dtype=torch.bfloat16, noise_from=base, seed=22)
    ft2 = make_checkpoint("ft2", dtype=torch.float16, noise_from=base, seed=23)
    recipe = {**recipes(base, ft1, ft2)[method], "dtype": "float32"}  # no rounding to hide
    streamed = run_recipe(tmp_path, recipe, "streamed", threads=2)
    converted = run_recipe(tmp_path, recipe, "converted", threads=2, device="cpu")
    assert shard_bytes(streamed) == shard_bytes(converted)


def _elementwise(method: str, base: Path, ft1: Path, ft2: Path) -> dict[str, Any]:
    if method == "passthrough":
        scaled = {"model": str(ft1), "parameters": {"scale": 0.4}}
        return {"merge_method": method, "models": [scaled]}
    models = [{"model": str(m)} for m in ((ft1,) if method == "nearswap" else (ft1, ft2))]
    params = {"t": 0.01} if method == "nearswap" else {"epsilon": 0.01}
    return {"merge_method": method, "base_model": str(base), "models": models, "parameters": params}


@pytest.mark.parametrize("method", ["nearswap", "ram", "passthrough"])
def test_elementwise_methods_stream_the_whole_tensor_bytes(
    tmp_path: Path,
    method: str,
    llama_base: Path,
    llama_ft1: Path,
    llama_ft2: Path,
    monkeypatch: Any,
) -> None:
    recipe = _elementwise(method, llama_base, llama_ft1, llama_ft2)
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe))
    plan = api.plan(path)
    assert all(streamed(j, plan.models, plan.method) for j in plan.jobs if not j.copy)
    assert any(not j.copy for j in plan.jobs)
    whole = run_recipe(tmp_path, recipe, "whole", threads=2, device="cpu")  # whole tensors
    monkeypatch.setattr(stream, "CHUNK_ELEMENTS", 96)  # many chunks per tensor
    chunked = run_recipe(tmp_path, recipe, "chunked", threads=2)
    assert shard_bytes(chunked) == shard_bytes(whole)


@pytest.mark.parametrize(("name", "params"), [(n, p) for n, p, _ in CASES])
def test_streamed_methods_merge_empty_tensors(name: str, params: dict[str, Any]) -> None:
    method = get_method(name)
    base = torch.zeros(0, 4)
    xs = [torch.zeros(0, 4)] * (1 if name == "slerp" else 3)
    full = full_params(name, params, len(xs) + (method.base == "input"))
    rng = torch.Generator().manual_seed(0) if method.random else None
    assert method.fn(xs, base, full, rng).shape == (0, 4)
