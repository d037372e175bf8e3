"""LoRA adapters (``base+adapter``): merged weights equal peft's own ``merge_and_unload()``.

Adapters are made here with peft (random non-zero factors, ``init_lora_weights=False``) on the
tiny float32 checkpoints and saved with ``save_pretrained``; the reference for every merged
tensor is peft merging the same adapter into the same base. Also: the adapter is applied while
tensors stream (one base read per tensor, inputs untouched, nothing written besides the output),
every bad adapter is one precise line, and Hub adapters download only their own files.
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from huggingface_hub import constants
from peft import IA3Config, LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file, save_file
from torch.testing import assert_close
from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel
from typer.testing import CliRunner

import merge.memory as memory
import merge.methods.stream as stream
from hubserver import HubServer
from merge import api, hub, lora
from merge.checkpoint import Checkpoint
from merge.cli import app
from merge.errors import CheckpointError
from merge.lora import LoraCheckpoint
from tiny import assert_loads_and_generates, load_state

pytestmark = [  # peft's advice on tied weights, transformers' deprecations
    pytest.mark.filterwarnings("ignore::UserWarning"),
    pytest.mark.filterwarnings("ignore::FutureWarning"),
]
QV = ["q_proj", "v_proj"]
ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


# --- helpers -------------------------------------------------------------------------------


def make_adapter(
    folder: Path,
    base: Path,
    *,
    seed: int = 0,
    edit: Callable[[torch.nn.Module], None] | None = None,
    safe: bool = True,
    config: Any = None,
    **lora_kwargs: Any,
) -> Path:
    """A peft adapter of ``base`` with random factors (and ``edit`` applied), saved to folder."""
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    cfg = config or LoraConfig(init_lora_weights=False, **lora_kwargs)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        peft_model = get_peft_model(model, cfg)
        if edit is not None:
            with torch.no_grad():
                edit(peft_model)
    peft_model.save_pretrained(folder, safe_serialization=safe)
    return folder


def peft_merged(base: Path, adapter: Path) -> dict[str, torch.Tensor]:
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    return PeftModel.from_pretrained(model, adapter).merge_and_unload().state_dict()


def noise_on(word: str) -> Callable[[torch.nn.Module], None]:
    """An edit adding noise to every trainable parameter whose name contains ``word``."""

    def edit(model: torch.nn.Module) -> None:
        for name, param in model.named_parameters():
            if word in name and param.requires_grad:
                param.add_(torch.randn(param.shape) * 0.1)

    return edit


def run(tmp_path: Path, recipe: dict, name: str = "out") -> Path:
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return api.run(path, tmp_path / name, progress=False)


def single(ref: str) -> dict:
    return {"merge_method": "linear", "models": [{"model": ref, "parameters": {"weight": 1.0}}]}


def open_lora(base: Path, adapter: Path) -> LoraCheckpoint:
    ckpt = Checkpoint.open(base, "b")
    return LoraCheckpoint.open(ckpt, adapter, label="b+a", base_label="b", adapter_label="a")


def digest(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


# --- merged weights equal peft's -----------------------------------------------------------

CASES: dict[str, dict[str, Any]] = {
    "q_v": {"target_modules": QV, "r": 4, "lora_alpha": 8},
    "bin_file": {"target_modules": QV, "r": 4, "lora_alpha": 16, "safe": False},
    "rslora_patterns": {
        "target_modules": ALL,
        "r": 4,
        "lora_alpha": 8,
        "use_rslora": True,
        "rank_pattern": {"v_proj": 2, r"layers\.1\.mlp\.down_proj": 6},
        "alpha_pattern": {"o_proj": 3, "gate_proj": 20},
    },
    "modules_to_save": {
        "target_modules": ["q_proj"],
        "modules_to_save": ["lm_head"],
        "edit": noise_on("modules_to_save"),
    },
    "embedding": {"target_modules": ["embed_tokens", "v_proj"], "r": 3, "lora_alpha": 5},
    "lm_head_lora": {"target_modules": ["lm_head", "k_proj"], "r": 2, "lora_alpha": 3},
    "bias_all": {"target_modules": ["q_proj"], "bias": "all", "edit": noise_on("bias")},
    "tied_embed_saved": {  # peft saves the (tied) embeddings as embed_tokens and lm_head
        "target_modules": ["q_proj"],
        "modules_to_save": ["embed_tokens"],
        "ensure_weight_tying": True,
        "edit": noise_on("modules_to_save"),
    },
}
# qwen2_tied has no lm_head tensor: an adapter that trains one of its own is refused (below)
LLAMA_ONLY = {"modules_to_save", "lm_head_lora"}
TIED_ONLY = {"bias_all", "tied_embed_saved"}  # llama has no biases and no tie


@pytest.mark.parametrize(
    "case, arch",
    [(c, "llama") for c in CASES if c not in TIED_ONLY]
    + [(c, "qwen2_tied") for c in CASES if c not in LLAMA_ONLY],
)
def test_matches_peft_merge_and_unload(
    tmp_path: Path, case: str, arch: str, llama_base: Path, qwen2_tied: Path
) -> None:
    base = llama_base if arch == "llama" else qwen2_tied
    adapter = make_adapter(tmp_path / "adapter", base, **CASES[case])
    out = run(tmp_path, single(f"{base}+{adapter}"))
    want, got, before = peft_merged(base, adapter), load_state(out), load_state(base)
    assert got.keys() == before.keys()  # the base's names (a tied base has no lm_head)
    changed = {n for n in got if not torch.equal(before[n], want[n])}
    assert changed, "the adapter changed nothing: the comparison would prove nothing"
    for name, tensor in got.items():
        assert tensor.dtype == torch.float32
        assert_close(tensor, want[name], rtol=1e-5, atol=1e-6, msg=name)
    if case not in ("embedding", "tied_embed_saved"):
        assert "model.embed_tokens.weight" not in changed
    assert_loads_and_generates(out)


def test_fan_in_fan_out_conv1d(tmp_path: Path) -> None:
    """GPT-2's Conv1D stores W as [in, out]: the delta is transposed (c_attn is not square)."""
    config = GPT2Config(
        n_layer=2,
        n_embd=32,
        n_head=4,
        vocab_size=64,
        n_positions=32,
        bos_token_id=0,
        eos_token_id=0,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        GPT2LMHeadModel(config).save_pretrained(tmp_path / "gpt2")
    base = tmp_path / "gpt2"
    targets = ["c_attn", "c_proj", "c_fc"]
    adapter = make_adapter(
        tmp_path / "ad", base, target_modules=targets, fan_in_fan_out=True, r=2, lora_alpha=6
    )
    want = peft_merged(base, adapter)
    with open_lora(base, adapter) as ckpt:
        assert len(ckpt.adapter.pairs) == 2 * 4  # per layer: c_attn, c_fc, two c_proj
        for name in ckpt.tensors:
            assert_close(ckpt.read(name).float(), want[name], rtol=1e-5, atol=1e-6, msg=name)


def test_scaling_and_patterns() -> None:
    """peft's rule: the first pattern that matches the name's end on a dot boundary."""
    cfg = lora.LoraConfig(
        r=8,
        alpha=16,
        rank_pattern=(("v_proj", 4), (r"layers\.1\..*", 2)),
        alpha_pattern=(("1.self_attn.q_proj", 3.0),),
    )
    assert cfg.rank_alpha("model.layers.0.self_attn.q_proj") == (8, 16)
    assert cfg.rank_alpha("model.layers.0.self_attn.v_proj") == (4, 16)
    assert cfg.rank_alpha("model.layers.1.self_attn.q_proj") == (2, 3.0)
    assert cfg.rank_alpha("model.layers.0.self_attn.xv_proj") == (8, 16)  # not on a dot
    assert cfg.scaling("model.layers.0.mlp.up_proj") == 2.0
    rs = lora.LoraConfig(r=4, alpha=8, rslora=True)
    assert rs.scaling("x") == 4.0 and math.isclose(rs.scaling("x"), 8 / math.sqrt(4))


def test_lora_delta_by_hand() -> None:
    a = torch.tensor([[1.0, 2.0, 3.0]])  # r=1, in=3
    b = torch.tensor([[1.0], [-1.0]])  # out=2
    want = [[0.5 * b[i, 0].item() * a[0, j].item() for j in range(3)] for i in range(2)]
    assert lora.lora_delta(a, b, 0.5).tolist() == want
    assert lora.lora_delta(a, b, 0.5, transpose=True).tolist() == [
        list(c) for c in zip(*want, strict=True)
    ]


@pytest.mark.parametrize(
    "key, parsed",
    [
        (
            "base_model.model.model.layers.0.mlp.up_proj.lora_A.weight",
            ("A", "model.layers.0.mlp.up_proj", False),
        ),
        ("base_model.model.model.embed_tokens.lora_embedding_B", ("B", "model.embed_tokens", True)),
        ("base_model.model.lm_head.weight", ("replace", "lm_head.weight", False)),
        (
            "base_model.model.model.embed_tokens.base_layer.weight",
            ("copy", "model.embed_tokens.weight", False),
        ),
        (
            "base_model.model.x.lora_magnitude_vector",
            ("unknown", "base_model.model.x.lora_magnitude_vector", False),
        ),
    ],
)
def test_parse_key(key: str, parsed: tuple[str, str, bool]) -> None:
    assert lora.parse_key(key) == parsed


# --- streaming: one base tensor at a time, inputs untouched, nothing else written ----------


def test_two_adapters_on_one_base_stream(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, llama_base: Path, hf_offline: Path
) -> None:
    """The compat recipe's shape: task_arithmetic over base+ad1 and base+ad2, base as base."""
    ad1 = make_adapter(tmp_path / "ad1", llama_base, seed=1, target_modules=QV)
    ad2 = make_adapter(tmp_path / "ad2", llama_base, seed=2, target_modules=["o_proj", "q_proj"])
    inputs = {d: digest(d) for d in (llama_base, ad1, ad2)}
    cache = digest(hf_offline)
    by_thread: dict[int, list[tuple[str, str, int, int]]] = {}  # jobs run in worker threads
    base_read, base_range = Checkpoint.read, Checkpoint.read_range
    lora_range = LoraCheckpoint.read_range

    def event(kind: str, name: str, start: int = 0, stop: int = 0) -> None:
        by_thread.setdefault(threading.get_ident(), []).append((kind, name, start, stop))

    def spy_base(self: Checkpoint, name: str) -> torch.Tensor:
        event("whole", name)
        return base_read(self, name)

    def spy_range(self: Checkpoint, name: str, start: int, stop: int) -> torch.Tensor:
        event("base", name, start, stop)
        return base_range(self, name, start, stop)

    def spy_lora(self: LoraCheckpoint, name: str, start: int, stop: int) -> torch.Tensor:
        event("lora" if name in self.adapter.pairs else "plain", name, start, stop)
        tensor = lora_range(self, name, start, stop)
        event("end", name)
        return tensor

    monkeypatch.setattr(Checkpoint, "read", spy_base)
    monkeypatch.setattr(Checkpoint, "read_range", spy_range)
    monkeypatch.setattr(LoraCheckpoint, "read_range", spy_lora)
    monkeypatch.setattr(stream, "CHUNK_ELEMENTS", 100)  # several chunks per tensor
    monkeypatch.setattr(memory, "CHUNK_ELEMENTS", 100)
    recipe = {
        "merge_method": "task_arithmetic",
        "base_model": str(llama_base),
        "models": [
            {"model": f"{llama_base}+{ad1}", "parameters": {"weight": 0.5}},
            {"model": f"{llama_base}+{ad2}", "parameters": {"weight": 0.7}},
        ],
        "dtype": "float32",
    }
    out = tmp_path / "out"
    (tmp_path / "out.yaml").write_text(yaml.safe_dump(recipe, sort_keys=False))
    api.run(tmp_path / "out.yaml", out, progress=False, max_memory=64 * 1024)
    monkeypatch.undo()
    # Nothing is read whole: LoRA-updated tensors stream too. Each LoRA range is one read of
    # the base's rows that the range covers (in its thread), never more.
    events = [e for thread in by_thread.values() for e in thread]
    assert not [e for e in events if e[0] == "whole"]
    touched = {n for n in load_state(llama_base) if any(f".{m}." in n for m in (*QV, "o_proj"))}
    starts = [i for i, e in enumerate(events) if e[0] == "lora" and e[1] in touched]
    assert touched and {events[i][1] for i in starts} == touched
    shapes = {n: t.shape for n, t in load_state(llama_base).items()}
    for i in starts:
        _, name, start, stop = events[i]
        kind, got, lo, hi = events[i + 1]
        cols = shapes[name][-1]
        assert (kind, got) == ("base", name) and events[i + 2][:2] == ("end", name)
        assert lo == start // cols * cols and hi == -(-stop // cols) * cols
        assert hi - lo <= 100 + 2 * cols
    assert {d: digest(d) for d in inputs} == inputs
    assert digest(hf_offline) == cache
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ad1", "ad2", "out", "out.yaml"]
    b, m1, m2 = load_state(llama_base), peft_merged(llama_base, ad1), peft_merged(llama_base, ad2)
    for name, tensor in load_state(out).items():
        want = b[name] + 0.5 * (m1[name] - b[name]) + 0.7 * (m2[name] - b[name])
        assert_close(tensor, want, msg=name)
    assert_loads_and_generates(out)


# --- errors: one precise line each, at open time -------------------------------------------

runner = CliRunner()


def cli_fails(tmp_path: Path, recipe: dict) -> list[str]:
    """Run the recipe through the CLI; assert exit 2, no traceback, no output; the lines."""
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    result = runner.invoke(app, ["run", str(path), str(tmp_path / "out")])
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output and not (tmp_path / "out").exists()
    return [line.removeprefix("error: ") for line in result.stderr.strip().splitlines()]


@pytest.fixture(scope="module")
def layer3_adapter(tmp_path_factory: pytest.TempPathFactory, llama_base: Path) -> Path:
    """An adapter of the 4-layer llama_base on one module only: layer 3's q_proj."""
    folder = tmp_path_factory.mktemp("layer3") / "ad"
    return make_adapter(folder, llama_base, target_modules=r"model\.layers\.3\.self_attn\.q_proj")


def test_module_the_base_lacks(
    tmp_path: Path, make_checkpoint: Callable[..., Path], layer3_adapter: Path
) -> None:
    small = make_checkpoint("small", layers=2)  # same shapes, layers 0-1 only
    ref = f"{small}+{layer3_adapter}"
    assert cli_fails(tmp_path, single(ref)) == [
        f"{tmp_path / 'recipe.yaml'}:3: models[0].model: model '{ref}': adapter "
        f"'{layer3_adapter}' targets module 'model.layers.3.self_attn.q_proj', which base "
        f"model '{small}' lacks (no tensor 'model.layers.3.self_attn.q_proj.weight')"
    ]


def test_shape_mismatch(
    tmp_path: Path, make_checkpoint: Callable[..., Path], layer3_adapter: Path
) -> None:
    wide = make_checkpoint("wide", layers=4, hidden=64)
    ref = f"{wide}+{layer3_adapter}"
    assert cli_fails(tmp_path, single(ref)) == [
        f"{tmp_path / 'recipe.yaml'}:3: models[0].model: model '{ref}': adapter "
        f"'{layer3_adapter}': module 'model.layers.3.self_attn.q_proj': the LoRA delta has "
        "shape [32, 32] (lora_B [32, 8] @ lora_A [8, 32]) but"
        f" base model '{wide}' has 'model.layers.3.self_attn.q_proj.weight' "
        "with shape [64, 64]"
    ]


def test_missing_adapter_folder(tmp_path: Path, llama_base: Path) -> None:
    lines = cli_fails(tmp_path, single(f"{llama_base}+./nope"))
    assert lines == [
        f"{tmp_path / 'recipe.yaml'}:3: models[0].model: adapter './nope': local path not found "
        f"(looked in CWD and {tmp_path})"
    ]


@pytest.mark.parametrize("saved", ["lm_head", "embed_tokens"])
def test_untying_a_tied_lm_head_is_refused(tmp_path: Path, qwen2_tied: Path, saved: str) -> None:
    """peft's merge unties a tied lm_head from a modules_to_save lm_head or embed_tokens (see
    the ensure_weight_tying case above): the output, tied, cannot represent that."""
    adapter = make_adapter(
        tmp_path / "ad",
        qwen2_tied,
        modules_to_save=[saved],
        target_modules=QV,
        edit=noise_on("modules_to_save"),
    )
    want = peft_merged(qwen2_tied, adapter)
    assert not torch.equal(want["lm_head.weight"], want["model.embed_tokens.weight"])
    with pytest.raises(CheckpointError) as info:
        open_lora(qwen2_tied, adapter)
    messages = {
        "lm_head": "replaces tensor 'lm_head.weight', which base model 'b' lacks (no tensor "
        "'lm_head.weight'); its lm_head is tied to the input embeddings (tie_word_embeddings)",
        "embed_tokens": "replaces 'model.embed_tokens.weight' (modules_to_save), which base "
        "model 'b' ties to lm_head: peft's merge would untie them; save the adapter with "
        "ensure_weight_tying=True or untie the base first",
    }
    assert str(info.value) == f"model 'b+a': adapter 'a' {messages[saved]}"


def _edit_config(**changes: Any) -> Callable[[Path], None]:
    def edit(folder: Path) -> None:
        path = folder / "adapter_config.json"
        path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))

    return edit


