"""The README stays true: generated method table, every command, every recipe key."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

from typer.testing import CliRunner

from merge.cli import app
from merge.methods import METHODS
from merge.methods.docs import methods_table
from merge.moe.schema import ExpertEntry, MoeSchema
from merge.recipe.schema import ModelEntry, ModuleEntry, RecipeSchema, Slice, SliceSource

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text(encoding="utf-8")
WIDE = {"COLUMNS": "240"}  # no option name cut short in --help


def test_method_table_is_generated_from_the_registry() -> None:
    assert methods_table() in README, "run: python scripts/gen_readme_methods.py"
    for name in METHODS:
        assert f"`{name}`" in methods_table()


def test_generator_check_mode_detects_drift(tmp_path: Path) -> None:
    script = ROOT / "scripts" / "gen_readme_methods.py"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}  # this checkout's merge, not an installed one
    ok = subprocess.run([sys.executable, str(script), "--check"], capture_output=True, env=env)
    assert ok.returncode == 0, ok.stdout
    from merge.methods.docs import replace_table

    stale = README.replace("| [`ties`]", "| [`tiez`]")
    assert replace_table(stale) == README


def test_every_command_is_documented() -> None:
    """Each command's usage line in the README is the one its --help prints."""
    commands = [c.name or c.callback.__name__ for c in app.registered_commands]  # type: ignore[union-attr]
    documented = re.findall(r"^\| `merge ([a-z]+) \[OPTIONS\]", README, re.M)
    assert sorted(commands) == sorted(documented) and len(commands) >= 5
    runner = CliRunner()
    for name in commands:
        text = runner.invoke(app, [name, "--help"], prog_name="merge", env=WIDE).stdout
        usage = re.search(r"Usage: (.*?)\s*$", text, re.M)
        assert usage is not None and f"| `{usage.group(1)}` |" in README, name
    for option in ("--overwrite", "--seed", "--out-shard-size", "--quiet", "--json", "--version"):
        assert option in README, option


def test_every_option_is_documented() -> None:
    """Every option name that ``merge run --help`` lists appears in the README."""
    text = CliRunner().invoke(app, ["run", "--help"], prog_name="merge", env=WIDE).stdout
    names = set(re.findall(r"(?<=[\s,│])(--?[a-z][\w-]*)", text)) - {"--help"}
    assert len(names) > 40
    missing = sorted(n for n in names if not re.search(rf"[`/]{re.escape(n)}[ `/,=]", README))
    assert not missing, missing


def test_every_recipe_key_is_documented() -> None:
    for model in (
        RecipeSchema,
        ModelEntry,
        ModuleEntry,
        Slice,
        SliceSource,
        MoeSchema,
        ExpertEntry,
    ):
        for key in model.model_fields:
            pattern = rf"(`|\{{|, ){key}(`|:)"
            assert re.search(pattern, README), f"README does not mention recipe key {key}"


def test_quick_start_and_test_command_come_first() -> None:
    blocks = re.findall(r"```sh\n(.*?)\n```", README, flags=re.S)
    venv, cpu_torch = blocks[0].splitlines()
    assert venv == "python3 -m venv .venv && . .venv/bin/activate"
    assert cpu_torch == "pip install torch --index-url https://download.pytorch.org/whl/cpu"
    assert blocks[1] == "pip install -e . && merge run recipes/quickstart.yaml out/"
    assert blocks[2] == "pip install -e '.[dev]' && python -m pytest -q"
    ci = (ROOT / ".ci" / "run").read_text()
    assert "\npython -m pytest -q\n" in ci
