"""The MoE output families: which dense models fit, the output config, the on-disk names.

Design
------
One small ``Family`` record per output format (DESIGN.md allows a table exactly here, where the
formats truly differ): the dense model types it takes as base and experts, whether it holds a
shared expert (and whether that one has a gate), the per-expert tensor names that the family's
``transformers`` model writes with ``save_pretrained`` (transformers 5 fuses the experts in
memory and converts these names on load; transformers 4, vLLM and llama.cpp read them as is),
and a function from the base's ``config.json`` to the output's.

The families, checked against transformers 5.23 (save, reload, and identical experts
reproducing the dense model's logits):

- ``mixtral`` (Llama or Mistral experts): ``block_sparse_moe.experts.E.w1/w3/w2`` (gate, up,
  down) and ``block_sparse_moe.gate``. Softmax over all experts, top-k renormalised.
- ``qwen2_moe`` (mergekit's ``qwen``; Qwen2, Llama or Mistral experts): ``mlp.experts.E.*_proj``,
  ``mlp.gate``, and always one shared expert ``mlp.shared_expert.*`` with its sigmoid gate
  ``mlp.shared_expert_gate``. ``norm_topk_prob: true`` so the chosen experts' weights sum to 1.
- ``qwen3_moe`` (Qwen3 experts): ``mlp.experts.E.*_proj`` and ``mlp.gate``; no shared expert.
- ``deepseek_v3`` (mergekit's ``deepseek``; dense DeepSeek-V3 models, i.e.
  ``first_k_dense_replace >= num_hidden_layers``): ``mlp.experts.E.*_proj``, ``mlp.gate``,
  ``mlp.gate.e_score_correction_bias`` (zeros) and an optional ungated shared expert
  ``mlp.shared_experts.*``. Every output layer is an MoE layer (``first_k_dense_replace: 0``);
  sigmoid scoring with one group, ``norm_topk_prob: true`` and ``routed_scaling_factor: 1``
  so the chosen experts' weights sum to 1. DeepSeek-V2 is not offered: its router never
  renormalises the top-k weights, so an MoE of it would not reproduce its experts.

What this module does not do: read tensors or headers (``merge.moe.plan`` checks the models
against a family), or remote-code formats (mergekit's ``deepseek`` output is the remote-code
DeepSeek-MoE-16B model; ours is the native DeepSeek-V3).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

PROJS = ("gate", "up", "down")

ConfigFn = Callable[[dict[str, Any], "MoeShape"], None]


@dataclass(frozen=True)
class MoeShape:
    """What the output config needs to know beyond the base's config."""

    num_experts: int
    experts_per_token: int
    intermediate: int
    shared_intermediate: int | None
    qkv_bias: bool


@dataclass(frozen=True)
class Family:
    name: str
    title: str
    aliases: tuple[str, ...]
    model_type: str
    architecture: str
    expert_types: tuple[str, ...]
    block: str  # the MoE module inside a layer: "block_sparse_moe" or "mlp"
    proj: dict[str, str]  # gate/up/down -> the expert's tensor stem
    shared: str | None  # the shared expert's module name, None: the family has none
    shared_required: bool = False
    shared_gate: bool = False  # a sigmoid gate row for the shared expert
    score_bias: bool = False  # DeepSeek-V3's e_score_correction_bias
    attn_bias: str = "any"  # "none": no attention biases; "qkv": q/k/v only; "any": as base
    configure: ConfigFn | None = None

    def expert(self, layer: int, index: int, proj: str) -> str:
        return f"model.layers.{layer}.{self.block}.experts.{index}.{self.proj[proj]}.weight"

    def router(self, layer: int) -> str:
        return f"model.layers.{layer}.{self.block}.gate.weight"

    def shared_name(self, layer: int, proj: str) -> str:
        return f"model.layers.{layer}.mlp.{self.shared}.{proj}_proj.weight"

    def shared_gate_name(self, layer: int) -> str:
        return f"model.layers.{layer}.mlp.shared_expert_gate.weight"

    def score_bias_name(self, layer: int) -> str:
        return f"model.layers.{layer}.mlp.gate.e_score_correction_bias"


def dense_mlp(layer: int, proj: str) -> str:
    """A dense model's MLP tensor (every family's inputs name it this way)."""
    return f"model.layers.{layer}.mlp.{proj}_proj.weight"


DENSE_MLP_RE = re.compile(r"(^|\.)layers\.\d+\.mlp\.")


def is_dense_mlp(name: str) -> bool:
    """True for a tensor of a decoder layer's dense MLP (replaced by the experts)."""
    return DENSE_MLP_RE.search(name) is not None


