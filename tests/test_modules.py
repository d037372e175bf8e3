"""``modules:``: multimodal models merged module by module (mergekit's syntax).

The tiny LLaVA and Qwen2-VL models (``tests/tiny_vlm.py``) have 2 text layers and 3 vision
layers, so per-module layer counting shows in gradients, slices and the output config. Every
expected tensor is computed here from the inputs with the method's formula written out.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
import yaml
from torch.testing import assert_close
from typer.testing import CliRunner

from merge import api
from merge import modules as mods
from merge.cli import app
from merge.errors import PlanError
from standins import seed_cache
from tiny import load_state
from tiny_vlm import assert_image_text_forward

runner = CliRunner()


def write(tmp_path: Path, recipe: dict, name: str = "recipe.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


def run(tmp_path: Path, recipe: dict) -> Path:
    out = tmp_path / "out"
    result = runner.invoke(app, ["run", str(write(tmp_path, recipe)), str(out)])
    assert result.exit_code == 0, result.stderr
    return out


def fails(tmp_path: Path, recipe: dict) -> list[str]:
    path = write(tmp_path, recipe)
    result = runner.invoke(app, ["run", str(path), str(tmp_path / "out")])
    assert result.exit_code == 2, result.stderr
    assert not (tmp_path / "out").exists()
    return [line.removeprefix(f"error: {path}:") for line in result.stderr.strip().splitlines()]


def test_llava_modules_each_merged_their_own_way(
    tmp_path: Path, llava_base: Path, llava_ft: Path
) -> None:
    b, f = str(llava_base), str(llava_ft)
    recipe = {
        "merge_method": "linear",
        "base_model": b,
        "modules": {
            "text_decoder": {
                "models": [
                    {"model": b, "parameters": {"weight": 0.3}},
                    {"model": f, "parameters": {"weight": 0.7}},
                ]
            },
            "vision_tower": {
                "models": [{"model": b}, {"model": f, "parameters": {"weight": [0, 1]}}],
                "parameters": {"weight": 1.0},  # the module's: below the model's own
            },
            "multi_modal_projector": {
                "models": [
                    {"model": b, "parameters": {"weight": 0.0}},
                    {"model": f, "parameters": {"weight": 1.0}},
                ]
            },
        },
    }
    out = run(tmp_path, recipe)
    base, ft, merged = load_state(llava_base), load_state(llava_ft), load_state(out)
    assert sorted(merged) == sorted(base)
    for name, tensor in merged.items():
        module = mods.module_of(name, multimodal=True)
        if module == mods.TEXT:
            want = 0.3 * base[name] + 0.7 * ft[name]
        elif module == mods.PROJECTOR:
            want = ft[name]
        else:  # vision: the gradient [0, 1] over its 3 layers; outside the layers, the first
            layer = int(name.split(".layers.")[1].split(".")[0]) if ".layers." in name else 0
            w = layer / 2
            want = (base[name] + w * ft[name]) / (1 + w)
        assert_close(tensor, want, rtol=0, atol=1e-6, msg=name)
    assert (out / "preprocessor_config.json").read_bytes() == (
        llava_base / "preprocessor_config.json"
    ).read_bytes()
    config = json.loads((out / "config.json").read_text())
    assert config["vision_config"]["num_hidden_layers"] == 3
    assert config["text_config"]["num_hidden_layers"] == 2
    assert_image_text_forward(out)


def test_qwen2vl_frankenmerge_of_text_and_vision_layers(
    tmp_path: Path, qwen2vl_base: Path, qwen2vl_ft: Path
) -> None:
    b, f = str(qwen2vl_base), str(qwen2vl_ft)
    recipe = {
        "merge_method": "passthrough",
        "modules": {
            "text_decoder": {
                "slices": [
                    {"sources": [{"model": b, "layer_range": [0, 2]}]},
                    {"sources": [{"model": f, "layer_range": [1, 2]}]},
                ]
            },
            "vision_tower": {
                "slices": [
                    {"sources": [{"model": b, "layer_range": [0, 3]}]},
                    {"sources": [{"model": f, "layer_range": [2, 3]}]},
                ]
            },
            "multi_modal_projector": {"models": [{"model": f}]},
        },
    }
    result = runner.invoke(app, ["validate", str(write(tmp_path, recipe, "v.yaml"))])
    assert result.exit_code == 0, result.stderr
    assert (
        "  modules: text_decoder (3 layers, 39 tensors, from slices), vision_tower (4 layers, "
        "49 tensors, from slices), multi_modal_projector (0 layers, 6 tensors, from models)"
    ) in result.stdout.splitlines()
    out = run(tmp_path, recipe)
    base, ft, merged = load_state(qwen2vl_base), load_state(qwen2vl_ft), load_state(out)
    config = json.loads((out / "config.json").read_text())
    assert config["text_config"]["num_hidden_layers"] == 3
    assert config["text_config"]["layer_types"] == ["full_attention"] * 3
    assert config["vision_config"]["depth"] == 4
    for name, tensor in merged.items():
        if name.startswith("model.layers.2."):
            want = ft[name.replace("layers.2.", "layers.1.")]
        elif name.startswith("visual.blocks.3."):
            want = ft[name.replace("blocks.3.", "blocks.2.")]
        elif name.startswith(("visual.merger.", "model.norm.", "lm_head.")):
            want = ft[name]  # the projector's model; the last text slice's norm and head
        else:
            want = base[name]  # the first slices' layers and embeddings (text and vision)
        assert torch.equal(tensor, want), name
    assert len(merged) == len(base) + 12 + 12  # one text layer and one vision block more
    assert_image_text_forward(out)


def test_models_recipe_counts_layers_per_module(tmp_path: Path, llava_base: Path, llava_ft: Path):
    recipe = {
        "merge_method": "slerp",
        "base_model": str(llava_base),
        "models": [{"model": str(llava_base)}, {"model": str(llava_ft)}],
        "parameters": {"t": [0, 1]},
    }
    plan = api.plan(write(tmp_path, recipe))
    t = {job.name: job.params["t"] for job in plan.jobs}
    assert t["language_model.model.layers.0.mlp.up_proj.weight"] == 0.0
    assert t["language_model.model.layers.1.mlp.up_proj.weight"] == 1.0  # 1 of 2 text layers
    assert t["vision_tower.encoder.layers.1.mlp.fc1.weight"] == 0.5  # 1 of 3 vision layers
    assert t["vision_tower.encoder.layers.2.mlp.fc1.weight"] == 1.0
    assert t["multi_modal_projector.linear_1.weight"] == 0.0  # outside the layers: the first
    assert len(plan.jobs) == len(load_state(llava_base))


def test_slices_of_a_multimodal_model_need_modules(tmp_path: Path, llava_base: Path) -> None:
    recipe = {
        "merge_method": "passthrough",
        "slices": [{"sources": [{"model": str(llava_base), "layer_range": [0, 2]}]}],
    }
    assert fails(tmp_path, recipe) == [
        f"2: slices: model '{llava_base}' has 3 modules (text_decoder (2 layers), vision_tower "
        "(3 layers), multi_modal_projector (0 layers)), and slices stack the layers of one: "
        "give each module its own models: or slices: under modules: (mergekit's syntax for "
        "multimodal models)"
    ]


def test_module_names_are_checked_against_the_model(tmp_path: Path, llava_base: Path) -> None:
    m = str(llava_base)
    recipe = {
        "merge_method": "passthrough",
        "modules": {
            "text_decoder": {"models": [{"model": m}]},
            "vision": {"models": [{"model": m}]},
        },
    }
    got = fails(tmp_path, recipe)
    assert got == [
        f"6: modules.vision: model '{m}' has no module 'vision'; did you mean 'vision_tower'? "
        "(allowed: text_decoder, vision_tower, multi_modal_projector)",
        f"2: modules: no entry for module 'vision_tower' of model '{m}' (55 tensors, such as "
        "'vision_tower.embeddings.class_embedding'): every module needs models: or slices: "
        "(mergekit would leave its tensors out of the output)",
        f"2: modules: no entry for module 'multi_modal_projector' of model '{m}' (4 tensors, "
        "such as 'multi_modal_projector.linear_1.bias'): every module needs models: or "
        "slices: (mergekit would leave its tensors out of the output)",
    ]


def test_a_module_needs_models_or_slices(tmp_path: Path, llava_base: Path) -> None:
    recipe = {"merge_method": "passthrough", "modules": {"text_decoder": {"parameters": {}}}}
    path = write(tmp_path, recipe)
    result = runner.invoke(app, ["validate", str(path)])
    assert result.exit_code == 2
    assert result.stderr == (
        f"error: {path}:3: modules.text_decoder: module 'text_decoder' needs exactly one of "
        "models: (whole models) or slices: (layer ranges)\n"
    )


def test_default_module_and_precedence_on_a_text_model(
    tmp_path: Path, llama_base: Path, llama_ft1: Path
) -> None:
    """mergekit names a text-only model's one module ``default``. Precedence: a source's own
    parameters, then the slice's, then the module's, then the top level's."""
    b, f = str(llama_base), str(llama_ft1)
    recipe = {
        "merge_method": "linear",
        "parameters": {"weight": 5.0, "normalize": False},
        "modules": {
            "default": {
                "parameters": {"weight": 3.0},
                "slices": [
                    {
                        "sources": [
                            {"model": b, "layer_range": [0, 4], "parameters": {"weight": 1.0}},
                            {"model": f, "layer_range": [0, 4]},
                        ],
                        "parameters": {"weight": [2.0, 2.0]},
                    }
                ],
            }
        },
    }
    plan = api.plan(write(tmp_path, recipe))
    assert {tuple(job.params["weight"]) for job in plan.jobs if job.layer is not None} == {
        (1.0, 2.0)
    }
    recipe["modules"]["default"]["slices"][0].pop("parameters")
    plan = api.plan(write(tmp_path, recipe))
    assert {tuple(job.params["weight"]) for job in plan.jobs} == {(1.0, 3.0)}
    with pytest.raises(PlanError, match="has no module 'vision_tower'"):
        api.plan(
            write(
                tmp_path,
                {
                    "merge_method": "passthrough",
                    "modules": {"vision_tower": {"models": [{"model": b}]}},
                },
            )
        )


