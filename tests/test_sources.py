"""merge.sources and merge.hub: reference syntax, local lookup, and Hub resolution with no network.

Hub tests build a real Hugging Face cache layout (blobs, snapshots with symlinks, refs) and run
huggingface_hub against it offline; online paths are exercised with the Hub calls replaced.
"""

from __future__ import annotations

import hashlib
import types
from pathlib import Path

import huggingface_hub
import pytest
from huggingface_hub import constants
from huggingface_hub import errors as hf_errors

from _ckpt_utils import tiny_state_dict, write_safetensors
from merge.checkpoint import Checkpoint
from merge.errors import SourceError
from merge.hub import download as hub
from merge.sources import ModelRef, resolve, resolve_pair

SHA = "0123456789abcdef0123456789abcdef01234567"
_real_snapshot_download = huggingface_hub.snapshot_download

# --- ModelRef --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, path, revision, lora",
    [
        ("org/name", "org/name", None, None),
        ("org/name@v1.0", "org/name", "v1.0", None),
        ("org/name@refs/pr/3", "org/name", "refs/pr/3", None),
        ("./models/a", "./models/a", None, None),
        ("/abs/model", "/abs/model", None, None),
        ("org/name@rev+org/ad@r2", "org/name", "rev", ModelRef("org/ad", "r2")),
        ("base+adapter", "base", None, ModelRef("adapter")),
    ],
)
def test_parse_round_trip(text: str, path: str, revision: str | None, lora: ModelRef) -> None:
    ref = ModelRef.parse(text)
    assert (ref.path, ref.revision, ref.lora) == (path, revision, lora)
    assert str(ref) == text
    assert ModelRef.parse(str(ref)) == ref


@pytest.mark.parametrize(
    "text, reason",
    [
        ("", "empty model reference"),
        ("   ", "empty model reference"),
        ("a@", "'a@': missing revision after '@'"),
        ("@rev", "'@rev': missing model name before '@'"),
        ("a++b", "'a++b': empty model name around '+'"),
        ("+b", "'+b': empty model name around '+'"),
        ("a+", "'a+': empty model name around '+'"),
        ("a+b+c", "'a+b+c': at most one '+adapter' is allowed"),
        ("a+b@", "'a+b@': missing revision after '@'"),
    ],
)
def test_parse_errors(text: str, reason: str) -> None:
    with pytest.raises(ValueError) as info:
        ModelRef.parse(text)
    assert str(info.value) == reason


@pytest.mark.parametrize(
    "text, expected",
    [
        ("org/name", True),
        ("Org-1/name.v2_x@main", True),
        ("./org/name", False),
        ("../name", False),
        ("/org/name", False),
        ("~/name", False),
        ("a/b/c", False),
        ("name", False),
        ("-org/name", False),
    ],
)
def test_is_hub(text: str, expected: bool) -> None:
    assert ModelRef.parse(text).is_hub is expected


# --- local paths -----------------------------------------------------------------------------


def test_local_relative_to_cwd_and_search_dirs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "cwd" / "models" / "a").mkdir(parents=True)
    (tmp_path / "recipes" / "b").mkdir(parents=True)
    monkeypatch.chdir(tmp_path / "cwd")
    dirs = [tmp_path / "elsewhere", tmp_path / "recipes"]
    assert resolve(ModelRef.parse("models/a")) == tmp_path / "cwd" / "models" / "a"
    assert resolve(ModelRef.parse("./models/a")) == tmp_path / "cwd" / "models" / "a"
    assert resolve(ModelRef.parse("b"), search_dirs=dirs) == tmp_path / "recipes" / "b"
    assert resolve(ModelRef.parse("./b"), search_dirs=dirs) == tmp_path / "recipes" / "b"
    assert resolve(ModelRef.parse(str(tmp_path / "recipes" / "b"))) == tmp_path / "recipes" / "b"


def test_local_wins_over_hub_and_home_is_expanded(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "org" / "name").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(hub, "download_model", lambda *a: pytest.fail("went to the Hub"))
    assert resolve(ModelRef.parse("org/name")) == tmp_path / "org" / "name"
    monkeypatch.setenv("HOME", str(tmp_path))
    assert resolve(ModelRef.parse("~/org/name")) == tmp_path / "org" / "name"


def test_local_errors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "m").mkdir()
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(hub, "download_model", lambda *a: pytest.fail("went to the Hub"))
    cases = {
        "./x": "model './x': local path not found (looked in CWD and /recipes)",
        "a/b/c": "model 'a/b/c': local path not found (looked in CWD and /recipes)",
        "/no/such": "model '/no/such': local path not found (/no/such)",
        "m@v1": f"model 'm@v1': a revision (@v1) applies only to Hub models, but 'm' is a local "
        f"directory ({tmp_path / 'm'})",
        "gpt2": "model 'gpt2': not a local directory (looked in CWD and /recipes) and not a "
        "Hugging Face repo id; use a model folder path or 'org/name' (optionally '@revision')",
    }
    for text, message in cases.items():
        with pytest.raises(SourceError) as info:
            resolve(ModelRef.parse(text), search_dirs=[Path("/recipes")])
        assert str(info.value) == message


