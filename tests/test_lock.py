"""Lock files of local models: the format, the hash cache, locked runs and every bad input.

Each test copies two tiny checkpoints into ``tmp_path`` (``./base``, ``./ft``) so it may change
them, and names them in ``r.yaml``; its lock is ``r.lock``. Hub locks: ``test_lock_hub.py``.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from merge.build import hashing
from merge.build.lockfile import read_lock
from merge.cli import app

RECIPE = """merge_method: linear
models:
  - model: ./base
    parameters: {weight: 1}
  - model: ./ft
    parameters: {weight: 1}
"""
RECIPE_SHA = hashlib.sha256(RECIPE.encode()).hexdigest()


def cli(*args: str | Path) -> tuple[int, str, str]:
    result = CliRunner().invoke(app, [str(a) for a in args])
    return result.exit_code, result.stdout, result.stderr


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def recipe(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, llama_base: Path, llama_ft1: Path
) -> Path:
    shutil.copytree(llama_base, tmp_path / "base")
    shutil.copytree(llama_ft1, tmp_path / "ft")
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "r.yaml"
    path.write_text(RECIPE)
    return path


def fails(*args: str | Path) -> str:
    """Run the command: exit 2, nothing on stdout, no ``out`` (or temporary one); stderr."""
    code, stdout, stderr = cli(*args)
    assert (code, stdout) == (2, ""), stderr
    assert "Traceback" not in stderr
    assert not Path("out").exists() and not list(Path.cwd().glob(".out*"))
    return stderr


def line_of(text: str, needle: str) -> int:
    """The line (1-based) where the last ``needle`` starts in ``text``."""
    return text[: text.rindex(needle)].count("\n") + 1


def test_lock_format(recipe: Path, tmp_path: Path) -> None:
    code, stdout, stderr = cli("lock", recipe)
    assert code == 0, stderr
    assert stdout == "./base: added (local, 6 files)\n./ft: added (local, 6 files)\n"
    expected = [
        "# merge lock file for r.yaml: what each model resolved to.",
        "# Refresh with `merge lock --update r.yaml [MODEL ...]`; see what moved upstream with "
        "`merge outdated r.yaml`.",
        "version: 1",
        "tool: mergesmith 0.1.0",
        "recipe:",
        "  file: r.yaml",
        f"  sha256: {RECIPE_SHA}",
        "models:",
    ]
    for name in ("base", "ft"):
        expected += [f"- ref: ./{name}", "  source: local", "  files:"]
        for file in sorted((tmp_path / name).iterdir()):
            expected += [
                f"  - path: {file.name}",
                f"    size: {file.stat().st_size}",
                f"    sha256: {sha256(file)}",
            ]
    assert (tmp_path / "r.lock").read_text().splitlines() == expected
    assert cli("lock", recipe)[1] == "./base: kept (local, 6 files)\n./ft: kept (local, 6 files)\n"


def test_base_and_adapter_are_two_entries(recipe: Path, tmp_path: Path) -> None:
    adapter = tmp_path / "ad"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{}")
    (adapter / "adapter_model.safetensors").write_bytes(b"weights")
    recipe.write_text(RECIPE.replace("./ft\n", "./ft+./ad\n"))
    code, stdout, stderr = cli("lock", recipe)
    assert code == 0, stderr
    lock = read_lock(tmp_path / "r.lock", recipe)
    assert [m.ref for m in lock.models] == ["./ad", "./base", "./ft"]
    assert [f.path for f in lock.models[0].files] == [
        "adapter_config.json",
        "adapter_model.safetensors",
    ]
    assert lock.models[0].files[1].sha256 == hashlib.sha256(b"weights").hexdigest()
    code, stdout, _ = cli("lock", "--update", recipe, "./ft+./ad")
    assert stdout.splitlines() == [
        "./ad: unchanged (local, 2 files)",
        "./base: kept (local, 6 files)",
        "./ft: unchanged (local, 6 files)",
    ]


def test_plain_lock_keeps_entries_adds_and_removes(
    recipe: Path, tmp_path: Path, llama_ft2: Path
) -> None:
    assert cli("lock", recipe)[0] == 0
    shutil.copytree(llama_ft2, tmp_path / "ft2")
    (tmp_path / "base" / "extra.json").write_text("{}")  # kept as locked all the same
    recipe.write_text(RECIPE.replace("./ft\n", "./ft2\n"))
    code, stdout, _ = cli("lock", recipe)
    assert code == 0
    assert stdout.splitlines() == [
        "./base: kept (local, 6 files)",
        "./ft: removed",
        "./ft2: added (local, 6 files)",
    ]
    code, stdout, _ = cli("lock", "--update", recipe)
    assert stdout.splitlines()[0] == "./base: updated (local, 7 files)"


def test_second_lock_and_outdated_read_nothing(
    recipe: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The hash cache keys on (path, size, mtime): unchanged inputs are not read again, and a
    file changed in place is."""
    monkeypatch.setenv("MERGE_CACHE_DIR", str(tmp_path / "cache"))
    reads: list[str] = []
    real = hashing.digest

    def counting(path: Path) -> str:
        reads.append(Path(path).name)
        return real(path)

    monkeypatch.setattr(hashing, "digest", counting)
    assert cli("lock", recipe)[0] == 0
    assert len(reads) == 12  # 6 files in each folder, each read once
    reads.clear()
    assert cli("lock", "--update", recipe)[0] == 0
    assert cli("outdated", recipe)[0] == 0
    assert reads == []
    config = tmp_path / "ft" / "generation_config.json"
    config.write_text(config.read_text() + " ")
    code, stdout, _ = cli("outdated", recipe)
    assert reads == ["generation_config.json"]
    assert code == 1
    assert stdout.splitlines() == [
        "./base: as locked (local)",
        "./ft: the local directory changed (changed: generation_config.json)",
        f"1 of 2 models moved; lock them as they are now with `merge lock --update {recipe}` "
        "(all, or name the models)",
    ]


