"""Mixed architectures (``merge.crimes``): config names and tensor sets; the recipe's
``allow_mismatched_architectures: true`` and ``--allow-crimes`` as the escapes; optional
tensors that never count; and frankenmerges whose lm_head and config agree."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file
from test_cli_flags import cli, error_lines, linear, run_ok, write
from transformers import AutoModelForCausalLM

from tiny import assert_loads_and_generates, load_state, make_tiny

ESCAPE = "set allow_mismatched_architectures: true or pass --allow-crimes to merge them anyway"


def _edit(source: Path, target: Path, add: dict[str, torch.Tensor], **config: Any) -> Path:
    """A copy of ``source`` with extra tensors ``add`` and config entries ``config``."""
    shutil.copytree(source, target)
    state = load_file(target / "model.safetensors")
    save_file({**state, **add}, target / "model.safetensors", metadata={"format": "pt"})
    cfg = json.loads((target / "config.json").read_text())
    (target / "config.json").write_text(json.dumps({**cfg, **config}))
    return target


@pytest.fixture(scope="module")
def biased(tmp_path_factory: pytest.TempPathFactory, llama_base: Path) -> Path:
    """llama_base with query biases in its 4 layers: a Llama, but other tensors."""
    bias = {f"model.layers.{i}.self_attn.q_proj.bias": torch.zeros(32) for i in range(4)}
    root = tmp_path_factory.mktemp("crimes")
    return _edit(llama_base, root / "biased", bias, attention_bias=True)


@pytest.fixture(scope="module")
def mistral(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny(tmp_path_factory.mktemp("crimes") / "mistral", "mistral", seed=5, layers=4)


@pytest.fixture(scope="module")
def qwen2_untied(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny(tmp_path_factory.mktemp("crimes") / "qwen2_untied", "qwen2", seed=6)


def passthrough(*ranges: tuple[Path, int, int]) -> dict[str, Any]:
    return {
        "merge_method": "passthrough",
        "slices": [{"sources": [{"model": str(m), "layer_range": [a, b]}]} for m, a, b in ranges],
    }


def loads_every_tensor(out: Path) -> None:
    """The output loads with no weight left to random init, and generates."""
    _, info = AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"], info
    assert_loads_and_generates(out)


def test_the_recipe_key_allows_other_architectures(
    tmp_path: Path, llama_base: Path, mistral: Path
) -> None:
    recipe = write(tmp_path, linear(llama_base, mistral))
    (line,) = error_lines(tmp_path, "validate", recipe)
    assert line.endswith(f"is MistralForCausalLM; {ESCAPE}"), line
    allowed = write(
        tmp_path, {**linear(llama_base, mistral), "allow_mismatched_architectures": True}
    )
    stderr = run_ok(allowed, tmp_path / "out")
    assert stderr.splitlines()[0] == (
        f"warning: the models have different architectures: '{llama_base}' is LlamaForCausalLM; "
        f"'{mistral}' is MistralForCausalLM; merging anyway (allow_mismatched_architectures: true)"
    )
    assert_loads_and_generates(tmp_path / "out")
    code, _, stderr = cli("validate", allowed, "--allow-crimes")
    assert code == 0 and stderr.splitlines() == [
        f"warning: the models have different architectures: '{llama_base}' is LlamaForCausalLM; "
        f"'{mistral}' is MistralForCausalLM; merging anyway (--allow-crimes)"
    ]


def test_the_recipe_key_is_a_boolean(tmp_path: Path, llama_base: Path) -> None:
    recipe = write(tmp_path, {**linear(llama_base), "allow_mismatched_architectures": "yes"})
    (line,) = error_lines(tmp_path, "validate", recipe)
    assert line.startswith(f"{recipe}:") and "allow_mismatched_architectures" in line, line


def test_other_tensors_of_one_architecture_are_an_error_naming_both(
    tmp_path: Path, llama_base: Path, biased: Path
) -> None:
    recipe = write(tmp_path, linear(llama_base, biased))
    want = (
        f"{recipe}: the models have different tensors: '{biased}' has 4 tensors "
        f"'{llama_base}' lacks (model.layers.0.self_attn.q_proj.bias, "
        "model.layers.1.self_attn.q_proj.bias, model.layers.2.self_attn.q_proj.bias, ...); "
        + ESCAPE
    )
    assert error_lines(tmp_path, "validate", recipe) == [want]
    assert error_lines(tmp_path, "run", recipe, tmp_path / "out") == [want]
    stderr = run_ok(recipe, tmp_path / "out", "--allow-crimes")
    lines = stderr.splitlines()
    assert lines[0] == (
        f"warning: the models have different tensors: '{biased}' has 4 tensors "
        f"'{llama_base}' lacks (model.layers.0.self_attn.q_proj.bias, "
        "model.layers.1.self_attn.q_proj.bias, model.layers.2.self_attn.q_proj.bias, ...); "
        "merging anyway (--allow-crimes)"
    )
    assert sum("different" in line for line in lines) == 1
    assert not any(".bias" in name for name in load_state(tmp_path / "out"))
    assert_loads_and_generates(tmp_path / "out")


def test_tensors_the_output_needs_are_the_planners_error_alone(
    tmp_path: Path, llama_base: Path, biased: Path
) -> None:
    """With the biased model as the donor, llama_base lacks what the output needs: the
    planner names each tensor, and no escape is offered (none would help)."""
    recipe = write(tmp_path, linear(biased, llama_base))
    lines = error_lines(tmp_path, "validate", recipe, "--allow-crimes")
    assert lines == error_lines(tmp_path, "validate", recipe)
    assert len(lines) == 4, lines
    assert lines[0] == (
        f"model '{llama_base}' has no tensor 'model.layers.0.self_attn.q_proj.bias' (needed for "
        "output tensor 'model.layers.0.self_attn.q_proj.bias')"
    )


def test_a_frankenmerge_of_other_tensors_is_an_error(
    tmp_path: Path, llama_base: Path, biased: Path
) -> None:
    recipe = write(tmp_path, passthrough((llama_base, 0, 2), (biased, 2, 4)))
    (line,) = error_lines(tmp_path, "validate", recipe)
    assert line == (
        f"{recipe}: the models have different tensors: '{biased}' has 4 tensors "
        f"'{llama_base}' lacks (model.layers.0.self_attn.q_proj.bias, "
        "model.layers.1.self_attn.q_proj.bias, model.layers.2.self_attn.q_proj.bias, ...); "
        + ESCAPE
    )


def test_optional_tensors_and_depth_do_not_count(
    tmp_path: Path, llama_base: Path, qwen2_tied: Path, qwen2_untied: Path
) -> None:
    """A stored rotary inv_freq buffer, a tied vs an untied lm_head, and another layer
    count (a frankenmerge's ranges) are the same architecture."""
    buffers = {f"model.layers.{i}.self_attn.rotary_emb.inv_freq": torch.ones(4) for i in range(4)}
    old = _edit(llama_base, tmp_path / "old", buffers)
    shallow = make_tiny(tmp_path / "shallow", "llama", seed=7, layers=2)
    for recipe in (
        linear(llama_base, old),
        linear(qwen2_untied, qwen2_tied),
        passthrough((llama_base, 0, 3), (shallow, 0, 2)),
    ):
        code, _, stderr = cli("validate", write(tmp_path, recipe))
        assert code == 0, stderr
        assert "different" not in stderr and "crimes" not in stderr, stderr


def test_llama_and_tied_qwen2_frankenmerge(
    tmp_path: Path, llama_base: Path, qwen2_tied: Path
) -> None:
    """The reported case: the last slice's Qwen2 ties its embeddings (no lm_head) and the
    output's config (the Llama's) does not: an error, and with the escape an output whose
    lm_head is the Qwen2's embedding, so nothing is left to random init."""
    recipe = write(tmp_path, passthrough((llama_base, 0, 2), (qwen2_tied, 0, 2)))
    (line,) = error_lines(tmp_path, "validate", recipe)
    assert line == (
        f"{recipe}: the models have different architectures: '{llama_base}' is "
        f"LlamaForCausalLM; '{qwen2_tied}' is Qwen2ForCausalLM; {ESCAPE}"
    )
    stderr = run_ok(recipe, tmp_path / "out", "--allow-crimes")
    assert stderr.splitlines()[0].startswith("warning: the models have different architectures")
    out = load_state(tmp_path / "out")
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["tie_word_embeddings"] is False
    qwen = load_state(qwen2_tied)
    assert torch.equal(out["lm_head.weight"], qwen["model.embed_tokens.weight"])
    assert torch.equal(out["model.norm.weight"], qwen["model.norm.weight"])
    loads_every_tensor(tmp_path / "out")


def test_a_tied_donor_with_an_untied_last_slice_is_untied(
    tmp_path: Path, qwen2_tied: Path, qwen2_untied: Path
) -> None:
    """The lm_head comes from the last slice; a tied config would throw it away."""
    recipe = write(tmp_path, passthrough((qwen2_tied, 0, 1), (qwen2_untied, 1, 2)))
    stderr = run_ok(recipe, tmp_path / "out")
    assert [line for line in stderr.splitlines() if line.startswith("warning:")] == [
        f"warning: 'lm_head.weight' comes from model '{qwen2_untied}', whose embeddings are not "
        "tied: the output config says tie_word_embeddings: false"
    ]
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["tie_word_embeddings"] is False
    out = load_state(tmp_path / "out")
    assert torch.equal(out["lm_head.weight"], load_state(qwen2_untied)["lm_head.weight"])
    assert torch.equal(
        out["model.embed_tokens.weight"], load_state(qwen2_tied)["model.embed_tokens.weight"]
    )
    loads_every_tensor(tmp_path / "out")


def test_an_untied_donor_with_a_tied_last_slice_gets_its_embedding_as_lm_head(
    tmp_path: Path, qwen2_tied: Path, qwen2_untied: Path
) -> None:
    recipe = write(tmp_path, passthrough((qwen2_untied, 0, 1), (qwen2_tied, 1, 2)))
    stderr = run_ok(recipe, tmp_path / "out")
    assert "warning" not in stderr, stderr
    out = load_state(tmp_path / "out")
    assert torch.equal(out["lm_head.weight"], load_state(qwen2_tied)["model.embed_tokens.weight"])
    loads_every_tensor(tmp_path / "out")


def test_a_lora_input_counts_as_its_base(
    tmp_path: Path, llama_base: Path, llama_ft1: Path, biased: Path
) -> None:
    from test_lora import make_adapter

    adapter = make_adapter(tmp_path / "ad", llama_base, target_modules=["q_proj", "v_proj"])
    lora = f"{llama_base}+{adapter}"
    code, _, stderr = cli("validate", write(tmp_path, linear(lora, llama_ft1)))
    assert code == 0 and "different" not in stderr, stderr
    recipe = write(tmp_path, linear(lora, biased))
    (line,) = error_lines(tmp_path, "validate", recipe)
    assert line.startswith(
        f"{recipe}: the models have different tensors: '{biased}' has 4 tensors '{lora}' lacks"
    ), line
