"""The command line: every bad input is one precise line, exit code 2, nothing on disk."""

from __future__ import annotations

import gc
import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from merge.cli import _exit_status, app
from tiny import assert_loads_and_generates

runner = CliRunner()


def cli(*args: str | Path) -> tuple[int, str, str]:
    result = runner.invoke(app, [str(a) for a in args])
    return result.exit_code, result.stdout, result.stderr


def write(tmp_path: Path, recipe: dict | str, name: str = "recipe.yaml") -> Path:
    path = tmp_path / name
    path.write_text(recipe if isinstance(recipe, str) else yaml.safe_dump(recipe, sort_keys=False))
    return path


def linear(*models: Path | str) -> dict:
    return {
        "merge_method": "linear",
        "models": [{"model": str(m), "parameters": {"weight": 1.0}} for m in models],
    }


def fails(recipe: Path, tmp_path: Path, *extra: str) -> list[str]:
    """Run the recipe; assert exit 2, no traceback, no output; return the error lines."""
    out = tmp_path / "out"
    code, stdout, stderr = cli("run", recipe, out, *extra)
    assert code == 2, stderr
    assert "Traceback" not in stderr + stdout
    assert not out.exists()
    assert not list(tmp_path.glob(".out.*")), "temporary output left behind"
    lines = stderr.strip().splitlines()
    assert all(line.startswith("error: ") for line in lines), stderr
    return [line.removeprefix("error: ") for line in lines]


def test_unknown_key_and_bad_value_together(
    tmp_path: Path, llama_base: Path, llama_ft1: Path
) -> None:
    recipe = write(
        tmp_path,
        f"""merge_method: ties
base_model: {llama_base}
models:
  - model: {llama_base}
    parameters: {{weight: 1, density: 1.5}}
  - model: {llama_ft1}
    parameters: {{wieght: 1}}
""",
    )
    assert fails(recipe, tmp_path) == [
        f"{recipe}:5: models[0].parameters.density: must be in (0, 1], got 1.5",
        f"{recipe}:7: models[1].parameters.wieght: unknown parameter for ties; did you mean "
        "'weight'? (allowed: weight, density, normalize, lambda, int8_mask, rescale, trim)",
        f"{recipe}:6: models[1]: model '{llama_ft1}' needs the parameter 'weight' (a number) "
        "for ties",
    ]


def test_missing_required_parameter(tmp_path: Path, llama_base: Path, llama_ft1: Path) -> None:
    recipe = write(
        tmp_path,
        {
            "merge_method": "slerp",
            "base_model": str(llama_base),
            "models": [{"model": str(llama_base)}, {"model": str(llama_ft1)}],
        },
    )
    assert fails(recipe, tmp_path) == [
        f"{recipe}:3: models: slerp needs the global parameter 't' (a number in [0, 1]) under "
        "parameters:"
    ]


def test_missing_local_path(tmp_path: Path, llama_base: Path) -> None:
    recipe = write(tmp_path, linear(llama_base, "./no/such/model"))
    (line,) = fails(recipe, tmp_path)
    assert line.startswith(
        f"{recipe}:6: models[1].model: model './no/such/model': local path not found"
    )


def test_missing_tensor(tmp_path: Path, llama_base: Path) -> None:
    broken = tmp_path / "broken"
    shutil.copytree(llama_base, broken)
    state = load_file(broken / "model.safetensors")
    del state["model.layers.1.mlp.up_proj.weight"]
    save_file(state, broken / "model.safetensors", metadata={"format": "pt"})
    recipe = write(tmp_path, linear(llama_base, broken))
    assert fails(recipe, tmp_path) == [
        f"model '{broken}' has no tensor 'model.layers.1.mlp.up_proj.weight' (needed for output "
        "tensor 'model.layers.1.mlp.up_proj.weight')"
    ]


