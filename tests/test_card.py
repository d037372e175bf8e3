"""The model card: Hub front matter, model list, verbatim recipe, reproduction note."""

from __future__ import annotations

from typing import Any

import pytest
import yaml

from merge.card import hub_id, model_card

RECIPE = """\
# A comment that must survive
merge_method: ties
base_model: org/base@main
models:
  - model: org/a@abc123
    parameters: {density: 0.5, weight: 0.5}
  - model: ./local/model
dtype: bfloat16
"""


def make_card(**overrides: Any) -> str:
    args: dict[str, Any] = {
        "recipe_text": RECIPE,
        "method_name": "TIES",
        "method_paper": "https://arxiv.org/abs/2306.01708",
        "method_description": "Trims small changes and elects a sign per parameter.",
        "models": ["org/a@abc123", "./local/model", "/abs/path/m", "org/base@main"],
        "base_model": "org/base@main",
        "tool_version": "0.1.0",
        "seed": 42,
        "dtype": "bfloat16",
    }
    args.update(overrides)
    return model_card(**args)


def front_matter(card: str) -> dict[str, Any]:
    assert card.startswith("---\n")
    head, _, _ = card[4:].partition("\n---\n")
    data = yaml.safe_load(head)
    assert isinstance(data, dict)
    return data


def test_front_matter_fields() -> None:
    meta = front_matter(make_card())
    assert meta == {
        "base_model": ["org/base", "org/a"],
        "base_model_relation": "merge",
        "library_name": "transformers",
        "tags": ["merge", "mergesmith"],
    }


def test_local_paths_dropped_and_relation_omitted() -> None:
    meta = front_matter(make_card(models=["./x", "/abs/y", "rel/../z", "~/m"], base_model=None))
    assert "base_model" not in meta and "base_model_relation" not in meta
    assert meta["library_name"] == "transformers"


def test_odd_names_stay_valid_yaml() -> None:
    card = make_card(models=["yes/no", "null/1e3", "org/a+org/lora"], base_model="true/false")
    assert front_matter(card)["base_model"] == ["true/false", "yes/no", "null/1e3", "org/a"]


def test_duplicates_removed_base_first() -> None:
    card = make_card(models=["org/a", "org/b@v2", "org/a@v1"], base_model="org/b@v2")
    assert front_matter(card)["base_model"] == ["org/b", "org/a"]


def test_recipe_verbatim_in_yaml_block() -> None:
    card = make_card()
    assert f"```yaml\n{RECIPE}```\n" in card
    assert "## Configuration" in card


def test_recipe_with_backticks_gets_longer_fence() -> None:
    recipe = "# see ```this```\nmerge_method: linear"
    card = make_card(recipe_text=recipe)
    assert f"````yaml\n{recipe}\n````\n" in card


def test_body_mentions_method_models_and_reproduction() -> None:
    card = make_card(num_params=7_241_732_096, extra_sections=[("Gates", "Prompt based.")])
    assert "[TIES](https://arxiv.org/abs/2306.01708)" in card
    assert "- [org/base](https://huggingface.co/org/base), revision `main` (base model)" in card
    assert "- [org/a](https://huggingface.co/org/a), revision `abc123`\n" in card
    assert "- `./local/model`\n" in card
    assert "## Gates\n\nPrompt based." in card
    assert "7.24B" in card
    assert "mergesmith 0.1.0, seed 42" in card
    assert "merge run recipe.yaml" in card
    assert "mergesmith" in card.split("## Models")[0]


def test_no_paper_link() -> None:
    card = make_card(method_name="Linear", method_paper=None)
    assert "using the Linear merge method" in card


@pytest.mark.parametrize(
    ("ref", "expected"),
    [
        ("org/name", "org/name"),
        ("org/name@rev", "org/name"),
        ("Org-1/Name_2.5", "Org-1/Name_2.5"),
        ("org/a+org/lora", "org/a"),
        ("./x", None),
        ("/abs/x", None),
        ("x", None),
        ("a/b/c", None),
        ("org/..", None),
        ("org/a--b", None),
        ("C:\\models\\x", None),
    ],
)
def test_hub_id(ref: str, expected: str | None) -> None:
    assert hub_id(ref) == expected


def test_fields_in_front_matter_and_lock_reproduction() -> None:
    from merge.card import Fields

    fields = Fields(
        license="mit",
        language=["en", "fr"],
        datasets=["d/one"],
        pipeline_tag="text-generation",
        tags=["merge", "mergesmith", "ties", "lora"],
    )
    inputs = [{"ref": "org/a@abc123", "source": "hub", "repo": "org/a", "commit": "f" * 40}]
    card = make_card(fields=fields, inputs=inputs, recipe_name="m.yaml", lock_name="m.lock")
    meta = front_matter(card)
    assert meta["base_model"] == ["org/a"]  # the inputs say which refs are Hub repos
    assert meta["license"] == "mit" and meta["language"] == ["en", "fr"]
    assert meta["datasets"] == ["d/one"] and meta["pipeline_tag"] == "text-generation"
    assert meta["tags"] == ["merge", "mergesmith", "ties", "lora"]
    assert f"commit `{'f' * 40}`" in card
    assert "pip install mergesmith==0.1.0\nmerge run --locked m.yaml\n" in card


def test_decide_override_silences_the_disagreement() -> None:
    from merge.card.facts import decide

    facts = {
        "input_cards": {
            "org/a": {"license": "mit"},
            "org/b": {"license": "apache-2.0"},
            "./c": None,
        },
        "donor": "org/a",
        "architectures": ["LlamaForCausalLM"],
        "vision": False,
        "tags": ["merge"],
    }
    fields, warnings = decide(facts)
    assert fields.license is None and len(warnings) == 1 and "org/b: apache-2.0" in warnings[0]
    fields, warnings = decide(facts, license="other")
    assert fields.license == "other" and warnings == []
    assert fields.pipeline_tag == "text-generation"


def test_local_inputs_are_named_in_the_reproduction() -> None:
    inputs = [
        {"ref": "org/a@abc123", "source": "hub", "repo": "org/a", "commit": "f" * 40},
        {"ref": "./local/model", "source": "local"},
    ]
    card = make_card(inputs=inputs, recipe_name="m.yaml", lock_name="m.lock")
    assert (
        "The local inputs (`./local/model`) are not on the Hub: put folders with the same files "
        "at the same paths beside the recipe first (the lock checks their hashes)."
    ) in card
    hub_only = make_card(inputs=inputs[:1], models=["org/a@abc123"], base_model=None)
    assert "local inputs" not in hub_only
