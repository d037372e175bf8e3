"""End to end for ramplus_tl: a recipe over the tiny Llama fixtures (llama_base and two
fine-tunes of it, 0.02 noise) runs through ``merge.api.run``; every output tensor is compared
with RAM+'s formula computed here in float64 with plain torch (its own counts per tensor), and
the output loads with transformers and generates. Then ``merge methods ramplus_tl`` and a
recipe error for a negative ``r``.
"""

from __future__ import annotations

from pathlib import Path

from torch import Tensor
from torch.testing import assert_close
from typer.testing import CliRunner

from merge.cli import app
from support import run_recipe
from tiny import assert_loads_and_generates, load_state

runner = CliRunner()
EPSILON, R, ALPHA = 0.02, 0.5, 1.0


def ramplus_formula(b: Tensor, xs: list[Tensor]) -> tuple[Tensor, list[float]]:
    """``b + sum_i d_i [active_i] ([c = 1] lambda_i + [c > 1] / c)`` in float64, from float32
    task vectors; also each model's lambda (1 where it has no unique entry)."""
    ds = [x - b for x in xs]  # float32, as defined
    active = [d.abs() > EPSILON for d in ds]
    c = sum(a.long() for a in active)
    assert isinstance(c, Tensor)
    out = b.double().clone()
    lambdas = []
    for d, a in zip(ds, active, strict=True):
        unique, shared = int((a & (c == 1)).sum()), int((a & (c > 1)).sum())
        lam = 1 + R * min(shared / max(unique, EPSILON), ALPHA) if unique else 1.0
        lambdas.append(lam)
        scale = (c == 1).double() * lam + (c > 1).double() / c.clamp(min=1).double()
        out += d.double() * a.double() * scale
    return out, lambdas


def test_ramplus_tl(tmp_path: Path, llama_base: Path, llama_ft1: Path, llama_ft2: Path) -> None:
    out = run_recipe(
        tmp_path,
        {
            "merge_method": "ramplus_tl",
            "base_model": str(llama_base),
            "models": [{"model": str(llama_ft1)}, {"model": str(llama_ft2)}],
            "parameters": {"epsilon": EPSILON, "r": R, "alpha": ALPHA},
        },
    )
    raw = [load_state(p) for p in (llama_base, llama_ft1, llama_ft2)]
    got = load_state(out)
    assert set(got) == set(raw[0])
    seen: set[float] = set()
    for name, tensor in got.items():
        want, lambdas = ramplus_formula(raw[0][name], [m[name] for m in raw[1:]])
        assert_close(tensor.double(), want, rtol=2e-5, atol=2e-6, msg=name)
        seen.update(round(lam, 6) for lam in lambdas)
    assert len(seen) > 2 and all(1.0 <= lam <= 1 + R * ALPHA for lam in seen)  # tensor-local
    assert_loads_and_generates(out)


def test_methods_command_describes_ramplus_tl() -> None:
    result = runner.invoke(app, ["methods", "ramplus_tl"])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0].startswith("ramplus_tl: ram, with each model's unique changes amplified")
    assert "  base model: required; models: 1 or more, plus the base" in lines
    assert any(line.startswith("    r (number in >= 0, default 0.1): rescaling") for line in lines)
    assert any(line.startswith("    alpha (number in >= 0, default 0.2): ") for line in lines)
    assert "https://arxiv.org/abs/2601.13572" in result.output
    listing = runner.invoke(app, ["methods"])
    assert "\nramplus_tl: " in listing.output


def test_negative_r_is_a_recipe_error(tmp_path: Path, llama_base: Path, llama_ft1: Path) -> None:
    recipe = tmp_path / "ramplus.yaml"
    recipe.write_text(
        f"""merge_method: ramplus_tl
base_model: {llama_base}
models:
  - model: {llama_ft1}
parameters:
  r: -0.1
"""
    )
    out = tmp_path / "out"
    result = runner.invoke(app, ["run", str(recipe), str(out)])
    assert result.exit_code == 2
    assert result.stderr.strip() == f"error: {recipe}:6: parameters.r: must be >= 0, got -0.1"
    assert not out.exists()
