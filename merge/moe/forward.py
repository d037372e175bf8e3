"""The base model's hidden states on the expert prompts, one decoder layer in memory at a time.

Design
------
``prompt_states`` tokenises every prompt of every group into one left-padded batch (BOS +
prompt, attention mask), builds the model skeleton from ``config.json`` with accelerate's
``init_empty_weights`` (parameters on the meta device, buffers such as the rotary frequencies
real), then materialises the input embedding, and one decoder layer after another: the layer's
tensors are read from the checkpoint (``checkpoint.read``, cast to float32) and assigned into
the layer, the layer runs on the batch, and its parameters go back to the meta device. Memory is
the embedding plus one layer plus the batch's activations, whatever the model size.

Only the model's own pieces run: its embedding module, its rotary embedding module, its decoder
layers, and transformers' mask helpers (``create_causal_mask``, and the sliding-window variant
for layers whose ``config.layer_types`` entry says so, or every layer of a Mistral with
``sliding_window``), exactly as ``LlamaModel.forward`` and
its siblings (Mistral, Qwen2, Qwen3, dense DeepSeek-V2/V3) call them. Positions come from the
attention mask (``cumsum - 1``, as generation does), so a left-padded prompt has the states it
would have alone.

For each layer l and prompt, the layer's *input* (``hidden_states[l]`` of a full forward with
``output_hidden_states``) is pooled: the last real token, or (``hidden_avg``) the mean over the
real tokens only; padding never enters (``torch.where``, since padded rows may hold NaN).

transformers loads the tokenizer, config and model class with ``trust_remote_code`` as
``--trust-remote-code`` says (``merge.settings.remote_code``).

What this module does not do: the final norm or the LM head (never needed), KV caches,
quantised models, GPUs (it runs in float32 on the CPU), or chunking a batch too
large for memory (prompts are short).
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from merge.errors import PlanError
from merge.settings import remote_code


def _tokenizer(base_dir: Path) -> Any:
    return _cached_tokenizer(base_dir, remote_code())


@lru_cache(maxsize=4)
def _cached_tokenizer(base_dir: Path, trust_remote_code: bool) -> Any:
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(base_dir, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, TypeError, KeyError) as e:
        raise PlanError(
            f"base model folder {base_dir}: no usable tokenizer, which the router needs to "
            f"tokenize the expert prompts ({type(e).__name__})"
        ) from e


def tokenize(base_dir: Path, texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """``(input_ids, attention_mask)``, both ``[len(texts), T]`` int64: BOS + text, left padded."""
    tok = _tokenizer(Path(base_dir))
    bos = tok.bos_token_id
    rows = [list(tok(t, add_special_tokens=False)["input_ids"]) for t in texts]
    rows = [([bos] if bos is not None else []) + r for r in rows]
    pad = next((p for p in (tok.pad_token_id, tok.eos_token_id) if p is not None), 0)
    width = max((len(r) for r in rows), default=0)
    ids = torch.full((len(rows), width), int(pad), dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        if r:
            ids[i, width - len(r) :] = torch.tensor(r, dtype=torch.long)
            mask[i, width - len(r) :] = 1
    return ids, mask


def position_ids(mask: torch.Tensor) -> torch.Tensor:
    """Generation's positions for a left-padded batch: ``cumsum(mask) - 1``, padding at 1."""
    return (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 1)


def pool(states: torch.Tensor, mask: torch.Tensor, mode: str) -> torch.Tensor:
    """``[B, T, H]`` -> ``[B, H]``: the last real token, or the mean over real tokens."""
    real = mask.bool().unsqueeze(-1)
    if mode == "hidden_avg":
        total = torch.where(real, states, 0.0).sum(dim=1)
        return total / mask.sum(dim=1, keepdim=True).clamp(min=1).to(states.dtype)
    last = mask.shape[1] - 1 - mask.flip(1).long().argmax(dim=1)  # last position with mask 1
    return states[torch.arange(states.shape[0]), last]


def prompt_states(
    checkpoint: Any,
    base_dir: Path,
    groups: Sequence[Sequence[str]],
    mode: str = "hidden",
    progress: bool = False,
) -> list[torch.Tensor]:
    """Per group ``[num_layers, len(group), hidden]``: every layer's pooled input state."""
    texts = [t for g in groups for t in g]
    if texts:
        ids, mask = tokenize(base_dir, texts)
        pooled = streamed_states(checkpoint, base_dir, ids, mask, mode, progress)
    else:
        pooled = torch.zeros(int(checkpoint.layer_count), 0, 0)
    out, start = [], 0
    for g in groups:
        out.append(pooled[:, start : start + len(g)])
        start += len(g)
    return out


