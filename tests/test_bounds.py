"""Bounded work and finite parameters (issue 14): a recipe that would expand without bound,
or whose numbers cannot be computed in float32, is refused at validate/plan time with
``file:line: path: message`` and exit 2, never by running out of memory or writing NaN."""

from __future__ import annotations

import textwrap
import time
from pathlib import Path

import yaml
from typer.testing import CliRunner

from merge.cli import app

runner = CliRunner()


def validate(tmp_path: Path, text: str) -> tuple[int, str]:
    recipe = tmp_path / "r.yaml"
    recipe.write_text(textwrap.dedent(text).lstrip("\n"), encoding="utf-8")
    result = runner.invoke(app, ["validate", str(recipe)])
    return result.exit_code, result.output.replace(str(recipe), "r.yaml")


def test_alias_bomb_is_counted_not_expanded(tmp_path: Path) -> None:
    levels = ["merge_method: linear", "a0: &a0 [" + ", ".join(["x"] * 10) + "]"]
    for i in range(1, 9):
        levels.append(f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 10) + "]")
    start = time.perf_counter()
    code, out = validate(tmp_path, "\n".join(levels) + "\n")
    assert time.perf_counter() - start < 0.5
    assert code == 2
    assert out.strip() == (
        "error: r.yaml:6: a4[9]: the recipe expands to more than 100,000 values "
        "(each alias counts as a copy of what it names)"
    )


def test_nesting_depth_is_bounded(tmp_path: Path) -> None:
    code, out = validate(tmp_path, "merge_method: linear\nx: " + "[" * 150 + "]" * 150 + "\n")
    assert code == 2
    assert out.strip() == "error: r.yaml:2: x[0][0][0]...: nested more than 100 levels deep"
    code, out = validate(tmp_path, "merge_method: linear\nx: " + "[" * 5000 + "]" * 5000 + "\n")
    assert code == 2
    assert out.strip() == "error: r.yaml: nested more than 100 levels deep"


def test_string_and_file_sizes_are_bounded(tmp_path: Path) -> None:
    code, out = validate(tmp_path, "merge_method: linear\nchat_template: " + "x" * 1_100_000)
    assert code == 2
    assert out.strip() == (
        "error: r.yaml:2: chat_template: a value of 1,100,000 characters (at most 1,048,576)"
    )
    code, out = validate(tmp_path, "merge_method: linear\n" + "#" * 9_000_000 + "\n")
    assert code == 2
    assert out.strip() == (
        "error: r.yaml: a recipe of 9,000,022 bytes (at most 8,388,608); is this the right file?"
    )


def test_parameters_must_be_finite_within_float32(tmp_path: Path) -> None:
    code, out = validate(
        tmp_path,
        """
        merge_method: linear
        parameters:
          normalize: true
        models:
          - model: a/b
            parameters:
              weight: .inf
          - model: c/d
            parameters:
              weight: [1, 100000000000000000000000000000000000000000000000000000000000]
          - model: e/f
            parameters:
              weight:
                - filter: mlp
                  value: 1.0e+400
                - value: .nan
          - model: g/h
            parameters:
              weight: 1.0e+39
        """,
    )
    assert code == 2
    lines = out.strip().splitlines()
    assert lines[:5] == [
        "error: r.yaml:7: models[0].parameters.weight: "
        "must be a finite number within float32 (got inf)",
        "error: r.yaml:10: models[1].parameters.weight: "
        "entry 1: must be a finite number within float32 (got an integer of 60 digits)",
        "error: r.yaml:15: models[2].parameters.weight[0].value: "
        "must be a finite number within float32 (got inf)",
        "error: r.yaml:16: models[2].parameters.weight[1].value: "
        "must be a finite number within float32 (got nan)",
        "error: r.yaml:19: models[3].parameters.weight: "
        "must be a finite number within float32 (got 1e+39)",
    ]


def test_integer_parameter_too_large_for_a_float(tmp_path: Path) -> None:
    code, out = validate(
        tmp_path,
        """
        merge_method: karcher
        parameters:
          tol: 100000000000000000000000000000000000000000000000000000000000000000000
        models:
          - model: a/b
          - model: c/d
        """,
    )
    assert code == 2
    assert out.strip() == (
        "error: r.yaml:3: parameters.tol: must be a finite number within float32 "
        "(got an integer of 69 digits)"
    )


def test_slice_scale_and_residual_weight_must_be_finite(tmp_path: Path) -> None:
    recipe = """
        merge_method: passthrough
        slices:
          - sources:
              - model: a/b
                layer_range: [0, 2]
                parameters:
                  scale: .inf
        """
    code, out = validate(tmp_path, recipe)
    assert code == 2
    assert out.strip() == (
        "error: r.yaml:7: slices[0].sources[0].parameters.scale: "
        "must be a finite number within float32 (got inf)"
    )
    code, out = validate(
        tmp_path, recipe.replace("scale: .inf", "scale: 1") + "    residual_weight: -.inf\n"
    )
    assert code == 2
    assert out.strip() == (
        "error: r.yaml:8: slices[0].residual_weight: "
        "must be a finite number within float32 (got -inf)"
    )


