"""Router gate vectors (merge.moe.router) and the layer-by-layer forward (merge.moe.forward).

References are computed plainly here: a full ``AutoModelForCausalLM`` forward with
``output_hidden_states`` on a batch tokenised and left-padded by hand, per-prompt loops, and the
embedding matrix read with ``load_state``.
"""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    DeepseekV3Config,
    MistralConfig,
    PretrainedConfig,
    Qwen3Config,
)

from merge.checkpoint import Checkpoint
from merge.errors import PlanError
from merge.moe import forward
from merge.moe.router import GATE_MODES, PROMPT_MODES, ExpertPrompts, GateResult, compute_gates
from merge.moe.routing_report import build_report, gate_condition
from tiny import copy_tokenizer, load_state, make_tiny, special_token_ids

CODE = ExpertPrompts(("Write python code to sort a list", "def foo(x): return x + 1"))
STORY = ExpertPrompts(("Tell me a story about a dragon",), ("The end.",))
MATH = ExpertPrompts(("What is 2+2?", "Compute the integral of x", "Solve for y"))
EXPERTS = [CODE, STORY, MATH]


# --- tiny models beyond tests/tiny.py's families -----------------------------------------------


def _save(directory: Path, config: PretrainedConfig, seed: int) -> Path:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.save_pretrained(directory)
    copy_tokenizer(directory)
    return directory


def _common() -> dict[str, int]:
    ids = special_token_ids()
    return {
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_attention_heads": 4,
        "vocab_size": ids["vocab_size"],
        "max_position_embeddings": 128,
        "bos_token_id": ids["bos_token_id"],
        "eos_token_id": ids["eos_token_id"],
        "pad_token_id": ids["pad_token_id"],
    }