def _edit_weights(change: Callable[[dict[str, torch.Tensor]], None]) -> Callable[[Path], None]:
    def edit(folder: Path) -> None:
        weights = load_file(folder / "adapter_model.safetensors")
        change(weights)
        save_file(weights, folder / "adapter_model.safetensors")

    return edit


Q0 = "base_model.model.model.layers.3.self_attn.q_proj"
RERUN = "merge the adapter into its base with peft's merge_and_unload() first"
BAD_ADAPTERS: dict[str, tuple[Callable[[Path], None], str]] = {
    "dora": (_edit_config(use_dora=True), f"use_dora=true (DoRA) is not supported; {RERUN}"),
    "lora_bias": (
        _edit_config(lora_bias=True),
        f"lora_bias=true (LoRA bias terms) is not supported; {RERUN}",
    ),
    "rank": (
        _edit_config(r=4),
        "module 'model.layers.3.self_attn.q_proj': lora_B [32, 8] @ lora_A [8, 32] do not have "
        "the rank r=4 that adapter_config.json gives it",
    ),
    "bad_r": (_edit_config(r="8"), 'adapter_config.json: r must be a positive integer, got "8"'),
    "no_B": (
        _edit_weights(lambda w: w.pop(f"{Q0}.lora_B.weight")),
        "module 'model.layers.3.self_attn.q_proj' has lora_A but no lora_B",
    ),
    "unknown_tensor": (
        _edit_weights(lambda w: w.update({f"{Q0}.lora_E": torch.zeros(8)})),
        f"unrecognised LoRA tensor '{Q0}.lora_E'",
    ),
    "conv": (
        _edit_weights(lambda w: w.update({f"{Q0}.lora_A.weight": torch.zeros(8, 32, 1, 1)})),
        "module 'model.layers.3.self_attn.q_proj': lora_B [32, 8] @ lora_A [8, 32, 1, 1] are "
        "not matrices (convolution LoRA is not supported)",
    ),
}


