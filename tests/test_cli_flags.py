"""mergekit's command-line flags on ``merge run``/``plan``/``validate``: each one's effect, or
its one notice; shard sizes in mergekit's units; the help text."""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from test_e2e import dare_recipe
from test_sources import SHA, build_hf_cache
from typer.testing import CliRunner

from merge.cli import app
from merge.tokenizer import TOKENIZER_FILES
from tiny import assert_loads_and_generates, load_state

runner = CliRunner()


def cli(*args: str | Path, env: dict[str, str] | None = None) -> tuple[int, str, str]:
    result = runner.invoke(app, [str(a) for a in args], env=env, prog_name="merge")
    return result.exit_code, result.stdout, result.stderr


def write(tmp_path: Path, recipe: dict[str, Any], name: str = "recipe.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


def linear(*models: Path | str) -> dict[str, Any]:
    return {
        "merge_method": "linear",
        "models": [{"model": str(m), "parameters": {"weight": 1.0}} for m in models],
    }


def run_ok(recipe: Path, out: Path, *extra: str | Path) -> str:
    code, stdout, stderr = cli("run", recipe, out, *extra)
    assert code == 0, stderr
    assert stdout == ""
    return stderr


def error_lines(tmp_path: Path, *args: str | Path) -> list[str]:
    """Run; assert exit 2, no traceback and nothing written; the ``error:`` lines."""
    code, stdout, stderr = cli(*args)
    assert code == 2, stderr
    assert "Traceback" not in stderr + stdout
    assert not (tmp_path / "out").exists()
    lines = stderr.strip().splitlines()
    assert all(line.startswith("error: ") for line in lines), stderr
    return [line.removeprefix("error: ") for line in lines]


# --- sizes --------------------------------------------------------------------------------------


def test_mergekit_size_units(tmp_path: Path, llama_base: Path) -> None:
    recipe = write(tmp_path, linear(llama_base))
    run_ok(recipe, tmp_path / "b", "--out-shard-size", "1B", "-q")  # 10^9 bytes: one shard
    assert [p.name for p in (tmp_path / "b").glob("*.safetensors")] == ["model.safetensors"]
    run_ok(recipe, tmp_path / "m", "--out-shard-size", "1.5m", "--max-memory", "2GiB", "-q")


@pytest.mark.parametrize(("size", "nbytes"), [("500KB", "500,000"), ("1K", "1,000"), ("64", "64")])
def test_shard_size_under_1mb_is_an_error(
    tmp_path: Path, llama_base: Path, size: str, nbytes: str
) -> None:
    recipe = write(tmp_path, linear(llama_base))
    (line,) = error_lines(tmp_path, "run", recipe, tmp_path / "out", "--out-shard-size", size)
    assert line.startswith(
        f"--out-shard-size {size} means {nbytes} bytes; it must be at least 1,000,000 bytes; "
        "units (any case): K or KB = 10^3 bytes, M or MB = 10^6, B, G or GB = 10^9"
    )
    (again,) = error_lines(tmp_path, "plan", recipe, "--out-shard-size", size)
    assert again == line


# --- same meaning -------------------------------------------------------------------------------


def test_random_seed_is_seed(
    tmp_path: Path, llama_base: Path, llama_ft1: Path, llama_ft2: Path
) -> None:
    recipe = write(tmp_path, dare_recipe(llama_base, llama_ft1, llama_ft2))
    run_ok(recipe, tmp_path / "seed", "--seed", "7", "-q")
    run_ok(recipe, tmp_path / "random", "--random-seed", "7", "-q")
    run_ok(recipe, tmp_path / "other", "--random-seed", "8", "-q")
    seed, random, other = (load_state(tmp_path / n) for n in ("seed", "random", "other"))
    assert all(torch.equal(seed[k], random[k]) for k in seed)
    assert any(not torch.equal(seed[k], other[k]) for k in seed)
    assert "seed 7" in (tmp_path / "random" / "README.md").read_text()
    _, text, _ = cli("plan", recipe, "--random-seed", "8", "--json", "-q")
    assert '"seed": 8,' in text


def test_num_threads_and_j_are_threads(
    tmp_path: Path, llama_base: Path, llama_ft1: Path, llama_ft2: Path
) -> None:
    recipe = write(tmp_path, dare_recipe(llama_base, llama_ft1, llama_ft2))
    run_ok(recipe, tmp_path / "j1", "-j", "1", "-q")
    run_ok(recipe, tmp_path / "n3", "--num-threads", "3", "-q")
    one, three = load_state(tmp_path / "j1"), load_state(tmp_path / "n3")
    assert all(torch.equal(one[k], three[k]) for k in one)
    assert error_lines(tmp_path, "run", recipe, tmp_path / "out", "-j", "0") == [
        "--threads must be at least 1, got 0"
    ]
    code, text, stderr = cli("plan", recipe, "-j", "2", "--num-threads", "2", "-q")
    assert code == 0, stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
@pytest.mark.parametrize("flag", [["--cuda"], ["--gpu-rich"], ["--cuda", "--gpu-rich"]])
def test_cuda_flags_are_device_cuda(tmp_path: Path, llama_base: Path, flag: list[str]) -> None:
    recipe = write(tmp_path, linear(llama_base))
    want = error_lines(tmp_path, "run", recipe, tmp_path / "out", "--device", "cuda")
    assert want == ["--device cuda: CUDA is not available here; use --device cpu"]
    assert error_lines(tmp_path, "run", recipe, tmp_path / "out", *flag) == want


def test_device_auto_and_an_explicit_device_win(tmp_path: Path, llama_base: Path) -> None:
    recipe = write(tmp_path, linear(llama_base))
    run_ok(recipe, tmp_path / "auto", "--device", "auto", "-q")
    run_ok(recipe, tmp_path / "cpu", "--cuda", "--device", "cpu", "-q")  # as in mergekit
    run_ok(recipe, tmp_path / "nocuda", "--no-cuda", "-q")
    assert_loads_and_generates(tmp_path / "auto")


def _tokenizer_files(out: Path) -> list[str]:
    return [n for n in TOKENIZER_FILES if (out / n).exists()]


def test_no_copy_tokenizer(tmp_path: Path, llama_base: Path, llama_ft1: Path) -> None:
    recipe = write(tmp_path, {**linear(llama_base, llama_ft1), "chat_template": "chatml"})
    stderr = run_ok(recipe, tmp_path / "none", "--no-copy-tokenizer")
    assert _tokenizer_files(tmp_path / "none") == []
    assert (tmp_path / "none" / "generation_config.json").is_file()
    assert (
        "warning: chat_template is set but --no-copy-tokenizer writes no tokenizer; it is not "
        "saved\n" in stderr
    )
    run_ok(recipe, tmp_path / "copied", "--copy-tokenizer", "-q")
    assert "tokenizer.json" in _tokenizer_files(tmp_path / "copied")
    assert "chat_template.jinja" in _tokenizer_files(tmp_path / "copied")


def test_no_copy_tokenizer_keeps_a_tokenizer_the_recipe_built(
    tmp_path: Path, llama_base: Path, llama_ft1: Path
) -> None:
    recipe = {**linear(llama_base, llama_ft1), "tokenizer_source": "union"}
    stderr = run_ok(write(tmp_path, recipe), tmp_path / "out", "--no-copy-tokenizer")
    assert "tokenizer.json" in _tokenizer_files(tmp_path / "out")
    assert "chat_template" not in stderr
    assert_loads_and_generates(tmp_path / "out")


def test_no_write_model_card(tmp_path: Path, llama_base: Path) -> None:
    recipe = write(tmp_path, linear(llama_base))
    run_ok(recipe, tmp_path / "out", "--no-write-model-card", "-q")
    assert not (tmp_path / "out" / "README.md").exists()
    assert (tmp_path / "out" / "merge-recipe.yaml").read_text() == recipe.read_text()
    run_ok(recipe, tmp_path / "card", "--write-model-card", "-q")
    assert (tmp_path / "card" / "README.md").is_file()


def test_transformers_cache_is_where_models_are_found(tmp_path: Path, llama_base: Path) -> None:
    cache = tmp_path / "elsewhere"
    build_hf_cache(cache, "org/tiny", llama_base, {"main": SHA})
    recipe = write(tmp_path, linear(llama_base, "org/tiny"))
    before = os.environ.get("HF_HUB_CACHE")
    (line,) = error_lines(tmp_path, "validate", recipe)
    assert "not in the Hugging Face cache" in line and str(cache) not in line
    code, stdout, stderr = cli("validate", recipe, "--transformers-cache", cache)
    assert code == 0 and stdout.startswith(f"{recipe}: ok"), stderr
    assert os.environ.get("HF_HUB_CACHE") == before
    run_ok(recipe, tmp_path / "out", "--transformers-cache", cache, "-q")
    card = (tmp_path / "out" / "README.md").read_text()
    assert f"[org/tiny](https://huggingface.co/org/tiny), commit `{SHA}`" in card


# --- --trust-remote-code ------------------------------------------------------------------------


@pytest.fixture
def seen_remote_code(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, Any]]:
    """Every transformers Auto* load the project makes, with its ``trust_remote_code``."""
    import transformers

    seen: list[tuple[str, Any]] = []

    def spy(cls: Any, name: str) -> None:
        original = getattr(cls, name)

        def wrapped(*args: Any, **kwargs: Any) -> Any:
            seen.append((f"{cls.__name__}.{name}", kwargs.get("trust_remote_code")))
            return original(*args, **kwargs)

        monkeypatch.setattr(cls, name, wrapped)

    spy(transformers.AutoTokenizer, "from_pretrained")
    spy(transformers.AutoConfig, "from_pretrained")
    spy(transformers.AutoModelForCausalLM, "from_config")
    from merge.moe import forward

    forward._cached_tokenizer.cache_clear()
    return seen