@pytest.fixture(scope="module")
def qwen3_sliding(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Qwen3, layer 0 full attention and layers 1-2 sliding (window 4: shorter than prompts)."""
    config = Qwen3Config(
        **_common(), num_hidden_layers=3, num_key_value_heads=2, head_dim=8,
        use_sliding_window=True, sliding_window=4, max_window_layers=1,
    )  # fmt: skip
    assert "sliding_attention" in config.layer_types
    return _save(tmp_path_factory.mktemp("qwen3"), config, seed=5)


@pytest.fixture(scope="module")
def deepseek_dense(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """DeepSeek-V3 (MLA attention) with every layer dense (first_k_dense_replace = layers)."""
    config = DeepseekV3Config(
        **_common(), num_hidden_layers=2, first_k_dense_replace=2, num_key_value_heads=4,
        q_lora_rank=None, kv_lora_rank=16, qk_rope_head_dim=4, qk_nope_head_dim=4,
        v_head_dim=8, n_routed_experts=4, moe_intermediate_size=16,
    )  # fmt: skip
    return _save(tmp_path_factory.mktemp("deepseek"), config, seed=6)


@pytest.fixture(scope="module")
def llama_pad_row(tmp_path_factory: pytest.TempPathFactory, llama_base: Path) -> Path:
    """llama_base with a random (not zero) pad embedding row, so padded positions carry
    non-zero states through every layer: including them would change an average."""
    out = tmp_path_factory.mktemp("llama_pad_row")
    state = load_state(llama_base)
    pad = special_token_ids()["pad_token_id"]
    state["model.embed_tokens.weight"][pad] = torch.randn(
        32, generator=torch.Generator().manual_seed(9)
    )
    save_file(state, out / "model.safetensors", metadata={"format": "pt"})
    shutil.copyfile(llama_base / "config.json", out / "config.json")
    copy_tokenizer(out)
    return out


@pytest.fixture(scope="module")
def mistral_sliding(tmp_path_factory: pytest.TempPathFactory) -> Path:
    config = MistralConfig(
        **_common(), num_hidden_layers=2, num_key_value_heads=2, sliding_window=3
    )
    return _save(tmp_path_factory.mktemp("mistral"), config, seed=7)


# --- plain references --------------------------------------------------------------------------


def _batch(base: Path, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """BOS + tokens, left padded with the pad token, written out by hand."""
    tok = AutoTokenizer.from_pretrained(base)
    rows = [[tok.bos_token_id] + tok(t, add_special_tokens=False)["input_ids"] for t in texts]
    width = max(len(r) for r in rows)
    ids = [[tok.pad_token_id] * (width - len(r)) + r for r in rows]
    mask = [[0] * (width - len(r)) + [1] * len(r) for r in rows]
    return torch.tensor(ids), torch.tensor(mask)


@torch.no_grad()
def _full_states(base: Path, texts: list[str]) -> tuple[tuple[torch.Tensor, ...], torch.Tensor]:
    """``hidden_states`` of a whole-model forward (entry l = layer l's input) and the mask."""
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()
    ids, mask = _batch(base, texts)
    positions = torch.zeros_like(ids)
    for b in range(ids.shape[0]):
        pos = 0
        for t in range(ids.shape[1]):
            if mask[b, t]:
                positions[b, t] = pos
                pos += 1
            else:
                positions[b, t] = 1
    out = model(
        input_ids=ids, attention_mask=mask, position_ids=positions, output_hidden_states=True
    )
    return out.hidden_states, mask


def _pooled(states: torch.Tensor, mask: torch.Tensor, b: int, avg: bool) -> torch.Tensor:
    real = [t for t in range(mask.shape[1]) if mask[b, t]]
    if avg:
        return sum(states[b, t] for t in real) / len(real)
    return states[b, real[-1]]


def _reference_gates(base: Path, experts: list[ExpertPrompts], avg: bool) -> torch.Tensor:
    texts = [t for e in experts for t in (*e.positive, *e.negative)]
    hidden_states, mask = _full_states(base, texts)
    num_layers = len(hidden_states) - 1
    gates = torch.zeros(num_layers, len(experts), hidden_states[0].shape[-1])
    for layer in range(num_layers):
        row = 0
        for e, expert in enumerate(experts):
            pos = [
                _pooled(hidden_states[layer], mask, row + i, avg)
                for i in range(len(expert.positive))
            ]
            row += len(expert.positive)
            v = sum(pos) / len(pos)
            if expert.negative:
                neg = [
                    _pooled(hidden_states[layer], mask, row + i, avg)
                    for i in range(len(expert.negative))
                ]
                row += len(expert.negative)
                v = v - sum(neg) / len(neg)
            gates[layer, e] = v / v.norm()
    return gates


def _gates(base: Path, experts: list[ExpertPrompts], mode: str, **kw: object) -> GateResult:
    with Checkpoint.open(base, "base") as ckpt:
        return compute_gates(ckpt, base, experts, mode, seed=kw.pop("seed", 0), **kw)  # type: ignore[arg-type]


# --- hidden modes ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "model",
    [
        "llama_base",
        "llama_pad_row",
        "qwen2_tied",
        "qwen3_sliding",
        "deepseek_dense",
        "mistral_sliding",
    ],
)
@pytest.mark.parametrize("mode", ["hidden", "hidden_avg"])
def test_streamed_gates_equal_full_forward(
    request: pytest.FixtureRequest, model: str, mode: str
) -> None:
    base = request.getfixturevalue(model)
    got = _gates(base, EXPERTS, mode).gates
    want = _reference_gates(base, EXPERTS, avg=mode == "hidden_avg")
    assert got.shape == want.shape and got.dtype == torch.float32
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)


def test_hidden_last_is_hidden(llama_base: Path) -> None:
    """mergekit takes position -1 of a left-padded batch for both: the last real token."""
    a = _gates(llama_base, EXPERTS, "hidden").gates
    b = _gates(llama_base, EXPERTS, "hidden_last").gates
    assert torch.equal(a, b)
    assert not torch.allclose(a, _gates(llama_base, EXPERTS, "hidden_avg").gates)