def test_lora_resolves_both_sides(tmp_path: Path) -> None:
    (tmp_path / "base").mkdir()
    (tmp_path / "adapter").mkdir()
    ref = ModelRef.parse("./base+./adapter")
    assert resolve_pair(ref, search_dirs=[tmp_path]) == (tmp_path / "base", tmp_path / "adapter")
    assert resolve_pair(ref.base, search_dirs=[tmp_path]) == (tmp_path / "base", None)
    assert resolve(ref, search_dirs=[tmp_path]) == tmp_path / "base"  # config, tokenizer


def test_lora_reports_an_unreachable_side(tmp_path: Path) -> None:
    (tmp_path / "base").mkdir()
    with pytest.raises(SourceError) as info:
        resolve(ModelRef.parse("./base+./adapter"), search_dirs=[tmp_path])
    assert (
        str(info.value)
        == f"adapter './adapter': local path not found (looked in CWD and {tmp_path})"
    )
    with pytest.raises(SourceError) as info:
        resolve_pair(ModelRef.parse("./nope+./adapter@v1"), search_dirs=[tmp_path])
    assert info.value.problems == [
        f"model './nope': local path not found (looked in CWD and {tmp_path})",
        f"adapter './adapter@v1': local path not found (looked in CWD and {tmp_path})",
    ]


# --- the Hub, offline against a locally built cache -------------------------------------------


def build_hf_cache(hub_dir: Path, repo_id: str, source: Path, refs: dict[str, str]) -> Path:
    """Lay out ``source``'s files as huggingface_hub caches them; return the snapshot dir."""
    repo = hub_dir / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo / "snapshots" / SHA
    (repo / "blobs").mkdir(parents=True)
    snapshot.mkdir(parents=True)
    for f in sorted(source.iterdir()):
        data = f.read_bytes()
        digest = hashlib.sha256(data).hexdigest()
        (repo / "blobs" / digest).write_bytes(data)
        (snapshot / f.name).symlink_to(Path("../../blobs") / digest)
    (repo / "refs").mkdir()
    for ref, sha in refs.items():
        (repo / "refs" / ref).write_text(sha)
    return snapshot


@pytest.fixture
def hf_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, Path]:
    """(hub cache dir, snapshot dir of org/name) with HF_HUB_OFFLINE=1."""
    source = write_safetensors(tmp_path / "src", tiny_state_dict())
    (source / "tokenizer.json").write_text("{}")
    cache = tmp_path / "hub"
    snapshot = build_hf_cache(cache, "org/name", source, {"main": SHA, "v1": SHA})
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)
    return cache, snapshot


@pytest.mark.parametrize("text", ["org/name", "org/name@main", "org/name@v1", f"org/name@{SHA}"])
def test_hub_offline_from_cache(hf_cache: tuple[Path, Path], text: str) -> None:
    folder = resolve(ModelRef.parse(text))
    assert folder == hf_cache[1]
    with Checkpoint.open(folder, text) as ckpt:
        assert ckpt.num_layers == 2 and "lm_head.weight" in ckpt.tensors


@pytest.mark.parametrize("text", ["org/other", "org/other@v2", "org/name@v9"])
def test_hub_offline_not_cached(hf_cache: tuple[Path, Path], text: str) -> None:
    with pytest.raises(SourceError) as info:
        resolve(ModelRef.parse(text))
    assert str(info.value) == (
        f"model '{text}': not in the Hugging Face cache ({hf_cache[0]}) and HF_HUB_OFFLINE=1 "
        "is set; download it once online or use a local path"
    )


def test_hub_cache_dir_from_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for key in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_HOME", "XDG_CACHE_HOME"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", "/x")
    assert hub.hub_cache_dir() == Path("/x/huggingface/hub")
    monkeypatch.setenv("HF_HOME", "/h")
    assert hub.hub_cache_dir() == Path("/h/hub")
    monkeypatch.setenv("HF_HUB_CACHE", "/c")
    assert hub.hub_cache_dir() == Path("/c")


# --- the Hub, online paths with the network calls replaced -----------------------------------

LISTING = [
    ".gitattributes",
    "README.md",
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer.model",
    "tokenizer_config.json",
    "model-00001-of-00002.safetensors",
    "model-00002-of-00002.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
    "training_args.bin",
    "model.gguf",
    "model.onnx",
    "flax_model.msgpack",
    "tf_model.h5",
    "consolidated.00.pth",
    "consolidated.safetensors",
    "original/model.safetensors",
    "original/params.json",
]


