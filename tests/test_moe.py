"""MoE assembly end to end: every output family, routing, scales, bad input, plan without data.

The strongest check of routing, expert layout and config: E identical experts made from one
tiny dense model must give that dense model's logits (each family renormalises the chosen
experts' weights to sum to 1, so the MoE layer equals the one dense MLP). Distinct experts must
load, generate, and route each expert's own prompts to it, computed here from the saved router
rows and the base model's hidden states (transformers' own forward, not ours).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM, AutoTokenizer
from typer.testing import CliRunner

from merge.cli import app
from merge.moe.recipe import MoeRecipe
from merge.recipe import load_recipe
from tiny import assert_loads_and_generates, load_state, make_tiny

runner = CliRunner()
COMPAT = Path(__file__).resolve().parent / "data" / "compat"
PROMPTS = [["hello hello hello", "hello there hello"], ["1 2 3 4 5", "6 7 8 9 0"]]
INPUT = torch.tensor([[1, 5, 9, 33, 70, 100, 7, 250]])
EXPERT_NAMES = {  # family -> (expert gate_proj name of layer 1, expert 1; router name)
    "mixtral": ("model.layers.1.block_sparse_moe.experts.1.w1.weight", "block_sparse_moe.gate"),
    "qwen2_moe": ("model.layers.1.mlp.experts.1.gate_proj.weight", "mlp.gate"),
    "qwen3_moe": ("model.layers.1.mlp.experts.1.gate_proj.weight", "mlp.gate"),
    "deepseek_v3": ("model.layers.1.mlp.experts.1.gate_proj.weight", "mlp.gate"),
}


def cli(*args: str | Path) -> tuple[int, str, str]:
    result = runner.invoke(app, [str(a) for a in args])
    return result.exit_code, result.stdout, result.stderr


def write(tmp_path: Path, recipe: dict[str, Any], name: str = "moe.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


@pytest.fixture(scope="module")
def dense(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("moe_dense")
    archs = ("llama", "mistral", "qwen2", "qwen3", "deepseek_v3")
    out = {a: make_tiny(root / a, a, seed=10 + i) for i, a in enumerate(archs)}  # type: ignore[arg-type]
    out["llama_b"] = make_tiny(root / "llama_b", "llama", seed=21)
    out["llama_c"] = make_tiny(root / "llama_c", "llama", seed=22)
    out["llama_wide"] = make_tiny(root / "llama_wide", "llama", seed=23, hidden=64)
    return out


def moe(base: Path, experts: list[Path], **extra: Any) -> dict[str, Any]:
    return {
        "base_model": str(base),
        "gate_mode": "random",
        "experts": [{"source_model": str(e)} for e in experts],
        **extra,
    }


@torch.no_grad()
def logits(path: Path) -> torch.Tensor:
    return AutoModelForCausalLM.from_pretrained(path).eval()(INPUT).logits


CASES = [  # (dense arch, architecture, experts, shared residual_scale, gate_mode, family)
    ("llama", "mixtral", 3, None, "random", "mixtral"),
    ("mistral", None, 2, None, "uniform_random", "mixtral"),
    ("qwen2", "qwen", 3, 0.0, "random", "qwen2_moe"),
    ("llama", "qwen2_moe", 2, 0.0, "hidden", "qwen2_moe"),
    ("qwen3", None, 3, None, "cheap_embed", "qwen3_moe"),
    ("deepseek_v3", "deepseek", 3, None, "uniform_random", "deepseek_v3"),
    ("deepseek_v3", None, 2, 0.0, "random", "deepseek_v3"),
]


@pytest.mark.parametrize(("arch", "architecture", "n", "shared", "mode", "family"), CASES)
def test_identical_experts_reproduce_the_dense_model(
    tmp_path: Path,
    dense: dict[str, Path],
    arch: str,
    architecture: str | None,
    n: int,
    shared: float | None,
    mode: str,
    family: str,
) -> None:
    src = dense[arch]
    recipe = moe(src, [src] * n, gate_mode=mode, experts_per_token=2)
    for i, e in enumerate(recipe["experts"]):
        e["positive_prompts"] = PROMPTS[i % 2]
    if architecture:
        recipe["architecture"] = architecture
    if shared is not None:  # residual_scale 0: the shared expert adds nothing
        recipe["shared_experts"] = [
            {"source_model": str(src), "positive_prompts": ["hi"], "residual_scale": shared}
        ]
        if family == "deepseek_v3":
            del recipe["shared_experts"][0]["positive_prompts"]
    code, _, stderr = cli("run", write(tmp_path, recipe), tmp_path / "out", "--quiet")
    assert code == 0, stderr
    out = tmp_path / "out"
    config = yaml.safe_load((out / "config.json").read_text())
    assert config["model_type"] == family
    torch.testing.assert_close(logits(out), logits(src), atol=1e-5, rtol=0)
    got, want = load_state(out), load_state(src)
    expert_name, router = EXPERT_NAMES[family]
    assert torch.equal(got[expert_name], want["model.layers.1.mlp.gate_proj.weight"])
    assert got[f"model.layers.0.{router}.weight"].shape == (n, 32)
    assert not any(".mlp.gate_proj" in k or ".mlp.down_proj" in k for k in got)
    assert_loads_and_generates(out)


def test_distinct_experts_route_their_own_prompts(tmp_path: Path, dense: dict[str, Path]) -> None:
    base, b, c = dense["llama"], dense["llama_b"], dense["llama_c"]
    prompts = [*PROMPTS, ["<<<>>>", "{[()]}"]]
    recipe = moe(base, [base, b, c], gate_mode="hidden")
    for e, p in zip(recipe["experts"], prompts, strict=True):
        e["positive_prompts"] = p
    code, _, stderr = cli("run", write(tmp_path, recipe), tmp_path / "out")
    assert code == 0, stderr
    assert "routing report" in stderr
    out = tmp_path / "out"
    assert_loads_and_generates(out)
    state = load_state(out)
    for i, m in enumerate((base, b, c)):  # each expert's MLP is its own model's
        want = load_state(m)["model.layers.0.mlp.down_proj.weight"]
        assert torch.equal(state[f"model.layers.0.block_sparse_moe.experts.{i}.w2.weight"], want)
    tok = AutoTokenizer.from_pretrained(base)
    model = AutoModelForCausalLM.from_pretrained(base).eval()
    hits = total = 0
    for expert, texts in enumerate(prompts):
        for text in texts:
            with torch.no_grad():
                states = model(**tok(text, return_tensors="pt"), output_hidden_states=True)
            for layer in range(2):
                gate = state[f"model.layers.{layer}.block_sparse_moe.gate.weight"]
                scores = [float(row @ states.hidden_states[layer][0, -1]) for row in gate]
                hits += max(range(3), key=lambda k: scores[k]) == expert
                total += 1
    assert hits >= 0.8 * total, f"{hits}/{total} prompts routed to their own expert"
    card = (out / "README.md").read_text()
    assert "## Routing report" in card and "`hello there hello`" in card
    assert "Mixtral (`MixtralForCausalLM`)" in card and "2 per token" in card


def test_noise_and_residual_scale_follow_mergekit(tmp_path: Path, dense: dict[str, Path]) -> None:
    """noise_scale: seeded N(0, s^2) added to each MLP tensor of the expert; residual_scale:
    a factor on down_proj (the tensor writing into the residual stream)."""
    src = dense["llama"]
    recipe = moe(src, [src, src], seed=7)
    recipe["experts"][0]["noise_scale"] = 0.5
    recipe["experts"][1]["residual_scale"] = 0.25
    outs = []
    for name in ("a", "b"):
        assert cli("run", write(tmp_path, recipe, f"{name}.yaml"), tmp_path / name, "-q")[0] == 0
        outs.append(load_state(tmp_path / name))
    dense_state = load_state(src)
    pre = "model.layers.1.block_sparse_moe.experts"
    for proj, stem in (("down", "w2"), ("up", "w3")):
        want = dense_state[f"model.layers.1.mlp.{proj}_proj.weight"]
        noise = outs[0][f"{pre}.0.{stem}.weight"] - want
        assert 0.45 < float(noise.std()) < 0.55 and abs(float(noise.mean())) < 0.05
        scaled = want * (0.25 if proj == "down" else 1.0)
        assert torch.equal(outs[0][f"{pre}.1.{stem}.weight"], scaled)
    for name, tensor in outs[0].items():  # deterministic: the same seed, the same bytes
        assert torch.equal(tensor, outs[1][name]), name


def test_plan_and_validate_read_no_tensor_data(
    tmp_path: Path, dense: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    from merge.checkpoint import Checkpoint

    def forbidden(self: object, name: str) -> torch.Tensor:
        raise AssertionError(f"plan read tensor data: {name}")

    monkeypatch.setattr(Checkpoint, "read", forbidden)
    src = dense["qwen2"]
    recipe = moe(src, [src, src], gate_mode="hidden", architecture="qwen")
    for e, p in zip(recipe["experts"], PROMPTS, strict=True):
        e["positive_prompts"] = p
    recipe["shared_experts"] = [{"source_model": str(src), "positive_prompts": ["x y"]}]
    path = write(tmp_path, recipe)
    code, stdout, stderr = cli("plan", path)
    assert code == 0, stderr
    assert (
        "model.layers.0.mlp.gate.weight  [2x32]  computed: gate_mode hidden from 4 prompts"
        in stdout
    )
    assert "model.layers.0.mlp.shared_expert_gate.weight  [1x32]  computed" in stdout
    assert "moe: Qwen2-MoE (Qwen2MoeForCausalLM), 2 experts + 1 shared expert (gated)" in stdout
    code, stdout, stderr = cli("validate", path)
    assert code == 0 and stdout.startswith(f"{path}: ok"), stderr


def _bad(tmp_path: Path, recipe: dict[str, Any]) -> str:
    code, stdout, stderr = cli("run", write(tmp_path, recipe), tmp_path / "out")
    assert code == 2 and stdout == ""
    assert not (tmp_path / "out").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["moe.yaml"]
    return stderr


def test_bad_input_errors(tmp_path: Path, dense: dict[str, Path]) -> None:
    llama, qwen3, wide = dense["llama"], dense["qwen3"], dense["llama_wide"]
    r = tmp_path / "moe.yaml"
    assert _bad(tmp_path, moe(llama, [llama, llama], experts_per_token=3)) == (
        f"error: {r}:6: experts_per_token: 3 is more than the 2 expert(s); lower it to at "
        "most 2 or add experts\n"
    )
    assert _bad(tmp_path, moe(llama, [llama], gate_mode="hidden", experts_per_token=1)) == (
        f"error: {r}:4: experts[0]: gate_mode hidden needs positive_prompts for every expert: "
        "add some, or use gate_mode: random\n"
    )
    assert _bad(tmp_path, moe(llama, [llama, qwen3], architecture="mixtral")) == (
        f"error: {r}:5: experts[1].source_model: model '{qwen3}' is a qwen3 model, which "
        "Mixtral cannot hold (it takes llama, mistral models): use other models or another "
        "architecture\n"
    )
    shared = [{"source_model": str(llama)}]
    assert _bad(
        tmp_path, moe(llama, [llama, llama], shared_experts=shared, architecture="mixtral")
    ) == (
        f"error: {r}:6: shared_experts: architecture mixtral (Mixtral) cannot hold a shared "
        "expert: remove shared_experts or use architecture: qwen2_moe or deepseek_v3\n"
    )
    assert _bad(tmp_path, moe(qwen3, [qwen3, qwen3], shared_experts=shared)) == (
        f"error: {r}:6: shared_experts: architecture qwen3_moe (Qwen3-MoE) cannot hold a shared "
        "expert: remove shared_experts or use architecture: qwen2_moe or deepseek_v3\n"
    )
    assert _bad(tmp_path, moe(llama, [llama, wide])) == (
        f"error: {r}:5: experts[1].source_model: model '{wide}' has hidden size 64, but the base "
        "model has 32\n"
    )
    assert _bad(tmp_path, moe(llama, [llama], gate_mod="random")) == (
        f"error: {r}:5: gate_mod: unknown key; did you mean 'gate_mode'? (allowed: base_model, "
        "experts, gate_mode, experts_per_token, dtype, architecture, shared_experts, seed)\n"
    )
    assert _bad(tmp_path, moe(llama, [llama, llama], architecture="mixtrall")) == (
        f"error: {r}:6: architecture: unknown MoE architecture; did you mean 'mixtral'? "
        "(allowed: mixtral, qwen2_moe, qwen3_moe, deepseek_v3, qwen, qwen2, qwen_moe, qwen2moe, "
        "qwen3, qwen3moe, deepseek, deepseekv3, deepseek_moe)\n"
    )


@pytest.mark.parametrize("name", ["moe_hidden.yaml", "moe_qwen_shared.yaml"])
def test_compat_moe_recipes_parse_and_validate_offline(
    name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    recipe = load_recipe(COMPAT / name)
    assert isinstance(recipe, MoeRecipe) and len(recipe.experts) >= 2
    monkeypatch.chdir(tmp_path)
    code, stdout, stderr = cli("validate", COMPAT / name)
    assert code == 2 and stdout == ""
    lines = stderr.strip().splitlines()
    assert len(lines) == len(recipe.model_refs())
    for line in lines:
        assert "not in the Hugging Face cache" in line and "HF_HUB_OFFLINE=1 is set" in line, line
