"""Layer structure inferred from tensor names and the config: no per-architecture files.

Decoder layers are found from names (``...layers.N...``, ``...h.N...``, ``...blocks.N...``,
``...layer.N...``); the layer count from the config (``num_hidden_layers``, ``n_layer``,
``num_layers``, ``n_layers``, also inside ``text_config``). Tensors outside the layers are
"pre" (embeddings: they come before the layers) or "post" (final norm, lm_head). Tied input
and output embeddings come from ``tie_word_embeddings``.

What it does not do: MoE expert layouts (a small table lives with the MoE code) and encoder-
decoder models (two layer stacks).
"""

from __future__ import annotations

import copy
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

LAYER_RE = re.compile(r"(^|\.)(layers|h|blocks|layer|decoder_layers)\.(\d+)(\.|$)")
PRE_RE = re.compile(
    r"(embed|wte|wpe|word_embeddings|tok_embeddings|embeddings|pre_layrnorm|pre_layernorm"
    r"|ln_pre|patch_conv)"
)
LAYER_COUNT_KEYS = ("num_hidden_layers", "n_layer", "num_layers", "n_layers")
NOT_PER_LAYER = ("architectures", "auto_map")
TIED_PAIRS = (
    (
        "lm_head.weight",
        (
            "model.embed_tokens.weight",
            "transformer.wte.weight",
            "model.embeddings.weight",
            "embed_tokens.weight",
        ),
    ),
)


def layer_of(name: str) -> int | None:
    """The decoder layer index of a tensor name, or None outside the layers."""
    m = LAYER_RE.search(name)
    return int(m.group(3)) if m else None


def with_layer(name: str, index: int) -> str:
    """``name`` with its layer index replaced by ``index``."""
    m = LAYER_RE.search(name)
    if m is None:
        raise ValueError(f"{name!r} is not inside a layer")
    return f"{name[: m.start(3)]}{index}{name[m.end(3) :]}"


def is_pre(name: str) -> bool:
    """True for tensors that precede the layers (embeddings); others outside come after."""
    return layer_of(name) is None and bool(PRE_RE.search(name)) and "lm_head" not in name


def sort_key(name: str) -> tuple[int, int, str]:
    """Output order: embeddings, layers in numeric order, then norms and lm_head."""
    layer = layer_of(name)
    if layer is not None:
        return (1, layer, name)
    return (0, 0, name) if is_pre(name) else (2, 0, name)


def ordered(names: Iterable[str]) -> list[str]:
    return sorted(names, key=sort_key)


def _text_config(config: dict[str, Any]) -> dict[str, Any]:
    inner = config.get("text_config")
    return inner if isinstance(inner, dict) else config


def num_layers(config: dict[str, Any]) -> int | None:
    for cfg in (config, _text_config(config)):
        for key in LAYER_COUNT_KEYS:
            value = cfg.get(key)
            if isinstance(value, int) and not isinstance(value, bool):
                return value
    return None


def count_layers(names: Iterable[str]) -> int:
    """Layer count from tensor names (1 + highest index), 0 without layers."""
    found = [layer_of(n) for n in names]
    return max((i for i in found if i is not None), default=-1) + 1


def config_disagreements(
    config: dict[str, Any], shapes: Mapping[str, Sequence[int]]
) -> list[tuple[str, int | str, int, str]]:
    """Where a plain (single-module) config disagrees with its tensors: ``(key, config value,
    tensors' value, what the tensors count)`` for the layer count and ``vocab_size`` (the token
    embedding's rows). Configs with a ``text_config`` or ``vision_config`` are not judged, nor
    layer counts of models with extra prediction layers (``num_nextn_predict_layers``)."""
    if isinstance(config.get("text_config"), dict) or isinstance(config.get("vision_config"), dict):
        return []
    found: list[tuple[str, int | str, int, str]] = []
    counted = count_layers(shapes)
    for key in LAYER_COUNT_KEYS:
        value = config.get(key)
        if isinstance(value, int) and not isinstance(value, bool):
            if counted and value != counted and not config.get("num_nextn_predict_layers"):
                found.append((key, value, counted, "layers"))
            break
        if value is not None and counted:  # "four", 4.0, a list: no model loads it
            found.append((key, repr(value), counted, "layers"))
            break
    vocab, embed = config.get("vocab_size"), embedding_name(shapes)
    if embed is not None and len(shapes[embed]) == 2:
        rows = shapes[embed][0]
        if vocab is not None and (not _is_int(vocab) or rows != vocab):
            found.append(
                ("vocab_size", vocab if _is_int(vocab) else repr(vocab), rows, f"rows in '{embed}'")
            )
    return found


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def ties_embeddings(config: dict[str, Any]) -> bool:
    for cfg in (config, _text_config(config)):
        if "tie_word_embeddings" in cfg:
            return bool(cfg["tie_word_embeddings"])
    return False


