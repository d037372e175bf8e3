"""Locks of Hub models, through the real huggingface_hub client against tests/hubserver.py.

The story of the issue: lock two Hub models (metadata only, no weight downloaded), run locked,
push a new commit upstream, see ``merge outdated`` exit 1 naming the repo and the file, see a
plain run still use the locked commit, ``merge lock --update``, run again: the output follows.
"""

from __future__ import annotations

import hashlib
import json
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
from torch.testing import assert_close
from typer.testing import CliRunner

from hubserver import HubServer, commit_sha, use_endpoint
from merge import api
from merge.build.lockfile import read_lock
from merge.cli import app
from tiny import load_state

DNS_ERROR = f"ConnectError: [Errno {socket.EAI_NONAME}] Name or service not known"
STEP = "download it once online, use a local path, or set HF_HUB_OFFLINE=1 to use only the cache"


def cli(*args: str | Path) -> tuple[int, str, str]:
    result = CliRunner().invoke(app, [str(a) for a in args])
    return result.exit_code, result.stdout, result.stderr


@pytest.fixture
def hub(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, llama_base: Path, llama_ft1: Path
) -> Iterator[HubServer]:
    """org/a (main: llama_base) and org/b (main: llama_ft1, v1: llama_base); online env."""
    repos = {"org/a": {"main": llama_base}, "org/b": {"main": llama_ft1, "v1": llama_base}}
    with HubServer(repos) as server:
        use_endpoint(monkeypatch, server.endpoint, tmp_path / "hub-cache")
        monkeypatch.chdir(tmp_path)
        yield server


def recipe(folder: Path, *models: str, name: str = "hub.yaml") -> Path:
    """A linear recipe; model i is named on line 3 + 2 * i."""
    lines = ["merge_method: linear", "models:"]
    for model in models:
        lines += [f"  - model: {model}", "    parameters: {weight: 1}"]
    path = folder / name
    path.write_text("\n".join(lines) + "\n")
    return path


def entry_line(lock: Path, ref: str) -> int:
    return lock.read_text().splitlines().index(f"- ref: {ref}") + 1


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def hashes(out: Path) -> dict[str, str]:
    return {p.name: sha256(p) for p in sorted(out.iterdir())}


def average(out: Path, *inputs: Path) -> None:
    states = [load_state(d) for d in inputs]
    got = load_state(out)
    for name, tensor in got.items():
        assert_close(tensor, sum(s[name] for s in states) / len(states), msg=name)