@pytest.mark.parametrize("case", list(BAD_ADAPTERS))
def test_bad_adapter(tmp_path: Path, llama_base: Path, layer3_adapter: Path, case: str) -> None:
    edit, message = BAD_ADAPTERS[case]
    adapter = Path(shutil.copytree(layer3_adapter, tmp_path / "ad"))
    edit(adapter)
    with pytest.raises(CheckpointError) as info:
        open_lora(llama_base, adapter)
    where = "" if case in ("rank", "no_B", "unknown_tensor", "conv") else f" ({adapter})"
    assert str(info.value) == f"model 'b+a': adapter 'a'{where}: {message}"


def test_not_an_adapter(tmp_path: Path, llama_base: Path, llama_ft1: Path) -> None:
    ia3 = make_adapter(tmp_path / "ia3", llama_base, config=IA3Config(target_modules=QV))
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 8}))
    cases = {
        ia3: "PEFT type 'IA3' is not supported (only LORA adapters); merge it into its base "
        "with peft's merge_and_unload() first",
        llama_ft1: "no adapter_config.json: not a PEFT adapter folder (it looks like a full model)",
        empty: "adapter_config.json: lora_alpha must be a number, got null",
    }
    for folder, message in cases.items():
        with pytest.raises(CheckpointError) as info:
            open_lora(llama_base, folder)
        assert str(info.value) == f"model 'b+a': adapter 'a' ({folder}): {message}"
    (empty / "adapter_config.json").write_text(
        json.dumps({"peft_type": "LORA", "r": 8, "lora_alpha": 8})
    )
    with pytest.raises(CheckpointError, match="no adapter weights: expected adapter_model.safe"):
        open_lora(llama_base, empty)


