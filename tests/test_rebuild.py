"""``merge rebuild``: the CI story end to end, through the real huggingface_hub client against
tests/hubserver.py. First run locks and builds; an unchanged rerun builds nothing; a push
upstream is seen by ``merge outdated``, and rebuild updates the lock and rebuilds; a corrupted
output fails ``merge verify`` and is rebuilt; every error is one line with exit 2."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from torch.testing import assert_close
from typer.testing import CliRunner

from hubserver import HubServer, commit_sha, use_endpoint
from merge.build.lockfile import read_lock
from merge.build.manifest import MANIFEST_NAME
from merge.cli import app
from tiny import assert_loads_and_generates, load_state


def cli(*args: str | Path) -> tuple[int, str, str]:
    result = CliRunner().invoke(app, [str(a) for a in args])
    return result.exit_code, result.stdout, result.stderr


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def stamps(out: Path) -> dict[str, tuple[int, int]]:
    """Each output file's inode and mtime: unchanged when nothing was rebuilt."""
    return {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in sorted(out.iterdir())}


@pytest.fixture
def hub(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, llama_base: Path, llama_ft1: Path
) -> Iterator[HubServer]:
    with HubServer({"org/a": {"main": llama_base}, "org/b": {"main": llama_ft1}}) as server:
        use_endpoint(monkeypatch, server.endpoint, tmp_path / "hub-cache")
        monkeypatch.chdir(tmp_path)
        yield server


@pytest.fixture
def recipe(tmp_path: Path) -> Path:
    path = tmp_path / "ci.yaml"
    path.write_text(
        "merge_method: linear\nmodels:\n"
        "  - model: org/a\n    parameters: {weight: 0.5}\n"
        "  - model: org/b\n    parameters: {weight: 0.5}\n"
        "dtype: float32\n"
    )
    return path


def mean_of(out: Path, *inputs: Path) -> None:
    states = [load_state(d) for d in inputs]
    for name, tensor in load_state(out).items():
        assert_close(tensor, sum(0.5 * s[name] for s in states), msg=name)


def test_rebuild_story(
    hub: HubServer,
    recipe: Path,
    tmp_path: Path,
    llama_base: Path,
    llama_ft1: Path,
    llama_ft2: Path,
) -> None:
    out, lock = tmp_path / "out", tmp_path / "ci.lock"
    a, b = commit_sha("org/a", "main"), commit_sha("org/b", "main")

    # First run in CI: no lock, no output. Lock, build from the lock, verify.
    code, stdout, stderr = cli("rebuild", "-q", recipe, out)
    assert code == 0, stderr
    files = len(json.loads((out / MANIFEST_NAME).read_text())["files"])
    assert stdout == f"rebuilt {out} (no lock yet: wrote {lock}); {files} files verify\n"
    assert [m.commit for m in read_lock(lock, recipe).models] == [a, b]
    mean_of(out, llama_base, llama_ft1)
    manifest = json.loads((out / MANIFEST_NAME).read_text())
    assert manifest["lock_sha256"] == sha256(lock)

    # Nothing moved: nothing is built, the output is only verified.
    before, weights_served = stamps(out), hub.bytes_served(".safetensors")
    code, stdout, stderr = cli("rebuild", recipe, out)
    assert code == 0, stderr
    assert stdout == f"{out} is up to date: no input moved and its {files} files verify\n"
    assert stamps(out) == before
    assert hub.bytes_served(".safetensors") == weights_served  # no download either

    # Upstream moves: outdated says so, rebuild updates the lock and rebuilds from it.
    new = hub.push("org/b", llama_ft2)
    code, stdout, _ = cli("outdated", recipe)
    assert code == 1 and "org/b: the default branch moved" in stdout
    assert "(changed: model.safetensors)" in stdout
    code, stdout, stderr = cli("rebuild", recipe, out)
    assert code == 0, stderr
    moved = f"org/b: the default branch moved from {b[:12]} to {new[:12]}"
    assert stdout == (
        f"rebuilt {out} ({moved} (changed: model.safetensors)); lock updated (1 entry); "
        f"{files} files verify\n"
    )
    assert f"moved: {moved}" in stderr and "lock: org/b: updated" in stderr
    assert [m.commit for m in read_lock(lock, recipe).models] == [a, new]
    mean_of(out, llama_base, llama_ft2)
    assert json.loads((out / MANIFEST_NAME).read_text())["lock_sha256"] == sha256(lock)
    assert cli("verify", out)[0] == 0
    assert cli("outdated", recipe)[0] == 0
    assert_loads_and_generates(out)

    # A corrupted output fails verify, naming the file, and the next rebuild repairs it.
    shard = out / "model.safetensors"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    code, stdout, _ = cli("verify", out)
    assert (code, stdout) == (
        1,
        f"{out}/model.safetensors: content differs from the manifest (sha256)\n",
    )
    code, stdout, stderr = cli("rebuild", recipe, out)
    assert code == 0, stderr
    assert stdout.startswith(f"rebuilt {out} ({out} fails verify (model.safetensors: content")
    assert cli("verify", out)[0] == 0
    mean_of(out, llama_base, llama_ft2)


def test_an_edited_recipe_is_relocked_and_rebuilt(
    hub: HubServer, recipe: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    assert cli("rebuild", "-q", recipe, out)[0] == 0
    recipe.write_text(recipe.read_text().replace("dtype: float32", "dtype: bfloat16"))
    code, stdout, stderr = cli("rebuild", "-q", recipe, out)
    assert code == 0, stderr
    assert stdout.startswith(f"rebuilt {out} ({recipe} changed since it was locked)")
    assert read_lock(tmp_path / "ci.lock", recipe).recipe_sha256 == sha256(recipe)
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"


def test_a_missing_output_is_built_from_the_lock(
    hub: HubServer, recipe: Path, tmp_path: Path
) -> None:
    assert cli("rebuild", "-q", recipe, tmp_path / "out")[0] == 0
    lock_text = (tmp_path / "ci.lock").read_text()
    code, stdout, stderr = cli("rebuild", "-q", recipe, tmp_path / "elsewhere")
    assert code == 0, stderr
    assert stdout.startswith(
        f"rebuilt {tmp_path / 'elsewhere'} ({tmp_path / 'elsewhere'} does not exist)"
    )
    assert (tmp_path / "ci.lock").read_text() == lock_text  # nothing moved: the lock stays
    assert (tmp_path / "out" / "model.safetensors").read_bytes() == (
        tmp_path / "elsewhere" / "model.safetensors"
    ).read_bytes()


def test_rebuild_errors(hub: HubServer, recipe: Path, tmp_path: Path) -> None:
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    code, stdout, stderr = cli("rebuild", "-q", recipe, foreign)
    assert (code, stdout) == (2, "")
    assert stderr == (
        f"error: {foreign} exists and is not a merge output (no {MANIFEST_NAME}); rebuild "
        "never replaces it: remove it or choose another OUT\n"
    )
    assert [p.name for p in foreign.iterdir()] == ["notes.txt"]

    missing = tmp_path / "nope.yaml"
    assert cli("rebuild", missing, tmp_path / "o") == (
        2,
        "",
        f"error: {missing}: recipe not found\n",
    )

    unknown = tmp_path / "unknown.yaml"
    unknown.write_text(recipe.read_text().replace("org/b", "org/zz"))
    code, _, stderr = cli("rebuild", "-q", unknown, tmp_path / "o")
    assert code == 2 and stderr.startswith("error: ") and "org/zz" in stderr
    assert "repo not found" in stderr
    assert not (tmp_path / "o").exists() and not (tmp_path / "unknown.lock").exists()
