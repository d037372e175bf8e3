"""``merge publish`` and ``--push-to-hub``, through the real huggingface_hub client against
tests/hubupload.py: a merge of two Hub models is published and read back byte-equal; an
unchanged output uploads nothing; a changed input uploads only the changed shards; pull
requests, branches, --delete-extra; an interrupted upload resumes on rerun; every error is one
line with exit 2 and publishes nothing."""

from __future__ import annotations

import hashlib
import importlib
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from huggingface_hub import HfApi, constants, snapshot_download
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from hubserver import use_endpoint
from hubupload import Account, UploadHub
from merge.build.manifest import MANIFEST_NAME
from merge.card.render import HUB_URL
from merge.cli import app
from tiny import make_tiny

WRITE, READ = "hf_write_token", "hf_read_token"


def cli(*args: str | Path) -> tuple[int, str, str]:
    result = CliRunner().invoke(app, [str(a) for a in args])
    if result.exception and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result.exit_code, result.stdout, result.stderr


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def files_of(folder: Path) -> dict[str, bytes]:
    return {
        p.relative_to(folder).as_posix(): p.read_bytes()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and ".cache" not in p.parts
    }


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A base, a fine-tune, and the fine-tune with only layer 1 changed (3.4 MB each, so a
    1MB shard size gives several shards, of which only some hold layer 1)."""
    root = tmp_path_factory.mktemp("publish-models")
    base = make_tiny(root / "base", seed=0, layers=2, hidden=192)
    ft = make_tiny(root / "ft", seed=1, layers=2, hidden=192, noise_from=base)
    moved = Path(shutil.copytree(ft, root / "ft-moved"))
    state = load_file(moved / "model.safetensors")
    for name in state:
        if ".layers.1." in name:
            state[name] = state[name] * 1.5
    save_file(state, moved / "model.safetensors", metadata={"format": "pt"})
    cards = {
        base: "license: apache-2.0\nlanguage: [en]\n",
        ft: "license: apache-2.0\nlanguage: [en]\ndatasets: [org/chat]\n",
        moved: "license: apache-2.0\nlanguage: [en]\ndatasets: [org/chat]\n",
    }
    for folder, meta in cards.items():  # the inputs' own model cards
        (folder / "README.md").write_text(f"---\n{meta}---\n\n# A tiny model\n")
    return {"base": base, "ft": ft, "moved": moved}


@pytest.fixture
def hub(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, models: dict[str, Path]
) -> Iterator[UploadHub]:
    tokens = {WRITE: Account("alice", orgs=("team",)), READ: Account("bob", ("team",), False)}
    repos = {"org/a": {"main": models["base"]}, "org/b": {"main": models["ft"]}}
    with UploadHub(repos, tmp_path / "hub-store", tokens) as server:
        use_endpoint(monkeypatch, server.endpoint, tmp_path / "hub-cache")
        monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no-saved-token"))
        monkeypatch.setattr(constants, "HF_STORED_TOKENS_PATH", str(tmp_path / "no-tokens"))
        monkeypatch.setenv("HF_TOKEN", WRITE)
        monkeypatch.chdir(tmp_path)
        yield server


@pytest.fixture
def recipe(tmp_path: Path) -> Path:
    path = tmp_path / "pub.yaml"
    path.write_text(
        "merge_method: linear\nbase_model: org/a\nmodels:\n"
        "  - model: org/a\n    parameters: {weight: 0.5}\n"
        "  - model: org/b\n    parameters: {weight: 0.5}\n"
        "dtype: float32\n"
    )
    return path


@pytest.fixture
def out(hub: UploadHub, recipe: Path, tmp_path: Path) -> Path:
    out = tmp_path / "out"
    code, _, stderr = cli("run", "-q", recipe, out, "--out-shard-size", "1MB")
    assert code == 0, stderr
    return out


def download(repo_id: str, revision: str = "main") -> Path:
    """The repo's files at ``revision`` but the Hub's own .gitattributes, from the server."""
    return Path(snapshot_download(repo_id, revision=revision, ignore_patterns=".gitattributes"))


def test_publish_story(
    hub: UploadHub, recipe: Path, out: Path, tmp_path: Path, models: dict[str, Path]
) -> None:
    shards = sorted(p.name for p in out.glob("model-*.safetensors"))
    assert len(shards) >= 3

    # First publish: the repo is created, every file uploaded in one commit.
    code, stdout, stderr = cli("publish", "-q", out, "team/merged")
    assert code == 0, stderr
    assert stdout.startswith(f"published to {hub.endpoint}/team/merged (main): ")
    assert f"({len(files_of(out))} uploaded, 0 unchanged)" in stdout
    message = f"Upload merge output ({len(files_of(out))} files)"
    assert [c.message for c in hub.commits] == ["initial commit", message]
    assert sorted(hub.received) == sorted(sha256(out / s) for s in shards)

    # Read back: every file byte-equal, and merge verify holds for the download.
    back = download("team/merged")
    assert files_of(back) == files_of(out)
    assert cli("verify", "-q", back)[0] == 0
    card = (back / "README.md").read_text()
    front = yaml.safe_load(card.split("---\n")[1])
    assert front["base_model"] == ["org/a", "org/b"]
    assert front["base_model_relation"] == "merge"
    assert front["library_name"] == "transformers"
    assert front["tags"] == ["merge", "mergesmith", "linear"]
    assert front["pipeline_tag"] == "text-generation"  # from LlamaForCausalLM
    assert front["license"] == "apache-2.0"  # both input cards agree
    assert front["language"] == ["en"]
    assert "datasets" not in front  # org/a states none: the merge's datasets are not known
    for repo in ("org/a", "org/b"):
        commit = hub.names[repo]["main"]
        assert f"[{repo}]({HUB_URL}/{repo})" in card and commit in card
    assert "pip install mergesmith==" in card and "merge run merge-recipe.yaml" in card

    # Unchanged: nothing uploaded, no commit.
    commits, received = len(hub.commits), list(hub.received)
    code, stdout, stderr = cli("publish", out, "team/merged")
    assert code == 0, stderr
    assert stdout == (
        f"{hub.endpoint}/team/merged: already up to date (0 uploaded, "
        f"{len(files_of(out))} unchanged); nothing uploaded\n"
    )
    assert (len(hub.commits), hub.received) == (commits, received)

    # One input moves upstream (layer 1 only): rebuild and publish only the changed shards.
    before = {s: sha256(out / s) for s in shards}
    assert cli("lock", "-q", recipe)[0] == 0
    hub.push("org/b", models["moved"])
    code, stdout, stderr = cli(
        "rebuild", "-q", recipe, out, "--out-shard-size", "1MB", "--push-to-hub", "team/merged"
    )
    assert code == 0, stderr
    changed = {s for s in shards if sha256(out / s) != before[s]}
    assert stdout.startswith(f"rebuilt {out} (org/b: the default branch moved")
    assert stdout.endswith(
        f"files verify; published to {hub.endpoint}/team/merged (main): {hub.endpoint}/team/"
        f"merged/commit/{hub.commits[-1].sha} ({len(changed) + 3} uploaded, "
        f"{len(files_of(out)) - len(changed) - 3} unchanged)\n"
    )
    changed = {s for s in shards if sha256(out / s) != before[s]}
    assert changed and changed != set(shards)
    assert sorted(hub.received[len(received) :]) == sorted(sha256(out / s) for s in changed)
    assert len(hub.commits) == commits + 1
    # the card (new commit of org/b), the manifest and the lock now copied beside the recipe
    small = {"README.md", MANIFEST_NAME, "merge-recipe.lock"}
    assert hub.commits[-1].changed == sorted(small | changed)
    assert files_of(download("team/merged")) == files_of(out)


def test_create_pr_opens_a_pull_request_ref(hub: UploadHub, out: Path) -> None:
    code, stdout, stderr = cli("publish", out, "team/pr", "--create-pr", "--commit-message", "m1")
    assert code == 0, stderr
    url = f"{hub.endpoint}/team/pr/discussions/1"
    assert stdout.startswith(f"opened pull request {url} (")
    assert hub.commits[-1].ref == "refs/pr/1" and hub.commits[-1].message == "m1"
    assert files_of(download("team/pr", revision="refs/pr/1")) == files_of(out)
    assert HfApi().list_repo_files("team/pr") == [".gitattributes"]  # main untouched


def test_create_pr_needs_an_existing_revision(hub: UploadHub, out: Path) -> None:
    code, stdout, stderr = cli("publish", out, "team/pr", "--create-pr", "--revision", "dev")
    assert (code, stdout) == (2, "")
    assert stderr == (
        "error: publish to team/pr: revision 'dev' does not exist; a pull request needs an "
        "existing branch: create it, or publish without --create-pr\n"
    )
    assert [c.repo for c in hub.commits] == ["team/pr"]  # the repo's own first commit only


def test_a_missing_branch_is_created(hub: UploadHub, out: Path) -> None:
    code, stdout, stderr = cli("publish", "-q", out, "alice/m", "--revision", "dev", "--private")
    assert code == 0, stderr
    assert "alice/m (dev): " in stdout
    assert files_of(download("alice/m", revision="dev")) == files_of(out)
    assert HfApi().list_repo_files("alice/m") == [".gitattributes"] and "alice/m" in hub.private


@pytest.mark.parametrize(
    ("env", "args", "message"),
    [
        (None, (), "no Hugging Face token: set HF_TOKEN or run `hf auth login` (or pass --token)"),
        (
            "hf_unknown",
            (),
            "publish to team/x: the token was rejected (invalid or expired); set HF_TOKEN or run "
            "`hf auth login` with a valid token",
        ),
        (
            READ,
            (),
            "publish to team/x: the token may not write to 'team' (read-only token, or not a "
            "member of that org); use a token with write access there",
        ),
        (
            None,
            ("--token", WRITE, "--private"),
            "publish to other/x: the token may not write to 'other' (read-only token, or not a "
            "member of that org); use a token with write access there",
        ),
    ],
    ids=["no-token", "bad-token", "read-only", "foreign-org"],
)
def test_token_errors_publish_nothing(
    hub: UploadHub,
    out: Path,
    monkeypatch: pytest.MonkeyPatch,
    env: str | None,
    args: tuple[str, ...],
    message: str,
) -> None:
    if env is None:
        monkeypatch.delenv("HF_TOKEN")
    else:
        monkeypatch.setenv("HF_TOKEN", env)
    repo = "other/x" if "--token" in args else "team/x"
    code, stdout, stderr = cli("publish", out, repo, *args)
    assert (code, stdout, stderr) == (2, "", f"error: {message}\n")
    assert (hub.commits, hub.received, repo in hub.repos) == ([], [], False)


def test_no_token_fails_before_the_build(
    hub: UploadHub, recipe: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("HF_TOKEN")
    for command in ("run", "rebuild"):
        code, _, stderr = cli(command, recipe, tmp_path / "o", "--push-to-hub", "team/x")
        assert (code, stderr) == (
            2,
            "error: no Hugging Face token: set HF_TOKEN or run `hf auth login` (or pass --token)\n",
        )
        assert not (tmp_path / "o").exists() and not hub.fetched()
    assert not (tmp_path / "pub.lock").exists()


def test_run_push_to_hub(hub: UploadHub, recipe: Path, tmp_path: Path) -> None:
    out = tmp_path / "o"
    code, stdout, stderr = cli("run", recipe, out, "--push-to-hub", "team/run")
    assert code == 0, stderr
    assert f"published to {hub.endpoint}/team/run (main): " in stderr
    assert files_of(download("team/run")) == files_of(out)


def test_a_failing_verify_publishes_nothing(hub: UploadHub, out: Path) -> None:
    (out / "config.json").write_text("{}")
    code, stdout, stderr = cli("publish", out, "team/x")
    assert (code, stdout) == (2, "")
    assert stderr == (
        f"error: {out} fails verify (config.json: size 2 bytes, the manifest says 715); "
        f"nothing was published: run `merge verify {out}` and rebuild it\n"
    )
    assert (hub.commits, "team/x" in hub.repos) == ([], False)


def test_extra_files_are_deleted_only_when_asked(hub: UploadHub, out: Path) -> None:
    hub.create("team/d", private=False)
    _, folder = hub.snapshot("team/d", "main")
    hub.commit("team/d", "main", "old", {"old.bin": b"x" * 10, "notes.txt": b"hi"}, [], folder)
    assert cli("publish", "-q", out, "team/d")[0] == 0
    assert {"old.bin", "notes.txt"} <= set(files_of(download("team/d")))
    code, stdout, stderr = cli("publish", out, "team/d", "--delete-extra")
    assert code == 0, stderr
    assert f"(0 uploaded, {len(files_of(out))} unchanged, 2 deleted)" in stdout
    assert hub.commits[-1].deleted == ["notes.txt", "old.bin"]
    assert files_of(download("team/d")) == files_of(out)


def test_an_interrupted_upload_resumes_on_rerun(
    hub: UploadHub, out: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The server drops the connection in the middle of one shard's body, more often than the
    client retries: the publish fails with one line and no commit; the rerun sends that shard
    only, not the shards that had arrived."""
    import huggingface_hub.utils._http as http

    monkeypatch.setattr(http.time, "sleep", lambda s: None)  # the client's retry backoff
    shards = sorted(out.glob("model-*.safetensors"))
    victim = sha256(shards[1])
    hub.drop[victim] = 100
    code, stdout, stderr = cli("publish", "-q", out, "team/r")
    assert (code, stdout) == (2, "")
    assert stderr.startswith("error: publish to team/r: network failure (")
    assert stderr.endswith(
        "check your connection, then nothing was committed; rerun the same command to resume "
        "(uploaded files are kept)\n"
    )
    assert len(stderr.splitlines()) == 1 and hub.drop[victim] > 0
    assert [c.message for c in hub.commits] == ["initial commit"]
    arrived = set(hub.received)
    assert arrived == {sha256(s) for s in shards} - {victim}

    hub.drop.clear()
    puts = hub.blob_puts
    code, stdout, stderr = cli("publish", "-q", out, "team/r")
    assert code == 0, stderr
    assert hub.received[len(arrived) :] == [victim] and hub.blob_puts == puts + 1
    assert files_of(download("team/r")) == files_of(out)