README = Path(__file__).resolve().parents[1] / "README.md"
README_MODELS = {  # the README examples' Hub ids -> the tiny checkpoints' fixture names
    "llava-hf/llava-1.5-7b-hf": "llava_base",
    "my-org/llava-1.5-7b-chat-ft": "llava_ft",
    "Qwen/Qwen2-VL-7B-Instruct": "qwen2vl_base",
    "my-org/qwen2-vl-7b-ft": "qwen2vl_ft",
}


def readme_examples() -> list[str]:
    blocks = re.findall(r"```yaml\n(.*?)```", README.read_text(encoding="utf-8"), flags=re.S)
    return [b for b in blocks if "\nmodules:\n" in b]


@pytest.mark.parametrize("index", [0, 1], ids=["llava", "qwen2_vl"])
def test_readme_multimodal_examples_run(
    index: int, tmp_path: Path, request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The README's two examples, with their Hub ids resolving offline to the tiny models;
    the only edit: Qwen2-VL-7B's 28 text layers become the tiny model's 2."""
    examples = readme_examples()
    assert len(examples) == 2
    text = examples[index].replace("[0, 14]", "[0, 1]").replace("[14, 28]", "[1, 2]")
    hub = tmp_path / "hub"
    for repo_id, fixture in README_MODELS.items():
        if repo_id in text:
            seed_cache(hub, repo_id, request.getfixturevalue(fixture))
    monkeypatch.setenv("HF_HUB_CACHE", str(hub))
    monkeypatch.chdir(tmp_path)
    (tmp_path / "recipe.yaml").write_text(text)
    result = runner.invoke(app, ["run", "recipe.yaml", "out"])
    assert result.exit_code == 0, result.stderr
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["architectures"][0] in (
        "LlavaForConditionalGeneration",
        "Qwen2VLForConditionalGeneration",
    )
    assert_image_text_forward(tmp_path / "out")