def test_trust_remote_code_reaches_the_tokenizer_reader(
    tmp_path: Path, llama_base: Path, llama_ft1: Path, seen_remote_code: list[tuple[str, Any]]
) -> None:
    converted = Path(shutil.copytree(llama_ft1, tmp_path / "no_json"))
    (converted / "tokenizer.json").rename(converted / "tokenizer.json.bak")
    (converted / "vocab.txt").write_text("")  # a format only transformers reads
    recipe = write(tmp_path, {**linear(llama_base, converted), "tokenizer_source": "union"})
    for flag, want in (("--trust-remote-code", True), ("--no-trust-remote-code", False)):
        seen_remote_code.clear()
        cli("validate", recipe, flag)
        assert seen_remote_code and all(v is want for _, v in seen_remote_code), seen_remote_code


def test_trust_remote_code_reaches_the_router(
    tmp_path: Path, llama_base: Path, seen_remote_code: list[tuple[str, Any]]
) -> None:
    recipe = {
        "base_model": str(llama_base),
        "gate_mode": "hidden",
        "experts": [
            {"source_model": str(llama_base), "positive_prompts": ["hello there"]},
            {"source_model": str(llama_base), "positive_prompts": ["1 2 3 4"]},
        ],
    }
    run_ok(write(tmp_path, recipe), tmp_path / "out", "--trust-remote-code", "-q")
    names = {name for name, _ in seen_remote_code}
    assert names == {
        "AutoTokenizer.from_pretrained",
        "AutoConfig.from_pretrained",
        "AutoModelForCausalLM.from_config",
    }
    assert all(v is True for _, v in seen_remote_code)


