"""The computed tensors of an MoE plan: router rows, shared-expert gates, score biases.

``gate_tensors`` runs the router (``merge.moe.router.compute_gates``, which reads the base
model's tensors and, for the ``hidden*`` modes, runs it on the prompts) and lays its result
out under the family's tensor names, as float32 tensors for the executor's ``computed`` jobs.
It runs in ``merge run`` only, after planning and before anything is written.

What it does not do: per-expert noise or scaling (those act on the experts' MLP weights, in
the executor's copy jobs, as in mergekit-moe), or any checking (the plan did it).
"""

from __future__ import annotations

import torch

from merge.jobs import Plan
from merge.moe.router import ExpertPrompts, compute_gates


def gate_tensors(
    plan: Plan, *, progress: bool = False
) -> tuple[dict[str, torch.Tensor], list[str], list[str]]:
    """(tensors by output name, routing report lines, warnings) for ``plan``'s computed jobs."""
    lay = plan.moe
    assert lay is not None, "not an MoE plan"
    fam = lay.family
    base = plan.models[plan.donor]
    experts = [ExpertPrompts(e.positive, e.negative) for e in lay.experts]
    shared = None
    if lay.shared is not None and fam.shared_gate:
        shared = ExpertPrompts(lay.shared.positive, lay.shared.negative)
    result = compute_gates(
        base.checkpoint,
        base.directory,
        experts,
        lay.gate_mode,
        shared=shared,
        experts_per_token=lay.experts_per_token,
        seed=plan.seed,
        progress=progress,
    )
    want = (lay.num_layers, len(experts), lay.hidden)
    if tuple(result.gates.shape) != want:  # a router bug, not a user error
        raise RuntimeError(
            f"router returned gates of shape {tuple(result.gates.shape)}, expected {want}"
        )
    out: dict[str, torch.Tensor] = {}
    for layer in range(lay.num_layers):
        out[fam.router(layer)] = result.gates[layer].to(torch.float32)
        if fam.score_bias:
            out[fam.score_bias_name(layer)] = torch.zeros(len(experts))
            if lay.shared is None:  # n_shared_experts: 0 -> a zero-width shared MLP
                for proj in ("gate", "up", "down"):
                    shape = (lay.hidden, 0) if proj == "down" else (0, lay.hidden)
                    out[fam.shared_name(layer, proj)] = torch.zeros(shape)
        if shared is not None:
            gate = result.shared[layer] if result.shared is not None else torch.zeros(1, lay.hidden)
            out[fam.shared_gate_name(layer)] = gate.to(torch.float32)
    return out, list(result.report), list(result.warnings)
