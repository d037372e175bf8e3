"""merge.hub against a local Hub-compatible server (tests/hubserver.py), with the real client.

Each test starts a ``HubServer`` on 127.0.0.1, points ``HF_ENDPOINT`` at it and undoes the
session's offline setup (environment and the ``huggingface_hub.constants`` values frozen at
import) with a fresh cache under ``tmp_path``. The server's request log shows exactly which
files the client fetched.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from huggingface_hub import constants
from torch.testing import assert_close

from hubserver import HubServer, commit_sha, use_endpoint
from merge import api
from merge.errors import SourceError
from merge.hub import download_model
from tiny import assert_loads_and_generates, load_state

DECOYS = {
    "pytorch_model.bin": b"not these weights",
    "model.gguf": b"GGUF",
    "training_args.bin": b"args",
    "original/consolidated.00.pth": b"meta weights",
}
CARD = b"---\nlicense: mit\n---\n# tiny\n"  # fetched with the small files: the input card
LOGIN = "log in with `hf auth login` (or `huggingface-cli login`) or set HF_TOKEN"


@pytest.fixture(scope="module")
def tiny_repo(tmp_path_factory: pytest.TempPathFactory, llama_base: Path) -> Path:
    """llama_base plus files a merge must not download (other weight formats, originals)."""
    folder = Path(shutil.copytree(llama_base, tmp_path_factory.mktemp("repo") / "tiny"))
    for name, data in DECOYS.items():
        (folder / name).parent.mkdir(exist_ok=True)
        (folder / name).write_bytes(data)
    (folder / "README.md").write_bytes(CARD)
    return folder


@pytest.fixture
def hub(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    tiny_repo: Path,
    llama_ft1: Path,
    llama_bin: Path,
) -> Iterator[HubServer]:
    """A running server with org/tiny (main, v1), org/bin-only and org/gated; online env."""
    repos = {
        "org/tiny": {"main": tiny_repo, "v1": llama_ft1},
        "org/bin-only": {"main": llama_bin},
        "org/gated": {"main": llama_ft1},
    }
    cache = tmp_path / "hub-cache"
    with HubServer(repos, gated=("org/gated",)) as server:
        use_endpoint(monkeypatch, server.endpoint, cache)
        monkeypatch.chdir(tmp_path)  # no local folder named org/... shadows the Hub ids
        yield server


def same_files(folder: Path, source: Path, card: bool = False) -> None:
    names = sorted(p.name for p in folder.iterdir() if p.name != "README.md" or not card)
    assert names == sorted(p.name for p in source.iterdir() if p.is_file())
    assert (folder / "README.md").is_file() == card
    for name in names:
        assert (folder / name).read_bytes() == (source / name).read_bytes(), name


def test_downloads_one_weight_format_and_metadata(hub: HubServer, llama_base: Path) -> None:
    folder = download_model("org/tiny", None)
    sha = commit_sha("org/tiny", "main")
    assert folder == Path(constants.HF_HUB_CACHE) / "models--org--tiny" / "snapshots" / sha
    same_files(folder, llama_base, card=True)  # no decoy in the snapshot; the card is fetched
    assert (folder / "README.md").read_bytes() == CARD
    wanted = {p.name for p in llama_base.iterdir()}
    assert wanted == {
        "chat_template.jinja",
        "config.json",
        "generation_config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
    }
    assert hub.fetched() == wanted | {"README.md"}
    touched = " ".join(path for _, path in hub.requests)
    for decoy in DECOYS:
        assert f"/resolve/{sha}/{decoy}" not in touched and f"/main/{decoy}" not in touched


def test_bin_only_repo_fetches_the_bin(hub: HubServer, llama_bin: Path) -> None:
    folder = download_model("org/bin-only", None)
    same_files(folder, llama_bin)
    assert "pytorch_model.bin" in hub.fetched("org/bin-only")
    assert not any(n.endswith(".safetensors") for n in hub.fetched())


def test_revision_and_commit_sha(hub: HubServer, llama_ft1: Path) -> None:
    main = download_model("org/tiny", None)
    v1 = download_model("org/tiny", "v1")
    sha = commit_sha("org/tiny", "v1")
    assert v1.name == sha and v1 != main and v1.parent == main.parent
    same_files(v1, llama_ft1)
    assert (v1 / "model.safetensors").read_bytes() != (main / "model.safetensors").read_bytes()
    assert download_model("org/tiny", sha) == v1


def test_offline_after_download_uses_cache_only(
    hub: HubServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    main = download_model("org/tiny", None)
    v1 = download_model("org/tiny", "v1")
    seen = len(hub.requests)
    # Only the variable: merge.hub reads it at call time; huggingface_hub read it at import.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert download_model("org/tiny", None) == main
    assert download_model("org/tiny", "v1") == v1
    assert download_model("org/tiny", commit_sha("org/tiny", "v1")) == v1
    assert len(hub.requests) == seen
    with pytest.raises(SourceError) as info:
        download_model("org/bin-only", None)
    assert str(info.value) == (
        f"model 'org/bin-only': not in the Hugging Face cache ({constants.HF_HUB_CACHE}) and "
        "HF_HUB_OFFLINE=1 is set; download it once online or use a local path"
    )
    assert len(hub.requests) == seen


def test_transformers_offline_also_keeps_us_offline(
    hub: HubServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    main = download_model("org/tiny", None)
    seen = len(hub.requests)
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    assert download_model("org/tiny", None) == main
    with pytest.raises(SourceError, match="and TRANSFORMERS_OFFLINE=1 is set; download it once"):
        download_model("org/bin-only", None)
    assert len(hub.requests) == seen


@pytest.mark.parametrize(
    "repo_id, revision, message",
    [
        ("org/missing", None, f"repo not found on the Hub (if it is private, {LOGIN})"),
        ("org/tiny", "nope", "revision 'nope' not found in the repo"),
        ("org/gated", None, f"gated repo: accept its terms on the Hub, then {LOGIN}"),
    ],
)
def test_errors(hub: HubServer, repo_id: str, revision: str | None, message: str) -> None:
    label = repo_id if revision is None else f"{repo_id}@{revision}"
    with pytest.raises(SourceError) as info:
        download_model(repo_id, revision)
    assert str(info.value) == f"model '{label}': {message}"
    assert hub.requests and not hub.fetched()
    assert not list(Path(constants.HF_HUB_CACHE).glob("*/snapshots/*"))


def test_run_recipe_with_hub_models(
    hub: HubServer, tmp_path: Path, llama_base: Path, llama_ft1: Path
) -> None:
    """Hub refs in a recipe: merged numbers, a loadable output, and Hub ids in the card."""
    recipe = {
        "merge_method": "linear",
        "models": [
            {"model": "org/tiny", "parameters": {"weight": 1.0}},
            {"model": "org/tiny@v1", "parameters": {"weight": 1.0}},
        ],
        "dtype": "float32",
    }
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    out = api.run(path, tmp_path / "out", progress=False)
    a, b, got = load_state(llama_base), load_state(llama_ft1), load_state(out)
    assert got.keys() == a.keys()
    for name, tensor in got.items():
        assert_close(tensor, (a[name] + b[name]) / 2, msg=name)
    assert_loads_and_generates(out)
    card = (out / "README.md").read_text()
    front = yaml.safe_load(card.split("---\n")[1])
    assert front["base_model"] == ["org/tiny"] and front["base_model_relation"] == "merge"
    assert f"revision `v1`, commit `{commit_sha('org/tiny', 'v1')}`" in card
    assert front["license"] == "mit"  # main's card states it, v1 has no card: no disagreement


def test_local_server_counts_as_reachable_probed_once_per_run(
    hub: HubServer, tmp_path: Path
) -> None:
    """Each run probes the Hub once (HEAD on the endpoint, whose 404 is an answer), then
    downloads; the next run probes again."""
    recipe = {
        "merge_method": "linear",
        "models": [
            {"model": m, "parameters": {"weight": 1.0}}
            for m in ("org/tiny", "org/tiny@v1", "org/bin-only")
        ],
    }
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    for run in (1, 2):
        assert sorted(api.plan(path).models) == ["org/bin-only", "org/tiny", "org/tiny@v1"]
        assert hub.requests.count(("HEAD", "/")) == run
    assert "pytorch_model.bin" in hub.fetched("org/bin-only")
