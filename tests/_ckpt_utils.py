"""Tiny checkpoints for tests, written with torch/safetensors directly (fast: no transformers).

The tensors follow a 2-layer Llama layout (hidden 16, intermediate 32, 2 heads, 1 KV head,
vocab 64) so that names and config look like a real Hugging Face model.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

CONFIG = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 16,
    "intermediate_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "num_key_value_heads": 1,
    "vocab_size": 64,
    "tie_word_embeddings": False,
    "torch_dtype": "float32",
}


def tiny_state_dict(seed: int = 0, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """Random Llama-shaped tensors, deterministic for a seed."""
    g = torch.Generator().manual_seed(seed)
    h, i, v, kv = 16, 32, 64, 8  # kv = head_dim * num_key_value_heads
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (v, h)}
    for n in range(2):
        p = f"model.layers.{n}."
        shapes |= {
            p + "self_attn.q_proj.weight": (h, h),
            p + "self_attn.k_proj.weight": (kv, h),
            p + "self_attn.v_proj.weight": (kv, h),
            p + "self_attn.o_proj.weight": (h, h),
            p + "mlp.gate_proj.weight": (i, h),
            p + "mlp.up_proj.weight": (i, h),
            p + "mlp.down_proj.weight": (h, i),
            p + "input_layernorm.weight": (h,),
            p + "post_attention_layernorm.weight": (h,),
        }
    shapes |= {"model.norm.weight": (h,), "lm_head.weight": (v, h)}
    return {k: torch.randn(s, generator=g).to(dtype) for k, s in shapes.items()}


def _split(sd: dict[str, torch.Tensor], shards: int) -> list[dict[str, torch.Tensor]]:
    names = list(sd)
    size = -(-len(names) // shards)
    return [{k: sd[k] for k in names[j : j + size]} for j in range(0, len(names), size)]


def write_config(directory: Path, config: dict | None = None) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(config or CONFIG, indent=2))


def write_safetensors(
    directory: Path, sd: dict[str, torch.Tensor], shards: int = 1, config: bool = True
) -> Path:
    """``model.safetensors``, or ``model-0000K-of-0000N.safetensors`` + index when sharded."""
    directory.mkdir(parents=True, exist_ok=True)
    if config:
        write_config(directory)
    if shards == 1:
        save_file(sd, str(directory / "model.safetensors"), metadata={"format": "pt"})
        return directory
    parts = _split(sd, shards)
    weight_map: dict[str, str] = {}
    for k, part in enumerate(parts, 1):
        name = f"model-{k:05d}-of-{len(parts):05d}.safetensors"
        save_file(part, str(directory / name), metadata={"format": "pt"})
        weight_map |= dict.fromkeys(part, name)
    index = {"metadata": {"total_size": 0}, "weight_map": weight_map}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index))
    return directory


def write_bin(
    directory: Path, sd: dict[str, torch.Tensor], shards: int = 1, config: bool = True
) -> Path:
    """``pytorch_model.bin`` (zip format), or shards + ``pytorch_model.bin.index.json``."""
    directory.mkdir(parents=True, exist_ok=True)
    if config:
        write_config(directory)
    if shards == 1:
        torch.save(sd, directory / "pytorch_model.bin")
        return directory
    parts = _split(sd, shards)
    weight_map: dict[str, str] = {}
    for k, part in enumerate(parts, 1):
        name = f"pytorch_model-{k:05d}-of-{len(parts):05d}.bin"
        torch.save(part, directory / name)
        weight_map |= dict.fromkeys(part, name)
    index = {"metadata": {"total_size": 0}, "weight_map": weight_map}
    (directory / "pytorch_model.bin.index.json").write_text(json.dumps(index))
    return directory


def snapshot_files(directory: Path) -> dict[str, tuple[int, bytes]]:
    """mtime_ns and bytes of every file below ``directory`` (to prove inputs are untouched)."""
    return {
        str(p.relative_to(directory)): (p.stat().st_mtime_ns, p.read_bytes())
        for p in sorted(directory.rglob("*"))
        if p.is_file()
    }