def test_moe_scales_must_be_finite(tmp_path: Path) -> None:
    code, out = validate(
        tmp_path,
        """
        base_model: a/b
        gate_mode: random
        experts:
          - source_model: c/d
            residual_scale: .nan
          - source_model: e/f
            residual_scale: .inf
            noise_scale: .inf
        """,
    )
    assert code == 2
    assert sorted(out.strip().splitlines()) == [
        "error: r.yaml:5: experts[0].residual_scale: "
        "must be a finite number within float32 (got nan)",
        "error: r.yaml:7: experts[1].residual_scale: "
        "must be a finite number within float32 (got inf)",
        "error: r.yaml:8: experts[1].noise_scale: must be a finite number within float32 (got inf)",
    ]


def test_karcher_max_iter_is_capped(tmp_path: Path) -> None:
    code, out = validate(
        tmp_path,
        """
        merge_method: karcher
        parameters: {max_iter: 1000000000}
        models:
          - model: a/b
        """,
    )
    assert code == 2
    assert (
        out.strip() == "error: r.yaml:2: parameters.max_iter: must be in [0, 10000], got 1000000000"
    )


def test_pad_to_multiple_of_is_bounded(tmp_path: Path) -> None:
    for value in (1_000_000_000, 2**63):
        code, out = validate(
            tmp_path,
            f"""
            merge_method: linear
            models:
              - model: a/b
                parameters: {{weight: 1}}
            tokenizer:
              pad_to_multiple_of: {value}
            """,
        )
        assert code == 2
        assert out.strip() == (
            "error: r.yaml:6: tokenizer.pad_to_multiple_of: "
            f"must be less than or equal to 65536, got {value}"
        )


def test_empty_token_name_is_refused(tmp_path: Path) -> None:
    code, out = validate(
        tmp_path,
        """
        merge_method: linear
        models:
          - model: a/b
            parameters: {weight: 1}
        tokenizer:
          tokens:
            "<x>": {source: a/b}
            "": {source: a/b}
        """,
    )
    assert code == 2
    assert out.strip() == "error: r.yaml:8: tokenizer.tokens: a token name must not be empty"


def plan(tmp_path: Path, recipe: dict) -> tuple[int, str]:
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False), encoding="utf-8")
    result = runner.invoke(app, ["plan", str(path)])
    return result.exit_code, result.output


def test_weights_whose_sum_overflows_float32_are_a_plan_error(
    tmp_path: Path, llama_ft1: Path, llama_ft2: Path
) -> None:
    recipe = {
        "merge_method": "linear",
        "models": [
            {"model": str(llama_ft1), "parameters": {"weight": 3.0e38}},
            {"model": str(llama_ft2), "parameters": {"weight": 3.0e38}},
        ],
    }
    code, out = plan(tmp_path, recipe)
    assert code == 2
    assert out.strip() == (  # one line: the same cause for every tensor
        "error: tensor 'model.embed_tokens.weight' and 38 other tensors: the weights' absolute "
        "sum 6e+38 is past float32's range (3.40282e+38), so the weighted sum overflows; scale "
        "the weights down"
    )


def test_tiny_density_with_inverse_density_rescale_is_a_plan_error(
    tmp_path: Path, llama_base: Path, llama_ft1: Path
) -> None:
    recipe = {
        "merge_method": "dare_linear",
        "base_model": str(llama_base),
        "parameters": {"rescale": "inverse_density"},
        "models": [
            {"model": str(llama_ft1), "parameters": {"weight": 1.0, "density": 1e-300}},
        ],
    }
    code, out = plan(tmp_path, recipe)
    assert code == 2
    assert (
        f"density 1e-300 for model '{llama_ft1}' is below 1e-06, too small for rescale: "
        "inverse_density to divide by; raise it or use rescale: l1"
    ) in out
    recipe["parameters"] = {"rescale": "l1"}
    code, out = plan(tmp_path, recipe)
    assert code == 0, out


def test_moe_prompt_longer_than_the_model_positions_is_a_plan_error(
    tmp_path: Path, llama_base: Path, llama_ft1: Path
) -> None:
    long = "hello " * 20_000
    recipe = {
        "base_model": str(llama_base),
        "gate_mode": "hidden",
        "experts_per_token": 1,
        "experts": [
            {"source_model": str(llama_base), "positive_prompts": ["chat"]},
            {"source_model": str(llama_ft1), "positive_prompts": ["math", long]},
        ],
    }
    start = time.perf_counter()
    code, out = plan(tmp_path, recipe)
    assert time.perf_counter() - start < 20
    assert code == 2
    lines = [line for line in out.strip().splitlines() if line.startswith("error:")]
    assert len(lines) == 1
    assert lines[0].endswith(
        f"p.yaml:11: experts[1].positive_prompts[1]: prompt 'hello hello hello hello hello "
        f"hello h...' of expert '{llama_ft1}' is 60,002 tokens, more than the base model's "
        "128 positions (max_position_embeddings); shorten it"
    ), lines[0]