@pytest.mark.parametrize("model", ["llama_pad_row", "qwen3_sliding"])
def test_left_padding_does_not_change_states(request: pytest.FixtureRequest, model: str) -> None:
    base = request.getfixturevalue(model)
    short, long = "Hi", "A much longer prompt that forces the short one to be padded"
    with Checkpoint.open(base, "base") as ckpt:
        for mode in ("hidden", "hidden_avg"):
            alone = forward.prompt_states(ckpt, base, [[short]], mode)[0]
            padded = forward.prompt_states(ckpt, base, [[long, short]], mode)[0]
            torch.testing.assert_close(padded[:, 1:], alone, atol=1e-5, rtol=1e-4)


@torch.no_grad()
def test_hidden_avg_excludes_padding(llama_pad_row: Path) -> None:
    """Each prompt alone (no padding at all) through the full model, mean over its tokens."""
    prompts = ("x", "A considerably longer prompt with many more tokens in it")
    model = AutoModelForCausalLM.from_pretrained(llama_pad_row, dtype=torch.float32).eval()
    per_prompt = []
    for text in prompts:
        ids, _ = _batch(llama_pad_row, [text])
        hs = model(input_ids=ids, output_hidden_states=True).hidden_states[:-1]
        per_prompt.append(torch.stack([h[0].mean(dim=0) for h in hs]))
    mean = sum(per_prompt) / len(per_prompt)
    want = mean / mean.norm(dim=-1, keepdim=True)
    got = _gates(llama_pad_row, [ExpertPrompts(prompts)], "hidden_avg").gates[:, 0]
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)


def test_negative_prompts_are_subtracted(llama_base: Path) -> None:
    pos, neg = ("Write python code",), ("Write a poem", "Sing a song")
    with Checkpoint.open(llama_base, "base") as ckpt:
        p, n = forward.prompt_states(ckpt, llama_base, [pos, neg])
    v = p.mean(dim=1) - n.mean(dim=1)
    want = v / v.norm(dim=-1, keepdim=True)
    got = _gates(llama_base, [ExpertPrompts(pos, neg)], "hidden").gates[:, 0]
    torch.testing.assert_close(got, want)
    plain = _gates(llama_base, [ExpertPrompts(pos)], "hidden").gates[:, 0]
    assert not torch.allclose(got, plain, atol=1e-3)


def test_gates_are_unit_rows(llama_base: Path) -> None:
    for mode in PROMPT_MODES:
        g = _gates(llama_base, EXPERTS, mode).gates
        torch.testing.assert_close(g.norm(dim=-1), torch.ones(g.shape[:2]))


def test_shared_expert_gate(llama_base: Path) -> None:
    shared = ExpertPrompts(("general chat",))
    res = _gates(llama_base, EXPERTS, "hidden", shared=shared)
    alone = _gates(llama_base, [shared], "hidden").gates
    assert res.shared is not None and res.shared.shape == (4, 1, 32)
    torch.testing.assert_close(res.shared, alone, atol=1e-5, rtol=1e-4)
    assert any("shared" in line for line in res.report)
    empty = _gates(llama_base, EXPERTS, "hidden", shared=ExpertPrompts(())).shared
    assert empty is not None and torch.equal(empty, torch.zeros(4, 1, 32))
    assert _gates(llama_base, EXPERTS, "hidden").shared is None