def test_two_locked_runs_are_byte_identical(recipe: Path, tmp_path: Path) -> None:
    assert cli("lock", recipe)[0] == 0
    outs = []
    for name in ("out1", "out2"):
        code, _, stderr = cli("run", "--locked", "-q", recipe, tmp_path / name)
        assert code == 0, stderr
        outs.append({p.name: sha256(p) for p in sorted((tmp_path / name).iterdir())})
    assert outs[0] == outs[1] and "model.safetensors" in outs[0]
    manifest = json.loads((tmp_path / "out1" / "merge-manifest.json").read_text())
    assert manifest["lock_sha256"] == sha256(tmp_path / "r.lock")
    lock = read_lock(tmp_path / "r.lock", recipe)
    assert manifest["inputs"] == [m.as_dict() for m in lock.models]


def test_locked_run_refusals(recipe: Path, tmp_path: Path) -> None:
    lock = tmp_path / "r.lock"
    assert fails("run", "--locked", recipe, "out") == (
        f"error: {lock}: no lock file for {recipe} (--locked needs one); "
        f"run `merge lock {recipe}` first\n"
    )
    assert cli("lock", recipe)[0] == 0
    text = lock.read_text()

    gen = tmp_path / "ft" / "generation_config.json"
    gen.write_text(gen.read_text() + " ")
    (tmp_path / "ft" / "extra.json").write_text("{}")
    (tmp_path / "base" / "tokenizer_config.json").unlink()
    assert fails("run", "--locked", recipe, "out") == (
        f"error: {lock}:{line_of(text, '- ref: ./base')}: models[0] (./base): content differs "
        "from the lock (removed: tokenizer_config.json); run `merge lock --update "
        f"{recipe} ./base` to lock it as it is now\n"
        f"error: {lock}:{line_of(text, '- ref: ./ft')}: models[1] (./ft): content differs from "
        "the lock (changed: generation_config.json; added: extra.json); run `merge lock "
        f"--update {recipe} ./ft` to lock it as it is now\n"
    )
    assert cli("lock", "--update", recipe)[0] == 0
    text = lock.read_text()

    recipe.write_text(RECIPE + "dtype: float32\n")
    changed = (
        f"{lock}:{line_of(text, RECIPE_SHA)}: recipe.sha256: {recipe} changed since it was "
        f"locked; run `merge lock {recipe}` to lock it as it is now"
    )
    assert fails("run", "--locked", recipe, "out") == f"error: {changed}\n"
    code, _, stderr = cli("run", recipe, "out1")  # without --locked: a warning
    assert code == 0 and stderr.splitlines()[0] == f"warning: {changed}"

    recipe.write_text(RECIPE)
    entry = text[text.index("- ref: ./ft") :]
    lock.write_text(text.replace(entry, ""))
    missing = f"{lock}: model './ft' is not in the lock; run `merge lock {recipe}` to add it"
    assert fails("run", "--locked", recipe, "out") == f"error: {missing}\n"
    code, _, stderr = cli("run", recipe, "out2")
    assert code == 0 and stderr.splitlines()[0] == f"warning: {missing}"