# --- --allow-crimes -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def mistral(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A Mistral with llama_base's tensor names and shapes: mixable, but another architecture."""
    from tiny import make_tiny

    return make_tiny(tmp_path_factory.mktemp("crimes") / "mistral", "mistral", seed=5, layers=4)


def test_mixed_architectures_need_allow_crimes(
    tmp_path: Path, llama_base: Path, llama_ft1: Path, mistral: Path
) -> None:
    recipe = write(tmp_path, linear(llama_base, llama_ft1, mistral))
    want = (
        f"{recipe}: the models have different architectures: '{llama_base}' and '{llama_ft1}' "
        f"are LlamaForCausalLM; '{mistral}' is MistralForCausalLM; set "
        "allow_mismatched_architectures: true or pass --allow-crimes to merge them anyway"
    )
    assert error_lines(tmp_path, "run", recipe, tmp_path / "out") == [want]
    assert error_lines(tmp_path, "validate", recipe) == [want]
    assert error_lines(tmp_path, "plan", recipe, "--no-allow-crimes") == [want]
    stderr = run_ok(recipe, tmp_path / "out", "--allow-crimes")
    warning = (
        f"warning: the models have different architectures: '{llama_base}' and '{llama_ft1}' "
        f"are LlamaForCausalLM; '{mistral}' is MistralForCausalLM; merging anyway (--allow-crimes)"
    )
    assert stderr.splitlines()[0] == warning
    assert_loads_and_generates(tmp_path / "out")
    code, stdout, stderr = cli("validate", recipe, "--allow-crimes")
    assert code == 0 and stderr.splitlines() == [warning], stderr
    code, _, stderr = cli("plan", recipe, "--allow-crimes", "-q")
    assert code == 0 and stderr == ""


