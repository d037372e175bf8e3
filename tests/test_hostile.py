"""The hostile corpus (issue: reliability): every recipe in ``tests/data/hostile/recipes`` and
every corrupted checkpoint in ``tests/data/hostile/checkpoints`` gives its expected exit code and
exactly one ``error:`` line (or its expected warnings), never a traceback, leaves no output or
temporary sibling behind, and leaves its inputs byte for byte as they were."""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
from typer.testing import CliRunner

from hostile import CORPUS, Case, corrupt, read_checkpoint_case, read_recipe_case, substitute
from merge.cli import app

runner = CliRunner()
RECIPES = sorted((CORPUS / "recipes").glob("*.yaml"))
CHECKPOINTS = sorted((CORPUS / "checkpoints").glob("*.yaml"))
DEFAULT_RECIPE = {
    "merge_method": "linear",
    "models": [
        {"model": "@ckpt", "parameters": {"weight": 1.0}},
        {"model": "@ft1", "parameters": {"weight": 1.0}},
    ],
}


@pytest.fixture
def places(
    tmp_path: Path, llama_base: Path, llama_ft1: Path, llama_ft2: Path, llama_sharded: Path
) -> dict[str, Path | str]:
    return {
        "base": llama_base,
        "ft1": llama_ft1,
        "ft2": llama_ft2,
        "sharded": llama_sharded,
        "tmp": tmp_path,
        "out": tmp_path / "out",
    }


def _digest(folders: list[Path]) -> dict[str, str]:
    seen = {}
    for folder in folders:
        for f in sorted(folder.rglob("*")):
            if f.is_symlink():
                seen[str(f)] = "->" + str(f.readlink())
            elif f.is_file():
                seen[str(f)] = hashlib.sha256(f.read_bytes()).hexdigest()
    return seen


def check(
    case: Case,
    recipe: Path,
    places: dict[str, Path | str],
    inputs: list[Path],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    tmp, out = Path(places["tmp"]), Path(places["out"])
    args = [case.command, str(recipe)]
    if case.command == "run":
        args.append(substitute(case.out, places))
        if not case.warnings:  # --quiet hides warnings too
            args.append("--quiet")
    args += [substitute(a, places) for a in case.args]
    if case.cwd:
        cwd = Path(substitute(case.cwd, places))
        cwd.mkdir(parents=True, exist_ok=True)
        monkeypatch.chdir(cwd)
    target = Path(substitute(case.out, places))
    existed = os.path.lexists(target)  # False, not an error, for a name too long
    before = _digest(inputs)
    result = runner.invoke(app, args)
    stderr = result.stderr
    assert "Traceback" not in stderr + result.stdout, stderr
    assert result.exit_code == case.exit, (result.exit_code, stderr, result.exception)
    lines = [line for line in stderr.strip().splitlines() if not line.startswith("wrote ")]
    errors = [line for line in lines if line.startswith("error: ")]
    warnings = [line for line in lines if line.startswith("warning: ")]
    assert len(errors) + len(warnings) == len(lines), stderr
    escaped = {k: re.escape(str(v)) for k, v in places.items()}
    if case.exit == 2:
        assert len(errors) == 1, stderr
        assert case.error is not None, f"{case.name}: no expect-error"
        pattern = substitute(case.error, escaped)
        assert re.search(pattern, errors[0].removeprefix("error: ")), (pattern, errors[0])
    else:
        assert errors == [], stderr
    for expected in case.warnings:
        pattern = substitute(expected, escaped)
        assert any(re.search(pattern, w.removeprefix("warning: ")) for w in warnings), (
            pattern,
            stderr,
        )
    assert len(warnings) == len(case.warnings), stderr
    if case.exit != 0:
        assert not out.exists()
        assert existed or not os.path.lexists(target), f"{target} was made"
        left = list(tmp.rglob(".out.*"))
        if target.name not in ("", ".", ".."):
            left += target.parent.glob(f".{target.name[:200]}*")
        assert not left, left
    assert _digest(inputs) == before, "an input changed"
    for path in case.must_not_exist:
        assert not Path(substitute(path, places)).exists(), f"{path}: code from a model ran"


def _params(paths: list[Path], read: Callable[[Path], tuple[Case, Any]]) -> list[Any]:
    """One param per case; a case with ``xfail`` is a strict xfail (it must keep failing)."""
    out = []
    for path in paths:
        reason = read(path)[0].xfail
        marks = [pytest.mark.xfail(strict=True, reason=reason)] if reason else []
        out.append(pytest.param(path, id=path.stem, marks=marks))
    return out


@pytest.mark.parametrize("path", _params(RECIPES, read_recipe_case))
def test_hostile_recipe(
    path: Path, places: dict[str, Path | str], monkeypatch: pytest.MonkeyPatch
) -> None:
    case, text = read_recipe_case(path)
    recipe = Path(places["tmp"]) / "recipe.yaml"
    recipe.write_text(substitute(text, places), encoding="utf-8")
    inputs = [Path(places[k]) for k in ("base", "ft1", "ft2", "sharded")]
    check(case, recipe, places, inputs, monkeypatch)


@pytest.mark.parametrize("path", _params(CHECKPOINTS, read_checkpoint_case))
def test_hostile_checkpoint(
    path: Path, places: dict[str, Path | str], monkeypatch: pytest.MonkeyPatch
) -> None:
    case, spec = read_checkpoint_case(path)
    tmp = Path(places["tmp"])
    source = Path(places[spec.get("from", "base")])
    ckpt = corrupt(source, tmp / "ckpt", spec.get("mutations", []), tmp)
    places["ckpt"] = ckpt
    doc = spec.get("recipe", DEFAULT_RECIPE)
    recipe = tmp / "recipe.yaml"
    recipe.write_text(substitute(yaml.safe_dump(doc, sort_keys=False), places), encoding="utf-8")
    inputs = [ckpt] + [Path(places[k]) for k in ("base", "ft1", "ft2", "sharded")]
    check(case, recipe, places, inputs, monkeypatch)


def test_the_corpus_is_big_enough() -> None:
    assert len(RECIPES) >= 60 and len(CHECKPOINTS) >= 25
