"""Tiny checkpoints for the test suite, and the checks every merged output must pass.

``make_tiny`` writes a complete Hugging Face checkpoint folder (config, weights, tokenizer,
generation config) for a randomly initialised model of a few hundred KB. Everything is
deterministic: a seed fixes the random init, and a "fine-tune" (``noise_from``) is its source's
weights plus seeded Gaussian noise. The tokenizer is the one shipped with the quick start
example (``recipes/quickstart/tokenizer``, built by ``scripts/make_quickstart.py``); it is copied,
never retrained.

``assert_loads_and_generates`` and ``load_state`` check outputs. The session fixtures in
``conftest.py`` call these functions; tests may also call them directly.

What this does not do: touch the network or any cache (``from_pretrained`` is only ever given
local folders), or keep anything outside the folders it is given.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any, Literal

import torch
from safetensors.torch import load_file
from tokenizers import Tokenizer
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    DeepseekV3Config,
    DeepseekV3ForCausalLM,
    GenerationConfig,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    PretrainedConfig,
    PreTrainedModel,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)
from transformers.utils import logging as hf_logging

ROOT = Path(__file__).resolve().parent.parent
QUICKSTART_TOKENIZER = ROOT / "recipes" / "quickstart" / "tokenizer"
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
)

Arch = Literal["llama", "qwen2", "mistral", "qwen3", "deepseek_v3"]
Format = Literal["safetensors", "bin"]

ARCHS: dict[str, tuple[type[PretrainedConfig], type[PreTrainedModel]]] = {
    "llama": (LlamaConfig, LlamaForCausalLM),
    "qwen2": (Qwen2Config, Qwen2ForCausalLM),
    "mistral": (MistralConfig, MistralForCausalLM),
    "qwen3": (Qwen3Config, Qwen3ForCausalLM),
    "deepseek_v3": (DeepseekV3Config, DeepseekV3ForCausalLM),
}
# A dense DeepSeek-V3 (every layer dense): small multi-head latent attention.
DEEPSEEK_DENSE = {
    "num_key_value_heads": 4,
    "q_lora_rank": None,
    "kv_lora_rank": 16,
    "qk_rope_head_dim": 8,
    "qk_nope_head_dim": 8,
    "v_head_dim": 8,
    "n_routed_experts": 4,
    "n_shared_experts": 1,
}

hf_logging.disable_progress_bar()


def special_token_ids(tokenizer_dir: Path = QUICKSTART_TOKENIZER) -> dict[str, int]:
    """Ids of the tokenizer's ``bos``/``eos``/``pad`` tokens, and its full vocabulary size."""
    tok = Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json"))
    ids = {"vocab_size": tok.get_vocab_size(with_added_tokens=True)}
    for key, token in [
        ("bos_token_id", "<s>"),
        ("eos_token_id", "</s>"),
        ("pad_token_id", "<pad>"),
    ]:
        token_id = tok.token_to_id(token)
        assert token_id is not None, f"{tokenizer_dir}: no {token} token"
        ids[key] = token_id
    return ids


def copy_tokenizer(directory: Path, source: Path = QUICKSTART_TOKENIZER) -> None:
    """Copy the tokenizer files present in ``source`` into ``directory``."""
    for name in TOKENIZER_FILES:
        if (source / name).is_file():
            shutil.copyfile(source / name, directory / name)


def tiny_config(
    arch: Arch = "llama",
    *,
    layers: int = 2,
    hidden: int = 32,
    vocab: int | None = None,
    tie: bool = False,
) -> PretrainedConfig:
    """A config for a tiny model: 4 attention heads, 2 KV heads, MLP twice the hidden size."""
    if arch not in ARCHS:
        raise ValueError(f"unknown arch {arch!r}; expected one of {sorted(ARCHS)}")
    ids = special_token_ids()
    config_cls, _ = ARCHS[arch]
    kwargs: dict[str, Any] = {
        "hidden_size": hidden,
        "intermediate_size": 2 * hidden,
        "num_hidden_layers": layers,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "vocab_size": vocab or ids["vocab_size"],
        "max_position_embeddings": 128,
        "tie_word_embeddings": tie,
        "bos_token_id": ids["bos_token_id"],
        "eos_token_id": ids["eos_token_id"],
        "pad_token_id": ids["pad_token_id"],
    }
    if arch == "deepseek_v3":
        kwargs.update(DEEPSEEK_DENSE, first_k_dense_replace=layers)
    return config_cls(**kwargs)


def _random_model(config: PretrainedConfig, seed: int) -> PreTrainedModel:
    _, model_cls = ARCHS[config.model_type]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = model_cls(config)
    return model.eval()


@torch.no_grad()
def fine_tune(source: Path, seed: int, noise: float, auto: Any = AutoModelForCausalLM) -> Any:
    """``source``'s weights (read as float32 by the ``auto`` class) plus ``noise * randn``,
    seeded by ``seed``."""
    model = auto.from_pretrained(source, dtype=torch.float32).eval()
    gen = torch.Generator().manual_seed(seed)
    # named_parameters() lists a tied weight once, so tied tensors stay tied.
    for _, param in sorted(model.named_parameters()):
        param.add_(torch.randn(param.shape, generator=gen) * noise)
    return model


