"""End to end: recipes over tiny checkpoints -> outputs that equal the formulas and load.

Each method runs through ``merge.api.run`` on tiny random Llama/Qwen2 checkpoints; the output
is compared tensor by tensor with the formula computed here, plainly, from the inputs, and is
loaded with transformers and made to generate.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import yaml
from torch.testing import assert_close

from merge import api
from support import run_recipe, states
from tiny import assert_loads_and_generates, load_state


def test_linear(tmp_path: Path, llama_base: Path, llama_ft1: Path, llama_ft2: Path) -> None:
    out = run_recipe(
        tmp_path,
        {
            "merge_method": "linear",
            "models": [
                {"model": str(llama_base), "parameters": {"weight": 0.2}},
                {"model": str(llama_ft1), "parameters": {"weight": 0.5}},
                {"model": str(llama_ft2), "parameters": {"weight": [0.3, 0.9]}},
            ],
        },
    )
    a, b, c = states(llama_base, llama_ft1, llama_ft2)
    got = load_state(out)
    assert got.keys() == a.keys()
    for name, t in got.items():
        layer = int(name.split(".")[2]) if ".layers." in name else None
        w3 = 0.3 + 0.6 * (layer / 3) if layer is not None else 0.3  # gradient over 4 layers
        want = (0.2 * a[name] + 0.5 * b[name] + w3 * c[name]) / (0.2 + 0.5 + w3)
        assert_close(t, want, msg=name)
    assert_loads_and_generates(out)


def test_task_arithmetic_mixed_formats(
    tmp_path: Path, llama_base: Path, llama_sharded: Path, llama_bin: Path
) -> None:
    """Sharded safetensors and a .bin input give the same numbers as plain files."""
    out = run_recipe(
        tmp_path,
        {
            "merge_method": "task_arithmetic",
            "base_model": str(llama_base),
            "models": [
                {"model": str(llama_sharded), "parameters": {"weight": 0.7}},
                {"model": str(llama_bin), "parameters": {"weight": -0.4}},
            ],
            "parameters": {"lambda": 1.5},
        },
    )
    b, x, y = states(llama_base, llama_sharded, llama_bin)
    for name, t in load_state(out).items():
        want = b[name] + 1.5 * (0.7 * (x[name] - b[name]) - 0.4 * (y[name] - b[name]))
        assert_close(t, want, msg=name)
    assert_loads_and_generates(out)


def test_ties(tmp_path: Path, llama_base: Path, llama_ft1: Path, llama_ft2: Path) -> None:
    out = run_recipe(
        tmp_path,
        {
            "merge_method": "ties",
            "base_model": str(llama_base),
            "models": [
                {"model": str(llama_base)},
                {"model": str(llama_ft1), "parameters": {"weight": 1.0, "density": 0.5}},
                {"model": str(llama_ft2), "parameters": {"weight": 0.5, "density": 0.3}},
            ],
            "dtype": "bfloat16",
        },
    )
    b, x, y = states(llama_base, llama_ft1, llama_ft2)
    got = load_state(out)
    for name, t in got.items():
        assert t.dtype == torch.bfloat16
        kept = []
        for m, w, density in ((x, 1.0, 0.5), (y, 0.5, 0.3)):
            d = (m[name] - b[name]).flatten()
            k = int(density * d.numel())
            keep = torch.zeros_like(d, dtype=torch.bool)
            keep[d.abs().argsort(descending=True)[:k]] = True
            kept.append((w * torch.where(keep, d, 0.0), w))
        total = kept[0][0] + kept[1][0]
        sign = torch.where(total >= 0, 1.0, -1.0)
        num = torch.zeros_like(total)
        den = torch.zeros_like(total)
        for o, w in kept:
            agree = torch.sign(o) == sign
            num += torch.where(agree, o, 0.0)
            den += torch.where(agree, w, 0.0)
        den = torch.where(den == 0, 1.0, den)
        want = (b[name].flatten() + num / den).reshape(b[name].shape)
        assert_close(t.float(), want.to(torch.bfloat16).float(), msg=name)
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    assert_loads_and_generates(out)


def _slerp(x0: torch.Tensor, x1: torch.Tensor, t: float) -> torch.Tensor:
    a, b = x0.flatten().double(), x1.flatten().double()
    dot = float((a / a.norm()) @ (b / b.norm()))
    if abs(dot) > 0.9995:
        return ((1 - t) * x0.double() + t * x1.double()).float()
    th = math.acos(dot)
    s0, s1 = math.sin((1 - t) * th) / math.sin(th), math.sin(t * th) / math.sin(th)
    return (s0 * x0.double() + s1 * x1.double()).float()


def test_gradient_slerp_slices(tmp_path: Path, llama_base: Path, llama_ft1: Path) -> None:
    """mergekit's classic gradient SLERP: per-layer t from filters and gradients."""
    out = run_recipe(
        tmp_path,
        {
            "slices": [
                {
                    "sources": [
                        {"model": str(llama_base), "layer_range": [0, 4]},
                        {"model": str(llama_ft1), "layer_range": [0, 4]},
                    ]
                }
            ],
            "merge_method": "slerp",
            "base_model": str(llama_base),
            "parameters": {
                "t": [
                    {"filter": "self_attn", "value": [0, 0.5, 0.3, 0.7, 1]},
                    {"filter": "mlp", "value": [1, 0.5, 0.7, 0.3, 0]},
                    {"value": 0.5},
                ]
            },
        },
    )
    a, b = states(llama_base, llama_ft1)
    grads = {"self_attn": [0, 0.5, 0.3, 0.7, 1], "mlp": [1, 0.5, 0.7, 0.3, 0]}
    got = load_state(out)
    for name, tensor in got.items():
        t = 0.5
        for key, g in grads.items():
            if key in name:
                layer = int(name.split(".")[2])
                s = layer / 3 * 4
                lo, hi = math.floor(s), math.ceil(s)
                t = g[lo] + (g[hi] - g[lo]) * (s - lo)
        assert_close(tensor, _slerp(a[name], b[name], t), msg=name)
    q0 = "model.layers.0.self_attn.q_proj.weight"
    assert torch.equal(got[q0], a[q0])  # t=0 at the first layer: exactly the base
    assert_loads_and_generates(out)


