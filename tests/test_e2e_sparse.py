"""End to end: breadcrumbs*, della* and rescale modes on tiny Llama checkpoints.

Deterministic methods are compared tensor by tensor with the formula computed here with plain
torch ops (a stable argsort gives the ranks). For della the random mask is checked through the
formula given the mask, its statistics, reproducibility, and della with ``epsilon: 0`` against
dare_ties (the same draws). Every output loads with transformers and generates. A bad
``density +/- epsilon`` is a plan error: exit 2, exact messages, no tensor data read.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from torch.testing import assert_close
from typer.testing import CliRunner

from merge.checkpoint import Checkpoint
from merge.cli import app
from support import run_recipe, states
from tiny import assert_loads_and_generates, load_state

runner = CliRunner()


def band(d: torch.Tensor, density: float, gamma: float) -> torch.Tensor:
    """METHODS.md breadcrumbs mask: ascending |d|, drop the top int(gamma n) and the bottom
    n - int(density n) - int(gamma n) (if negative, fewer from the top)."""
    flat = d.flatten()
    n = flat.numel()
    keep, top = int(density * n), int(gamma * n)
    bottom = n - keep - top
    if bottom < 0:
        top, bottom = top + bottom, 0
    order = flat.abs().argsort(stable=True)
    mask = torch.zeros(n, dtype=torch.bool)
    mask[order[bottom : n - top]] = True
    return mask.reshape(d.shape)


def consensus_merge(parts: list[tuple[torch.Tensor, float]], normalize: bool) -> torch.Tensor:
    """TIES: majority sign of sum o_i (0 -> +), sum of the agreeing o_i / their weights."""
    total = sum(o for o, _ in parts)
    sign = torch.where(total >= 0, 1.0, -1.0)
    num, den = torch.zeros_like(total), torch.zeros_like(total)
    for o, w in parts:
        agree = torch.sign(o) == sign
        num += torch.where(agree, o, 0.0)
        den += torch.where(agree, w, 0.0)
    return num / torch.where(den == 0, 1.0, den) if normalize else num


def sparse_recipe(method: str, base: Path, models: list[tuple[Path, dict]], **top: object) -> dict:
    return {
        "merge_method": method,
        "base_model": str(base),
        "models": [{"model": str(m), "parameters": p} for m, p in models],
        **({"parameters": top} if top else {}),
    }


# --- breadcrumbs ----------------------------------------------------------------------------


def test_breadcrumbs(tmp_path: Path, llama_base: Path, llama_ft1: Path, llama_ft2: Path) -> None:
    specs = [(llama_ft1, 1.0, 0.5, 0.02), (llama_ft2, 0.5, 0.3, 0.05)]
    out = run_recipe(
        tmp_path,
        sparse_recipe(
            "breadcrumbs",
            llama_base,
            [(m, {"weight": w, "density": dens, "gamma": g}) for m, w, dens, g in specs],
        ),
    )
    b, x, y = states(llama_base, llama_ft1, llama_ft2)
    got = load_state(out)
    assert got.keys() == b.keys()
    for name, t in got.items():
        want = b[name].clone()
        for m, (_, w, dens, g) in zip((x, y), specs, strict=True):
            d = m[name] - b[name]
            want += w * torch.where(band(d, dens, g), d, 0.0)
        assert_close(t, want, msg=name)
    # the mergekit fix: a 32-entry norm has int(0.02 * 32) == 0 and is still merged
    norm = "model.layers.0.input_layernorm.weight"
    assert int((got[norm] != b[norm]).sum()) > 0
    assert_loads_and_generates(out)


def test_breadcrumbs_ties_inverse_density(
    tmp_path: Path, llama_base: Path, llama_ft1: Path, llama_ft2: Path
) -> None:
    specs = [(llama_ft1, 0.7, 0.45, 0.1), (llama_ft2, 0.6, 0.62, 0.01)]
    out = run_recipe(
        tmp_path,
        sparse_recipe(
            "breadcrumbs_ties",
            llama_base,
            [(m, {"weight": w, "density": dens, "gamma": g}) for m, w, dens, g in specs],
            rescale="inverse_density",
            normalize=True,
            **{"lambda": 0.8},
        ),
    )
    b, x, y = states(llama_base, llama_ft1, llama_ft2)
    for name, t in load_state(out).items():
        parts = []
        for m, (_, w, dens, g) in zip((x, y), specs, strict=True):
            d = m[name] - b[name]
            fraction = int(dens * d.numel()) / d.numel()  # the kept fraction
            parts.append((w * torch.where(band(d, dens, g), d, 0.0) / fraction, w))
        assert_close(t, b[name] + 0.8 * consensus_merge(parts, normalize=True), msg=name)
    assert_loads_and_generates(out)


# --- della ----------------------------------------------------------------------------------


def test_della_linear_inverse_density_one_model(
    tmp_path: Path, llama_base: Path, llama_ft1: Path
) -> None:
    """Given the drawn mask: kept entries are w d / p with p from the rank in the row,
    dropped ones are the base; keep rates follow p."""
    density, eps, w = 0.4, 0.2, 0.9
    out = run_recipe(
        tmp_path,
        sparse_recipe(
            "della_linear",
            llama_base,
            [(llama_ft1, {"weight": w, "density": density, "epsilon": eps})],
            rescale="inverse_density",
        ),
    )
    b, x = states(llama_base, llama_ft1)
    low = high = low_n = high_n = 0
    for name, t in load_state(out).items():
        d = x[name] - b[name]
        rows = d.reshape(-1, d.shape[-1])
        n = rows.shape[-1]
        rank = rows.abs().argsort(dim=-1, stable=True).argsort(dim=-1).float().reshape(d.shape)
        p = density - eps + 2 * eps * rank / (n - 1)
        kept = t != b[name]
        assert_close(t[kept], b[name][kept] + w * d[kept] / p[kept], msg=name)
        assert torch.equal(t[~kept], b[name][~kept])
        low, low_n = low + int(kept[p < 0.25].sum()), low_n + int((p < 0.25).sum())
        high, high_n = high + int(kept[p > 0.55].sum()), high_n + int((p > 0.55).sum())
    assert 0.2 < low / low_n < 0.25 and 0.55 < high / high_n < 0.6
    assert_loads_and_generates(out)


def test_della_with_epsilon_zero_equals_dare_ties(
    tmp_path: Path, llama_base: Path, llama_ft1: Path, llama_ft2: Path
) -> None:
    models = [
        (llama_ft1, {"weight": 0.6, "density": 0.5}),
        (llama_ft2, {"weight": 0.4, "density": 0.7}),
    ]
    zero = [(m, {**p, "epsilon": 0.0}) for m, p in models]
    della = run_recipe(tmp_path, sparse_recipe("della", llama_base, zero), "della")
    dare = run_recipe(
        tmp_path, sparse_recipe("dare_ties", llama_base, models, normalize=True), "dare"
    )
    a, c = load_state(della), load_state(dare)
    assert a.keys() == c.keys()
    for name in a:
        assert torch.equal(a[name], c[name]), name
    assert_loads_and_generates(della)


def test_della_is_reproducible_and_seeded(
    tmp_path: Path, llama_base: Path, llama_ft1: Path, llama_ft2: Path
) -> None:
    recipe = sparse_recipe(
        "della",
        llama_base,
        [
            (llama_ft1, {"weight": 0.6, "density": 0.5}),
            (llama_ft2, {"weight": 0.4, "density": 0.3}),
        ],
    )
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = run_recipe(tmp_path, recipe, "one")
        torch.set_num_threads(2)
        two = run_recipe(tmp_path, recipe, "two")
    finally:
        torch.set_num_threads(threads)
    for shard in sorted(p.name for p in one.glob("*.safetensors")):
        assert (one / shard).read_bytes() == (two / shard).read_bytes()
    other = load_state(run_recipe(tmp_path, recipe, "other", seed=7))
    first = load_state(one)
    assert any(not torch.equal(first[k], other[k]) for k in first)
    assert_loads_and_generates(one)


# --- plan-time errors -----------------------------------------------------------------------


def _fails(args: list[str], out: Path | None = None) -> list[str]:
    result = runner.invoke(app, args)
    assert result.exit_code == 2, result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    if out is not None:
        assert not out.exists()
    lines = result.stderr.strip().splitlines()
    assert all(line.startswith("error: ") for line in lines), result.stderr
    return [line.removeprefix("error: ") for line in lines]


def test_della_bounds_are_a_plan_error_before_any_data_is_read(
    tmp_path: Path,
    llama_base: Path,
    llama_ft1: Path,
    llama_ft2: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def no_reading(self: Checkpoint, name: str) -> torch.Tensor:
        raise AssertionError(f"tensor data read: {name}")

    monkeypatch.setattr(Checkpoint, "read", no_reading)
    recipe = tmp_path / "della.yaml"
    models = [(llama_ft1, {"weight": 1.0, "density": 0.5}), (llama_ft2, {"weight": 1.0})]
    recipe.write_text(
        yaml.safe_dump(
            sparse_recipe("della", llama_base, models, density=[0.5, 0.9]), sort_keys=False
        )
    )
    # ft1 has 0.5 everywhere; ft2 takes the global gradient: 0.5 + 0.4 * layer / 3, and with
    # the default epsilon 0.15 only layer 3 (density 0.9) leaves (0, 1)
    layer3 = [
        f"model.layers.3.{part}"
        for part in (
            "input_layernorm.weight",
            "mlp.down_proj.weight",
            "mlp.gate_proj.weight",
            "mlp.up_proj.weight",
            "post_attention_layernorm.weight",
            "self_attn.k_proj.weight",
            "self_attn.o_proj.weight",
            "self_attn.q_proj.weight",
            "self_attn.v_proj.weight",
        )
    ]
    expected = [  # one line for the tensors of layer 3: the same cause
        f"tensor '{sorted(layer3)[0]}' and {len(layer3) - 1} other tensors: density +/- epsilon "
        f"must be in (0, 1) for model '{llama_ft2}', got density 0.9 and epsilon 0.15 "
        "(use epsilon < 0.1)"
    ]
    out = tmp_path / "out"
    assert sorted(_fails(["run", str(recipe), str(out)], out)) == sorted(expected)
    for command in ("plan", "validate"):
        assert sorted(_fails([command, str(recipe)])) == sorted(expected)


def test_epsilon_out_of_range_is_a_recipe_error(
    tmp_path: Path, llama_base: Path, llama_ft1: Path
) -> None:
    recipe = tmp_path / "della.yaml"
    recipe.write_text(
        f"""merge_method: della_linear
base_model: {llama_base}
models:
  - model: {llama_ft1}
    parameters: {{weight: 1, density: 0.5, epsilon: 0.5}}
parameters:
  rescale: l2
"""
    )
    out = tmp_path / "out"
    assert _fails(["run", str(recipe), str(out)], out) == [
        f"{recipe}:7: parameters.rescale: must be true, false, l1 or inverse_density, got 'l2'",
        f"{recipe}:5: models[0].parameters.epsilon: must be in [0, 0.5), got 0.5",
    ]