def test_lock_of_the_same_text_under_another_name(recipe: Path, tmp_path: Path) -> None:
    """An output's merge-recipe.yaml beside the lock of r.yaml: the content is what counts."""
    assert cli("lock", recipe)[0] == 0
    copy = tmp_path / "copy"
    copy.mkdir()
    shutil.copy(recipe, copy / "merge-recipe.yaml")
    shutil.copy(tmp_path / "r.lock", copy / "merge-recipe.lock")
    code, _, stderr = cli("run", "--locked", copy / "merge-recipe.yaml", tmp_path / "out")
    assert code == 0, stderr


def test_lock_for_another_recipe(recipe: Path, tmp_path: Path) -> None:
    other = tmp_path / "other.yaml"
    other.write_text(RECIPE + "# another recipe\n")
    assert cli("lock", other)[0] == 0
    shutil.copy(tmp_path / "other.lock", tmp_path / "r.lock")
    message = (
        f"error: {tmp_path / 'r.lock'}:6: recipe.file: this lock is for 'other.yaml', not "
        f"'r.yaml'; run `merge lock --update {recipe}` to replace it\n"
    )
    for args in (("run", recipe, "out"), ("lock", recipe), ("outdated", recipe)):
        assert fails(*args) == message
    assert cli("lock", "--update", recipe)[0] == 0  # replaces it


def test_lock_command_refusals(recipe: Path) -> None:
    assert fails("lock", recipe, "./ft") == (
        f"error: naming models (./ft) refreshes them: run `merge lock --update {recipe} ./ft`\n"
    )
    assert fails("lock", "--update", recipe, "./nope") == (
        f"error: {recipe}: './nope' is not a model of the recipe (its models: ./base, ./ft)\n"
    )
    assert not (recipe.parent / "r.lock").exists()
    assert fails("outdated", recipe.parent / "nope.yaml") == (
        f"error: {recipe.parent / 'nope.yaml'}: recipe not found\n"
    )


HUB_ENTRY = "- ref: org/a\n  source: hub\n  repo: org/a\n"
# (name, the text replaced, its replacement, the message after "r.lock:N: ", the needle of N)
BAD_LOCKS = [
    ("top-level field", "models:\n", "extra: 1\nmodels:\n",
     "extra: unknown field (allowed: version, tool, recipe, models)", "extra"),
    ("entry field", "  source: local\n", "  source: local\n  mirror: x\n",
     "models[0].mirror: unknown field (allowed: ref, source, files)", "  mirror"),
    ("file field", "    size: 172\n", "    size: 172\n    mode: 1\n",
     "models[0].files[0].mode: unknown field (allowed: path, size, sha256)", "    mode"),
    ("missing version", "version: 1\n", "",
     "missing field 'version'", "tool"),
    ("missing source", "  source: local\n", "",
     "models[0]: missing field 'source'", "- ref: ./base"),
    ("size as text", "    size: 172\n", "    size: '172'\n",
     "models[0].files[0].size: expected an integer, got '172'", "    size: '172'"),
    ("size as bool", "    size: 172\n", "    size: true\n",
     "models[0].files[0].size: expected an integer, got True", "    size: true"),
    ("negative size", "    size: 172\n", "    size: -1\n",
     "models[0].files[0].size: expected a size >= 0, got -1", "    size: -1"),
    ("short sha256", f"  sha256: {RECIPE_SHA}\n", "  sha256: abc\n",
     "recipe.sha256: expected a sha256 (64 lowercase hex digits), got 'abc'", "  sha256: abc"),
    ("version 2", "version: 1\n", "version: 2\n",
     "version: unsupported lock version 2 (this merge reads version 1)", "version: 2"),
    ("stage source", "  source: local\n", "  source: stage\n",
     "models[0].source: expected 'hub' or 'local', got 'stage'", "  source: stage"),
    ("same ref twice", "- ref: ./ft\n", "- ref: ./base\n",
     "models[1].ref: './base' is locked twice (first on line 9)", "- ref: ./base"),
    ("bad commit", "- ref: ./base\n  source: local\n", HUB_ENTRY + "  commit: abc\n",
     "models[0].commit: expected a commit sha (40 lowercase hex digits), got 'abc'", "  commit"),
    ("missing commit", "- ref: ./base\n  source: local\n", HUB_ENTRY,
     "models[0]: missing field 'commit'", "- ref: org/a"),
    ("ref against repo", "- ref: ./base\n  source: local\n",
     HUB_ENTRY.replace("repo: org/a", "repo: org/b") + "  commit: " + "a" * 40 + "\n",
     "models[0].ref: 'org/a' does not match repo and revision ('org/b')", "- ref: org/a"),
]  # fmt: skip