def test_frankenmerge_passthrough(tmp_path: Path, llama_base: Path, llama_ft1: Path) -> None:
    out = run_recipe(
        tmp_path,
        {
            "slices": [
                {"sources": [{"model": str(llama_base), "layer_range": [0, 3]}]},
                {"sources": [{"model": str(llama_ft1), "layer_range": [1, 4]}]},
            ],
            "merge_method": "passthrough",
        },
    )
    a, b = load_state(llama_base), load_state(llama_ft1)
    got = load_state(out)
    config = json.loads((out / "config.json").read_text())
    assert config["num_hidden_layers"] == 6
    mapping = {0: (a, 0), 1: (a, 1), 2: (a, 2), 3: (b, 1), 4: (b, 2), 5: (b, 3)}
    for name, tensor in got.items():
        if ".layers." in name:
            parts = name.split(".")
            src, layer = mapping[int(parts[2])]
            parts[2] = str(layer)
            assert torch.equal(tensor, src[".".join(parts)]), name
        elif "embed" in name:
            assert torch.equal(tensor, a[name])  # pre-layer tensors from the first slice
        else:
            assert torch.equal(tensor, b[name])  # final norm and lm_head from the last
    n_layer_tensors = sum(".layers.0." in k for k in a)
    assert len(got) == len(a) + 2 * n_layer_tensors
    assert_loads_and_generates(out)


def test_tied_embeddings_qwen2(tmp_path: Path, qwen2_tied: Path, qwen2_tied_ft: Path) -> None:
    out = run_recipe(
        tmp_path,
        {
            "merge_method": "linear",
            "models": [
                {"model": str(qwen2_tied), "parameters": {"weight": 1}},
                {"model": str(qwen2_tied_ft), "parameters": {"weight": 1}},
            ],
        },
    )
    got = load_state(out)
    assert "lm_head.weight" not in got
    a, b = states(qwen2_tied, qwen2_tied_ft)
    for name, tensor in got.items():
        assert_close(tensor, (a[name] + b[name]) / 2)
    assert_loads_and_generates(out)


def dare_recipe(base: Path, ft1: Path, ft2: Path, method: str = "dare_ties") -> dict:
    return {
        "merge_method": method,
        "base_model": str(base),
        "models": [
            {"model": str(ft1), "parameters": {"weight": 0.6, "density": 0.5}},
            {"model": str(ft2), "parameters": {"weight": 0.4, "density": 0.7}},
        ],
        "parameters": {"int8_mask": True},
    }