def test_a_connection_dropped_once_is_retried_by_the_client(
    hub: UploadHub, out: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import huggingface_hub.utils._http as http

    monkeypatch.setattr(http.time, "sleep", lambda s: None)
    shard = sorted(out.glob("model-*.safetensors"))[0]
    hub.drop[sha256(shard)] = 1
    code, _, stderr = cli("publish", "-q", out, "team/once")
    assert code == 0, stderr
    assert hub.drop[sha256(shard)] == 0 and hub.received.count(sha256(shard)) == 1
    assert files_of(download("team/once")) == files_of(out)


def test_a_folder_that_is_no_merge_output_is_refused(hub: UploadHub, tmp_path: Path) -> None:
    (tmp_path / "plain").mkdir()
    code, stdout, stderr = cli("publish", tmp_path / "plain", "team/x")
    assert (code, stdout) == (2, "")
    assert stderr.startswith(f"error: {tmp_path / 'plain'}: no {MANIFEST_NAME}; ")
    assert stderr.endswith("; nothing was published\n") and len(stderr.splitlines()) == 1
    assert "team/x" not in hub.repos


def test_a_server_error_is_one_line_and_commits_nothing(
    hub: UploadHub, out: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import huggingface_hub.utils._http as http

    monkeypatch.setattr(http.time, "sleep", lambda s: None)
    hub.fail_commits = 1
    code, stdout, stderr = cli("publish", "-q", out, "team/e")
    assert (code, stdout) == (2, "")
    assert stderr.startswith("error: publish to team/e: the Hub failed (Server error '500 ")
    assert stderr.endswith("rerun the same command to resume (uploaded files are kept)\n")
    assert len(stderr.splitlines()) == 1
    assert [c.message for c in hub.commits] == ["initial commit"]
    blobs = len(hub.received)
    assert cli("publish", "-q", out, "team/e")[0] == 0
    assert len(hub.received) == blobs  # the blobs of the failed publish were not sent again
    assert files_of(download("team/e")) == files_of(out)


def test_a_branch_that_moved_meanwhile_is_not_overwritten(
    hub: UploadHub, out: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Someone pushes between the comparison and the commit: the Hub refuses the commit, whose
    parent is the compared head, and the error says to rerun."""
    pub = importlib.import_module("merge.hub.publish")  # merge.hub.publish is the function
    compare = pub._operations

    def push_meanwhile(*args: object) -> list:
        ops = compare(*args)  # type: ignore[arg-type]
        _, folder = hub.snapshot("team/m", "main")
        hub.commit("team/m", "main", "theirs", {"theirs.txt": b"x"}, [], folder)
        return ops

    hub.create("team/m", private=False)
    monkeypatch.setattr(pub, "_operations", push_meanwhile)
    code, stdout, stderr = cli("publish", "-q", out, "team/m")
    assert (code, stdout) == (2, "")
    assert stderr == (
        "error: publish to team/m: 'main' moved while publishing (someone else pushed); nothing "
        "was committed: rerun to compare with the new head\n"
    )
    assert [c.message for c in hub.commits] == ["initial commit", "theirs"]