def test_lock_run_push_outdated_update(
    hub: HubServer, tmp_path: Path, llama_base: Path, llama_ft1: Path, llama_ft2: Path
) -> None:
    path = recipe(tmp_path, "org/a", "org/b")
    a, b = commit_sha("org/a", "main"), commit_sha("org/b", "main")

    code, stdout, stderr = cli("lock", path)
    assert code == 0, stderr
    assert stdout.splitlines() == [
        f"org/a: added (commit {a[:12]}, 6 files)",
        f"org/b: added (commit {b[:12]}, 6 files)",
    ]
    assert stderr == f"wrote {tmp_path / 'hub.lock'}\n"
    assert "model.safetensors" not in hub.fetched()  # weights described by metadata only
    lock = read_lock(tmp_path / "hub.lock", path)
    assert [(m.ref, m.repo, m.revision, m.commit) for m in lock.models] == [
        ("org/a", "org/a", None, a),
        ("org/b", "org/b", None, b),
    ]
    weights = lock.models[1].file_map()["model.safetensors"]
    assert weights.sha256 == sha256(llama_ft1 / "model.safetensors")
    assert weights.size == (llama_ft1 / "model.safetensors").stat().st_size

    code, _, stderr = cli("run", "--locked", "-q", path, tmp_path / "out1")
    assert code == 0, stderr
    average(tmp_path / "out1", llama_base, llama_ft1)
    manifest = json.loads((tmp_path / "out1" / "merge-manifest.json").read_text())
    assert manifest["lock_sha256"] == sha256(tmp_path / "hub.lock")
    assert [i for i in manifest["inputs"]] == [m.as_dict() for m in lock.models]

    new = hub.push("org/b", llama_ft2)
    code, stdout, stderr = cli("outdated", path)
    assert code == 1, stderr
    assert stdout.splitlines() == [
        f"org/a: as locked (commit {a[:12]})",
        f"org/b: the default branch moved from {b[:12]} to {new[:12]} (changed: model.safetensors)",
        f"1 of 2 models moved; lock them as they are now with `merge lock --update {path}` "
        "(all, or name the models)",
    ]
    code, stdout, _ = cli("outdated", "--json", path)
    report = json.loads(stdout)
    assert code == 1 and report["moved"] is True
    assert report["models"][1] == {
        "ref": "org/b",
        "source": "hub",
        "repo": "org/b",
        "revision": None,
        "old_commit": b,
        "new_commit": new,
        "moved": True,
        "changed": ["model.safetensors"],
        "added": [],
        "removed": [],
    }
    assert report["models"][0]["moved"] is False

    # Without --locked the lock still pins org/b, in every phase: the same bytes as before.
    assert api.plan(path).models["org/b"].directory.name == b
    code, _, stderr = cli("run", "-q", path, tmp_path / "pinned")
    assert code == 0, stderr
    assert hashes(tmp_path / "pinned") == hashes(tmp_path / "out1")

    code, stdout, stderr = cli("lock", "--update", path, "org/b")
    assert code == 0, stderr
    assert stdout.splitlines() == [
        f"org/a: kept (commit {a[:12]}, 6 files)",
        f"org/b: updated (commit {b[:12]} -> {new[:12]}, 6 files)",
    ]
    assert cli("outdated", path)[0] == 0

    code, _, stderr = cli("run", "--locked", "-q", path, tmp_path / "out2")
    assert code == 0, stderr
    average(tmp_path / "out2", llama_base, llama_ft2)
    assert sha256(tmp_path / "out2" / "model.safetensors") != sha256(
        tmp_path / "out1" / "model.safetensors"
    )


def test_revision_and_adapter_sides_are_entries(hub: HubServer, tmp_path: Path) -> None:
    """A named revision is locked with it; ``--update REPO`` refreshes every revision."""
    path = recipe(tmp_path, "org/b@v1", "org/a")
    assert cli("lock", path)[0] == 0
    lock = read_lock(tmp_path / "hub.lock", path)
    assert [(m.ref, m.revision, m.commit) for m in lock.models] == [
        ("org/a", None, commit_sha("org/a", "main")),
        ("org/b@v1", "v1", commit_sha("org/b", "v1")),
    ]
    text = (tmp_path / "hub.lock").read_text()
    assert "  revision: v1\n  commit: " in text  # the fixed key order of InputId.as_dict
    code, stdout, _ = cli("lock", "--update", path, "org/b")
    assert code == 0 and stdout.splitlines()[1] == (
        f"org/b@v1: unchanged (commit {commit_sha('org/b', 'v1')[:12]}, 6 files)"
    )