def test_select_files() -> None:
    assert hub.select_files(LISTING) == [
        "README.md",
        "config.json",
        "generation_config.json",
        "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors",
        "model.safetensors.index.json",
        "tokenizer.json",
        "tokenizer.model",
        "tokenizer_config.json",
    ]
    no_safetensors = [n for n in LISTING if "safetensors" not in n]
    assert hub.select_files(no_safetensors) == [
        "README.md",
        "config.json",
        "generation_config.json",
        "pytorch_model.bin",
        "pytorch_model.bin.index.json",
        "tokenizer.json",
        "tokenizer.model",
        "tokenizer_config.json",
    ]
    assert hub.select_files(["config.json", "model.gguf"]) == []


@pytest.fixture
def online(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> dict:
    """Online mode with list_repo_files/snapshot_download replaced; records the calls."""
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    calls: dict = {"listing": LISTING}

    def list_repo_files(self: object, repo_id: str, revision: str | None = None) -> list[str]:
        if isinstance(calls["listing"], BaseException):
            raise calls["listing"]
        return calls["listing"]

    def snapshot_download(repo_id: str, **kwargs: object) -> str:
        calls["download"] = (repo_id, kwargs)
        return str(tmp_path / "snap")

    monkeypatch.setattr(huggingface_hub.HfApi, "list_repo_files", list_repo_files)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    return calls


def test_online_downloads_only_what_is_needed(online: dict, tmp_path: Path) -> None:
    assert hub.download_model("org/name", "v1") == tmp_path / "snap"
    repo_id, kwargs = online["download"]
    assert repo_id == "org/name" and kwargs["revision"] == "v1"
    assert kwargs["cache_dir"] == tmp_path / "hub"
    assert kwargs["allow_patterns"] == hub.select_files(LISTING)


def hf_error(cls: type[Exception], status: int = 404) -> Exception:
    """An instance of a huggingface_hub HTTP error without a real HTTP response."""
    error = cls.__new__(cls)
    Exception.__init__(error, f"{status} Client Error\nmore details")
    error.response = types.SimpleNamespace(status_code=status)  # type: ignore[attr-defined]
    return error


LOGIN = "log in with `hf auth login` (or `huggingface-cli login`) or set HF_TOKEN"
GATED = f"gated repo: accept its terms on the Hub, then {LOGIN}"
NOT_FOUND = f"repo not found on the Hub (if it is private, {LOGIN})"


@pytest.mark.parametrize(
    "error, message",
    [
        (hf_error(hf_errors.GatedRepoError, 403), GATED),
        (hf_error(hf_errors.RepositoryNotFoundError), NOT_FOUND),
        (hf_error(hf_errors.RevisionNotFoundError), "revision 'v1' not found in the repo"),
        (hf_error(hf_errors.HfHubHTTPError, 401), f"access denied by the Hub; {LOGIN}"),
        (hf_error(hf_errors.HfHubHTTPError, 500), "Hub request failed: 500 Client Error"),
    ],
)
def test_online_errors(online: dict, error: Exception, message: str) -> None:
    online["listing"] = error
    with pytest.raises(SourceError) as info:
        hub.download_model("org/name", "v1")
    assert str(info.value) == f"model 'org/name@v1': {message}"


def test_online_no_weights(online: dict) -> None:
    online["listing"] = ["config.json", "model.gguf"]
    with pytest.raises(SourceError, match="model 'org/name': the repo has no safetensors"):
        hub.download_model("org/name", None)
    assert "download" not in online


def test_unreachable_hub_falls_back_to_cache(
    online: dict, hf_cache: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", _real_snapshot_download)
    online["listing"] = ConnectionError("connection refused")
    assert hub.download_model("org/name", "v1") == hf_cache[1]
    with pytest.raises(SourceError) as info:
        hub.download_model("org/other", None)
    assert str(info.value) == (
        f"model 'org/other': not in the Hugging Face cache ({hf_cache[0]}) and the Hub at "
        f"{constants.ENDPOINT} cannot be reached (ConnectionError: connection refused); "
        "download it once online, use a local path, or set HF_HUB_OFFLINE=1 to use only the cache"
    )


def test_select_files_takes_every_tokenizer_file_the_output_copies() -> None:
    """WordPiece (vocab.txt) and SentencePiece (spiece.model) tokenizers are fetched too."""
    from merge.hub import select_files
    from merge.tokenizer import TOKENIZER_FILES

    listing = ["model.safetensors", "config.json", *TOKENIZER_FILES, "README.md", "x.gguf"]
    chosen = select_files(listing)
    assert set(TOKENIZER_FILES) <= set(chosen)
    assert "README.md" in chosen and "x.gguf" not in chosen  # the card: license, language...
