"""tests/hubupload.py on its own, through the real huggingface_hub client: the answers that
uploads rely on (token checks with the Hub's errors, 409 on an existing repo, blobs kept
across commits, pull request refs), so a publish test failing points at publish, not at the
server."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from huggingface_hub import CommitOperationAdd, CommitOperationDelete, HfApi, hf_hub_download
from huggingface_hub import errors as hf

from hubserver import use_endpoint
from hubupload import GITATTRIBUTES, Account, UploadHub

TOKENS = {"w": Account("alice", orgs=("team",)), "r": Account("bob", write=False)}


@pytest.fixture
def hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[UploadHub]:
    with UploadHub({}, tmp_path / "store", TOKENS) as server:
        use_endpoint(monkeypatch, server.endpoint, tmp_path / "cache")
        yield server


def test_whoami_and_token_checks(hub: UploadHub) -> None:
    api = HfApi(endpoint=hub.endpoint)
    me = api.whoami(token="w")
    assert (me["name"], [o["name"] for o in me["orgs"]]) == ("alice", ["team"])
    assert api.whoami(token="r")["auth"]["accessToken"]["role"] == "read"
    with pytest.raises(hf.HfHubHTTPError) as no_token:
        api.create_repo("team/x", token=False)
    assert no_token.value.response.status_code == 401
    for token, repo in (("r", "bob/x"), ("w", "other/x")):
        with pytest.raises(hf.HfHubHTTPError) as denied:
            api.create_repo(repo, token=token)
        assert denied.value.response.status_code == 403
    assert hub.repos == {}


def test_repos_commits_blobs_and_pull_requests(hub: UploadHub, tmp_path: Path) -> None:
    api = HfApi(endpoint=hub.endpoint, token="w")
    url = api.create_repo("team/m", private=True)
    assert url == f"{hub.endpoint}/team/m" and "team/m" in hub.private
    assert api.create_repo("team/m", exist_ok=True) == url
    with pytest.raises(hf.HfHubHTTPError):
        api.create_repo("team/m")

    weights = b"\x01" * 3000
    ops = [
        CommitOperationAdd("model.safetensors", weights),
        CommitOperationAdd("config.json", b"{}"),
    ]
    info = api.create_commit("team/m", ops, commit_message="first")
    assert len(hub.received) == 1 and hub.commits[-1].changed == [
        "config.json",
        "model.safetensors",
    ]
    file = hf_hub_download("team/m", "model.safetensors", revision=info.oid)
    assert Path(file).read_bytes() == weights
    listing = {f.path: f for f in api.list_repo_tree("team/m", recursive=True)}
    assert listing["model.safetensors"].lfs.size == 3000  # type: ignore[union-attr]
    assert (tmp_path / "store" / "blobs").is_dir()

    # The same blob again: no upload. A pull request gets refs/pr/1 and its URL.
    again = [CommitOperationAdd("copy.safetensors", weights), CommitOperationDelete("config.json")]
    pr = api.create_commit("team/m", again, commit_message="pr", create_pr=True)
    assert pr.pr_url == f"{hub.endpoint}/team/m/discussions/1"
    assert len(hub.received) == 1 and hub.commits[-1].ref == "refs/pr/1"
    assert sorted(api.list_repo_files("team/m", revision="refs/pr/1")) == [
        ".gitattributes",
        "copy.safetensors",
        "model.safetensors",
    ]
    assert "config.json" in api.list_repo_files("team/m")  # main unchanged
    gitattributes = hf_hub_download("team/m", ".gitattributes")
    assert Path(gitattributes).read_bytes() == GITATTRIBUTES

    api.create_branch("team/m", branch="dev")
    with pytest.raises(hf.HfHubHTTPError):
        api.create_branch("team/m", branch="dev")
    api.create_branch("team/m", branch="dev", exist_ok=True)
    assert api.list_repo_files("team/m", revision="dev") == api.list_repo_files("team/m")