def test_offline_lock_uses_the_cache(
    hub: HubServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With HF_HUB_OFFLINE a lock records the cached snapshots, with the same entries."""
    path = recipe(tmp_path, "org/a", "org/b")
    assert cli("run", "-q", path, tmp_path / "out")[0] == 0  # downloads into the cache
    assert cli("lock", path)[0] == 0
    online = (tmp_path / "hub.lock").read_text()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    seen = len(hub.requests)
    code, _, stderr = cli("lock", "--update", path)
    assert code == 0, stderr
    assert len(hub.requests) == seen
    assert (tmp_path / "hub.lock").read_text() == online


def test_outdated_errors(hub: HubServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = recipe(tmp_path, "org/a", "org/b")
    code, stdout, stderr = cli("outdated", path)
    lock = tmp_path / "hub.lock"
    assert (code, stdout) == (2, "")
    assert stderr == f"error: {lock}: no lock file for {path}; run `merge lock {path}`\n"
    assert cli("lock", path)[0] == 0
    text = lock.read_text()
    lock.write_text(
        text.replace("repo: org/b", "repo: org/gone").replace("ref: org/b", "ref: org/gone")
    )
    code, stdout, stderr = cli("outdated", path)
    login = "log in with `hf auth login` (or `huggingface-cli login`) or set HF_TOKEN"
    assert (code, stdout) == (2, "")
    line = entry_line(lock, "org/gone")
    assert stderr == (
        f"error: {lock}:{line}: models[1] (org/gone): repo not found on the Hub "
        f"(if it is private, {login})\n"
    )
    lock.write_text(text)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    code, stdout, stderr = cli("outdated", path)
    assert (code, stdout) == (2, "")
    why = "HF_HUB_OFFLINE=1 is set, but `merge outdated` asks the Hub what each revision is now"
    assert stderr == (
        f"error: {lock}:{entry_line(lock, 'org/a')}: models[0] (org/a): {why}; unset it\n"
        f"error: {lock}:{line}: models[1] (org/b): {why}; unset it\n"
    )


def test_locked_run_with_the_hub_unreachable(
    hub: HubServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, llama_ft1: Path
) -> None:
    """A locked commit in the cache needs no Hub; one that is not is an error naming the
    recipe line, the lock entry and the commit; nothing is written."""
    path = recipe(tmp_path, "org/a", "org/b")
    assert cli("lock", path)[0] == 0
    lock = tmp_path / "hub.lock"
    cache = tmp_path / "hub-cache"
    # org/a fully cached (run at the commit locked); of org/b only the small files the lock read
    assert cli("run", "-q", recipe(tmp_path, "org/a", name="a.yaml"), tmp_path / "warm")[0] == 0

    real = socket.getaddrinfo

    def getaddrinfo(host: object, *args: object, **kwargs: object) -> object:
        if host == "hub.invalid":
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return real(host, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    use_endpoint(monkeypatch, "https://hub.invalid", cache)
    out = tmp_path / "out"
    code, stdout, stderr = cli("run", "--locked", path, out)
    b = commit_sha("org/b", "main")
    snapshot = cache / "models--org--b" / "snapshots" / b
    why = f"the Hub at https://hub.invalid cannot be reached ({DNS_ERROR})"
    assert (code, stdout) == (2, "")
    assert stderr == (
        f"error: {path}:5: models[1].model: model 'org/b' (locked in {lock}:"
        f"{entry_line(lock, 'org/b')} at {b[:12]}): "
        f"the cached snapshot {snapshot} has no weights and {why}; {STEP}\n"
    )
    assert not out.exists() and not list(tmp_path.glob(".out.*"))


def test_lock_errors(hub: HubServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every model's problem together, exit 2, no lock written."""
    path = recipe(tmp_path, "org/missing", "org/b@nope")
    code, stdout, stderr = cli("lock", path)
    login = "log in with `hf auth login` (or `huggingface-cli login`) or set HF_TOKEN"
    assert (code, stdout) == (2, "")
    assert stderr == (
        f"error: {path}:3: models[0].model: model 'org/missing': repo not found on the Hub "
        f"(if it is private, {login})\n"
        f"error: {path}:5: models[1].model: model 'org/b@nope': revision 'nope' not found in "
        "the repo\n"
    )
    assert not (tmp_path / "hub.lock").exists()

    real = socket.getaddrinfo

    def getaddrinfo(host: object, *args: object, **kwargs: object) -> object:
        if host == "hub.invalid":
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return real(host, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    use_endpoint(monkeypatch, "https://hub.invalid", tmp_path / "hub-cache")
    path = recipe(tmp_path, "org/a", "org/b")
    code, stdout, stderr = cli("lock", path)
    why = f"the Hub at https://hub.invalid cannot be reached ({DNS_ERROR})"
    step = "connect, or set HF_HUB_OFFLINE=1 to lock what the Hugging Face cache holds"
    assert (code, stdout) == (2, "")
    assert stderr == (
        f"error: {path}:3: models[0].model: model 'org/a': {why}; {step}\n"
        f"error: {path}:5: models[1].model: model 'org/b': {why}; {step}\n"
    )
    assert not (tmp_path / "hub.lock").exists()