def test_shape_mismatch(tmp_path: Path, llama_base: Path, make_checkpoint) -> None:
    small = make_checkpoint("small", layers=4, hidden=16)
    recipe = write(tmp_path, linear(llama_base, small))
    lines = fails(recipe, tmp_path)
    assert lines[0] == (  # lm_head.weight has the same shapes: one line for both
        f"tensor 'model.embed_tokens.weight' and 1 other tensor: shape [512, 16] in model "
        f"'{small}' does not match [512, 32] in model '{llama_base}'"
    )
    assert len(lines) == 6, lines  # one line per distinct pair of shapes


def test_vocabulary_mismatch_without_tokenizer_files_names_the_sizes(
    tmp_path: Path, llama_base: Path, make_checkpoint
) -> None:
    """Sizes differ and the second model cannot be matched by token: one precise error."""
    big = make_checkpoint("big", layers=4, vocab=520)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (big / name).unlink(missing_ok=True)
    recipe = write(tmp_path, linear(llama_base, big))
    assert fails(recipe, tmp_path) == [
        f"{recipe}:6: models[1].model: vocabulary sizes differ (512 in model '{llama_base}', "
        f"520 in model '{big}'); model '{big}' has no tokenizer files, so its 520 embedding "
        f"rows cannot be matched to the output vocabulary ('{llama_base}' has 512) by token"
    ]


def test_layer_range_out_of_bounds(tmp_path: Path, llama_base: Path) -> None:
    recipe = write(
        tmp_path,
        {
            "merge_method": "passthrough",
            "slices": [
                {"sources": [{"model": str(llama_base), "layer_range": [0, 2]}]},
                {"sources": [{"model": str(llama_base), "layer_range": [2, 8]}]},
            ],
        },
    )
    assert fails(recipe, tmp_path) == [
        f"{recipe}:10: slices[1].sources[0].layer_range: [2, 8] is out of range: model "
        f"'{llama_base}' has 4 layers (layer_range is [start, end) with end <= 4)"
    ]


