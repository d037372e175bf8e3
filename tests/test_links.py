"""Symbolic links in input folders: refused where they leave the model folder (or its Hub
cache repo folder), for every file the output takes and every weight file."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from merge.checkpoint import Checkpoint
from merge.cli import app

runner = CliRunner()


def _recipe(tmp_path: Path, *models: Path) -> Path:
    recipe = {
        "merge_method": "linear",
        "models": [{"model": str(m), "parameters": {"weight": 1.0}} for m in models],
    }
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


def _linked(tmp_path: Path, llama_base: Path, name: str) -> tuple[Path, Path, Path]:
    """A copy of ``llama_base`` whose ``name`` is a link to a file outside it."""
    donor = Path(shutil.copytree(llama_base, tmp_path / "donor"))
    secret = tmp_path / "secret.txt"
    secret.write_text("root:x:0:0:root:/root:/bin/bash\n")
    link = donor / name
    if link.exists():
        link.unlink()
    link.symlink_to(secret)
    return donor, link, secret


def _fails(tmp_path: Path, *args: str | Path) -> str:
    out = tmp_path / "out"
    result = runner.invoke(app, [str(a) for a in args])
    assert result.exit_code == 2, result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    assert not out.exists()
    assert not list(tmp_path.glob(".out.*"))
    return result.stderr.strip()


@pytest.mark.parametrize(
    "name",
    [
        "config.json",
        "generation_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "chat_template.jinja",
        "preprocessor_config.json",
        "README.md",
        "model.safetensors",
    ],
)
def test_link_outside_refused_by_validate_and_run(
    tmp_path: Path, llama_base: Path, llama_ft1: Path, name: str
) -> None:
    donor, link, secret = _linked(tmp_path, llama_base, name)
    recipe = _recipe(tmp_path, donor, llama_ft1)
    expected = (
        f"error: {recipe}:3: models[0].model: model '{donor}' ({link}): is a symbolic link "
        f"to '{secret}', outside the model folder; refused (copy the file into the folder)"
    )
    assert _fails(tmp_path, "validate", recipe) == expected
    assert _fails(tmp_path, "run", recipe, tmp_path / "out") == expected


def test_shard_linked_outside_refused(tmp_path: Path, llama_sharded: Path) -> None:
    donor = Path(shutil.copytree(llama_sharded, tmp_path / "donor"))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    shard = sorted(donor.glob("model-*.safetensors"))[0]
    shutil.move(shard, elsewhere / shard.name)
    shard.symlink_to(elsewhere / shard.name)
    with pytest.raises(Exception) as info:
        Checkpoint.open(donor, "m")
    assert str(info.value) == (
        f"model 'm' ({shard}): is a symbolic link to '{elsewhere / shard.name}', outside the "
        "model folder; refused (copy the file into the folder)"
    )


def test_links_inside_the_folder_and_hub_cache_layout_allowed(
    tmp_path: Path, llama_base: Path, llama_ft1: Path
) -> None:
    """A file linked to another file of its folder, and a cache snapshot whose files link into
    the repo's ``blobs/`` (as huggingface_hub lays them out), are read and copied."""
    repo = tmp_path / "hub" / "models--org--base"
    snapshot = repo / "snapshots" / ("a" * 40)
    blobs = repo / "blobs"
    blobs.mkdir(parents=True)
    snapshot.mkdir(parents=True)
    for f in sorted(llama_base.iterdir()):
        blob = blobs / f"blob-{f.name}"
        shutil.copyfile(f, blob)
        os.symlink(os.path.join("..", "..", "blobs", blob.name), snapshot / f.name)
    (snapshot / "chat_template.jinja").unlink()
    (snapshot / "chat_template.jinja").symlink_to("generation_config.json")
    out = tmp_path / "out"
    recipe = _recipe(tmp_path, snapshot, llama_ft1)
    result = runner.invoke(app, ["run", str(recipe), str(out)])
    assert result.exit_code == 0, result.stderr
    gen = (llama_base / "generation_config.json").read_bytes()
    assert (out / "generation_config.json").read_bytes() == gen
    assert not (out / "generation_config.json").is_symlink()


def test_every_transformers_load_passes_trust_remote_code() -> None:
    """Each ``from_pretrained``/``from_config`` call in ``merge/`` names ``trust_remote_code``
    (from ``merge.settings``, False unless ``--trust-remote-code``): never transformers'
    default, never a prompt."""
    import ast

    calls = []
    for path in sorted(Path("merge").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
                if node.func.attr in ("from_pretrained", "from_config"):
                    keywords = {k.arg for k in node.keywords}
                    calls.append((f"{path}:{node.lineno}", "trust_remote_code" in keywords))
    assert calls, "no transformers loads found"
    assert [where for where, ok in calls if not ok] == []