def test_mixed_architectures_are_reported_with_the_plans_other_problems(
    tmp_path: Path, llama_base: Path, mistral: Path
) -> None:
    recipe = write(
        tmp_path,
        {
            "merge_method": "passthrough",
            "slices": [
                {"sources": [{"model": str(llama_base), "layer_range": [0, 8]}]},
                {"sources": [{"model": str(mistral), "layer_range": [0, 4]}]},
            ],
        },
    )
    lines = error_lines(tmp_path, "validate", recipe)
    assert len(lines) == 2 and "different architectures" in lines[0]
    assert "[0, 8] is out of range" in lines[1]


def test_a_tokenizer_source_of_another_architecture_is_no_crime(
    tmp_path: Path, llama_base: Path, llama_ft1: Path, mistral: Path
) -> None:
    recipe = {**linear(llama_base, llama_ft1), "tokenizer_source": str(mistral)}
    code, _, stderr = cli("validate", write(tmp_path, recipe))
    assert code == 0, stderr
    assert "architectures" not in stderr


def test_moe_experts_may_differ_from_the_base(
    tmp_path: Path, llama_base: Path, mistral: Path
) -> None:
    recipe = {
        "base_model": str(llama_base),
        "gate_mode": "random",
        "experts": [{"source_model": str(llama_base)}, {"source_model": str(mistral)}],
    }
    code, _, stderr = cli("validate", write(tmp_path, recipe))
    assert "--allow-crimes" not in stderr and "architectures" not in stderr, stderr
    assert code == 0, stderr


# --- no-ops -------------------------------------------------------------------------------------

NOOPS = {
    "--lazy-unpickle": "inputs are always read lazily, tensor by tensor or chunk by chunk",
    "--low-cpu-memory": "each result is written to its shard as soon as it is computed",
    "--read-to-gpu": "with --device cuda every input tensor is moved to the GPU as it is read",
    "--multi-gpu": "the math runs on one device; pick it with --device cuda:N",
    "--lora-merge-cache": "adapters are applied in float32 while the base is read",
    "--lora-merge-dtype": "adapters are applied in float32 while the base is read",
    "--clone-tensors": "a layer used twice is always written twice",
    "--safe-serialization": "output is always safetensors",
    "--async-write": "the workers always write each tensor to its shard as soon as it is merged",
    "--write-threads": "the merge workers write their own results (--threads sets how many)",
    "--load-in-4bit": "the router's hidden states are computed layer by layer in float32",
    "--load-in-8bit": "the router's hidden states are computed layer by layer in float32",
    "--i-understand-this-is-not-useful-without-training": "nothing here refuses an MoE whose",
    "--verbose": "progress and warnings are shown without it",
}
VALUES = {"--lora-merge-cache": ["/tmp/x"], "--lora-merge-dtype": ["bfloat16"]}
VALUES["--write-threads"] = ["4"]
PAIRS = [f for f in NOOPS if f not in VALUES and not f.startswith(("--load", "--i-", "--verb"))]


