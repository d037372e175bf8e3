"""The model card of an MoE checkpoint: the usual card plus the experts and the routing report.

``moe_sections`` turns a planned MoE (and its routing report) into Markdown sections for
``merge.card.model_card``: the family and router settings, each expert with its prompts and
scales, and the routing report verbatim. Pure: no I/O.

What it does not do: describe how good the routing is beyond the router's own report.
"""

from __future__ import annotations

from collections.abc import Sequence

from merge.moe.layout import MoeLayout
from merge.moe.recipe import ExpertSpec


def _quoted(prompts: Sequence[str]) -> str:
    return ", ".join(f"`{p}`" for p in prompts) if prompts else "none"


def _expert_line(label: str, e: ExpertSpec) -> str:
    line = f"- {label}: `{e.model}`; positive prompts: {_quoted(e.positive)}"
    if e.negative:
        line += f"; negative prompts: {_quoted(e.negative)}"
    if e.noise_scale is not None:
        line += f"; noise_scale {e.noise_scale:g}"
    if e.residual_scale is not None:
        line += f"; residual_scale {e.residual_scale:g}"
    return line


def moe_sections(lay: MoeLayout, base_model: str, report: Sequence[str]) -> list[tuple[str, str]]:
    """(heading, body) sections describing the MoE."""
    fam = lay.family
    shared = "none"
    if lay.shared is not None:
        shared = "one, gated" if fam.shared_gate else "one, always on"
    facts = [
        f"- Family: {fam.title} (`{fam.architecture}`)",
        f"- Base model (attention, norms, embeddings, tokenizer): `{base_model}`",
        f"- Experts: {len(lay.experts)}, {lay.experts_per_token} per token",
        f"- Shared expert: {shared}",
        f"- Gate mode: `{lay.gate_mode}`",
    ]
    experts = [_expert_line(f"Expert {i}", e) for i, e in enumerate(lay.experts)]
    if lay.shared is not None:
        experts.append(_expert_line("Shared expert", lay.shared))
    sections = [("Mixture of experts", "\n".join(facts)), ("Experts", "\n".join(experts))]
    if report:
        body = "```text\n" + "\n".join(report) + "\n```"
        sections.append(("Routing report", body))
    return sections
