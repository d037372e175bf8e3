"""Bounded work and finite parameters (issue 14): a recipe that would expand without bound,
or whose numbers cannot be computed in float32, is refused at validate/plan time with
``file:line: path: message`` and exit 2, never by running out of memory or writing NaN."""

from __future__ import annotations

import textwrap
import time
from pathlib import Path

from typer.testing import CliRunner

from merge.cli import app

runner = CliRunner()


def validate(tmp_path: Path, text: str) -> tuple[int, str]:
    recipe = tmp_path / "r.yaml"
    recipe.write_text(textwrap.dedent(text).lstrip("\n"), encoding="utf-8")
    result = runner.invoke(app, ["validate", str(recipe)])
    return result.exit_code, result.output.replace(str(recipe), "r.yaml")


def test_alias_bomb_is_counted_not_expanded(tmp_path: Path) -> None:
    levels = ["merge_method: linear", "a0: &a0 [" + ", ".join(["x"] * 10) + "]"]
    for i in range(1, 9):
        levels.append(f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 10) + "]")
    start = time.perf_counter()
    code, out = validate(tmp_path, "\n".join(levels) + "\n")
    assert time.perf_counter() - start < 0.5
    assert code == 2
    assert out.strip() == (
        "error: r.yaml:6: a4[9]: the recipe expands to more than 100,000 values "
        "(each alias counts as a copy of what it names)"
    )


def test_nesting_depth_is_bounded(tmp_path: Path) -> None:
    code, out = validate(tmp_path, "merge_method: linear\nx: " + "[" * 150 + "]" * 150 + "\n")
    assert code == 2
    assert out.strip() == "error: r.yaml:2: x[0][0][0]...: nested more than 100 levels deep"
    code, out = validate(tmp_path, "merge_method: linear\nx: " + "[" * 5000 + "]" * 5000 + "\n")
    assert code == 2
    assert out.strip() == "error: r.yaml: nested more than 100 levels deep"


def test_string_and_file_sizes_are_bounded(tmp_path: Path) -> None:
    code, out = validate(tmp_path, "merge_method: linear\nchat_template: " + "x" * 1_100_000)
    assert code == 2
    assert out.strip() == (
        "error: r.yaml:2: chat_template: a value of 1,100,000 characters (at most 1,048,576)"
    )
    code, out = validate(tmp_path, "merge_method: linear\n" + "#" * 9_000_000 + "\n")
    assert code == 2
    assert out.strip() == (
        "error: r.yaml: a recipe of 9,000,022 bytes (at most 8,388,608); is this the right file?"
    )
