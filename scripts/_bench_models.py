"""Synthetic Llama checkpoints for the benchmark, generated tensor by tensor.

Design: a preset fixes the Llama shape (hidden size, layers, vocabulary, tied embeddings) and
the shard size. Every tensor is drawn from a ``torch.Generator`` seeded from (seed, model index,
tensor name), so a checkpoint is a pure function of (preset, seed): no model is instantiated and
no more than one tensor is in memory at a time. Shards are written in the safetensors format by
hand (header computed from the shapes first, then each tensor's bytes streamed), with
``model.safetensors.index.json``, ``config.json``, ``generation_config.json`` and the quick start
tokenizer. A fine-tune is the base plus small Gaussian noise. Checkpoints are built in a temporary
sibling folder and renamed into place, and reused when present.

Not done here: realistic weights (only shapes, dtypes and a plausible value scale matter for
speed), other architectures, or a tokenizer matching the vocabulary of the larger presets (no
prompts are ever tokenized: the MoE recipe uses random gates).
"""

from __future__ import annotations

import json
import shutil
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
TOKENIZER = ROOT / "recipes" / "quickstart" / "tokenizer"
NOISE_STD = 0.002
INIT_STD = 0.02


@dataclass(frozen=True)
class Preset:
    """The shape of one synthetic Llama model and the shard size of its checkpoint."""

    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int
    tied: bool
    shard_bytes: int


PRESETS: dict[str, Preset] = {
    # A few MB, for smoke tests; the quick start tokenizer's vocabulary.
    "tiny": Preset(64, 128, 4, 4, 2, 512, True, 256 * 1024),
    # SmolLM-135M's shape: 134.5M parameters, 269 MB in bf16.
    "small": Preset(576, 1536, 30, 9, 3, 49152, True, 100 * 2**20),
    # TinyLlama-1.1B's shape: 1.1B parameters, 2.2 GB in bf16.
    "1b": Preset(2048, 5632, 22, 32, 4, 32000, False, 2**30),
    # Mistral-7B's shape: 7.2B parameters, 14.5 GB in bf16 per model (4 models: about 58 GB
    # of disk, plus each output's 14.5 GB); generated on demand, one tensor in memory at a time.
    "7b": Preset(4096, 14336, 32, 32, 8, 32000, False, 5 * 2**30),
}


def tensor_shapes(p: Preset) -> list[tuple[str, tuple[int, ...]]]:
    """Every tensor of the Llama checkpoint, in the order transformers saves them."""
    head_dim = p.hidden // p.heads
    kv = p.kv_heads * head_dim
    shapes: list[tuple[str, tuple[int, ...]]] = [("model.embed_tokens.weight", (p.vocab, p.hidden))]
    for i in range(p.layers):
        pre = f"model.layers.{i}."
        shapes += [
            (pre + "input_layernorm.weight", (p.hidden,)),
            (pre + "self_attn.q_proj.weight", (p.hidden, p.hidden)),
            (pre + "self_attn.k_proj.weight", (kv, p.hidden)),
            (pre + "self_attn.v_proj.weight", (kv, p.hidden)),
            (pre + "self_attn.o_proj.weight", (p.hidden, p.hidden)),
            (pre + "post_attention_layernorm.weight", (p.hidden,)),
            (pre + "mlp.gate_proj.weight", (p.intermediate, p.hidden)),
            (pre + "mlp.up_proj.weight", (p.intermediate, p.hidden)),
            (pre + "mlp.down_proj.weight", (p.hidden, p.intermediate)),
        ]
    shapes.append(("model.norm.weight", (p.hidden,)))
    if not p.tied:
        shapes.append(("lm_head.weight", (p.vocab, p.hidden)))
    return shapes


def parameter_count(p: Preset) -> int:
    total = 0
    for _, shape in tensor_shapes(p):
        n = 1
        for d in shape:
            n *= d
        total += n
    return total


