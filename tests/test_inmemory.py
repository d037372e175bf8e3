"""In-memory merges (``merge.evolve.inmemory``): the same bytes as ``merge run``, no state
carried between candidates, the model generates; bad candidates are plan errors."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest
import torch

from merge.errors import PlanError, RecipeError
from merge.evolve import InMemoryMerger
from support import run_recipe
from tiny import load_state


def _recipe(method: str, base: Path, models: list[tuple[Path, dict]], **top: Any) -> dict:
    return {
        "merge_method": method,
        "base_model": str(base),
        "models": [{"model": str(m), "parameters": p} for m, p in models],
        **top,
    }


def _candidates(base: Path, ft1: Path, ft2: Path) -> dict[str, list[dict]]:
    """Two parameter sets per method over the same three models."""
    linear = [
        _recipe(
            "linear", base, [(base, {"weight": w0}), (ft1, {"weight": w1}), (ft2, {"weight": 1.0})]
        )
        for w0, w1 in [(0.2, 0.5), (1.0, 0.1)]
    ]
    ties = [
        _recipe(
            "ties",
            base,
            [(ft1, {"weight": 1.0, "density": d}), (ft2, {"weight": 0.5, "density": 0.7})],
            dtype="bfloat16",
        )
        for d in (0.5, 0.9)
    ]
    dare = [
        _recipe(
            "dare_ties",
            base,
            [(ft1, {"weight": w, "density": 0.6}), (ft2, {"weight": 0.8, "density": 0.4})],
            seed=seed,
        )
        for w, seed in [(1.0, 7), (0.3, 8)]
    ]
    return {"linear": linear, "ties": ties, "dare_ties": dare}


def _state(model: Any) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _assert_same(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    """Every tensor of ``want`` (a written checkpoint) is in ``got`` bit for bit."""
    assert want.keys() <= got.keys()
    for name, tensor in want.items():
        assert got[name].dtype == tensor.dtype, name
        assert torch.equal(got[name].view(torch.uint8), tensor.view(torch.uint8)), name


@pytest.mark.parametrize("method", ["linear", "ties", "dare_ties"])
def test_in_memory_equals_merge_run(
    tmp_path: Path, method: str, llama_base: Path, llama_ft1: Path, llama_ft2: Path
) -> None:
    first, second = _candidates(llama_base, llama_ft1, llama_ft2)[method]
    written = [
        load_state(run_recipe(tmp_path, r, name=f"out{i}")) for i, r in enumerate((first, second))
    ]
    with InMemoryMerger(first, threads=2) as merger:
        for recipe, want in zip((first, second, first), [*written, written[0]], strict=True):
            _assert_same(_state(merger.merge(recipe)), want)  # no state leaks between merges
    with InMemoryMerger(first, threads=1) as fresh:  # a fresh merger, another thread count
        _assert_same(_state(fresh.merge(second)), written[1])


def test_tied_embeddings_and_generation(
    tmp_path: Path, qwen2_tied: Path, qwen2_tied_ft: Path
) -> None:
    recipe = _recipe(
        "linear", qwen2_tied, [(qwen2_tied, {"weight": 0.5}), (qwen2_tied_ft, {"weight": 0.5})]
    )
    want = load_state(run_recipe(tmp_path, recipe))
    with InMemoryMerger(recipe, threads=2) as merger:
        model = merger.merge(recipe)
        state = _state(model)
        _assert_same(state, want)
        assert torch.equal(state["lm_head.weight"], want["model.embed_tokens.weight"])
        tok = merger.tokenizer()
        encoded = tok("The model merges weights.", return_tensors="pt")
        with torch.no_grad():
            out = model.generate(**encoded, max_new_tokens=4, do_sample=False)
            logits = model(**encoded).logits
        assert out.shape[1] == encoded["input_ids"].shape[1] + 4
        assert torch.isfinite(logits).all()


def test_candidate_must_make_the_targets_output(
    llama_base: Path, llama_ft1: Path, llama_ft2: Path, qwen2_tied: Path
) -> None:
    first = _candidates(llama_base, llama_ft1, llama_ft2)["linear"][0]
    with InMemoryMerger(first, threads=1) as merger:
        with pytest.raises(PlanError, match="the target has .* torch.float32, the candidate makes"):
            merger.merge({**first, "dtype": "bfloat16"})
        with pytest.raises(RecipeError, match="must use the base recipe's models"):
            merger.merge(
                _recipe(
                    "linear",
                    llama_base,
                    [(llama_base, {"weight": 1.0}), (qwen2_tied, {"weight": 1.0})],
                )
            )
        with pytest.raises(RecipeError, match="needs the parameter 'weight'"):  # the checks
            merger.merge(_recipe("linear", llama_base, [(m, {}) for m in (llama_base, llama_ft1)]))
        zero = [(llama_base, {"weight": 1.0}), (llama_ft1, {"weight": -1.0})]
        with pytest.raises(PlanError, match="sum"):  # the planner's own checks
            merger.merge(_recipe("linear", llama_base, [*zero, (llama_ft2, {"weight": 0.0})]))


def test_per_candidate_overhead(llama_base: Path, llama_ft1: Path, llama_ft2: Path) -> None:
    """Planning and merging a candidate reuses the opened models: report its cost."""
    first, second = _candidates(llama_base, llama_ft1, llama_ft2)["linear"]
    with InMemoryMerger(first, threads=2) as merger:
        merger.merge(first)
        start = time.perf_counter()
        for _ in range(5):
            merger.plan(second)
        planning = (time.perf_counter() - start) / 5
        start = time.perf_counter()
        for _ in range(5):
            merger.merge(second)
        merging = (time.perf_counter() - start) / 5
    print(f"per candidate: plan {planning * 1e3:.1f} ms, plan+merge {merging * 1e3:.1f} ms")
    assert merging < 2.0