def _untied_state(model: PreTrainedModel) -> dict[str, torch.Tensor]:
    """The state dict without the second name of tied tensors (as ``save_pretrained`` does)."""
    state: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for name, tensor in model.state_dict().items():
        if tensor.data_ptr() in seen:
            continue
        seen.add(tensor.data_ptr())
        state[name] = tensor.detach().clone().contiguous()
    return state


def _save_weights(
    model: PreTrainedModel, directory: Path, fmt: Format, shard_bytes: int | None
) -> None:
    if fmt == "safetensors":
        if shard_bytes is None:
            model.save_pretrained(directory)
        else:
            model.save_pretrained(directory, max_shard_size=shard_bytes)
    elif fmt == "bin":
        if shard_bytes is not None:
            raise ValueError("shard_bytes is only supported with fmt='safetensors'")
        model.config.save_pretrained(directory)
        torch.save(_untied_state(model), directory / "pytorch_model.bin")
    else:
        raise ValueError(f"unknown fmt {fmt!r}; expected 'safetensors' or 'bin'")


def make_tiny(
    directory: str | Path,
    arch: Arch = "llama",
    *,
    seed: int = 0,
    layers: int = 2,
    hidden: int = 32,
    vocab: int | None = None,
    tie: bool = False,
    shard_bytes: int | None = None,
    fmt: Format = "safetensors",
    dtype: torch.dtype = torch.float32,
    noise_from: str | Path | None = None,
    noise: float = 0.02,
) -> Path:
    """Write a tiny random checkpoint to ``directory`` and return its path.

    ``noise_from``: make a "fine-tune" of that checkpoint instead: its config and weights plus
    ``noise * randn`` (generator seeded with ``seed``); ``arch``, ``layers``, ``hidden``,
    ``vocab`` and ``tie`` are then taken from it and the arguments ignored.
    ``shard_bytes``: shard the safetensors at this size, with an index. ``fmt="bin"`` writes a
    single ``pytorch_model.bin`` (``torch.save`` zip format, tied duplicates dropped).
    ``dtype`` is the on-disk dtype, recorded in the config.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    if noise_from is not None:
        model = fine_tune(Path(noise_from), seed, noise)
    else:
        config = tiny_config(arch, layers=layers, hidden=hidden, vocab=vocab, tie=tie)
        model = _random_model(config, seed)
    model = model.to(dtype=dtype)  # type: ignore[call-arg]
    model.config.dtype = dtype
    ids = special_token_ids()
    model.generation_config = GenerationConfig(
        bos_token_id=ids["bos_token_id"],
        eos_token_id=ids["eos_token_id"],
        pad_token_id=ids["pad_token_id"],
        do_sample=False,
    )
    _save_weights(model, directory, fmt, shard_bytes)
    model.generation_config.save_pretrained(directory)
    copy_tokenizer(directory)
    return directory


def load_state(path: str | Path) -> dict[str, torch.Tensor]:
    """All tensors of a checkpoint folder: every ``*.safetensors``, else every ``*.bin``."""
    path = Path(path)
    files = sorted(path.glob("*.safetensors"))
    if files:
        parts = [load_file(f) for f in files]
    else:
        files = sorted(path.glob("*.bin"))
        parts = [torch.load(f, map_location="cpu", weights_only=True) for f in files]
    assert files, f"no *.safetensors or *.bin weights in {path}"
    state: dict[str, torch.Tensor] = {}
    for file, part in zip(files, parts, strict=True):
        duplicates = state.keys() & part.keys()
        assert not duplicates, f"{file.name} repeats tensors: {sorted(duplicates)[:5]}"
        state.update(part)
    return state


@torch.no_grad()
def assert_loads_and_generates(path: str | Path, text: str = "The model merges weights.") -> None:
    """Load ``path`` with transformers' Auto classes and greedily generate 4 tokens.

    Asserts that generation produced new tokens and that every logit (prompt forward pass and
    each generation step) is finite.
    """
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    encoded = tokenizer(text, return_tensors="pt")
    inputs = {"input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"]}
    logits = model(**inputs).logits
    assert torch.isfinite(logits).all(), f"{path}: non-finite logits on the prompt"
    out = model.generate(
        **inputs,
        max_new_tokens=4,
        do_sample=False,
        output_logits=True,
        return_dict_in_generate=True,
        pad_token_id=tokenizer.pad_token_id,
    )
    new_tokens = out.sequences.shape[1] - inputs["input_ids"].shape[1]
    assert new_tokens >= 1, f"{path}: generate produced no new tokens"
    for step, step_logits in enumerate(out.logits):
        assert torch.isfinite(step_logits).all(), f"{path}: non-finite logits at step {step}"
