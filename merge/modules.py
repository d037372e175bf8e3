"""The modules of a model: text decoder, vision tower and projector, from names and config.

A multimodal checkpoint (LLaVA, Qwen2-VL, Gemma 3, Mistral 3, ...) holds several stacks of
layers: the language model's and the vision encoder's, plus a projector between them. mergekit
calls these *modules* (``text_decoder``, ``vision_tower``, ``multi_modal_projector``) and lets a
recipe merge each its own way (``modules:``). Here they are found without per-architecture
files:

- a model is multimodal when its config has a ``vision_config``; otherwise every tensor is in
  ``text_decoder``;
- a tensor is in ``multi_modal_projector`` when a component of its name is a projector's
  (``multi_modal_projector``, ``mm_projector``, ``merger``, ``connector``, ...), else in
  ``vision_tower`` when one is a vision encoder's (``vision_tower``, ``visual``,
  ``vision_model``, ...), else in ``text_decoder``;
- layer counts come from the config (``num_hidden_layers`` at the top or in ``text_config``;
  ``vision_config``'s ``num_hidden_layers``/``depth``), else from the tensor names; the
  projector has no layers.

Within a module, layer indices, gradients and slices count that module's layers only.

What it does not do: encoder-decoder text models (T5, Whisper: two text stacks) or audio
towers; their tensors all land in ``text_decoder``.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from merge import architecture as arch

TEXT = "text_decoder"
VISION = "vision_tower"
PROJECTOR = "multi_modal_projector"
ORDER = (TEXT, VISION, PROJECTOR)
SINGLE_ALIASES = ("default",)  # mergekit's name of the one module of a text-only model

PROJECTOR_RE = re.compile(
    r"(^|\.)(multi_modal_projector|mm_projector|merger|connector|aligner|image_newline"
    r"|mm_input_projection\w*|mm_soft_emb_norm)(\.|$)"
)
VISION_RE = re.compile(
    r"(^|\.)(vision_tower|visual|vision_model|vision_encoder|vision|image_encoder|vpm)(\.|$)"
)
VISION_LAYER_KEYS = ("num_hidden_layers", "depth", "num_layers", "n_layers")


@dataclass(frozen=True)
class Module:
    """One module of a model: its tensors (in output order) and its layer count."""

    name: str
    tensors: tuple[str, ...]
    num_layers: int


def is_multimodal(config: Mapping[str, Any]) -> bool:
    return isinstance(config.get("vision_config"), dict)


def module_of(name: str, multimodal: bool) -> str:
    """The module a tensor belongs to (see the module notes)."""
    if not multimodal:
        return TEXT
    if PROJECTOR_RE.search(name):
        return PROJECTOR
    if VISION_RE.search(name):
        return VISION
    return TEXT


def _config_layers(config: Mapping[str, Any], module: str) -> int | None:
    if module == TEXT:
        return arch.num_layers(dict(config))
    if module == VISION:
        vision = config.get("vision_config")
        for key in VISION_LAYER_KEYS:
            value = vision.get(key) if isinstance(vision, dict) else None
            if isinstance(value, int) and not isinstance(value, bool):
                return value
    return None


def split(config: Mapping[str, Any], names: Iterable[str]) -> dict[str, Module]:
    """A model's modules, in ``ORDER``, each with its tensors in output order."""
    multimodal = is_multimodal(config)
    found: dict[str, list[str]] = {}
    for name in arch.ordered(names):
        found.setdefault(module_of(name, multimodal), []).append(name)
    modules = {}
    for module in ORDER:
        if module not in found:
            continue
        tensors = tuple(found[module])
        layers = 0 if module == PROJECTOR else _config_layers(config, module)
        count = arch.count_layers(tensors) if layers is None else layers
        modules[module] = Module(module, tensors, count)
    return modules


def vision_section(config: dict[str, Any]) -> tuple[dict[str, Any], str] | None:
    """The vision config and its layer-count key, for a frankenmerged vision tower."""
    vision = config.get("vision_config")
    if not isinstance(vision, dict):
        return None
    key = next((k for k in VISION_LAYER_KEYS if k in vision), "num_hidden_layers")
    return vision, key
