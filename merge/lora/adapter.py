"""Adapters in PEFT format: config, tensor-name mapping, deltas, and checks against a base.

``read_adapter`` reads an adapter folder whole (it is small) and checks every target against
the base checkpoint's headers; ``merge.lora.checkpoint.LoraCheckpoint`` applies the result as
tensors stream. See ``merge/lora/__init__.py`` for what is applied and how.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from merge import architecture as arch
from merge.checkpoint import Checkpoint, TensorInfo, load_bin
from merge.errors import CheckpointError

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_SAFE = "adapter_model.safetensors"
ADAPTER_BIN = "adapter_model.bin"
PEFT_PREFIX = "base_model.model."
MAX_PROBLEMS = 10
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)

# adapter_config.json options that change what merging means; refused when set (truthy).
UNSUPPORTED = {
    "use_dora": "DoRA",
    "lora_bias": "LoRA bias terms",
    "alora_invocation_tokens": "activated LoRA (aLoRA, not mergeable)",
    "trainable_token_indices": "trainable tokens",
    "target_parameters": "LoRA on parameters",
    "layer_replication": "layer replication",
    "use_qalora": "QA-LoRA",
    "use_bdlora": "block-diagonal LoRA",
    "kasa_config": "KaSA",
    "monteclora_config": "MonteCLoRA",
    "arrow_config": "Arrow routing",
}
# PEFT tensor-name suffixes of the low-rank factors: suffix -> (factor, is_embedding).
FACTORS = {
    ".lora_A.weight": ("A", False),
    ".lora_B.weight": ("B", False),
    ".lora_embedding_A": ("A", True),
    ".lora_embedding_B": ("B", True),
}


# --- pure parts: scaling, key mapping, delta ----------------------------------------------


@dataclass(frozen=True)
class LoraConfig:
    """The adapter_config.json values that decide the delta of each module."""

    r: int
    alpha: float
    rslora: bool = False
    rank_pattern: tuple[tuple[str, int], ...] = ()
    alpha_pattern: tuple[tuple[str, float], ...] = ()
    fan_in_fan_out: bool = False

    def rank_alpha(self, module: str) -> tuple[int, float]:
        """``(r, lora_alpha)`` of one module (e.g. ``model.layers.0.self_attn.q_proj``)."""
        r = next((v for k, v in self.rank_pattern if _matches(k, module)), self.r)
        alpha = next((v for k, v in self.alpha_pattern if _matches(k, module)), self.alpha)
        return r, alpha

    def scaling(self, module: str) -> float:
        r, alpha = self.rank_alpha(module)
        return alpha / math.sqrt(r) if self.rslora else alpha / r


def _matches(pattern: str, module: str) -> bool:
    """peft's pattern rule: the regex matches the whole name or a suffix after a dot."""
    return re.match(rf"(.*\.)?({pattern})$", module) is not None


def parse_key(key: str) -> tuple[str, str, bool]:
    """Map a PEFT tensor name to ``(kind, name, is_embedding)``.

    kind ``A``/``B``: ``name`` is the module (``model.layers.0.self_attn.q_proj``); kinds
    ``replace`` (a trained tensor: ``modules_to_save``, biases) and ``copy`` (a frozen base
    tensor saved alongside, ``.base_layer``): ``name`` is the base tensor it replaces; kind
    ``unknown``: an unrecognised LoRA tensor (``name`` is the key)."""
    name = key.removeprefix(PEFT_PREFIX)
    for suffix, (factor, embedding) in FACTORS.items():
        if name.endswith(suffix):
            return factor, name.removesuffix(suffix).replace(".base_layer", ""), embedding
    if "lora_" in name:
        return "unknown", key, False
    if ".base_layer." in name:
        return "copy", name.replace(".base_layer.", "."), False
    return "replace", name, False


LORA_BLOCK = 1 << 16  # elements of the delta per matmul (see ``LoraPair.block``)


def lora_delta(
    a: torch.Tensor, b: torch.Tensor, scaling: float, *, transpose: bool = False
) -> torch.Tensor:
    """``B @ A * scaling`` in float32 (``(B @ A)^T * scaling`` when ``transpose``)."""
    delta = b.to(torch.float32) @ a.to(torch.float32)
    return (delta.T if transpose else delta) * scaling


# --- the adapter folder ---------------------------------------------------------------------