# --- the Hub --------------------------------------------------------------------------------


@pytest.fixture
def online_hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, llama_base: Path) -> Iterator[Any]:
    """org/base (llama_base) and org/ad (a q/v adapter of it) on a local Hub; online env."""
    adapter = make_adapter(tmp_path / "src" / "ad", llama_base, target_modules=QV)
    with HubServer({"org/base": {"main": llama_base}, "org/ad": {"main": adapter}}) as server:
        cache = str(tmp_path / "cache")
        for key, value in {"HF_ENDPOINT": server.endpoint, "HF_HUB_DISABLE_XET": "1"}.items():
            monkeypatch.setenv(key, value)
        monkeypatch.setenv("HF_HUB_CACHE", cache)
        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
        monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
        for key, value in {
            "ENDPOINT": server.endpoint,
            "HUGGINGFACE_CO_URL_TEMPLATE": server.endpoint
            + "/{repo_id}/resolve/{revision}/{filename}",
            "HF_HUB_OFFLINE": False,
            "HF_HUB_DISABLE_XET": True,
            "HF_HUB_CACHE": cache,
        }.items():
            monkeypatch.setattr(constants, key, value)
        monkeypatch.chdir(tmp_path)
        yield server, adapter


def test_hub_adapter_online_then_offline(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, online_hub: Any, llama_base: Path
) -> None:
    server, adapter = online_hub
    out = run(tmp_path, single("org/base+org/ad"))
    assert server.fetched("org/ad") == {
        "README.md",  # the adapter's card, for the output's
        "adapter_config.json",
        "adapter_model.safetensors",
    }
    want = peft_merged(llama_base, adapter)
    for name, tensor in load_state(out).items():
        assert_close(tensor, want[name], msg=name)
    seen = len(server.requests)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    again = run(tmp_path, single("org/base+org/ad"), name="again")
    assert len(server.requests) == seen
    assert digest(again)["model.safetensors"] == digest(out)["model.safetensors"]


