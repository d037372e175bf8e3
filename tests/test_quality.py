"""scripts/quality.py at toy scale: data, tokenizer, a training step, recipes, the report.

The real benchmark trains for minutes; these run its pieces on a model of hidden 16 in
seconds. The end-to-end run (training included) is marked ``slow``.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import pytest
import torch
import yaml
from typer.testing import CliRunner

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

import _quality_train as qt  # noqa: E402
import quality  # noqa: E402

from merge.cli import app  # noqa: E402
from merge.eval import evaluate_loaded, parse_task  # noqa: E402

TOY = dataclasses.replace(
    qt.Settings(), hidden=16, layers=1, heads=2, base_steps=2, finetune_steps=1, batch=4,
    validation=5, test=6,
)  # fmt: skip


def test_examples_are_right_and_deterministic() -> None:
    s = qt.Settings()
    assert qt.examples("rev", "test", 20, s) == qt.examples("rev", "test", 20, s)
    assert qt.examples("rev", "test", 20, s) != qt.examples("rev", "validation", 20, s)
    for prompt, answer in qt.examples("add", "test", 20, s):
        a, b = prompt.removeprefix("add ").removesuffix(" =").split(" + ")
        assert int(a.replace(" ", "")) + int(b.replace(" ", "")) == int(answer.replace(" ", ""))
    for prompt, answer in qt.examples("sort", "test", 20, s):
        assert answer.split() == sorted(prompt.split()[1:-1])
    assert qt.examples("copy", "test", 1, s)[0][0].startswith("copy ")


def test_split_files_are_generate_tasks(tmp_path: Path) -> None:
    paths = qt.write_splits(tmp_path, TOY)
    again = qt.write_splits(tmp_path / "again", TOY)
    for split in ("validation", "test"):
        for task in qt.TASKS:
            assert paths[split][task].read_bytes() == again[split][task].read_bytes()
            task_obj = parse_task(f"generate:{paths[split][task]}")
            assert task_obj.kind == "generate"
    first = json.loads(paths["test"]["rev"].read_text().splitlines()[0])
    assert set(first) == {"prompt", "answer"}
    assert len(paths["test"]["rev"].read_text().splitlines()) == TOY.test


def test_tokenizer_round_trip_and_saved(tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    tok = qt.make_tokenizer()
    ids = tok("rev 3 9 1 =")["input_ids"]
    assert ids[0] == tok.bos_token_id and len(ids) == 6
    assert tok.decode(ids, skip_special_tokens=True) == "rev 3 9 1 ="
    tok.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    assert loaded("add 1 2 + 3 4 =")["input_ids"] == tok("add 1 2 + 3 4 =")["input_ids"]
    assert loaded.eos_token_id == tok.eos_token_id and loaded.pad_token_id == tok.pad_token_id


def test_batch_labels_only_the_answer() -> None:
    tok = qt.make_tokenizer()
    b = qt.encode_batch(tok, [("rev 1 2 =", "2 1"), ("copy 1 2 3 =", "1 2 3")])
    assert b.input_ids.shape == (2, 10)
    labelled = b.labels[0][b.labels[0] != -100].tolist()
    assert labelled == [*tok("2 1", add_special_tokens=False)["input_ids"], tok.eos_token_id]
    assert b.attention_mask[0].tolist() == [1] * 8 + [0] * 2


def test_training_step_is_deterministic_and_model_scores(tmp_path: Path) -> None:
    torch.set_num_threads(1)
    tok = qt.make_tokenizer()
    weights = []
    for _ in range(2):
        model = qt.make_model(TOY, tok)
        run = qt.Run(qt.TASKS, TOY.base_steps, seed=0, lr=TOY.lr)
        qt.train(model, tok, run, TOY)
        weights.append(model.model.embed_tokens.weight.detach().clone())
        assert len(run.losses) == TOY.base_steps
    assert torch.equal(weights[0], weights[1])
    qt.save(model, tok, tmp_path / "m")
    paths = qt.write_splits(tmp_path / "data", TOY)
    results = evaluate_loaded(model, tok, [f"generate:{paths['test']['copy']}"], batch_size=4)
    assert results.results[0].n == TOY.test
    assert 0.0 <= results.results[0].metrics["exact_match"] <= 1.0


@pytest.fixture(scope="module")
def toy_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    torch.set_num_threads(1)
    _, paths, record = quality.ensure_models(tmp_path_factory.mktemp("quality"), TOY)
    assert not record["cached"]
    return paths


def test_models_are_cached(toy_models: dict[str, Path]) -> None:
    workdir = toy_models["base"].parents[1]
    _, paths, record = quality.ensure_models(workdir, TOY)
    assert record["cached"] and paths == toy_models


@pytest.mark.parametrize("name", list(quality.RECIPES))
def test_recipes_validate(name: str, toy_models: dict[str, Path], tmp_path: Path) -> None:
    scale = None if name == "linear" else 0.5
    recipe = quality.make_recipe(name, toy_models, scale=scale)
    assert (scale is None) == ("lambda" not in recipe.get("parameters", {}))
    path = tmp_path / f"{quality.slug(name)}.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    result = CliRunner().invoke(app, ["validate", str(path)])
    assert result.exit_code == 0, result.output


def test_genome_uses_validation_splits(toy_models: dict[str, Path], tmp_path: Path) -> None:
    validation = qt.write_splits(tmp_path, TOY)["validation"]
    g = quality.genome(toy_models, validation)
    assert g["genome"]["base_model"] == str(toy_models["base"])
    assert all("validation" in t["name"] for t in g["tasks"])


def test_evolve_row_without_the_command(toy_models: dict[str, Path], tmp_path: Path) -> None:
    args = quality.parse_args(["--evolve-command", "false"])
    validation = qt.write_splits(tmp_path, TOY)["validation"]
    r = quality.evolve_row(tmp_path, toy_models, validation, args)
    assert r["accuracy"] is None and r["note"] == "evolve: not available"


def test_markdown_table() -> None:
    rows = [
        quality.row("base", "base", dict.fromkeys(qt.TASKS, 0.5)),
        quality.row("merge evolve", "merge", None, "evolve: not available"),
    ]
    assert quality.evolve_lines(rows) == []
    rows[0]["recipe"] = {
        "merge_method": "task_arithmetic",
        "models": [{"model": "/m/copy", "parameters": {"weight": 0.5}}, {"model": "/m/base"}],
    }
    rows[0]["note"] = "fitness on validation"
    assert quality.evolve_lines(rows)[1].endswith("task_arithmetic, weights copy 0.500.")
    report = {
        "rows": rows, "settings": TOY.as_dict(), "train_seconds": 1.0, "cached": True,
        "eval_seconds": 2.0, "command": "python scripts/quality.py", "machine": quality.machine(),
    }  # fmt: skip
    text = quality.to_markdown(report)
    assert "| base | base | – | 50.0 | 50.0 | 50.0 | 50.0 | **50.0** |" in text
    assert "evolve: not available" in text and "Command: `python scripts/quality.py`" in text


@pytest.mark.slow
def test_end_to_end(tmp_path: Path) -> None:
    report = quality.main(
        ["--workdir", str(tmp_path), "--no-evolve", "--out", str(tmp_path / "q.json")]
    )
    fine_tunes = [r for r in report["rows"] if r["kind"] == "fine-tune"]
    for r in fine_tunes:
        assert r["accuracy"][r["name"]] > 0.85
    assert json.loads((tmp_path / "q.json").read_text())["rows"] == report["rows"]