def make_tensor(name: str, shape: tuple[int, ...], seed: int, model: int) -> torch.Tensor:
    """Model 0 is the base; model k > 0 is the base plus noise seeded by (seed, k, name)."""
    gen = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
    if len(shape) == 1:
        base = torch.ones(shape) + torch.randn(shape, generator=gen) * INIT_STD
    else:
        base = torch.randn(shape, generator=gen) * INIT_STD
    if model:
        noise = torch.Generator().manual_seed(
            (seed * 1_000_003 + model) * 1_000_033 + zlib.crc32(name.encode())
        )
        base += torch.randn(shape, generator=noise) * NOISE_STD
    return base.to(torch.bfloat16)


def plan_shards(p: Preset) -> list[list[tuple[str, tuple[int, ...]]]]:
    """Consecutive tensors grouped so that no shard exceeds the preset's shard size."""
    shards: list[list[tuple[str, tuple[int, ...]]]] = [[]]
    size = 0
    for name, shape in tensor_shapes(p):
        nbytes = 2 * _numel(shape)
        if shards[-1] and size + nbytes > p.shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append((name, shape))
        size += nbytes
    return shards


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def _write_shard(
    path: Path, tensors: list[tuple[str, tuple[int, ...]]], seed: int, model: int
) -> int:
    header: dict[str, object] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, shape in tensors:
        end = offset + 2 * _numel(shape)
        header[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [offset, end]}
        offset = end
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for name, shape in tensors:
            data = make_tensor(name, shape, seed, model).view(torch.uint8).numpy()
            f.write(data.tobytes())
    return offset


def _config(p: Preset) -> dict[str, object]:
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "attention_bias": False,
        "attention_dropout": 0.0,
        "bos_token_id": 0,
        "eos_token_id": 1,
        "pad_token_id": 3,
        "head_dim": p.hidden // p.heads,
        "hidden_act": "silu",
        "hidden_size": p.hidden,
        "initializer_range": INIT_STD,
        "intermediate_size": p.intermediate,
        "max_position_embeddings": 2048,
        "mlp_bias": False,
        "num_attention_heads": p.heads,
        "num_hidden_layers": p.layers,
        "num_key_value_heads": p.kv_heads,
        "rms_norm_eps": 1e-05,
        "rope_theta": 10000.0,
        "tie_word_embeddings": p.tied,
        "torch_dtype": "bfloat16",
        "use_cache": True,
        "vocab_size": p.vocab,
    }


def write_model(out: Path, preset: str, seed: int, model: int) -> None:
    """Write one checkpoint (model 0 = base, k = fine-tune k) into ``out`` (must not exist)."""
    p = PRESETS[preset]
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    shards = plan_shards(p)
    weight_map: dict[str, str] = {}
    total = 0
    for k, tensors in enumerate(shards, start=1):
        fname = f"model-{k:05d}-of-{len(shards):05d}.safetensors"
        total += _write_shard(tmp / fname, tensors, seed, model)
        weight_map.update({name: fname for name, _ in tensors})
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    (tmp / "config.json").write_text(json.dumps(_config(p), indent=2))
    gen_config = {"bos_token_id": 0, "eos_token_id": 1, "pad_token_id": 3}
    (tmp / "generation_config.json").write_text(json.dumps(gen_config, indent=2))
    for f in TOKENIZER.iterdir():
        shutil.copy2(f, tmp / f.name)
    tmp.rename(out)


def ensure_models(workdir: Path, preset: str, seed: int, count: int) -> list[Path]:
    """The base and ``count - 1`` fine-tunes of (preset, seed), generated unless cached."""
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {sorted(PRESETS)}")
    folder = workdir / "models" / f"{preset}-seed{seed}"
    paths = []
    for model in range(count):
        path = folder / ("base" if model == 0 else f"ft{model}")
        if not (path / "model.safetensors.index.json").exists():
            write_model(path, preset, seed, model)
        paths.append(path)
    return paths