@torch.no_grad()
def streamed_states(
    checkpoint: Any,
    base_dir: Path,
    ids: torch.Tensor,
    mask: torch.Tensor,
    mode: str = "hidden",
    progress: bool = False,
) -> torch.Tensor:
    """``[num_layers, B, H]`` float32: each decoder layer's pooled input, one layer loaded."""
    model = skeleton(base_dir)
    names = {id(m): n for n, m in model.named_modules()}
    embed = model.get_input_embeddings()
    inner, layers = _decoder(model)
    with _loaded(checkpoint, embed, names[id(embed)]):
        hidden = embed(ids).to(torch.float32)
    pos = position_ids(mask)
    masks = _attention_masks(inner.config, hidden, mask, pos)
    rope = _rotary(inner)
    rotary = rope(hidden, pos) if rope is not None else None
    pooled = []
    for i, layer in enumerate(tqdm(layers, desc="router layers", disable=not progress)):
        pooled.append(pool(hidden, mask, mode))
        with _loaded(checkpoint, layer, names[id(layer)]):
            hidden = _run_layer(layer, hidden, masks[_layer_type(inner.config, i)], pos, rotary)
    return torch.stack(pooled)


def skeleton(base_dir: Path) -> Any:
    """The causal LM from ``base_dir``'s config with every parameter on the meta device."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        config = AutoConfig.from_pretrained(base_dir, trust_remote_code=remote_code())
    except (OSError, ValueError, KeyError) as e:
        raise PlanError(f"base model folder {base_dir}: cannot read config.json: {e}") from e
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(
            config, dtype=torch.float32, trust_remote_code=remote_code()
        )
    return model.eval()


def _decoder(model: Any) -> tuple[Any, nn.ModuleList]:
    """The inner decoder (holding ``layers``, ``rotary_emb``) and its list of layers."""
    inner = getattr(model, "model", None) or getattr(model, "base_model", model)
    layers = getattr(inner, "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise PlanError(
            f"{type(model).__name__}: no decoder layer list; the hidden gate modes support "
            "Llama-like models (Llama, Mistral, Qwen2, Qwen3, DeepSeek dense)"
        )
    return inner, layers


class _loaded:
    """Context: ``module``'s parameters read from ``checkpoint`` (float32); back to meta after."""

    def __init__(self, checkpoint: Any, module: nn.Module, prefix: str):
        self.checkpoint, self.module, self.prefix = checkpoint, module, prefix

    def __enter__(self) -> nn.Module:
        state = {}
        for name, _ in self.module.named_parameters():
            full = f"{self.prefix}.{name}" if self.prefix else name
            if full not in self.checkpoint.tensors:
                raise PlanError(
                    f"model '{self.checkpoint.label}': tensor '{full}' is missing; the router's "
                    "forward pass needs it"
                )
            state[name] = self.checkpoint.read(full).to(torch.float32)
        self.module.load_state_dict(state, strict=False, assign=True)
        return self.module

    def __exit__(self, *exc: object) -> None:
        self.module.to("meta")


def _attention_masks(
    config: Any, hidden: torch.Tensor, mask: torch.Tensor, pos: torch.Tensor
) -> dict[str, Any]:
    """The masks the model's own forward builds, keyed by ``config.layer_types`` entries."""
    from transformers.masking_utils import (
        create_causal_mask,
        create_sliding_window_causal_mask,
    )

    params = inspect.signature(create_causal_mask).parameters
    cache = "cache" if "cache" in params else "past_key_values"  # renamed in transformers 5.24
    kwargs: dict[str, Any] = {
        "config": config,
        "attention_mask": mask,
        cache: None,
        "position_ids": pos,
    }
    if "inputs_embeds" in params:  # transformers >= 5.9
        kwargs["inputs_embeds"] = hidden
    else:  # 4.53 to 5.8: the older name, and cache positions are required
        kwargs["input_embeds"] = hidden
        kwargs["cache_position"] = torch.arange(hidden.shape[1], device=hidden.device)
    masks = {"full_attention": create_causal_mask(**kwargs)}
    types = set(getattr(config, "layer_types", None) or ()) | {_layer_type(config, 0)}
    if "sliding_attention" in types:
        masks["sliding_attention"] = create_sliding_window_causal_mask(**kwargs)
    return masks


def _layer_type(config: Any, index: int) -> str:
    """``config.layer_types[index]``; without that list, Mistral's rule: every layer slides
    when ``sliding_window`` is set."""
    types = getattr(config, "layer_types", None)
    if types:
        return str(types[index])
    if getattr(config, "sliding_window", None) is not None:
        return "sliding_attention"
    return "full_attention"


def _rotary(inner: nn.Module) -> nn.Module | None:
    """The model's rotary embedding module, with real (not meta) frequency buffers."""
    rope = getattr(inner, "rotary_emb", None)
    if rope is not None and any(b.is_meta for b in rope.buffers()):
        rope = type(rope)(config=inner.config)
    return rope


def _run_layer(
    layer: nn.Module, hidden: torch.Tensor, mask: Any, pos: torch.Tensor, rotary: Any
) -> torch.Tensor:
    out = layer(
        hidden,
        attention_mask=mask,
        position_ids=pos,
        position_embeddings=rotary,
        use_cache=False,  # the cache argument (past_key_values, cache from 5.24) defaults to None
    )
    return out[0] if isinstance(out, tuple) else out