def test_truncated_checkpoint(tmp_path: Path, llama_base: Path) -> None:
    broken = tmp_path / "truncated"
    shutil.copytree(llama_base, broken)
    data = (broken / "model.safetensors").read_bytes()
    (broken / "model.safetensors").write_bytes(data[: len(data) // 2])
    recipe = write(tmp_path, linear(llama_base, broken))
    (line,) = fails(recipe, tmp_path)
    assert line.startswith(f"{recipe}:6: models[1].model: ")
    assert "truncated" in line and "model.safetensors" in line


def test_unreadable_bin(tmp_path: Path, llama_base: Path) -> None:
    broken = tmp_path / "garbage"
    broken.mkdir()
    shutil.copy(llama_base / "config.json", broken)
    (broken / "pytorch_model.bin").write_bytes(b"not a checkpoint at all")
    recipe = write(tmp_path, linear(llama_base, broken))
    (line,) = fails(recipe, tmp_path)
    assert line.startswith(f"{recipe}:6: models[1].model: ") and "pytorch_model.bin" in line


def test_uncached_hub_model_offline(tmp_path: Path, llama_base: Path) -> None:
    recipe = write(tmp_path, linear(llama_base, "someorg/somemodel"))
    (line,) = fails(recipe, tmp_path)
    assert line.startswith(f"{recipe}:6: models[1].model: model 'someorg/somemodel'")
    assert "HF_HUB_OFFLINE" in line


def test_output_inside_an_input(tmp_path: Path, llama_base: Path) -> None:
    model = tmp_path / "model"
    shutil.copytree(llama_base, model)
    recipe = write(tmp_path, linear(model))
    out = model / "merged"
    code, _, stderr = cli("run", recipe, out)
    assert code == 2 and not out.exists()
    assert stderr.strip() == (
        f"error: output '{out}' is inside input model '{model}' ({model}); choose another directory"
    )
    assert sorted(p.name for p in model.iterdir()) == sorted(p.name for p in llama_base.iterdir())


def test_existing_output_needs_overwrite(tmp_path: Path, llama_base: Path) -> None:
    recipe = write(tmp_path, linear(llama_base))
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    code, _, stderr = cli("run", recipe, out)
    assert code == 2
    assert stderr.strip() == (
        f"error: output '{out}' already exists; pass --overwrite to replace it"
    )
    assert (out / "keep.txt").read_text() == "precious"
    code, _, stderr = cli("run", recipe, out, "--overwrite", "--quiet")
    assert code == 0, stderr
    assert not (out / "keep.txt").exists() and (out / "model.safetensors").is_file()


def test_bad_shard_size(tmp_path: Path, llama_base: Path) -> None:
    recipe = write(tmp_path, linear(llama_base))
    (line,) = fails(recipe, tmp_path, "--out-shard-size", "lots")
    assert line.startswith("--out-shard-size must be a size like 5GB or 500MB, got 'lots'; units")


def test_debug_shows_traceback(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MERGE_DEBUG", "1")
    recipe = write(tmp_path, "merge_method: linear\n")
    result = runner.invoke(app, ["validate", str(recipe)])
    assert result.exit_code != 0 and result.exception is not None
    assert type(result.exception).__name__ == "RecipeError"


def test_run_default_output_and_progress_off(
    tmp_path: Path, llama_base: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    recipe = write(tmp_path, linear(llama_base, llama_base), "twice.yaml")
    monkeypatch.chdir(tmp_path)
    code, stdout, stderr = cli("run", recipe)
    assert code == 0, stderr
    assert stdout == ""
    assert stderr.startswith(f"wrote {tmp_path / 'twice-merged'} in ")
    assert_loads_and_generates(tmp_path / "twice-merged")


def test_validate_and_plan(tmp_path: Path, llama_base: Path, llama_ft1: Path) -> None:
    recipe = write(
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
            "parameters": {"t": [{"filter": "self_attn", "value": [0, 1]}, {"value": 0.25}]},
        },
    )
    code, stdout, stderr = cli("validate", recipe)
    assert code == 0, stderr
    assert stdout.splitlines()[0] == f"{recipe}: ok"
    assert "output: 39 tensors" in stdout
    code, stdout, stderr = cli("plan", recipe)
    assert code == 0, stderr
    lines = stdout.splitlines()
    q = [ln for ln in lines if "self_attn.q_proj" in ln]
    assert q[0].strip() == ("model.layers.0.self_attn.q_proj.weight  [32x32]  m1 base=m0  t=0")
    assert q[1].strip().endswith("t=0.333333")
    assert any(ln.strip().startswith("model.norm.weight  [32]  m1 base=m0  t=0.25") for ln in lines)
    assert "expected peak memory" in stdout and "model.safetensors: 39 tensors" in stdout
    code, stdout, _ = cli("plan", recipe, "--json")
    data = json.loads(stdout)
    assert len(data["tensors"]) == 39 and data["method"] == "slerp"
    assert data["tensors"][0]["params"] == {"t": 0.25}


def test_version() -> None:
    code, stdout, _ = cli("--version")
    assert code == 0 and stdout.startswith("merge ")


def test_plan_reads_no_tensor_data(
    tmp_path: Path, llama_base: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from merge.checkpoint import Checkpoint

    def forbidden(self: object, name: str) -> torch.Tensor:
        raise AssertionError(f"plan read tensor data: {name}")

    monkeypatch.setattr(Checkpoint, "read", forbidden)
    recipe = write(tmp_path, linear(llama_base))
    assert cli("plan", recipe)[0] == 0
    assert cli("validate", recipe)[0] == 0


COMPAT = Path(__file__).resolve().parent / "data" / "compat"


@pytest.mark.parametrize(
    "name", sorted(p.name for p in COMPAT.glob("*.yaml") if not p.name.startswith("moe_"))
)
def test_compat_recipes_validate_offline_with_only_unreachable_models(
    name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Offline, validate may only say that the (real Hub) models cannot be reached."""
    monkeypatch.chdir(tmp_path)
    code, stdout, stderr = cli("validate", COMPAT / name)
    assert code == 2 and stdout == ""
    lines = stderr.strip().splitlines()
    assert lines
    for line in lines:
        assert "not in the Hugging Face cache" in line and "HF_HUB_OFFLINE=1 is set" in line, line
        assert line.startswith(f"error: {COMPAT / name}:"), line


def test_warns_about_input_tensors_left_out(
    tmp_path: Path, qwen2_tied: Path, make_checkpoint
) -> None:
    """A tied donor has no lm_head: another model's own lm_head is ignored, loudly."""
    untied = make_checkpoint("untied", arch="qwen2", seed=5, tie=False)
    recipe = write(tmp_path, linear(qwen2_tied, untied))
    code, _, stderr = cli("run", recipe, tmp_path / "out")
    assert code == 0, stderr
    assert stderr.splitlines()[0] == (
        f"warning: model '{untied}': 1 tensor(s) are not in the output and are ignored: "
        f"'lm_head.weight' (the output has the tensors of '{qwen2_tied}')"
    )
    code, _, stderr = cli("validate", recipe)
    assert code == 0 and stderr.startswith(f"warning: model '{untied}': 1 tensor(s)")
    code, _, stderr = cli("run", recipe, tmp_path / "out2", "--quiet")
    assert code == 0 and stderr == ""


# --- the console script: ``main`` leaves without the interpreter's teardown -------------------


def console(*args: str | Path) -> subprocess.CompletedProcess[str]:
    """``merge ARGS`` through ``merge.cli.main`` (the console script's entry point), in a
    fresh interpreter whose stdout and stderr are pipes."""
    code = "import sys; from merge.cli import main; sys.argv[0] = 'merge'; main()"
    argv = [sys.executable, "-c", code, *(str(a) for a in args)]
    return subprocess.run(argv, capture_output=True, text=True, timeout=300, check=False)


def test_console_script_keeps_exit_codes_and_flushes_what_it_printed(
    tmp_path: Path, llama_base: Path, llama_ft1: Path
) -> None:
    recipe = write(tmp_path, linear(llama_base, llama_ft1))
    planned = console("plan", recipe, "--json")
    assert planned.returncode == 0, planned.stderr
    assert len(json.loads(planned.stdout)["tensors"]) > 10  # the whole document got out
    done = console("run", recipe, tmp_path / "out", "-q")
    assert done.returncode == 0, done.stderr
    assert load_file(tmp_path / "out" / "model.safetensors")  # written and moved into place
    bad = console("run", tmp_path / "missing.yaml", tmp_path / "out2")
    assert bad.returncode == 2
    assert "missing.yaml" in bad.stderr and "Traceback" not in bad.stderr
    assert not (tmp_path / "out2").exists()
    usage = console("run")  # typer's own usage error
    assert usage.returncode == 2 and "Missing argument" in usage.stderr


def test_exit_status_follows_sys_exit(capsys: pytest.CaptureFixture[str]) -> None:
    assert [_exit_status(c) for c in (None, 0, 2, 130)] == [0, 0, 2, 130]
    assert _exit_status("fatal: bad") == 1
    assert capsys.readouterr().err == "fatal: bad\n"


def test_collector_comes_back_on_once_the_command_has_imported(monkeypatch: Any) -> None:
    import merge.cli as cli_module

    assert gc.isenabled()
    monkeypatch.setitem(cli_module._startup, "gc_off", True)
    gc.disable()
    try:
        code, out, _ = cli("methods")  # as main() leaves it: off during the imports
        assert code == 0 and "ties" in out
        assert gc.isenabled() and gc.get_freeze_count() > 0
        assert not cli_module._startup["gc_off"]
    finally:
        gc.unfreeze()
        gc.enable()