@pytest.mark.parametrize(
    "old, new, message, needle", [c[1:] for c in BAD_LOCKS], ids=[c[0] for c in BAD_LOCKS]
)
def test_bad_lock(recipe: Path, old: str, new: str, message: str, needle: str) -> None:
    """Every command that reads a lock refuses a bad one: one line naming the lock's line and
    entry, exit 2, no output, the lock untouched."""
    assert cli("lock", recipe)[0] == 0
    lock = recipe.parent / "r.lock"
    text = lock.read_text()
    assert old in text
    bad = text.replace(old, new, 1)
    lock.write_text(bad)
    step = f"fix it or rewrite it with `merge lock --update {recipe}`"
    expected = f"error: {lock}:{line_of(bad, needle)}: {message}; {step}\n"
    for args in (("run", recipe, "out"), ("lock", recipe), ("outdated", recipe)):
        assert fails(*args) == expected, args
    assert lock.read_text() == bad


@pytest.mark.parametrize(
    "text, message",
    [
        ("", "the lock file is empty"),
        ("version: 1\n---\nversion: 1\n", "a lock file is one YAML document"),
        ("version: [1\n", None),
        ("- 1\n", None),
    ],
    ids=["empty", "two documents", "not YAML", "not a mapping"],
)
def test_unreadable_lock(recipe: Path, text: str, message: str | None) -> None:
    lock = recipe.parent / "r.lock"
    lock.write_text(text)
    step = f"fix it or rewrite it with `merge lock --update {recipe}`"
    got = fails("run", "--locked", recipe, "out")
    if message is None:  # PyYAML's words, with the line
        message = {
            "version: [1\n": "2: not valid YAML: while parsing a flow sequence expected ',' "
            "or ']', but got '<stream end>'",
            "- 1\n": "1: expected a mapping, got [1]",
        }[text]
        assert got == f"error: {lock}:{message}; {step}\n"
    else:
        assert got == f"error: {lock}: {message}; {step}\n"


def test_lock_of_a_missing_folder_writes_nothing(recipe: Path, tmp_path: Path) -> None:
    recipe.write_text(RECIPE.replace("./ft\n", "./gone\n"))
    assert fails("lock", recipe) == (
        f"error: {recipe}:5: models[1].model: model './gone': local path not found "
        f"(looked in CWD and {tmp_path})\n"
    )
    assert not (tmp_path / "r.lock").exists()


def test_a_lock_of_another_version_warns(recipe: Path, tmp_path: Path) -> None:
    assert cli("lock", recipe)[0] == 0
    lock = tmp_path / "r.lock"
    lock.write_text(lock.read_text().replace("tool: mergesmith 0.1.0", "tool: mergesmith 0.0.9"))
    code, _, stderr = cli("run", "--locked", recipe, "out")
    assert code == 0
    assert stderr.splitlines()[0] == (
        f"warning: {lock}:4: tool: written by mergesmith 0.0.9, this is mergesmith 0.1.0; the "
        "output may differ from that version's"
    )
