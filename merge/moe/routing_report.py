"""The routing report: where each expert's prompts are routed, and how separable the gates are.

Design
------
For every layer l, each expert's prompt states (pooled layer-l inputs, or the prompts' summed
embeddings for the modes without a forward pass) go through the gate matrix ``G_l [E, H]`` as
the MoE block would route them: ``softmax(h @ G_l.T)``, top-``k``, weights renormalised over the
top ``k`` (Mixtral; Qwen2-MoE with ``norm_topk_prob``). One line per layer gives the gate
matrix's condition number and, per expert e, the experts its prompts select (share of its
prompts selecting each; the three most selected when there are many experts) and ``w``: the
mean weight its prompts give to expert e itself (0 when not selected). With a shared expert,
``shared`` is the mean of ``sigmoid(h . g_shared)``.

Warnings: a layer's gate matrix is flagged when its condition number ``s_max / s_min`` exceeds
``COND_LIMIT`` or two experts' gates have cosine above ``COS_LIMIT``. The rows are unit vectors
in the prompt modes; two rows with cosine c alone give ``sqrt((1 + c) / (1 - c))`` (c = 0.99:
about 14), so the cosine test catches a similar pair, and the condition number catches an
expert whose gate is, to three digits, a combination of the others' (``s_min < 1e-3 s_max``):
no hidden state can then prefer it over that combination by more than a sliver. (mergekit
warns at 5, which ordinary, well-separated prompt sets of real models exceed.) With more
experts than hidden dimensions the rows are dependent by construction and only the cosine test
applies. Many flagged layers are summarised in one warning.

What this module does not do: routing through the MoE block's real input (the post-attention
norm of the layer; the report uses the layer input, as the gates themselves do), or printing.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

COND_LIMIT = 1e3
COS_LIMIT = 0.99
MAX_LISTED = 3  # experts listed per expert when there are more than SMALL_E experts
SMALL_E = 4
MAX_LAYER_WARNINGS = 3


def gate_condition(gates: torch.Tensor) -> tuple[float, float, tuple[int, int]]:
    """``(condition number, highest pairwise cosine, that pair)`` of one ``[E, H]`` matrix."""
    g = gates.to(torch.float32)
    s = torch.linalg.svdvals(g)
    cond = float("inf") if s[-1] <= 0 else float(s[0] / s[-1])
    if g.shape[0] < 2:
        return cond, 0.0, (0, 0)
    u = g / g.norm(dim=-1, keepdim=True).clamp(min=1e-12)
    cos = u @ u.T
    cos.fill_diagonal_(-2.0)
    flat = int(cos.argmax())
    i, j = divmod(flat, g.shape[0])
    return cond, float(cos[i, j]), (min(i, j), max(i, j))


def route(states: torch.Tensor, gates: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``[P, H]`` states through ``[E, H]`` gates: top-k ``[P, k]`` indices and their
    renormalised weights ``[P, k]``."""
    probs = torch.softmax(states.to(torch.float32) @ gates.to(torch.float32).T, dim=-1)
    weights, chosen = probs.topk(min(k, gates.shape[0]), dim=-1)
    return chosen, weights / weights.sum(dim=-1, keepdim=True)


def _expert_entry(e: int, chosen: torch.Tensor, weights: torch.Tensor, num_experts: int) -> str:
    counts = torch.bincount(chosen.flatten(), minlength=num_experts).tolist()
    n = chosen.shape[0]
    order = sorted((j for j in range(num_experts) if counts[j]), key=lambda j: (-counts[j], j))
    if num_experts > SMALL_E:
        order = order[:MAX_LISTED]
    picks = ",".join(f"{j}:{100 * counts[j] / n:.0f}%" for j in order)
    self_w = float(torch.where(chosen == e, weights, 0.0).sum() / n)
    return f"e{e}->{{{picks}}} w{self_w:.2f}"


def layer_line(
    layer: int,
    gates: torch.Tensor,
    shared: torch.Tensor | None,
    states: Sequence[torch.Tensor],
    k: int,
) -> tuple[str, float, float, tuple[int, int]]:
    """One layer's report line, with its condition number, top cosine and that pair."""
    cond, cos, pair = gate_condition(gates)
    parts = [f"layer {layer}: cond {cond:.3g}"]
    for e, s in enumerate(states):
        chosen, weights = route(s, gates, k)
        parts.append(_expert_entry(e, chosen, weights, gates.shape[0]))
    if shared is not None:
        h = torch.cat(list(states))
        parts.append(f"shared {float(torch.sigmoid(h @ shared[0].to(torch.float32)).mean()):.2f}")
    return " | ".join(parts), cond, cos, pair


def build_report(
    mode: str,
    gates: torch.Tensor,
    shared: torch.Tensor | None,
    states: Sequence[torch.Tensor],
    k: int,
) -> tuple[list[str], list[str]]:
    """The report lines and warnings for ``gates [L, E, H]``; ``states[e]`` is ``[L or 1, P, H]``
    (expert e's prompts per layer; one row for all layers)."""
    num_layers, num_experts, hidden = gates.shape
    source = "layer inputs" if mode.startswith("hidden") else "summed prompt embeddings"
    lines = [
        f"routing report: gate_mode {mode}, {num_experts} experts, top-{min(k, num_experts)}, "
        f"prompts routed by their {source}; per expert e: e->{{expert:share of its prompts "
        f"selecting it}} w<mean routing weight to e>"
    ]
    flagged: list[tuple[int, float, float, tuple[int, int]]] = []
    for layer in range(num_layers):
        per_layer = [s[min(layer, s.shape[0] - 1)] for s in states]
        sh = shared[layer] if shared is not None else None
        line, cond, cos, pair = layer_line(layer, gates[layer], sh, per_layer, k)
        lines.append(line)
        if (cond > COND_LIMIT and num_experts <= hidden) or cos > COS_LIMIT:
            flagged.append((layer, cond, cos, pair))
    return lines, _warnings(flagged, num_layers)


def _warnings(
    flagged: list[tuple[int, float, float, tuple[int, int]]], num_layers: int
) -> list[str]:
    def reason(cond: float, cos: float, pair: tuple[int, int]) -> str:
        return (
            f"the gate matrix is ill-conditioned (condition number {cond:.2g}, cosine of experts "
            f"{pair[0]} and {pair[1]}: {cos:.4f}): the prompts of experts {pair[0]} and "
            f"{pair[1]} are too similar to separate"
        )

    if len(flagged) <= MAX_LAYER_WARNINGS:
        return [f"layer {layer}: {reason(c, cos, p)}" for layer, c, cos, p in flagged]
    worst = max(flagged, key=lambda f: (f[2], f[1]))
    which = ", ".join(str(f[0]) for f in flagged)
    return [
        f"layers {which} ({len(flagged)} of {num_layers}): the gate matrices are ill-conditioned;"
        f" worst, layer {worst[0]}: {reason(worst[1], worst[2], worst[3])}"
    ]