def tied_partner(name: str, available: Iterable[str]) -> str | None:
    """For a missing lm_head of a tied model, the embedding tensor that stands in for it: a
    known embedding name under the lm_head's prefix (``language_model.lm_head.weight`` ->
    ``language_model.model.embed_tokens.weight``), else the model's only token embedding."""
    have = set(available)
    for head, embeds in TIED_PAIRS:
        if name.endswith(head):
            prefix = name[: -len(head)]
            for e in embeds:
                if prefix + e in have:
                    return prefix + e
            return embedding_name(have)
    return None


def head_stand_ins(
    want: Iterable[str], have: Sequence[str], config: dict[str, Any]
) -> list[tuple[str, str]]:
    """For each lm_head among ``want`` (outside the layers) that a model with tensors ``have``
    and config ``config`` lacks because it ties its embeddings: ``(lm_head, the embedding
    that stands in for it)``."""
    if not ties_embeddings(config):
        return []
    found = []
    for name in want:
        if layer_of(name) is None and name.endswith(TIED_PAIRS[0][0]) and name not in have:
            partner = tied_partner(name, have)
            if partner is not None:
                found.append((name, partner))
    return found


def untie(config: dict[str, Any]) -> None:
    """Set ``tie_word_embeddings`` to false in ``config`` (or its ``text_config``) in place."""
    for cfg in (config, _text_config(config)):
        if "tie_word_embeddings" in cfg:
            cfg["tie_word_embeddings"] = False
            return
    config["tie_word_embeddings"] = False


def embedding_name(names: Iterable[str]) -> str | None:
    """The token embedding among ``names``: a known name, else the only tensor outside the
    layers named ``...embed_tokens.weight`` (e.g. ``model.language_model.embed_tokens.weight``
    of a multimodal model); None if there is none or several."""
    have = set(names)
    for _, embeds in TIED_PAIRS:
        for e in embeds:
            if e in have:
                return e
    found = [n for n in have if n.endswith("embed_tokens.weight") and layer_of(n) is None]
    return found[0] if len(found) == 1 else None


def output_config(
    donor: dict[str, Any],
    dtype: str,
    layer_map: Sequence[int] | None,
    vocab_size: int | None = None,
    vision_map: Sequence[int] | None = None,
) -> dict[str, Any]:
    """The donor's config with the output dtype, the output ``vocab_size`` (when a tokenizer
    setting changed it) and, for frankenmerges, the new layer stack of the text layers
    (``layer_map``) and of a multimodal model's vision tower (``vision_map``, in
    ``vision_config``).

    ``layer_map[i]`` is the donor layer that output layer ``i`` copies its per-layer config
    entries (such as ``layer_types``) from.
    """
    cfg = copy.deepcopy(donor)
    cfg["dtype"] = dtype
    if "torch_dtype" in cfg:
        cfg["torch_dtype"] = dtype
    if vocab_size is not None:
        target = cfg if "vocab_size" in cfg else _text_config(cfg)
        target["vocab_size"] = vocab_size
    if layer_map is not None:
        target = cfg if any(k in cfg for k in LAYER_COUNT_KEYS) else _text_config(cfg)
        key = next((k for k in LAYER_COUNT_KEYS if k in target), "num_hidden_layers")
        restack(target, key, layer_map)
    if vision_map is not None:
        from merge.modules import vision_section

        section = vision_section(cfg)
        if section is not None:
            restack(*section, vision_map)
    return cfg


def restack(target: dict[str, Any], key: str, layer_map: Sequence[int]) -> None:
    """Set ``target[key]`` (a layer count) to ``len(layer_map)`` and remap the per-layer lists
    (those as long as the old count, except ids) of ``target`` in place."""
    old = target.get(key)
    target[key] = len(layer_map)
    if not isinstance(old, int) or isinstance(old, bool) or old <= 0:
        return
    for name, value in list(target.items()):
        if name in NOT_PER_LAYER or name.endswith(("_id", "_ids")):
            continue
        if isinstance(value, list) and len(value) == old:
            target[name] = [value[min(i, old - 1)] for i in layer_map]
