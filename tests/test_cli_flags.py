"""Command-line options in mergekit's terms: shard sizes in mergekit's units."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml
from typer.testing import CliRunner

from merge.cli import app

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