@dataclass(frozen=True)
class LoraPair:
    """The low-rank factors of one module, ready to make its delta."""

    module: str
    a: torch.Tensor
    b: torch.Tensor
    scaling: float
    transpose: bool

    @property
    def shape(self) -> tuple[int, int]:
        out, inp = self.b.shape[0], self.a.shape[1]
        return (inp, out) if self.transpose else (out, inp)

    @property
    def block(self) -> int:
        """Rows of the delta computed by one matmul: fixed by the shape (``LORA_BLOCK``
        elements), so a range of rows and the whole delta run the same matmuls."""
        return max(1, LORA_BLOCK // max(self.shape[1], 1))

    def delta(self) -> torch.Tensor:
        """The whole delta ``[out, in]`` (``[in, out]`` transposed), block after block."""
        return self.rows(0, self.shape[0])

    def rows(self, r0: int, r1: int) -> torch.Tensor:
        """Rows ``[r0, r1)`` of the delta (float32): the fixed blocks they overlap, each one
        matmul of the factors' rows (columns of ``A`` when transposed), then sliced; the same
        bits as those rows of ``delta()``."""
        step, n = self.block, self.shape[0]
        first, end = (r0 // step) * step, min(n, -(-r1 // step) * step)
        parts = []
        for lo in range(first, end, step):
            hi = min(lo + step, n)
            if self.transpose:
                part = lora_delta(self.a[:, lo:hi], self.b, self.scaling, transpose=True)
            else:
                part = lora_delta(self.a, self.b[lo:hi], self.scaling)
            parts.append(part)
        out = parts[0] if len(parts) == 1 else torch.cat(parts)
        return out[r0 - first : r1 - first]


@dataclass
class Adapter:
    """An adapter folder, read: per base tensor name, the delta and the replacement to apply."""

    directory: Path
    pairs: dict[str, LoraPair]
    replacements: dict[str, torch.Tensor]


def read_config(directory: Path, where: str) -> LoraConfig:
    """Parse and check ``adapter_config.json``; raise one line per unsupported setting."""
    path = directory / ADAPTER_CONFIG
    if not path.is_file():
        hint = " (it looks like a full model)" if (directory / "config.json").is_file() else ""
        raise CheckpointError(f"{where}: no {ADAPTER_CONFIG}: not a PEFT adapter folder{hint}")
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{where}: cannot read {ADAPTER_CONFIG}: {e}") from e
    if not isinstance(cfg, dict):
        raise CheckpointError(f"{where}: {ADAPTER_CONFIG}: expected a JSON object")
    kind = cfg.get("peft_type")
    if kind != "LORA":
        raise CheckpointError(
            f"{where}: PEFT type {kind!r} is not supported (only LORA adapters); "
            "merge it into its base with peft's merge_and_unload() first"
        )
    problems = [
        f"{where}: {key}={json.dumps(cfg[key])} ({what}) is not supported; merge the adapter "
        "into its base with peft's merge_and_unload() first"
        for key, what in UNSUPPORTED.items()
        if cfg.get(key)
    ]
    if cfg.get("bias", "none") not in ("none", "all", "lora_only"):
        problems.append(f"{where}: unknown bias setting {cfg.get('bias')!r}")
    try:
        config = LoraConfig(
            r=_positive(cfg.get("r"), "r"),
            alpha=_number(cfg.get("lora_alpha"), "lora_alpha"),
            rslora=bool(cfg.get("use_rslora")),
            rank_pattern=tuple(
                (k, _positive(v, f"rank_pattern[{k!r}]"))
                for k, v in (cfg.get("rank_pattern") or {}).items()
            ),
            alpha_pattern=tuple(
                (k, _number(v, f"alpha_pattern[{k!r}]"))
                for k, v in (cfg.get("alpha_pattern") or {}).items()
            ),
            fan_in_fan_out=bool(cfg.get("fan_in_fan_out")),
        )
    except (ValueError, AttributeError) as e:
        problems.append(f"{where}: {ADAPTER_CONFIG}: {e}")
    if problems:
        raise CheckpointError(problems)
    return config


def _positive(value: Any, key: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{key} must be a positive integer, got {json.dumps(value)}")
    return value


def _number(value: Any, key: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{key} must be a number, got {json.dumps(value)}")
    return float(value)


def read_weights(directory: Path, where: str, label: str) -> dict[str, torch.Tensor]:
    """All tensors of ``adapter_model.safetensors`` (preferred) or ``adapter_model.bin``."""
    safe, binary = directory / ADAPTER_SAFE, directory / ADAPTER_BIN
    if safe.is_file():
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(safe))
        except (SafetensorError, OSError) as e:
            raise CheckpointError(f"{where}: cannot read {ADAPTER_SAFE}: {e}") from e
    if binary.is_file():
        return load_bin(binary, label)
    raise CheckpointError(f"{where}: no adapter weights: expected {ADAPTER_SAFE} or {ADAPTER_BIN}")


def read_adapter(
    directory: Path, base: Checkpoint, *, label: str, base_label: str, adapter_label: str
) -> Adapter:
    """Read the adapter in ``directory`` and check it against the base's tensor headers."""
    who = f"model '{label}': adapter '{adapter_label}'"
    lacks = _Lacks(base, base_label)
    config = read_config(directory, f"{who} ({directory})")
    weights = read_weights(directory, f"{who} ({directory})", label)
    factors: dict[str, dict[str, tuple[torch.Tensor, bool]]] = {}
    replacements: dict[str, torch.Tensor] = {}
    trained: set[str] = set()
    problems: list[str] = []
    for key in sorted(weights):
        kind, name, embedding = parse_key(key)
        if kind == "unknown":
            problems.append(f"{who}: unrecognised LoRA tensor '{key}'")
        elif kind in ("replace", "copy"):
            replacements[name] = weights[key]
            if kind == "replace":
                trained.add(name)
        else:
            factors.setdefault(name, {})[kind] = (weights[key], embedding)
    problems += _tied_head(replacements, trained, base, who, base_label)
    for name, tensor in replacements.items():
        info = base.tensors.get(name)
        if info is None:
            problems.append(f"{who} replaces tensor '{name}', {lacks(name)}")
        elif tuple(tensor.shape) != info.shape:
            problems.append(
                f"{who} replaces '{name}' with shape {list(tensor.shape)} but base model "
                f"'{base_label}' has shape {list(info.shape)}"
            )
    pairs: dict[str, LoraPair] = {}
    for module, found in factors.items():
        checked = _check_module(module, found, config, base.tensors, who, lacks)
        if isinstance(checked, str):
            problems.append(checked)
        else:
            pairs[checked[0]] = checked[1]
    if problems:
        more = len(problems) - MAX_PROBLEMS
        if more > 0:
            problems = problems[:MAX_PROBLEMS] + [f"{who}: ... and {more} more problems"]
        raise CheckpointError(problems)
    return Adapter(directory, pairs, replacements)


def _tied_head(
    replacements: dict[str, torch.Tensor],
    trained: set[str],
    base: Checkpoint,
    who: str,
    base_label: str,
) -> list[str]:
    """A base whose lm_head is tied (no tensor of its own): peft keeps the tie when the adapter
    replaces the embeddings and lm_head alike (``ensure_weight_tying``; the lm_head copy is
    dropped here), and unties them when it replaces the embeddings alone: refused."""
    head = "lm_head.weight"
    embed = arch.tied_partner(head, base.tensors)
    if head in base.tensors or embed is None or not arch.ties_embeddings(base.config):
        return []
    new_head, new_embed = replacements.get(head), replacements.get(embed)
    if new_head is not None and new_embed is not None and torch.equal(new_head, new_embed):
        del replacements[head]
    elif new_head is None and embed in trained:
        return [
            f"{who} replaces '{embed}' (modules_to_save), which base model '{base_label}' ties "
            "to lm_head: peft's merge would untie them; save the adapter with "
            "ensure_weight_tying=True or untie the base first"
        ]
    return []


def _check_module(
    module: str,
    found: dict[str, tuple[torch.Tensor, bool]],
    config: LoraConfig,
    base: dict[str, TensorInfo],
    who: str,
    lacks: _Lacks,
) -> tuple[str, LoraPair] | str:
    """The base tensor and factors of one target module, or the one-line problem."""
    if "A" not in found or "B" not in found:
        have, lack = ("A", "B") if "A" in found else ("B", "A")
        return f"{who}: module '{module}' has lora_{have} but no lora_{lack}"
    (a, embedding), (b, _) = found["A"], found["B"]
    target = f"{module}.weight"
    info = base.get(target)
    if info is None:
        return f"{who} targets module '{module}', {lacks(target)}"
    if info.dtype not in FLOAT_DTYPES:
        return f"{who}: cannot add a LoRA delta to '{target}', stored as {info.dtype} (quantized?)"
    factors = f"lora_B {list(b.shape)} @ lora_A {list(a.shape)}"
    if a.ndim != 2 or b.ndim != 2:
        return (
            f"{who}: module '{module}': {factors} are not matrices (convolution LoRA is not "
            "supported)"
        )
    r, _ = config.rank_alpha(module)
    if a.shape[0] != r or b.shape[1] != r:
        return (
            f"{who}: module '{module}': {factors} do not have the rank r={r} that "
            f"{ADAPTER_CONFIG} gives it"
        )
    pair = LoraPair(module, a, b, config.scaling(module), embedding or config.fan_in_fan_out)
    if pair.shape != info.shape:
        return (
            f"{who}: module '{module}': the LoRA delta has shape {list(pair.shape)} ({factors}) "
            f"but base model '{lacks.label}' has '{target}' with shape {list(info.shape)}"
        )
    return target, pair


@dataclass(frozen=True)
class _Lacks:
    """Says that the base lacks a tensor, and why when its lm_head is tied."""

    base: Checkpoint
    label: str

    def __call__(self, name: str) -> str:
        text = f"which base model '{self.label}' lacks (no tensor '{name}')"
        if arch.ties_embeddings(self.base.config) and arch.tied_partner(name, self.base.tensors):
            text += "; its lm_head is tied to the input embeddings (tie_word_embeddings)"
        return text
