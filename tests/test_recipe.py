"""Recipe parsing: mergekit syntax accepted as is, every mistake reported with file and line."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from merge.errors import RecipeError
from merge.recipe import Gradient, ParamValue, Rule, load_recipe, lookup, parse_recipe
from merge.recipe.params import parse_value

COMPAT = Path(__file__).resolve().parent / "data" / "compat"
MOE = {"moe_hidden.yaml", "moe_qwen_shared.yaml"}


def test_compat_recipes_live_in_the_repository() -> None:
    """The parametrised compat tests below read these files: an empty glob would skip them."""
    names = {p.name for p in COMPAT.glob("*.yaml")}
    assert len(names) >= 8 and MOE <= names, names


def problems(text: str) -> list[str]:
    with pytest.raises(RecipeError) as info:
        parse_recipe(textwrap.dedent(text).lstrip("\n"), "r.yaml")
    return info.value.problems


@pytest.mark.parametrize("name", sorted(p.name for p in COMPAT.glob("*.yaml") if p.name not in MOE))
def test_compat_recipes_parse_unchanged(name: str) -> None:
    recipe = load_recipe(COMPAT / name)
    assert recipe.method.name in name.replace("gradient_", "").replace("_frankenmerge", "") or (
        recipe.method.name in ("linear", "task_arithmetic", "slerp", "passthrough")
    )
    assert recipe.model_refs(), "every compat recipe names models"
    assert not recipe.warnings


def test_compat_moe_recipes_are_recognised_as_moe() -> None:
    from merge.moe.recipe import MoeRecipe

    for name in MOE:
        recipe = load_recipe(COMPAT / name)
        assert isinstance(recipe, MoeRecipe) and not recipe.warnings


def test_unknown_key_has_line_and_suggestion() -> None:
    assert problems(
        """
        merge_method: linear
        modles:
          - model: a/b
        """
    ) == [
        "r.yaml:2: modles: unknown key; did you mean 'models'? (allowed: merge_method, models, "
        "slices, modules, base_model, parameters, dtype, out_dtype, tokenizer_source, tokenizer, "
        "chat_template, seed, allow_mismatched_architectures)"
    ]


def test_nested_unknown_key_and_out_of_range_are_reported_together() -> None:
    got = problems(
        """
        merge_method: ties
        base_model: a/base
        models:
          - model: a/base
          - model: a/one
            parametres: {weight: 1}
          - model: a/two
            parameters:
              weight: 0.5
              density: 1.5
        """
    )
    assert got == [
        "r.yaml:6: models[1].parametres: unknown key; did you mean 'parameters'? "
        "(allowed: model, parameters)"
    ]  # schema errors stop before method checks: the entry cannot be read at all
    got = problems(
        """
        merge_method: ties
        base_model: a/base
        models:
          - model: a/base
          - model: a/one
            parameters: {weight: 1, desnity: 0.5}
          - model: a/two
            parameters:
              weight: 0.5
              density: 1.5
        """
    )
    assert got == [
        "r.yaml:6: models[1].parameters.desnity: unknown parameter for ties; did you mean "
        "'density'? (allowed: weight, density, normalize, lambda, int8_mask, rescale, trim)",
        "r.yaml:10: models[2].parameters.density: must be in (0, 1], got 1.5",
    ]


def test_unknown_method_suggests() -> None:
    got = problems("merge_method: tie\nmodels: [{model: a/b}]\n")
    assert len(got) == 1
    assert got[0].startswith(
        "r.yaml:1: merge_method: unknown merge method 'tie'; did you mean 'ties'? (allowed: "
    )


def test_wrong_types_name_the_value() -> None:
    got = problems(
        """
        merge_method: linear
        models:
          - model: a/b
            parameters: {weight: heavy}
          - model: 7
        dtype: float64
        """
    )
    assert got == [
        "r.yaml:5: models[1].model: must be a valid string, got 7",
        "r.yaml:6: dtype: must be one of float32, float16, bfloat16, got 'float64'",
    ]
    got = problems(
        """
        merge_method: linear
        models:
          - model: a/b
            parameters: {weight: heavy}
        """
    )
    assert got == ["r.yaml:4: models[0].parameters.weight: must be a number, got 'heavy'"]


def test_linear_base_without_weight_gets_a_hint() -> None:
    got = problems(
        """
        merge_method: linear
        base_model: org/base
        models:
          - model: org/base
          - model: org/other
            parameters: {weight: 1}
        """
    )
    assert got == [
        "r.yaml:4: models[0]: model 'org/base' needs the parameter 'weight' (a number) for "
        "linear; linear merges base_model like any other model, so give it a weight too, or "
        "drop base_model"
    ]


def test_method_rules() -> None:
    got = problems(
        """
        merge_method: slerp
        models:
          - model: a/one
          - model: a/two
        """
    )
    assert got == [
        "r.yaml:2: models: slerp needs base_model: the model the others are merged relative to "
        "(one of the models)"
    ]
    got = problems(
        """
        merge_method: slerp
        base_model: a/one
        models:
          - model: a/one
          - model: a/two
          - model: a/three
        """
    )
    assert got == [
        "r.yaml:3: models: slerp takes exactly 1 model(s) besides the base model, got 2",
        "r.yaml:3: models: slerp needs the global parameter 't' (a number in [0, 1]) under "
        "parameters:",
    ]


def test_slices_need_equal_lengths_and_valid_ranges() -> None:
    got = problems(
        """
        merge_method: slerp
        base_model: a/one
        parameters: {t: 0.5}
        slices:
          - sources:
              - model: a/one
                layer_range: [0, 4]
              - model: a/two
                layer_range: [2, 8]
          - sources:
              - model: a/one
                layer_range: [4, 4]
        """
    )
    assert got == [
        "r.yaml:12: slices[1].sources[0].layer_range: must be [start, end) with 0 <= start < "
        "end, got [4, 4]"
    ]
    got = problems(
        """
        merge_method: slerp
        base_model: a/one
        parameters: {t: 0.5}
        slices:
          - sources:
              - model: a/one
                layer_range: [0, 4]
              - model: a/two
                layer_range: [2, 8]
        """
    )
    assert got == [
        "r.yaml:5: slices[0].sources: all sources of a slice need layer ranges of the same "
        "length, got [0, 4], [2, 8]"
    ]


def test_yaml_syntax_and_duplicate_keys() -> None:
    got = problems("merge_method: linear\nmodels: [\n")
    assert len(got) == 1 and got[0].startswith("r.yaml:3: not valid YAML")
    got = problems("merge_method: linear\nmerge_method: ties\n")
    assert got == ["r.yaml:2: merge_method: duplicate key (first given on line 1)"]


def test_exactly_one_of_models_or_slices() -> None:
    assert problems("merge_method: linear\n") == [
        "r.yaml:1: give exactly one of models: (whole models), slices: (layer ranges) or "
        "modules: (per module, for multimodal models); got none"
    ]


def test_misplaced_and_foreign_parameters_warn() -> None:
    recipe = parse_recipe(
        textwrap.dedent(
            """
            merge_method: task_arithmetic
            base_model: a/base
            models:
              - model: a/one
                parameters: {weight: 1, lambda: 2, density: 0.5}
            """
        ),
        "r.yaml",
    )
    assert recipe.warnings == [
        "r.yaml:6: models[0].parameters.lambda: 'lambda' is a global parameter of "
        "task_arithmetic: it has no effect here; put it under the top-level or slice parameters",
        "r.yaml:6: models[0].parameters.density: task_arithmetic does not use 'density'; ignored",
    ]


def test_chat_template_and_tokenizer_source_checked() -> None:
    got = problems(
        """
        merge_method: linear
        models: [{model: a/b, parameters: {weight: 1}}]
        chat_template: vicuna
        tokenizer_source: "a@"
        """
    )
    assert got[0] == (
        "r.yaml:4: tokenizer_source: must be base, union or a model: 'a@': "
        "missing revision after '@'"
    )
    assert got[1] == (
        "r.yaml:3: chat_template: must be one of auto, alpaca, chatml, exaone, llama3, "
        "mistral or a Jinja template, got 'vicuna'"
    )


def test_not_a_mapping() -> None:
    assert problems("- a\n- b\n") == [
        "r.yaml: a recipe must be a mapping of keys (merge_method, models or slices, ...), got "
        "a list"
    ]


def test_recipe_file_errors(tmp_path: Path) -> None:
    with pytest.raises(RecipeError, match="recipe not found"):
        load_recipe(tmp_path / "missing.yaml")


# --- parameter values -----------------------------------------------------------------------


def test_gradient_interpolation_matches_the_formula() -> None:
    g = Gradient((0.0, 0.5, 0.3, 0.7, 1.0))
    num_layers = 32
    for layer in range(num_layers):
        t = layer / (num_layers - 1)
        s = t * 4
        lo, hi = int(s // 1), min(int(-(-s // 1)), 4)
        want = g.values[lo] * (1 - (s - lo)) + g.values[hi] * (s - lo)
        assert g.at(layer, num_layers) == pytest.approx(want)
    assert g.at(0, 32) == 0.0 and g.at(31, 32) == 1.0
    assert g.at(None, 32) == 0.0  # outside the layers: the first entry
    assert Gradient((3.0,)).at(5, 10) == 3.0
    assert Gradient((0.0, 1.0)).at(0, 1) == 0.0


def test_filters_first_match_wins_and_fall_through() -> None:
    value, errs = parse_value(
        [{"filter": "self_attn", "value": 0.1}, {"filter": "mlp", "value": [0, 1]}]
    )
    assert not errs and value is not None
    assert value.at("model.layers.3.self_attn.q_proj.weight", 3, 4) == 0.1
    assert value.at("model.layers.3.mlp.up_proj.weight", 3, 4) == 1.0
    assert value.at("model.norm.weight", None, 4) is None
    top = ParamValue((Rule(None, 0.9),))
    assert lookup("t", [{"t": value}, {"t": top}], "model.norm.weight", None, 4) == 0.9
    assert lookup("t", [{"t": value}, {"t": top}], "x.self_attn.y", 0, 4) == 0.1
    assert lookup("w", [{}, {}], "x", 0, 4) is None


def test_bad_parameter_shapes() -> None:
    _, errs = parse_value([{"filter": "mlp"}])
    assert errs == [((0,), "filter entry needs a 'value'")]
    _, errs = parse_value({"a": 1})
    assert errs and "must be a number" in errs[0][1]
    _, errs = parse_value([])
    assert errs == [((), "must not be an empty list")]


# --- mergekit syntax beyond the basics -------------------------------------------------------


def test_mapping_form_of_model_references_reads_as_the_text_form() -> None:
    recipe = parse_recipe(
        textwrap.dedent(
            """
            merge_method: task_arithmetic
            base_model: {model: {path: org/base, revision: v1}}
            models:
              - model:
                  model: {path: org/base, revision: v1}
                  lora: {path: org/adapter, revision: abc123}
                parameters: {weight: 0.5}
              - model: {model: org/other@main, lora: org/lora2}
                parameters: {weight: 0.5}
            tokenizer_source: {model: org/other@main}
            """
        ),
        "r.yaml",
    )
    assert recipe.base_model == "org/base@v1"
    assert [s.model for s in recipe.models or ()] == [
        "org/base@v1+org/adapter@abc123",
        "org/other@main+org/lora2",
    ]
    assert recipe.tokenizer_source == "org/other@main"


def test_mapping_form_mistakes_are_one_line_each() -> None:
    got = problems(
        """
        merge_method: linear
        models:
          - model: {model: {path: a/b, rev: x}}
            parameters: {weight: 1}
          - model: {model: a/c, override_architecture: LlamaForCausalLM}
            parameters: {weight: 1}
          - model: {model: {path: ./my@dir}}
            parameters: {weight: 1}
          - model: {lora: a/d}
            parameters: {weight: 1}
        """
    )
    assert got == [
        "r.yaml:3: models[0].model: unknown key 'rev' in 'model' (allowed: path, revision)",
        "r.yaml:5: models[1].model: override_architecture (mergekit's per-model architecture "
        "override) is not supported yet; remove it (the architecture is read from each model's "
        "config.json)",
        "r.yaml:7: models[2].model: 'model.path' './my@dir' contains '@', which model "
        "references use to mark revisions and adapters; rename or link the folder",
        "r.yaml:9: models[3].model: a model reference mapping needs 'model' (and optionally "
        "'lora')",
    ]


def test_residual_weight_is_accepted_with_a_warning() -> None:
    recipe = parse_recipe(
        textwrap.dedent(
            """
            merge_method: passthrough
            slices:
              - sources: [{model: a/b, layer_range: [0, 4]}]
                residual_weight: 0.5
            """
        ),
        "r.yaml",
    )
    assert recipe.warnings == [
        "r.yaml:5: slices[0].residual_weight: has no effect (mergekit accepts and ignores it "
        "too); remove it"
    ]


def test_tools_we_do_not_run_yet_are_named() -> None:
    assert problems(
        """
        genome:
          models: [a/b, a/c]
          merge_method: dare_ties
        tasks:
          - name: hellaswag
        """
    ) == [
        "r.yaml:1: genome: a mergekit-evolve config (genome:, tasks:): run it with merge evolve; "
        "this file is not a merge recipe"
    ]
    assert problems(
        """
        name: first
        merge_method: linear
        models: [{model: a/b, parameters: {weight: 1}}]
        ---
        merge_method: slerp
        """
    ) == [
        "r.yaml:4: a second YAML document: this is a multi-stage recipe (mergekit-multi, one "
        "stage per document); load it with merge.build.stages"
    ]


def test_a_stage_name_alone_is_ignored_with_a_warning() -> None:
    recipe = parse_recipe(
        "name: first\nmerge_method: linear\nmodels: [{model: a/b, parameters: {weight: 1}}]\n",
        "r.yaml",
    )
    assert recipe.warnings == [
        "r.yaml:1: name: names a stage of a mergekit-multi recipe; a single recipe ignores it"
    ]


def test_exaone_chat_template_renders_the_exaone_format() -> None:
    from jinja2 import Template

    from merge.tokenizer import TEMPLATES

    messages = [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello"},
        {"role": "user", "content": "Why?"},
    ]
    text = Template(TEMPLATES["exaone"]).render(messages=messages, add_generation_prompt=True)
    assert text == (
        "[|system|][|endofturn|]\n[|user|]Hi\n[|assistant|]Hello[|endofturn|]\n"
        "[|user|]Why?\n[|assistant|]"
    )
    system = [{"role": "system", "content": "Be brief."}, messages[0]]
    assert Template(TEMPLATES["exaone"]).render(messages=system) == (
        "[|system|]Be brief.[|endofturn|]\n[|user|]Hi\n"
    )
    recipe = parse_recipe(
        "merge_method: linear\nmodels: [{model: a/b, parameters: {weight: 1}}]\n"
        "chat_template: exaone\n",
        "r.yaml",
    )
    assert recipe.chat_template == "exaone"