def test_one_decoder_layer_materialised_at_a_time(
    llama_base: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Reads go embedding, layer 0, layer 1, ... each layer once; while a layer runs, every
    other layer's parameters are on the meta device."""
    seen: list[list[int]] = []
    original = forward.skeleton

    def spying_skeleton(base_dir: Path) -> object:
        model = original(base_dir)
        layers = model.model.layers

        def hook(module: torch.nn.Module, args: object) -> None:
            seen.append(
                [i for i, layer in enumerate(layers) if not next(layer.parameters()).is_meta]
            )

        for layer in layers:
            layer.register_forward_pre_hook(hook)
        return model

    monkeypatch.setattr(forward, "skeleton", spying_skeleton)
    with Checkpoint.open(llama_base, "base") as ckpt:
        reads: list[str] = []
        read = ckpt.read
        monkeypatch.setattr(ckpt, "read", lambda name: reads.append(name) or read(name))
        compute_gates(ckpt, llama_base, EXPERTS, "hidden", seed=0)
    assert seen == [[0], [1], [2], [3]]
    assert reads[0] == "model.embed_tokens.weight"
    layer_of = [int(n.split(".")[2]) for n in reads[1:]]
    assert layer_of == sorted(layer_of) and set(layer_of) == {0, 1, 2, 3}
    assert len(reads) == len(set(reads))  # the report reuses the gate pass's states
    assert set(reads) == set(ckpt.tensors) - {"model.norm.weight", "lm_head.weight"}


# --- random and cheap modes --------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["random", "uniform_random"])
def test_random_gates_are_seeded(llama_base: Path, mode: str) -> None:
    shared = ExpertPrompts(())
    a = _gates(llama_base, EXPERTS, mode, seed=7, shared=shared)
    b = _gates(llama_base, EXPERTS, mode, seed=7, shared=shared)
    c = _gates(llama_base, EXPERTS, mode, seed=8, shared=shared)
    assert a.gates.shape == (4, 3, 32) and a.gates.dtype == torch.float32
    assert torch.equal(a.gates, b.gates) and a.shared is not None and b.shared is not None
    assert torch.equal(a.shared, b.shared)
    assert not torch.equal(a.gates, c.gates)
    assert not torch.equal(a.gates[0], a.gates[1])  # layers draw independently
    assert not torch.equal(a.gates[:, :1], a.shared)


def test_random_gates_use_no_global_rng(llama_base: Path) -> None:
    torch.manual_seed(0)
    before = torch.random.get_rng_state()
    a = _gates(llama_base, EXPERTS, "random", seed=1).gates
    assert torch.equal(torch.random.get_rng_state(), before)
    torch.manual_seed(123)
    assert torch.equal(_gates(llama_base, EXPERTS, "random", seed=1).gates, a)


def test_random_distributions(tmp_path: Path) -> None:
    base = make_tiny(tmp_path / "wide", hidden=256, layers=2)
    experts = [ExpertPrompts(())] * 64
    normal = _gates(base, experts, "random").gates
    assert abs(float(normal.mean())) < 0.02 and abs(float(normal.std()) - 1) < 0.02
    uniform = _gates(base, experts, "uniform_random").gates
    bound = 1 / math.sqrt(256)
    assert float(uniform.abs().max()) <= bound
    assert float(uniform.abs().max()) > 0.99 * bound
    assert abs(float(uniform.std()) - bound / math.sqrt(3)) < 0.02 * bound


def test_random_without_prompts_reports_one_line(llama_base: Path) -> None:
    res = _gates(llama_base, [ExpertPrompts(())] * 2, "random")
    assert len(res.report) == 1 and "random" in res.report[0] and res.warnings == []
    with_prompts = _gates(llama_base, EXPERTS, "random")
    assert len(with_prompts.report) == 1 + 4


def test_cheap_embed_is_normalised_embedding_sum(qwen2_tied: Path) -> None:
    embed = load_state(qwen2_tied)["model.embed_tokens.weight"].float()
    tok = AutoTokenizer.from_pretrained(qwen2_tied)

    def unit_sum(texts: tuple[str, ...]) -> torch.Tensor:
        total = torch.zeros(embed.shape[1])
        for text in texts:
            for token in [tok.bos_token_id] + tok(text, add_special_tokens=False)["input_ids"]:
                total += embed[token]
        return total / total.norm()

    res = _gates(qwen2_tied, [CODE, STORY], "cheap_embed")
    want0 = unit_sum(CODE.positive)
    neg = unit_sum(STORY.positive) - unit_sum(STORY.negative)  # mergekit: unit(pos) - unit(neg)
    want1 = neg / neg.norm()
    for layer in range(res.gates.shape[0]):
        torch.testing.assert_close(res.gates[layer, 0], want0)
        torch.testing.assert_close(res.gates[layer, 1], want1)


def test_bos_prepended_and_left_padded(llama_base: Path) -> None:
    ids, mask = forward.tokenize(llama_base, ["a", "a longer text"])
    want_ids, want_mask = _batch(llama_base, ["a", "a longer text"])
    assert torch.equal(ids, want_ids) and torch.equal(mask, want_mask)
    assert int(ids[0, -2]) == special_token_ids()["bos_token_id"] and int(mask[0, 0]) == 0


def test_missing_tokenizer_is_a_plan_error(llama_base: Path, tmp_path: Path) -> None:
    base = tmp_path / "no_tokenizer"
    base.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copyfile(llama_base / name, base / name)
    for mode in ("hidden", "cheap_embed"):
        with pytest.raises(PlanError) as err:
            _gates(base, EXPERTS, mode)
        assert str(base) in str(err.value) and "tokenizer" in str(err.value)
        assert "\n" not in str(err.value)
    assert _gates(base, [ExpertPrompts(())], "random").gates.shape == (4, 1, 32)


def test_modes_constant() -> None:
    assert set(PROMPT_MODES) < set(GATE_MODES) and len(GATE_MODES) == 6


# --- report ------------------------------------------------------------------------------------


def test_condition_warning_for_identical_prompts(llama_base: Path) -> None:
    same = ExpertPrompts(("Write python code to sort a list",))
    res = _gates(llama_base, [same, STORY, same], "hidden")
    assert res.warnings and "experts 0 and 2" in res.warnings[0]
    assert "too similar" in res.warnings[0]
    assert _gates(llama_base, EXPERTS, "hidden").warnings == []
    assert _gates(llama_base, EXPERTS, "cheap_embed").warnings == []


def test_condition_number_and_cosine() -> None:
    g = torch.tensor([[1.0, 0.0, 0.0], [0.0, 2.0, 0.0]])
    cond, cos, pair = gate_condition(g)
    assert cond == pytest.approx(2.0) and cos == pytest.approx(0.0) and pair in ((0, 1),)
    c = 0.99
    g = torch.tensor([[1.0, 0.0], [c, math.sqrt(1 - c * c)]])
    cond, cos, pair = gate_condition(g)
    assert cond == pytest.approx(math.sqrt((1 + c) / (1 - c)), rel=1e-4)
    assert cos == pytest.approx(c) and pair == (0, 1)


def test_report_routes_prompts_by_hand() -> None:
    """Two layers, three experts along the axes; expert 0's prompts point at expert 0."""
    gates = torch.eye(3).repeat(2, 1, 1)
    states = [
        torch.tensor([[[5.0, 0.0, 0.0], [5.0, 1.0, 0.0]]]),  # both pick 0 first, then 1
        torch.tensor([[[0.0, 0.0, 3.0]], [[0.0, 3.0, 0.0]]]),  # per layer: picks 2, then 1
        torch.tensor([[[0.0, 0.0, 4.0]]]),
    ]
    lines, warnings = build_report("hidden", gates, None, states, 1)
    assert warnings == [] and len(lines) == 3
    assert "e0->{0:100%} w1.00" in lines[1] and "e1->{2:100%} w0.00" in lines[1]
    assert "e1->{1:100%} w1.00" in lines[2] and "e2->{2:100%} w1.00" in lines[2]
    lines2, _ = build_report("hidden", gates, None, states, 2)
    # top-2 of [5, 1, 0] logits: weights e^5/(e^5+e^1), renormalised over the two chosen
    w = math.exp(5) / (math.exp(5) + math.exp(1))
    w_first = (math.exp(5) / (math.exp(5) + 2)) / ((math.exp(5) + 1) / (math.exp(5) + 2))
    assert f"w{(w + w_first) / 2:.2f}" in lines2[1].split(" | ")[1]
    assert "{0:100%,1:100%}" in lines2[1]


def test_many_flagged_layers_are_summarised() -> None:
    gates = torch.tensor([[1.0, 0.0], [1.0, 0.0]]).repeat(10, 1, 1)
    states = [torch.tensor([[[1.0, 0.0]]])] * 2
    lines, warnings = build_report("random", gates, None, states, 1)
    assert len(lines) == 11 and len(warnings) == 1
    assert warnings[0].startswith("layers 0, 1, 2") and "(10 of 10)" in warnings[0]
