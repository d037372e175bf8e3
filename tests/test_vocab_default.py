"""Vocabularies that differ in size, with no tokenizer setting: merged as mergekit users expect.

The output takes the base's tokenizer (else the first model's); every model's embedding and
lm_head rows are moved to it by token, with the fill rule for tokens a model lacks; one
warning names the sizes and the tokens filled and dropped. The expected rows are computed here
token by token (``vocab_models.aligned_rows``), independently of ``merge.vocab``. The models
A, B and C are ``vocab_models.EXTRAS``'s (its docstring has the table).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from torch.testing import assert_close
from typer.testing import CliRunner

from merge.cli import app
from tiny import assert_loads_and_generates, load_state
from vocab_models import EXTRAS, VOCAB_TENSORS, aligned_rows, make_vocab_model, vocab_of

runner = CliRunner()


@pytest.fixture(scope="module")
def abc(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("vocab_default")
    return {
        name: make_vocab_model(root / name, 30 + i, EXTRAS[name]) for i, name in enumerate("ABC")
    }


def run(tmp_path: Path, recipe: dict, name: str = "out") -> tuple[Path, list[str]]:
    """Run ``recipe`` through the CLI; return the output and the stderr lines."""
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    out = tmp_path / name
    result = runner.invoke(app, ["run", str(path), str(out)])
    assert result.exit_code == 0, result.stderr
    return out, result.stderr.strip().splitlines()


def state(directory: Path, tensor: str) -> tuple[dict[str, int], torch.Tensor]:
    return vocab_of(directory), load_state(directory)[tensor].float()


def test_linear_takes_the_first_models_tokenizer_and_aligns_by_token(
    tmp_path: Path, abc: dict[str, Path]
) -> None:
    weights = {"A": 0.25, "B": 0.75}
    recipe = {
        "merge_method": "linear",
        "models": [{"model": str(abc[n]), "parameters": {"weight": w}} for n, w in weights.items()],
    }
    out, stderr = run(tmp_path, recipe)
    assert stderr[0] == (
        f"warning: vocabulary sizes differ (513 in model '{abc['A']}', 515 in model "
        f"'{abc['B']}') and the recipe sets no tokenizer: the output takes the tokenizer of "
        f"'{abc['A']}' (513 rows), as tokenizer_source: base would, and every model's "
        f"embedding and lm_head rows are matched to it by token; model '{abc['B']}' lacks 1 of "
        "the output's rows, filled from the base's rows (else the other models'): '<|tool|>'; "
        f"model '{abc['B']}' has 3 row(s) the output lacks, dropped: '<|im_start|>', "
        "'<|im_end|>', 'hello_world'"
    )
    assert len(stderr) == 2 and stderr[1].startswith("wrote ")
    assert (out / "tokenizer.json").read_bytes() == (abc["A"] / "tokenizer.json").read_bytes()
    assert json.loads((out / "config.json").read_text())["vocab_size"] == 513
    merged = load_state(out)
    for tensor in VOCAB_TENSORS:
        models = {n: state(abc[n], tensor) for n in weights}
        rows = aligned_rows(vocab_of(abc["A"]), models, base=None)
        want = sum(w * rows[n] for n, w in weights.items()) / sum(weights.values())
        assert merged[tensor].shape == (513, 32)
        assert_close(merged[tensor], want, rtol=0, atol=1e-6)
        # row by row: A's own tokens keep A's and B's rows; <|tool|> (B lacks it) is A's row
        tool = vocab_of(abc["A"])["<|tool|>"]
        assert_close(merged[tensor][tool], models["A"][1][tool], rtol=0, atol=1e-6)
    assert_loads_and_generates(out)


def test_task_arithmetic_takes_the_base_tokenizer_and_fills_from_the_base(
    tmp_path: Path, abc: dict[str, Path]
) -> None:
    recipe = {
        "merge_method": "task_arithmetic",
        "base_model": str(abc["C"]),
        "models": [
            {"model": str(abc["A"]), "parameters": {"weight": 0.5}},
            {"model": str(abc["B"]), "parameters": {"weight": 0.3}},
        ],
    }
    out, stderr = run(tmp_path, recipe)
    assert f"the output takes the tokenizer of '{abc['C']}' (514 rows)" in stderr[0]
    assert f"model '{abc['A']}' lacks 1 of the output's rows" in stderr[0]
    assert "'<|im_end|>'" in stderr[0]
    merged = load_state(out)
    out_vocab = vocab_of(abc["C"])
    for tensor in VOCAB_TENSORS:
        models = {n: state(abc[n], tensor) for n in "ABC"}
        rows = aligned_rows(out_vocab, models, base="C")
        want = rows["C"] + 0.5 * (rows["A"] - rows["C"]) + 0.3 * (rows["B"] - rows["C"])
        assert_close(merged[tensor], want, rtol=0, atol=1e-6)
        im_end, tool = out_vocab["<|im_end|>"], out_vocab["<|tool|>"]
        # A lacks <|im_end|>, B lacks <|tool|>: their task vectors are 0 there (the base row)
        base = models["C"][1]
        a, b = models["A"], models["B"]
        assert_close(
            merged[tensor][im_end],
            base[im_end] + 0.3 * (b[1][b[0]["<|im_end|>"]] - base[im_end]),
            rtol=0,
            atol=1e-6,
        )
        assert_close(
            merged[tensor][tool],
            base[tool] + 0.5 * (a[1][a[0]["<|tool|>"]] - base[tool]),
            rtol=0,
            atol=1e-6,
        )
    explicit, _ = run(tmp_path, {**recipe, "tokenizer_source": "base"}, "explicit")
    assert (out / "model.safetensors").read_bytes() == (explicit / "model.safetensors").read_bytes()


def test_equal_sizes_merge_row_by_row_without_a_warning(
    tmp_path: Path, abc: dict[str, Path]
) -> None:
    """Same size, other tokens: row by row, as before (and as in mergekit)."""
    other = make_vocab_model(tmp_path / "other", 40, [("<|x|>", True)])
    recipe = {
        "merge_method": "linear",
        "models": [
            {"model": str(abc["A"]), "parameters": {"weight": 1.0}},
            {"model": str(other), "parameters": {"weight": 1.0}},
        ],
    }
    out, stderr = run(tmp_path, recipe)
    assert [line for line in stderr if line.startswith("warning:")] == []
    embed = "model.embed_tokens.weight"
    want = (load_state(abc["A"])[embed] + load_state(other)[embed]) / 2
    assert_close(load_state(out)[embed], want, rtol=0, atol=1e-6)


def test_a_model_without_tokenizer_files_cannot_be_matched(
    tmp_path: Path, abc: dict[str, Path]
) -> None:
    bare = Path(shutil.copytree(abc["B"], tmp_path / "bare"))
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (bare / name).unlink(missing_ok=True)
    recipe = {
        "merge_method": "linear",
        "models": [
            {"model": str(abc["A"]), "parameters": {"weight": 1.0}},
            {"model": str(bare), "parameters": {"weight": 1.0}},
        ],
    }
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    result = runner.invoke(app, ["run", str(path), str(tmp_path / "out")])
    assert result.exit_code == 2
    assert result.stderr.strip().splitlines() == [
        f"error: {path}:6: models[1].model: vocabulary sizes differ (513 in model "
        f"'{abc['A']}', 515 in model '{bare}'); model '{bare}' has no tokenizer files, so its "
        f"515 embedding rows cannot be matched to the output vocabulary ('{abc['A']}' has "
        "513) by token"
    ]
    assert not (tmp_path / "out").exists()
