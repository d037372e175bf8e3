"""Router gate vectors for MoE assembly: one row per expert and layer, from prompts or seeds.

Design
------
``compute_gates`` returns, for every decoder layer, the router weight ``[experts, hidden]``
(and the shared expert's ``[1, hidden]`` gate when there is one), a routing report and
warnings. The modes (``gate_mode`` in a mergekit-moe recipe):

- ``hidden`` / ``hidden_last``: the base model runs on each expert's prompts (BOS + prompt,
  left padded); layer l's row is the mean over prompts of layer l's *input* hidden state at the
  last real token, minus the same for the negative prompts, L2-normalised per layer. mergekit
  defines both modes this way (position -1 of a left-padded batch), so they are identical.
- ``hidden_avg``: as ``hidden`` but each prompt's state is its mean over its real tokens
  (mergekit also averages the padding positions: a documented fix).
- ``cheap_embed``: the sum of the prompts' token embedding rows (BOS included, no forward pass),
  normalised; with negative prompts, ``unit(unit(pos) - unit(neg))`` as mergekit does. The same
  vector for every layer.
- ``random`` (standard normal) and ``uniform_random`` (``U(-1/sqrt(H), 1/sqrt(H))``): drawn from
  a ``torch.Generator`` seeded by ``tensor_seed(seed, "router.{layer}")`` (the shared gate by
  ``"router.shared.{layer}"``), so reruns are bit-identical and layers are independent.

The forward pass for the ``hidden*`` modes streams the checkpoint one decoder layer at a time
(``merge.moe.forward``); the report is built by ``merge.moe.routing_report``. A shared expert
without positive prompts in a prompt mode gets a zero gate (``sigmoid(0) = 0.5`` on every token).

What this module does not do: per-expert ``noise_scale``/``residual_scale`` (applied by the
assembly), recipe validation (an expert lacking prompts in a prompt mode is an assertion here,
a recipe error at validation), or writing tensors.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from merge import architecture as arch
from merge.errors import PlanError
from merge.jobs import tensor_seed

GATE_MODES = ("hidden", "cheap_embed", "random", "uniform_random", "hidden_avg", "hidden_last")
PROMPT_MODES = ("hidden", "cheap_embed", "hidden_avg", "hidden_last")
HIDDEN_MODES = ("hidden", "hidden_avg", "hidden_last")

EPS = 1e-8  # floor of a norm before dividing by it (mergekit's clamp)
EMBED_NAMES = ("embed_tokens.weight", "wte.weight", "word_embeddings.weight", "embeddings.weight")


@dataclass(frozen=True)
class ExpertPrompts:
    positive: tuple[str, ...]
    negative: tuple[str, ...] = ()


@dataclass
class GateResult:
    gates: torch.Tensor  # float32 [num_layers, num_experts, hidden]
    shared: torch.Tensor | None  # float32 [num_layers, 1, hidden], None without a shared expert
    report: list[str]
    warnings: list[str]


def compute_gates(
    checkpoint: Any,
    base_dir: Path,
    experts: Sequence[ExpertPrompts],
    mode: str,
    *,
    shared: ExpertPrompts | None = None,
    experts_per_token: int = 2,
    seed: int,
    progress: bool = False,
) -> GateResult:
    """The router weights of every layer for ``experts`` (and ``shared``), with the report."""
    assert mode in GATE_MODES, f"unknown gate mode {mode!r}"
    num_layers = int(checkpoint.layer_count)
    hidden = _hidden_size(checkpoint)
    prompted = list(experts) + ([shared] if shared is not None else [])
    if mode in PROMPT_MODES:
        for i, e in enumerate(experts):
            assert e.positive, f"expert {i} has no positive_prompts (gate_mode {mode})"
    report_states: list[torch.Tensor] | None = None  # per expert [L or 1, prompts, H]
    if mode in ("random", "uniform_random"):
        gates = random_gates(seed, num_layers, len(experts), hidden, mode)
        shared_gates = None
        if shared is not None:
            shared_gates = random_gates(seed, num_layers, 1, hidden, mode, name="router.shared")
    elif mode == "cheap_embed":
        rows = [cheap_embed_vector(checkpoint, base_dir, p) for p in prompted]
        vectors = torch.stack(rows).unsqueeze(0).expand(num_layers, -1, -1).clone()
        gates, shared_gates = _split(vectors, len(experts), shared)
    else:
        from merge.moe.forward import prompt_states

        groups = [g for p in prompted for g in (p.positive, p.negative)]
        states = prompt_states(checkpoint, base_dir, groups, mode, progress)
        gates, shared_gates = _split(hidden_gates(prompted, states, hidden), len(experts), shared)
        report_states = [states[2 * i] for i in range(len(experts))]
    if report_states is None and all(e.positive for e in experts):
        # cheap_embed and random modes: route each prompt's summed embedding (no forward pass)
        report_states = _embedding_states(checkpoint, base_dir, [e.positive for e in experts])
    from merge.moe.routing_report import build_report

    if report_states is None:
        line = f"routing: gate_mode {mode}: random gates (seed {seed}); no prompts to report on"
        return GateResult(gates, shared_gates, [line], [])
    report, warnings = build_report(mode, gates, shared_gates, report_states, experts_per_token)
    return GateResult(gates, shared_gates, report, warnings)


def _split(
    vectors: torch.Tensor, num_experts: int, shared: ExpertPrompts | None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``[L, E (+1), H]`` -> the experts' gates and the shared expert's (or None)."""
    return vectors[:, :num_experts].contiguous(), (
        vectors[:, num_experts:].contiguous() if shared is not None else None
    )


