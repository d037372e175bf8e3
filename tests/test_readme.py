"""The README stays true: generated method table, every command, every recipe key."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from merge.cli import app
from merge.methods import METHODS
from merge.methods.docs import methods_table
from merge.moe.schema import ExpertEntry, MoeSchema
from merge.recipe.schema import ModelEntry, ModuleEntry, RecipeSchema, Slice, SliceSource

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text(encoding="utf-8")


def test_method_table_is_generated_from_the_registry() -> None:
    assert methods_table() in README, "run: python scripts/gen_readme_methods.py"
    for name in METHODS:
        assert f"`{name}`" in methods_table()


def test_generator_check_mode_detects_drift(tmp_path: Path) -> None:
    script = ROOT / "scripts" / "gen_readme_methods.py"
    ok = subprocess.run([sys.executable, str(script), "--check"], capture_output=True)
    assert ok.returncode == 0, ok.stdout
    from merge.methods.docs import replace_table

    stale = README.replace("| [`ties`]", "| [`tiez`]")
    assert replace_table(stale) == README


def test_every_command_is_documented() -> None:
    commands = [c.name or c.callback.__name__ for c in app.registered_commands]  # type: ignore[union-attr]
    assert sorted(commands) == ["methods", "plan", "run", "validate"]
    for name in commands:
        usage = "[NAME]" if name == "methods" else "RECIPE"
        assert f"`merge {name} {usage}" in README, name
    for option in ("--overwrite", "--seed", "--out-shard-size", "--quiet", "--json", "--version"):
        assert option in README, option


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