def _notes(stderr: str) -> dict[str, str]:
    notes = [line for line in stderr.splitlines() if line.startswith("note: ")]
    found = dict(re.match(r"note: (\S+) has no effect: (.*)$", n).groups() for n in notes)  # type: ignore[union-attr]
    assert len(found) == len(notes), "a notice printed twice"
    return found


def test_every_noop_flag_gives_one_notice(tmp_path: Path, llama_base: Path) -> None:
    recipe = write(tmp_path, linear(llama_base))
    args = [a for flag in NOOPS for a in [flag, *VALUES.get(flag, [])]]
    stderr = run_ok(recipe, tmp_path / "out", *args, "-vv", "--verbose")
    notes = _notes(stderr)
    assert sorted(notes) == sorted(NOOPS)
    for flag, why in NOOPS.items():
        assert notes[flag].startswith(why), flag
    assert stderr.index("note: ") == 0  # before anything else
    assert "\nwrote " in stderr
    assert run_ok(recipe, tmp_path / "quiet", *args, "-v", "-q") == ""


def test_the_no_forms_are_accepted_with_a_notice(tmp_path: Path, llama_base: Path) -> None:
    recipe = write(tmp_path, linear(llama_base))
    stderr = run_ok(recipe, tmp_path / "out", *(f"--no-{f[2:]}" for f in PAIRS), "--no-quiet")
    notes = _notes(stderr)
    assert sorted(notes) == sorted(f"--no-{f[2:]}" for f in PAIRS)
    assert notes["--no-safe-serialization"] == "output is always safetensors"
    assert _notes(run_ok(recipe, tmp_path / "plain")) == {}


def test_short_and_mergekit_command_lines_run(tmp_path: Path, llama_base: Path) -> None:
    """A mergekit-yaml command line, unchanged but for the program name."""
    recipe = write(tmp_path, linear(llama_base))
    args = "--cuda --no-cuda --copy-tokenizer --allow-crimes --lazy-unpickle --out-shard-size 5B"
    stderr = run_ok(recipe, tmp_path / "out", *args.split(), "--random-seed", "1", "-j", "2")
    assert _notes(stderr) == {"--lazy-unpickle": NOOPS["--lazy-unpickle"]}
    assert_loads_and_generates(tmp_path / "out")


# --- --help -------------------------------------------------------------------------------------

WIDE = {"COLUMNS": "240"}


@pytest.mark.parametrize("command", [[], ["run"], ["validate"], ["plan"], ["methods"]])
def test_help_shows_flags_as_flags(command: list[str]) -> None:
    code, text, _ = cli(*command, "--help", env=WIDE)
    assert code == 0
    assert "<bool>" not in text and "<int>" not in text  # options show N, SIZE, DIR, ...
    assert "Show this message and exit." in text
    if command == ["run"]:
        assert "Usage: merge run [OPTIONS] {RECIPE} [OUT]" in text
        assert "RECIPE" in text and "OUT" in text and "{recipe}" not in text
        for flag in [*NOOPS, *(f"--no-{f[2:]}" for f in PAIRS), "-j", "--num-threads"]:
            assert re.search(rf"(^|[\s,]){re.escape(flag)}([\s,]|$)", text, re.M), flag
        for option in ("--random-seed", "--gpu-rich", "--no-cuda", "--transformers-cache"):
            assert option in text
        assert re.search(r"--out-shard-size\s+SIZE", text) and re.search(r"--seed\S*\s+N", text)
        assert re.search(r"--overwrite\s+Replace", text)


def test_usage_lines() -> None:
    usages = {}
    for command in ("run", "validate", "plan", "methods"):
        _, text, _ = cli(command, "--help", env=WIDE)
        usages[command] = re.search(r"Usage: (.*?)\s*$", text, re.M).group(1)  # type: ignore[union-attr]
    assert usages == {
        "run": "merge run [OPTIONS] {RECIPE} [OUT]",
        "validate": "merge validate [OPTIONS] {RECIPE}",
        "plan": "merge plan [OPTIONS] {RECIPE}",
        "methods": "merge methods [OPTIONS] [NAME]",
    }