# --- random modes ------------------------------------------------------------------------------


def random_gates(
    seed: int, num_layers: int, rows: int, hidden: int, mode: str, name: str = "router"
) -> torch.Tensor:
    """``[num_layers, rows, hidden]`` float32: layer l drawn from ``tensor_seed(seed, name.l)``."""
    out = torch.empty(num_layers, rows, hidden, dtype=torch.float32)
    bound = 1.0 / hidden**0.5
    for layer in range(num_layers):
        gen = torch.Generator().manual_seed(tensor_seed(seed, f"{name}.{layer}"))
        if mode == "random":
            out[layer] = torch.randn(rows, hidden, generator=gen)
        else:
            out[layer] = torch.rand(rows, hidden, generator=gen) * (2 * bound) - bound
    return out


# --- prompt modes ------------------------------------------------------------------------------


def unit(v: torch.Tensor) -> torch.Tensor:
    """``v`` divided by its L2 norm along the last dimension (floored at ``EPS``)."""
    return v / v.norm(dim=-1, keepdim=True).clamp(min=EPS)


def hidden_gates(
    prompted: Sequence[ExpertPrompts], states: Sequence[torch.Tensor], hidden: int
) -> torch.Tensor:
    """``[L, len(prompted), H]`` from per-group pooled states (positive, negative per entry):
    ``unit(mean(positive) - mean(negative))`` per layer; zeros for an entry without prompts."""
    num_layers = states[0].shape[0]
    out = torch.zeros(num_layers, len(prompted), hidden)
    for i, p in enumerate(prompted):
        if not p.positive:  # a shared expert without prompts: a neutral (zero) gate
            continue
        v = states[2 * i].mean(dim=1)
        if p.negative:
            v = v - states[2 * i + 1].mean(dim=1)
        out[:, i] = unit(v)
    return out


def cheap_embed_vector(checkpoint: Any, base_dir: Path, prompts: ExpertPrompts) -> torch.Tensor:
    """``[hidden]``: the normalised sum of the prompts' token embeddings (zeros without any)."""
    if not prompts.positive:
        return torch.zeros(_hidden_size(checkpoint))
    embed = read_embedding(checkpoint)
    from merge.moe.forward import tokenize

    def summed(texts: Sequence[str]) -> torch.Tensor:
        ids, mask = tokenize(base_dir, texts)
        return unit((embed[ids] * mask.unsqueeze(-1)).sum(dim=(0, 1)))

    v = summed(prompts.positive)
    if prompts.negative:
        v = unit(v - summed(prompts.negative))
    return v


def _embedding_states(
    checkpoint: Any, base_dir: Path, groups: Sequence[Sequence[str]]
) -> list[torch.Tensor]:
    """Per group ``[1, prompts, hidden]``: each prompt's summed token embeddings."""
    from merge.moe.forward import tokenize

    embed = read_embedding(checkpoint)
    out = []
    for texts in groups:
        ids, mask = tokenize(base_dir, texts)
        out.append((embed[ids] * mask.unsqueeze(-1)).sum(dim=1).unsqueeze(0))
    return out


def embedding_name(checkpoint: Any) -> str:
    """The input embedding tensor's name in ``checkpoint``."""
    names = list(checkpoint.tensors)
    for _, candidates in arch.TIED_PAIRS:
        for c in candidates:
            if c in checkpoint.tensors:
                return c
    found = [n for n in names if arch.layer_of(n) is None and n.endswith(EMBED_NAMES)]
    if len(found) != 1:
        raise PlanError(
            f"model '{checkpoint.label}': cannot find the input embedding tensor "
            f"(candidates: {found or 'none'})"
        )
    return found[0]


def read_embedding(checkpoint: Any) -> torch.Tensor:
    """The input embedding matrix ``[vocab, hidden]`` as float32."""
    return checkpoint.read(embedding_name(checkpoint)).to(torch.float32)


def _hidden_size(checkpoint: Any) -> int:
    config = checkpoint.config
    for cfg in (config, config.get("text_config") or {}):
        for key in ("hidden_size", "n_embd", "d_model"):
            if key in cfg:
                return int(cfg[key])
    return int(checkpoint.tensors[embedding_name(checkpoint)].shape[-1])