@pytest.mark.parametrize("method", ["dare_ties", "dare_linear"])
def test_dare_is_reproducible_and_seeded(
    tmp_path: Path, llama_base: Path, llama_ft1: Path, llama_ft2: Path, method: str
) -> None:
    recipe = dare_recipe(llama_base, llama_ft1, llama_ft2, method)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = run_recipe(tmp_path, recipe, "one")
        torch.set_num_threads(2)
        two = run_recipe(tmp_path, recipe, "two")
    finally:
        torch.set_num_threads(threads)
    other = run_recipe(tmp_path, recipe, "other", seed=7)
    shards = sorted(p.name for p in one.glob("*.safetensors"))
    for shard in shards:
        assert (one / shard).read_bytes() == (two / shard).read_bytes()
    a, c = load_state(one), load_state(other)
    assert any(not torch.equal(a[k], c[k]) for k in a), "a different seed must change the mask"
    b, x, y = states(llama_base, llama_ft1, llama_ft2)
    name = "model.layers.1.mlp.up_proj.weight"
    delta = a[name] - b[name]
    assert 0 < int((delta == 0).sum()) < delta.numel()  # some entries dropped, some kept
    assert "seed 20240101" in (one / "README.md").read_text()
    assert_loads_and_generates(one)


def test_output_directory_contents(
    tmp_path: Path, llama_base: Path, llama_ft1: Path, llama_ft2: Path
) -> None:
    recipe = dare_recipe(llama_base, llama_ft1, llama_ft2)
    recipe["chat_template"] = "chatml"
    out = run_recipe(tmp_path, recipe, shard_size=100_000)  # bytes: no 1MB minimum
    index = json.loads((out / "model.safetensors.index.json").read_text())
    files = sorted({f for f in index["weight_map"].values()})
    assert len(files) >= 3
    assert files == sorted(p.name for p in out.glob("model-*.safetensors"))
    assert files[0] == f"model-00001-of-{len(files):05d}.safetensors"
    assert index["metadata"]["total_size"] == sum(
        t.numel() * t.element_size() for t in load_state(out).values()
    )
    for name in (
        "config.json",
        "generation_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "merge-recipe.yaml",
        "README.md",
    ):
        assert (out / name).is_file(), name
    assert (out / "merge-recipe.yaml").read_text() == (tmp_path / "out.yaml").read_text()
    card = (out / "README.md").read_text()
    front = yaml.safe_load(card.split("---")[1])
    assert front["library_name"] == "transformers" and "merge" in front["tags"]
    assert "https://arxiv.org/abs/2311.03099" in card
    assert "<|im_start|>" in (out / "chat_template.jinja").read_text()
    assert not list(tmp_path.glob(".out.tmp-*"))
    assert_loads_and_generates(out)


def test_inputs_are_not_modified(tmp_path: Path, llama_base: Path, llama_ft1: Path) -> None:
    before = {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in llama_ft1.iterdir()}
    run_recipe(
        tmp_path,
        {
            "merge_method": "task_arithmetic",
            "base_model": str(llama_base),
            "models": [{"model": str(llama_ft1), "parameters": {"weight": 1.0}}],
        },
    )
    after = {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in llama_ft1.iterdir()}
    assert before == after


def test_quickstart_recipe_runs_from_anywhere(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The shipped example resolves its models next to the recipe, whatever the CWD."""
    recipe = Path(__file__).resolve().parents[1] / "recipes" / "quickstart.yaml"
    monkeypatch.chdir(tmp_path)
    out = api.run(recipe, None, progress=False)
    assert out == tmp_path / "quickstart-merged"
    assert_loads_and_generates(out)


def test_tokenizer_source_and_auto_chat_template(
    tmp_path: Path, llama_base: Path, llama_ft1: Path
) -> None:
    """tokenizer_source picks the donor of the tokenizer; auto takes the common template."""
    donor = tmp_path / "donor"
    donor.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (donor / name).write_bytes((llama_ft1 / name).read_bytes())
    config = json.loads((donor / "tokenizer_config.json").read_text())
    config["model_max_length"] = 1234
    (donor / "tokenizer_config.json").write_text(json.dumps(config))
    for name in ("config.json", "model.safetensors"):
        (donor / name).write_bytes((llama_ft1 / name).read_bytes())
    out = run_recipe(
        tmp_path,
        {
            "merge_method": "task_arithmetic",
            "base_model": str(llama_base),
            "models": [{"model": str(llama_ft1), "parameters": {"weight": 1.0}}],
            "tokenizer_source": str(donor),
            "chat_template": "auto",
        },
    )
    written = json.loads((out / "tokenizer_config.json").read_text())
    assert written["model_max_length"] == 1234
    template = (llama_base / "chat_template.jinja").read_text()
    assert (out / "chat_template.jinja").read_text() == template
    assert written["chat_template"] == template
    assert_loads_and_generates(out)