def _mixtral(cfg: dict[str, Any], s: MoeShape) -> None:
    for key in ("attention_bias", "mlp_bias", "pretraining_tp"):
        cfg.pop(key, None)
    cfg.update(
        num_local_experts=s.num_experts,
        num_experts_per_tok=s.experts_per_token,
        intermediate_size=s.intermediate,
        output_router_logits=False,
        router_aux_loss_coef=cfg.get("router_aux_loss_coef", 0.001),
        router_jitter_noise=0.0,
    )
    cfg.setdefault("sliding_window", None)


def _qwen2_moe(cfg: dict[str, Any], s: MoeShape) -> None:
    for key in ("attention_bias", "mlp_bias", "pretraining_tp"):
        cfg.pop(key, None)
    cfg.update(
        num_experts=s.num_experts,
        num_experts_per_tok=s.experts_per_token,
        moe_intermediate_size=s.intermediate,
        shared_expert_intermediate_size=s.shared_intermediate,
        decoder_sparse_step=1,
        mlp_only_layers=[],
        norm_topk_prob=True,
        qkv_bias=s.qkv_bias,
        use_sliding_window=False,
        output_router_logits=False,
    )


def _qwen3_moe(cfg: dict[str, Any], s: MoeShape) -> None:
    cfg.update(
        num_experts=s.num_experts,
        num_experts_per_tok=s.experts_per_token,
        moe_intermediate_size=s.intermediate,
        decoder_sparse_step=1,
        mlp_only_layers=[],
        norm_topk_prob=True,
        output_router_logits=False,
    )


def _deepseek_v3(cfg: dict[str, Any], s: MoeShape) -> None:
    cfg.update(
        n_routed_experts=s.num_experts,
        n_shared_experts=1 if s.shared_intermediate else 0,
        num_experts_per_tok=s.experts_per_token,
        moe_intermediate_size=s.intermediate,
        first_k_dense_replace=0,
        n_group=1,
        topk_group=1,
        norm_topk_prob=True,
        routed_scaling_factor=1.0,
    )


GATE_UP_DOWN = {"gate": "gate_proj", "up": "up_proj", "down": "down_proj"}

FAMILIES: tuple[Family, ...] = (
    Family(
        "mixtral",
        "Mixtral",
        ("mixtral",),
        "mixtral",
        "MixtralForCausalLM",
        ("llama", "mistral"),
        "block_sparse_moe",
        {"gate": "w1", "up": "w3", "down": "w2"},
        None,
        attn_bias="none",
        configure=_mixtral,
    ),
    Family(
        "qwen2_moe",
        "Qwen2-MoE",
        ("qwen", "qwen2", "qwen2_moe", "qwen_moe", "qwen2moe"),
        "qwen2_moe",
        "Qwen2MoeForCausalLM",
        ("qwen2", "llama", "mistral"),
        "mlp",
        GATE_UP_DOWN,
        "shared_expert",
        shared_required=True,
        shared_gate=True,
        attn_bias="qkv",
        configure=_qwen2_moe,
    ),
    Family(
        "qwen3_moe",
        "Qwen3-MoE",
        ("qwen3", "qwen3_moe", "qwen3moe"),
        "qwen3_moe",
        "Qwen3MoeForCausalLM",
        ("qwen3",),
        "mlp",
        GATE_UP_DOWN,
        None,
        configure=_qwen3_moe,
    ),
    Family(
        "deepseek_v3",
        "DeepSeek-V3",
        ("deepseek", "deepseek_v3", "deepseekv3", "deepseek_moe"),
        "deepseek_v3",
        "DeepseekV3ForCausalLM",
        ("deepseek_v3",),
        "mlp",
        GATE_UP_DOWN,
        "shared_experts",
        score_bias=True,
        configure=_deepseek_v3,
    ),
)


def normalise(name: str) -> str:
    return re.sub(r"[\s\-]+", "_", name.strip().lower())


def find_family(name: str) -> Family | None:
    """The family called ``name`` (its name or an alias; case, spaces and dashes ignored)."""
    key = normalise(name)
    return next((f for f in FAMILIES if key == f.name or key in f.aliases), None)


def architecture_names() -> list[str]:
    """Every accepted ``architecture:`` value, canonical names first."""
    names = [f.name for f in FAMILIES]
    return names + [a for f in FAMILIES for a in f.aliases if a not in names]


def output_config(family: Family, base: dict[str, Any], shape: MoeShape) -> dict[str, Any]:
    """The output's config.json: the base's (with the output dtype set by the caller) turned
    into the family's MoE config."""
    cfg = dict(base)
    cfg["model_type"] = family.model_type
    cfg["architectures"] = [family.architecture]
    cfg.pop("auto_map", None)
    assert family.configure is not None
    family.configure(cfg, shape)
    return cfg
