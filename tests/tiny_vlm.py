"""Tiny multimodal checkpoints (LLaVA and Qwen2-VL shapes) and an image + text forward check.

``make_tiny_vlm(directory, "llava")`` writes a ``LlavaForConditionalGeneration`` (a CLIP vision
tower of 3 layers, a 2-layer projector MLP, a Llama text decoder of 2 layers); ``"qwen2_vl"``
a ``Qwen2VLForConditionalGeneration`` (3 vision blocks, the patch merger, a 2-layer Qwen2 text
decoder). Vision and text layer counts differ on purpose, so module-relative layer counting
is visible. The tokenizer is the quick start's plus the model's image tokens, and a
``preprocessor_config.json`` is written (a file the output must carry along). ``noise_from``
makes a "fine-tune": the source's weights plus seeded Gaussian noise.

``assert_image_text_forward`` loads a folder with ``AutoModelForImageTextToText`` and runs a
forward pass on an image and text, then generates from text.
"""

from __future__ import annotations

import inspect
import json
from pathlib import Path
from typing import Any, Literal

import torch
from tokenizers import AddedToken
from transformers import (
    AutoModelForImageTextToText,
    AutoTokenizer,
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    PreTrainedModel,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
)

from tiny import copy_tokenizer, fine_tune, special_token_ids

Kind = Literal["llava", "qwen2_vl"]
IMAGE_TOKENS = {
    "llava": ["<image>"],
    "qwen2_vl": ["<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"],
}
TEXT_LAYERS, VISION_LAYERS = 2, 3


def _config(kind: Kind) -> Any:
    ids = special_token_ids()
    vocab = ids["vocab_size"] + len(IMAGE_TOKENS[kind])
    first = ids["vocab_size"]  # the image tokens' ids start here
    text = {
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": TEXT_LAYERS,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "vocab_size": vocab,
        "max_position_embeddings": 128,
        "bos_token_id": ids["bos_token_id"],
        "eos_token_id": ids["eos_token_id"],
        "pad_token_id": ids["pad_token_id"],
    }
    if kind == "llava":
        vision = CLIPVisionConfig(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=VISION_LAYERS,
            num_attention_heads=4,
            image_size=32,
            patch_size=8,
            projection_dim=32,
        )
        return LlavaConfig(
            vision_config=vision, text_config=LlamaConfig(**text), image_token_index=first
        )
    text["rope_scaling"] = {"type": "mrope", "mrope_section": [1, 1, 2]}
    vision = {
        "depth": VISION_LAYERS,
        "embed_dim": 32,
        "hidden_size": 32,
        "num_heads": 4,
        "mlp_ratio": 2,
        "patch_size": 4,
        "spatial_merge_size": 2,
        "temporal_patch_size": 2,
        "in_channels": 3,
    }
    return Qwen2VLConfig(
        text_config=text,
        vision_config=vision,
        vision_start_token_id=first,
        vision_end_token_id=first + 1,
        image_token_id=first + 2,
        video_token_id=first + 3,
    )


def _model(kind: Kind, seed: int) -> PreTrainedModel:
    cls = LlavaForConditionalGeneration if kind == "llava" else Qwen2VLForConditionalGeneration
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return cls(_config(kind)).eval()


def make_tiny_vlm(
    directory: str | Path,
    kind: Kind = "llava",
    *,
    seed: int = 0,
    noise_from: str | Path | None = None,
    noise: float = 0.02,
) -> Path:
    """Write a tiny multimodal checkpoint (see the module notes) and return its folder."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    if noise_from is not None:
        model = fine_tune(Path(noise_from), seed, noise, AutoModelForImageTextToText)
        kind = "llava" if model.config.model_type == "llava" else "qwen2_vl"
    else:
        model = _model(kind, seed)
    model.save_pretrained(directory)
    copy_tokenizer(directory)
    tok = AutoTokenizer.from_pretrained(directory)
    tok.add_tokens([AddedToken(t, special=True, normalized=False) for t in IMAGE_TOKENS[kind]])
    tok.save_pretrained(directory)
    processor = {"image_processor_type": "CLIPImageProcessor", "size": {"shortest_edge": 32}}
    (directory / "preprocessor_config.json").write_text(json.dumps(processor, indent=2))
    return directory


def _image_inputs(model: PreTrainedModel) -> dict[str, torch.Tensor]:
    """Token ids with one image, and the image, as the model's forward takes them."""
    cfg = model.config
    gen = torch.Generator().manual_seed(0)
    if cfg.model_type == "llava":
        patches = (cfg.vision_config.image_size // cfg.vision_config.patch_size) ** 2
        ids = torch.tensor([[1, 5, *[cfg.image_token_index] * patches, 7, 8]])
        return {"input_ids": ids, "pixel_values": torch.randn(1, 3, 32, 32, generator=gen)}
    vc = cfg.vision_config
    grid = torch.tensor([[1, 2 * vc.spatial_merge_size, 2 * vc.spatial_merge_size]])
    patches = int(grid.prod())
    tokens = patches // vc.spatial_merge_size**2
    ids = [1, 5, cfg.vision_start_token_id, *[cfg.image_token_id] * tokens]
    ids += [cfg.vision_end_token_id, 7, 8]
    width = vc.in_channels * vc.temporal_patch_size * vc.patch_size**2
    inputs = {
        "input_ids": torch.tensor([ids]),
        "pixel_values": torch.randn(patches, width, generator=gen),
        "image_grid_thw": grid,
    }
    if "mm_token_type_ids" in inspect.signature(model.forward).parameters:
        inputs["mm_token_type_ids"] = (inputs["input_ids"] == cfg.image_token_id).long()
    return inputs


@torch.no_grad()
def assert_image_text_forward(path: str | Path) -> torch.Tensor:
    """Load ``path`` with ``AutoModelForImageTextToText``; an image + text forward pass gives
    finite logits, and text-only generation produces tokens. Returns the logits."""
    model = AutoModelForImageTextToText.from_pretrained(path).eval()
    inputs = _image_inputs(model)
    inputs["attention_mask"] = torch.ones_like(inputs["input_ids"])
    logits = model(**inputs).logits
    assert logits.shape[:2] == inputs["input_ids"].shape, f"{path}: logits {logits.shape}"
    assert torch.isfinite(logits).all(), f"{path}: non-finite logits on image + text"
    tok = AutoTokenizer.from_pretrained(path)
    text = tok("The model merges weights.", return_tensors="pt")
    out = model.generate(
        input_ids=text["input_ids"],
        attention_mask=text["attention_mask"],
        max_new_tokens=3,
        do_sample=False,
        pad_token_id=tok.pad_token_id,
    )
    assert out.shape[1] > text["input_ids"].shape[1], f"{path}: generate produced nothing"
    return logits
