"""validate and plan read only headers: 70B-sized inputs take seconds, not hours.

The checkpoints here have the exact tensor layout of Llama-3-70B (80 layers, hidden 8192,
bf16, 30 shards of ~4.7 GB) but are sparse files: their headers are real, their data is a hole
that occupies no disk. Any attempt to read tensor data would take minutes; the plan must not.
"""

from __future__ import annotations

import json
import os
import struct
import time
from pathlib import Path

import yaml
from typer.testing import CliRunner

from merge.cli import app
from merge.methods.stream import CHUNK_ELEMENTS

HIDDEN, INTER, LAYERS, VOCAB, KV = 8192, 28672, 80, 128256, 1024


def llama70b_shapes() -> dict[str, list[int]]:
    shapes = {"model.embed_tokens.weight": [VOCAB, HIDDEN]}
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        shapes.update(
            {
                p + "input_layernorm.weight": [HIDDEN],
                p + "post_attention_layernorm.weight": [HIDDEN],
                p + "self_attn.q_proj.weight": [HIDDEN, HIDDEN],
                p + "self_attn.k_proj.weight": [KV, HIDDEN],
                p + "self_attn.v_proj.weight": [KV, HIDDEN],
                p + "self_attn.o_proj.weight": [HIDDEN, HIDDEN],
                p + "mlp.gate_proj.weight": [INTER, HIDDEN],
                p + "mlp.up_proj.weight": [INTER, HIDDEN],
                p + "mlp.down_proj.weight": [HIDDEN, INTER],
            }
        )
    shapes["model.norm.weight"] = [HIDDEN]
    shapes["lm_head.weight"] = [VOCAB, HIDDEN]
    return shapes


def write_sparse_checkpoint(directory: Path, shards: int = 30) -> int:
    """Write headers + index of a bf16 70B checkpoint whose data are holes; returns bytes."""
    directory.mkdir(parents=True)
    names = list(llama70b_shapes().items())
    per = -(-len(names) // shards)
    weight_map, total = {}, 0
    for k in range(shards):
        fname = f"model-{k + 1:05d}-of-{shards:05d}.safetensors"
        header: dict = {"__metadata__": {"format": "pt"}}
        offset = 0
        for name, shape in names[k * per : (k + 1) * per]:
            n = 2
            for d in shape:
                n *= d
            header[name] = {"dtype": "BF16", "shape": shape, "data_offsets": [offset, offset + n]}
            offset += n
            weight_map[name] = fname
        raw = json.dumps(header).encode()
        raw += b" " * (-len(raw) % 8)
        with open(directory / fname, "wb") as f:
            f.write(struct.pack("<Q", len(raw)) + raw)
            f.truncate(8 + len(raw) + offset)  # a hole: no disk used
        total += offset
    (directory / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map})
    )
    (directory / "config.json").write_text(
        json.dumps(
            {
                "architectures": ["LlamaForCausalLM"],
                "model_type": "llama",
                "hidden_size": HIDDEN,
                "intermediate_size": INTER,
                "num_hidden_layers": LAYERS,
                "num_attention_heads": 64,
                "num_key_value_heads": 8,
                "vocab_size": VOCAB,
                "dtype": "bfloat16",
                "tie_word_embeddings": False,
            }
        )
    )
    return total


def test_plan_of_two_70b_models_reads_only_headers(tmp_path: Path) -> None:
    size = write_sparse_checkpoint(tmp_path / "a")
    write_sparse_checkpoint(tmp_path / "b")
    assert size > 140 * 10**9
    used = sum(os.stat(p).st_blocks * 512 for p in (tmp_path / "a").iterdir())
    assert used < 100 * 2**20, "the test files must be sparse"
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        yaml.safe_dump(
            {
                "merge_method": "ties",
                "base_model": str(tmp_path / "a"),
                "models": [
                    {"model": str(tmp_path / "b"), "parameters": {"weight": 1, "density": 0.5}}
                ],
            }
        )
    )
    runner = CliRunner()
    start = time.perf_counter()
    result = runner.invoke(app, ["plan", str(recipe), "--json"])
    elapsed = time.perf_counter() - start
    assert result.exit_code == 0, result.stderr
    plan = json.loads(result.stdout)
    assert len(plan["tensors"]) == 2 + 9 * LAYERS + 1
    assert plan["output_bytes"] == size
    assert all(s["bytes"] <= 5 * 10**9 for s in plan["shards"])
    assert sum(s["bytes"] for s in plan["shards"]) == size
    # Every job streams chunk by chunk from the memory maps, so even the largest tensors
    # (embed, lm_head: 1.05e9 elements) need only chunk-sized buffers: ties' float32 inputs,
    # base and working buffers of CHUNK_ELEMENTS entries each, whatever the model's size.
    chunk = 4 * CHUNK_ELEMENTS
    assert 2 * chunk < plan["peak_bytes"] < 20 * chunk < VOCAB * HIDDEN
    result = runner.invoke(app, ["validate", str(recipe)])
    assert result.exit_code == 0, result.stderr
    assert elapsed < 30, f"plan took {elapsed:.1f} s: it must read headers only"