def test_select_files_takes_adapter_files() -> None:
    listing = ["README.md", "adapter_config.json", "adapter_model.safetensors", "adapter_model.bin"]
    assert hub.select_files(listing) == [
        "README.md",
        "adapter_config.json",
        "adapter_model.safetensors",
    ]
    assert hub.select_files(listing[:2] + listing[3:]) == [
        "README.md",
        "adapter_config.json",
        "adapter_model.bin",
    ]
    with_model = ["config.json", "model.safetensors", *listing]
    assert hub.select_files(with_model) == [
        "README.md",
        "adapter_config.json",
        "adapter_model.safetensors",
        "config.json",
        "model.safetensors",
    ]


def test_adapter_named_as_a_model(tmp_path: Path, layer3_adapter: Path) -> None:
    assert cli_fails(tmp_path, single(str(layer3_adapter))) == [
        f"{tmp_path / 'recipe.yaml'}:3: models[0].model: model '{layer3_adapter}' "
        f"({layer3_adapter}): no model weights found: expected model.safetensors, "
        "model.safetensors.index.json, pytorch_model.bin or pytorch_model.bin.index.json; "
        "it holds a LoRA adapter: name it as 'base_model+adapter'"
    ]


def test_output_inside_the_adapter_is_refused(
    tmp_path: Path, llama_base: Path, layer3_adapter: Path
) -> None:
    adapter = Path(shutil.copytree(layer3_adapter, tmp_path / "ad"))
    before = digest(adapter)
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(single(f"{llama_base}+{adapter}")))
    result = runner.invoke(app, ["run", str(path), str(adapter / "out")])
    assert result.exit_code == 2
    assert result.stderr.strip() == (
        f"error: output '{adapter / 'out'}' is inside input model '{adapter}' ({adapter}); "
        "choose another directory"
    )
    assert digest(adapter) == before
