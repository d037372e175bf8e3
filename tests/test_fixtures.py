"""The shared fixtures and quick start assets are what they claim to be."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from tiny import ROOT, assert_loads_and_generates, load_state

CHECKPOINTS = [
    "llama_base",
    "llama_ft1",
    "llama_ft2",
    "llama_sharded",
    "llama_bin",
    "qwen2_tied",
    "qwen2_tied_ft",
]
QUICKSTART = ROOT / "recipes" / "quickstart"


def _config(path: Path) -> dict:
    return json.loads((path / "config.json").read_text())


def _diff_std(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    diffs = [(a[k].float() - b[k].float()).flatten() for k in sorted(a)]
    return torch.cat(diffs).std().item()


def test_offline_environment(hf_offline: Path) -> None:
    from huggingface_hub import constants

    assert os.environ["HF_HUB_OFFLINE"] == "1"
    assert os.environ["TRANSFORMERS_OFFLINE"] == "1"
    assert os.environ["HF_HUB_DISABLE_TELEMETRY"] == "1"
    assert constants.HF_HUB_OFFLINE is True
    assert Path(constants.HF_HUB_CACHE).is_relative_to(hf_offline)
    assert Path(os.environ["HF_HOME"]) == hf_offline


def test_finetunes_are_base_plus_noise(llama_base: Path, llama_ft1: Path, llama_ft2: Path) -> None:
    base, ft1, ft2 = (load_state(p) for p in (llama_base, llama_ft1, llama_ft2))
    assert {k: v.shape for k, v in base.items()} == {k: v.shape for k, v in ft1.items()}
    assert _diff_std(ft1, base) == pytest.approx(0.02, rel=0.05)
    assert _diff_std(ft2, base) == pytest.approx(0.02, rel=0.05)
    assert _diff_std(ft1, ft2) == pytest.approx(0.02 * 2**0.5, rel=0.05)
    assert _config(llama_base) == _config(llama_ft1)


def test_llama_has_four_layers(llama_base: Path) -> None:
    assert _config(llama_base)["num_hidden_layers"] == 4
    layers = {int(k.split(".")[2]) for k in load_state(llama_base) if k.startswith("model.layers.")}
    assert layers == {0, 1, 2, 3}


def test_sharded_equals_ft1(llama_sharded: Path, llama_ft1: Path) -> None:
    shards = sorted(llama_sharded.glob("*.safetensors"))
    assert len(shards) >= 3
    index = json.loads((llama_sharded / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == {s.name for s in shards}
    state, expected = load_state(llama_sharded), load_state(llama_ft1)
    assert set(index["weight_map"]) == set(state) == set(expected)
    for name, tensor in expected.items():
        assert torch.equal(state[name], tensor), name


def test_bin_equals_ft2(llama_bin: Path, llama_ft2: Path) -> None:
    assert (llama_bin / "pytorch_model.bin").is_file()
    assert not list(llama_bin.glob("*.safetensors"))
    state, expected = load_state(llama_bin), load_state(llama_ft2)
    assert state.keys() == expected.keys()
    for name, tensor in expected.items():
        assert torch.equal(state[name], tensor), name


@pytest.mark.parametrize("name", ["qwen2_tied", "qwen2_tied_ft"])
def test_qwen2_tied_has_no_lm_head(name: str, request: pytest.FixtureRequest) -> None:
    path: Path = request.getfixturevalue(name)
    config = _config(path)
    assert config["model_type"] == "qwen2"
    assert config["tie_word_embeddings"] is True
    state = load_state(path)
    assert "lm_head.weight" not in state
    assert "model.embed_tokens.weight" in state
    assert "model.layers.0.self_attn.q_proj.bias" in state


@pytest.mark.parametrize("name", CHECKPOINTS)
def test_checkpoint_is_complete(
    name: str, request: pytest.FixtureRequest, tokenizer_dir: Path
) -> None:
    path: Path = request.getfixturevalue(name)
    assert (path / "generation_config.json").is_file()
    tokenizer = (path / "tokenizer.json").read_bytes()
    assert tokenizer == (tokenizer_dir / "tokenizer.json").read_bytes()
    assert _config(path)["vocab_size"] == 512
    size = sum(f.stat().st_size for f in path.iterdir())
    assert size < 400_000
    assert_loads_and_generates(path)


def test_make_checkpoint_is_deterministic(make_checkpoint: Callable[..., Path]) -> None:
    a = make_checkpoint("a", arch="mistral", seed=7, hidden=16, dtype=torch.bfloat16)
    b = make_checkpoint("b", arch="mistral", seed=7, hidden=16, dtype=torch.bfloat16)
    c = make_checkpoint("c", arch="mistral", seed=8, hidden=16, dtype=torch.bfloat16)
    assert _config(a)["model_type"] == "mistral"
    assert _config(a)["dtype"] == "bfloat16"
    assert (a / "model.safetensors").read_bytes() == (b / "model.safetensors").read_bytes()
    state_a, state_c = load_state(a), load_state(c)
    assert all(t.dtype == torch.bfloat16 for t in state_a.values())
    embed = "model.embed_tokens.weight"
    assert not torch.equal(state_a[embed], state_c[embed])
    assert_loads_and_generates(a)


def test_quickstart_assets() -> None:
    total = sum(f.stat().st_size for f in QUICKSTART.rglob("*") if f.is_file())
    assert total < 600_000
    tokenizer = (QUICKSTART / "tokenizer" / "tokenizer.json").read_bytes()
    for name in ["base", "chat", "code"]:
        path = QUICKSTART / name
        assert (path / "tokenizer.json").read_bytes() == tokenizer
        assert _config(path)["dtype"] == "bfloat16"
        assert all(t.dtype == torch.bfloat16 for t in load_state(path).values())
        assert_loads_and_generates(path)
    assert 0 < _diff_std(load_state(QUICKSTART / "chat"), load_state(QUICKSTART / "base")) < 0.01
